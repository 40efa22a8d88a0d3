"""fastkd.integrations.trl's trainers against TRL's own loss on the same batch: the
DistillationTrainer subclass against TRL's chunked loss (``trl.DistillationTrainer._compute_loss``),
the GKDTrainer subclass against TRL's ``GKDTrainer.compute_loss`` (``generalized_jsd_loss`` on the
models' logits); loss, entropy metric, token count and student gradients. Tiny random models, a
word-level tokenizer built here, a temporary output folder: nothing is downloaded."""

import math
import os

import pytest
import torch

from reference import rel_err, row_losses

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install fastkd[hf])")
trl = pytest.importorskip("trl", reason="trl is not installed (pip install fastkd[hf])")
pytest.importorskip("datasets", reason="datasets is not installed (pip install fastkd[hf])")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from fastkd.integrations import trl as fastkd_trl  # noqa: E402

VOCAB = 300
TOLERANCE = 2e-5  # fp32 models: both losses accumulate in fp32


def _tokenizer():
    vocab = {f"w{i}": i for i in range(1, VOCAB)}
    vocab["<pad>"] = 0
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="w2",
                                                padding_side="left")


def _model(hidden, softcap=None, vocab=VOCAB, logit_std=20.0):
    if softcap is None:
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    else:
        config = transformers.Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8, final_logit_softcapping=softcap)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # logits of tens, as trained models have
        model.get_output_embeddings().weight.normal_(0, logit_std / hidden ** 0.5)
    return model


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def distillation(tmp_path):
    def build(beta=0.5, temperature=2.0, softcap=None, fastkd_options=None):
        args = trl.DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                                      per_device_train_batch_size=2, max_completion_length=5, beta=beta,
                                      temperature=temperature)
        dataset = Dataset.from_dict({"prompt": ["w3 w4 w5", "w6 w7"]})
        return fastkd_trl.DistillationTrainer(model=_model(32, softcap), teacher_model=_model(48, softcap), args=args,
                                              train_dataset=dataset, processing_class=_tokenizer(),
                                              fastkd_options=fastkd_options)
    return build


def _completion_batch(batch_size=2, prompt=4, completion=5):
    prompt_mask = torch.ones(batch_size, prompt, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_mask = torch.ones(batch_size, completion, dtype=torch.long)
    completion_mask[1, -2:] = 0  # stopped early
    return {"prompt_ids": torch.randint(1, VOCAB, (batch_size, prompt)), "prompt_mask": prompt_mask,
            "completion_ids": torch.randint(1, VOCAB, (batch_size, completion)), "completion_mask": completion_mask}


def _trl_and_fastkd(trainer, inputs, num_items=None):
    """(TRL's (loss, entropy sum, n), its student gradients, fastkd's, its gradients)."""
    student = trainer.accelerator.unwrap_model(trainer.model)
    theirs = trl.DistillationTrainer._compute_loss(trainer, student, inputs, num_items)
    theirs[0].backward()
    their_grads = _grads(student)
    student.zero_grad(set_to_none=True)
    ours = trainer._compute_loss(student, inputs, num_items)
    ours[0].backward()
    return theirs, their_grads, ours, _grads(student)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_distillation_trainer_matches_trls_chunked_loss(distillation, beta, softcap):
    trainer = distillation(beta=beta, softcap=softcap)
    theirs, their_grads, ours, grads = _trl_and_fastkd(trainer, _completion_batch())
    assert rel_err(ours[0], theirs[0]) < TOLERANCE
    assert rel_err(ours[1], theirs[1]) < TOLERANCE  # summed entropy at the temperature
    assert int(ours[2]) == int(theirs[2]) == 8
    assert grads.keys() == their_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, their_grads[name]) < 1e-4, name


def test_distillation_trainer_num_items_and_compute_loss(distillation):
    trainer = distillation()
    inputs = _completion_batch()
    theirs, _, ours, _ = _trl_and_fastkd(trainer, inputs, torch.tensor(13.0))
    assert rel_err(ours[0], theirs[0]) < TOLERANCE
    trainer.model.train()
    inputs["num_items_in_batch"] = torch.tensor(13.0)
    loss = trainer.compute_loss(trainer.model, inputs)  # TRL's compute_loss around our _compute_loss
    assert rel_err(loss, theirs[0]) < TOLERANCE
    assert trainer._metrics["train"]["entropy"] == [pytest.approx(float(theirs[1]) / 8, rel=1e-5)]


@pytest.mark.parametrize("options,beta", [({"divergence": "reverse_kl"}, 1.0),
                                          ({"teacher_top_k": VOCAB, "divergence": "forward_kl"}, 0.0),
                                          ({"teacher_top_k": VOCAB}, 0.5),  # JSD on a whole-vocabulary top-k
                                          ({"divergence": "forward_kl", "backend": "torch"}, 0.0)])
