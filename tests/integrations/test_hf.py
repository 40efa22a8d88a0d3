"""fastkd.integrations.hf against the eager loss on the models' own logits (model(...).logits, then
an independent float64 formula from tests/reference.py), for tiny random Llama-, Gemma-2-,
Gemma-3- and Granite-style models: tied and untied heads, soft-capped and scaled logits, a padded
vocabulary, ignored tokens; loss and every student parameter's gradient."""

import copy
import types

import pytest
import torch

from conftest import DEVICE
from reference import rel_err, row_losses

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install fastkd[hf])")

from fastkd.integrations import hf  # noqa: E402

VOCAB = 300  # the real vocabulary; a padded head has 320 rows
LOGIT_STD = 40.0  # the heads are rescaled so logits reach ±100, as trained models' do


def _llama(vocab, hidden, tied):
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)


def _gemma2(vocab, hidden, tied):
    return transformers.Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     final_logit_softcapping=30.0, tie_word_embeddings=tied)


def _gemma3(vocab, hidden, tied):
    return transformers.Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, final_logit_softcapping=50.0, tie_word_embeddings=tied)


def _granite(vocab, hidden, tied):
    return transformers.GraniteConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0,
                                      tie_word_embeddings=tied)


def _model(config, dtype=torch.float64):
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).to(DEVICE, dtype)
    with torch.no_grad():  # logits of ±100: a unit-variance final norm times a head of std LOGIT_STD / √H
        head = model.get_output_embeddings().weight
        head.normal_(0, LOGIT_STD / config.hidden_size ** 0.5)
    return model.eval()


def _batch(batch_size=2, length=9, vocab=VOCAB):
    input_ids = torch.randint(0, vocab, (batch_size, length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[1, :3] = -100  # a prompt
    return {"input_ids": input_ids.to(DEVICE), "attention_mask": attention_mask.to(DEVICE), "labels": labels.to(DEVICE)}


def _eager(student, teacher, batch, divergence, temperature=1.0, beta=0.5, num_items=None, vocab=VOCAB):
    """The loss on the models' logits, shifted as HF shifts them, by the float64 formula."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    student_logits = student(**kwargs).logits[:, :-1, :vocab].double()
    with torch.no_grad():
        teacher_logits = teacher(**kwargs).logits[:, :-1, :vocab].double()
    keep = batch["labels"][:, 1:] != -100
    rows = row_losses(divergence, student_logits, teacher_logits, temperature, beta)
    total = torch.where(keep, rows, torch.zeros_like(rows)).sum()
    return total / (keep.sum() if num_items is None else num_items)


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _check(student, teacher, batch, tolerance, divergence="forward_kl", num_items=None, vocab=VOCAB, exact=None,
           **options):
    """``exact``: (student, teacher) copies in float64 that give the reference, else the models."""
    reference_student, reference_teacher = exact or (student, teacher)
    reference = _eager(reference_student, reference_teacher, batch, divergence, options.get("temperature", 1.0),
                       options.get("beta", 0.5), num_items, vocab)
    reference.backward()
    reference_grads = _grads(reference_student)
    reference_student.zero_grad(set_to_none=True)

    out = hf.distillation_loss(student, teacher, batch, divergence=divergence, num_items_in_batch=num_items,
                               **options)
    out.loss.backward()
    grads = _grads(student)
    assert torch.isfinite(out.loss)
    assert rel_err(out.loss, reference) < tolerance
    assert int(out.n_tokens) == int((batch["labels"][:, 1:] != -100).sum())
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, reference_grads[name]) < tolerance, name
    assert all(p.grad is None for p in teacher.parameters())
    return out


@pytest.mark.parametrize("family,tied", [(_llama, False), (_llama, True), (_gemma2, True), (_gemma3, False),
                                         (_granite, False)])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_loss_and_student_gradients_match_eager(family, tied, divergence):
    student, teacher = _model(family(VOCAB, 32, tied)), _model(family(VOCAB, 48, tied))
    _check(student, teacher, _batch(), 1e-6, divergence, temperature=2.0, beta=0.3)


def test_padded_vocabularies_compare_the_real_one():
    # Qwen-style: the two heads differ by padding rows only; the real vocabulary is the smaller.
    student, teacher = _model(_llama(320, 32, False)), _model(_llama(VOCAB, 48, True))
    _check(student, teacher, _batch(), 1e-6, "reverse_kl")
    student.zero_grad(set_to_none=True)
    out = hf.distillation_loss(student, teacher, _batch(), vocab_size=290)
    out.loss.backward()
    assert torch.count_nonzero(student.lm_head.weight.grad[290:]) == 0


def test_num_items_in_batch_is_the_normaliser():
    student, teacher = _model(_llama(VOCAB, 32, False)), _model(_llama(VOCAB, 32, False))
    _check(student, teacher, _batch(), 1e-6, num_items=torch.tensor(37, device=DEVICE))


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_models(tied):
    # Against float64 copies of the same bf16 weights: the bf16 body's backward alone moves the
    # embedding gradients by up to ~5e-2 (the eager bf16 loss on the models' own logits lands
    # further from these than fastkd does: 6.6e-2 against 1.8e-2 on the tied case).
    student = _model(_gemma2(VOCAB, 32, tied), torch.bfloat16)
    teacher = _model(_gemma2(VOCAB, 48, tied), torch.bfloat16)
    exact = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    out = _check(student, teacher, _batch(), 6e-2, exact=exact)
    assert out.loss.dtype == torch.float32


def test_sparse_teacher_over_the_whole_vocabulary_is_the_dense_loss():
    student, teacher = _model(_llama(VOCAB, 32, False)), _model(_granite(VOCAB, 48, False))
    batch = _batch()
    dense = hf.distillation_loss(student, teacher, batch, temperature=2.0)
    sparse = hf.distillation_loss(student, teacher, batch, temperature=2.0, teacher_top_k=VOCAB)
    assert rel_err(sparse.loss, dense.loss) < 1e-9


@pytest.mark.parametrize("config", [_llama, _gemma2], ids=["llama", "gemma2-softcapped"])
def test_sparse_teacher_top_k_matches_the_restricted_softmaxes(config):
    # A soft-capped student: its model's logits (capped at 30) are what the top-k loss compares.
    student, teacher = _model(config(VOCAB, 32, False)), _model(_granite(VOCAB, 48, False))
    batch = _batch()
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    student_logits = student(**kwargs).logits[:, :-1].double()
    with torch.no_grad():
        teacher_logits = teacher(**kwargs).logits[:, :-1].double()
    ids = teacher_logits.topk(20, dim=-1).indices
    rows = row_losses("forward_kl", student_logits.gather(-1, ids), teacher_logits.gather(-1, ids))
    keep = batch["labels"][:, 1:] != -100
    reference = torch.where(keep, rows, torch.zeros_like(rows)).sum() / keep.sum()
    out = hf.distillation_loss(student, teacher, batch, teacher_top_k=20)
    assert rel_err(out.loss, reference) < 1e-9


@pytest.mark.parametrize("config", [_llama, _gemma2], ids=["llama", "gemma2-softcapped"])
def test_hard_term_is_the_models_own_cross_entropy(config):
    # Gemma-2 soft-caps its logits: the hard term must be the cross-entropy of the capped logits.
    student, teacher = _model(config(VOCAB, 32, True)), _model(_llama(VOCAB, 32, True))
    batch = _batch()
    own = student(**batch).loss  # HF's shifted cross-entropy, mean over the kept tokens, in fp32
    out = hf.distillation_loss(student, teacher, batch, soft_weight=0.0, hard_weight=1.0)
    assert rel_err(out.loss, own) < 1e-6
    assert rel_err(out.hard, own) < 1e-6


def test_labels_default_to_input_ids_outside_the_padding():
    student, teacher = _model(_llama(VOCAB, 32, False)), _model(_llama(VOCAB, 32, False))
    batch = _batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    without = {k: v for k, v in batch.items() if k != "labels"}
    assert rel_err(hf.distillation_loss(student, teacher, without).loss,
                   hf.distillation_loss(student, teacher, batch).loss) == 0


def test_logit_transform_names():
    def config(**fields):
        return types.SimpleNamespace(**fields)

    assert hf.logit_transform_of(config()) == (1.0, None)
    assert hf.logit_transform_of(config(logit_scale=0.0625)) == (0.0625, None)
    assert hf.logit_transform_of(config(logit_scale=None, output_multiplier=2.0)) == (2.0, None)
    assert hf.logit_transform_of(config(lm_head_multiplier=3.0)) == (3.0, None)
    assert hf.logit_transform_of(config(logits_scaling=8.0)) == (0.125, None)
    assert hf.logit_transform_of(config(logits_scaling=8.0, model_type="hyperclovax")) == (8.0, None)
    assert hf.logit_transform_of(config(final_logit_softcapping=30.0)) == (1.0, 30.0)


def test_clear_errors():
    student, teacher = _model(_gemma2(VOCAB, 32, True)), _model(_gemma2(VOCAB, 32, True))
    with pytest.raises(TypeError, match="batch"):
        hf.distillation_loss(student, teacher, [1, 2, 3])
    with pytest.raises(ValueError, match="teacher_top_k"):
        hf.distillation_loss(student, teacher, _batch(), teacher_top_k=4)
    llama = _model(_llama(VOCAB, 32, False))
    with pytest.raises(ValueError, match="teacher_top_k .* divergence"):
        hf.distillation_loss(llama, llama, _batch(), teacher_top_k=4, divergence="skew_forward_kl")
    adapted = _model(_llama(VOCAB, 32, False))
    adapted.lm_head.base_layer = torch.nn.Linear(32, VOCAB)  # what a PEFT LoRA layer on the head looks like
    with pytest.raises(ValueError, match="PEFT adapter"):
        hf.distillation_loss(adapted, llama, _batch())
    with pytest.raises(TypeError, match="student must be a causal LM"):
        hf.distillation_loss(torch.nn.Linear(2, 2), teacher, _batch())
    with pytest.raises(ValueError, match="divergence"):
        hf.distillation_loss(student, teacher, _batch(), divergence="kl")