def test_fastkd_options_reach_the_loss(distillation, options, beta):
    trainer = distillation(beta=0.5, fastkd_options=options)
    reference = distillation(beta=beta)
    reference.model.load_state_dict(trainer.model.state_dict())
    reference.teacher_model.load_state_dict(trainer.teacher_model.state_dict())
    inputs = _completion_batch()
    theirs, _, _, _ = _trl_and_fastkd(reference, inputs)
    ours = trainer._compute_loss(trainer.model, inputs, None)
    assert rel_err(ours[0], theirs[0]) < TOLERANCE


def test_distillation_trainer_other_divergence_against_the_formula(distillation):
    trainer = distillation(temperature=1.5, fastkd_options={"divergence": "skew_reverse_kl", "skew": 0.2})
    inputs = _completion_batch()
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = [m(input_ids=input_ids, attention_mask=attention_mask).logits[:, -6:-1].double().detach()
              for m in (trainer.model, trainer.teacher_model)]
    rows = row_losses("skew_reverse_kl", *logits, temperature=1.5, skew=0.2)
    keep = inputs["completion_mask"] != 0
    reference = torch.where(keep, rows, torch.zeros_like(rows)).sum() / keep.sum()
    assert rel_err(trainer._compute_loss(trainer.model, inputs, None)[0], reference) < TOLERANCE


def test_unknown_option_is_a_clear_error(distillation):
    with pytest.raises(ValueError, match="fastkd_options"):
        distillation(fastkd_options={"divergance": "jsd"})
    with pytest.raises(ValueError, match="teacher_top_k"):
        distillation(beta=0.5, fastkd_options={"teacher_top_k": 8, "divergence": "skew_forward_kl"})


@pytest.fixture
def gkd(tmp_path):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig

    def build(beta=0.5, fastkd_options=None):
        args = GKDConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, beta=beta, lmbda=0.0,
                         per_device_train_batch_size=2)
        dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": "w3"}]] * 2})
        # Logits of a few units: two random models' JSD at ±20 sits at its ln 2 plateau, where the
        # gradient is fp32 rounding noise in TRL's eager loss.
        return fastkd_trl.GKDTrainer(model=_model(32, logit_std=4.0), teacher_model=_model(48, logit_std=4.0),
                                     args=args, train_dataset=dataset,
                                     processing_class=_tokenizer(), data_collator=lambda rows: rows,
                                     fastkd_options=fastkd_options)
    return build


def _gkd_batch(batch_size=2, length=9):
    input_ids = torch.randint(1, VOCAB, (batch_size, length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_items", [None, 11])
def test_gkd_trainer_matches_generalized_jsd_loss(gkd, beta, num_items):
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    trainer = gkd(beta=beta)
    assert isinstance(trainer, TRLGKDTrainer)
    inputs = _gkd_batch()
    theirs = TRLGKDTrainer.compute_loss(trainer, trainer.model, inputs, num_items_in_batch=num_items)
    theirs.backward()
    their_grads = _grads(trainer.model)
    trainer.model.zero_grad(set_to_none=True)
    ours = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=num_items)
    ours.backward()
    assert rel_err(ours, theirs) < TOLERANCE
    grads = _grads(trainer.model)
    assert grads.keys() == their_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, their_grads[name]) < 1e-4, name
    loss, outputs = trainer.compute_loss(trainer.model, inputs, return_outputs=True)  # TRL's eager path
    assert outputs.logits.shape == (2, 9, VOCAB)


def test_distillation_trainer_trains(tmp_path):
    # The whole loop: TRL's generation, our loss, TRL's metrics, the optimizer step.
    args = trl.DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                                  per_device_train_batch_size=2, max_completion_length=4, max_steps=2,
                                  logging_steps=1, save_strategy="no")
    trainer = fastkd_trl.DistillationTrainer(model=_model(32), teacher_model=_model(48), args=args,
                                             train_dataset=Dataset.from_dict({"prompt": ["w3 w4", "w5", "w6", "w7"]}),
                                             processing_class=_tokenizer(), fastkd_options={"backend": "torch"})
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) and entry["entropy"] > 0 for entry in logs)
    assert not torch.equal(before, trainer.model.lm_head.weight)


def test_gkd_trainer_trains(gkd):
    def collate(rows):
        input_ids = torch.tensor([row["input_ids"] for row in rows])
        labels = input_ids.clone()
        labels[:, :3] = -100
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    trainer = gkd()
    trainer.args.max_steps, trainer.args.logging_steps, trainer.args.save_strategy = 2, 1, "no"
    trainer.data_collator = collate
    trainer.train_dataset = Dataset.from_dict({"input_ids": [[3, 4, 5, 6, 7, 8]] * 4})
    calls = []
    fused_loss = trainer._fused_loss
    trainer._fused_loss = lambda *args: calls.append(1) or fused_loss(*args)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert len(calls) == 2  # the fused loss, not TRL's eager one
