"""fastkd.integrations.hf with process_group (the vocabulary split over 2 gloo CPU processes, one
spawn running every case): loss, entropy and every student gradient equal on each rank to the
one-process loss on the same models and batch, for full heads (tied, padded, soft-capped), with
the hard term and a top-k teacher, and a DTensor lm_head placed Shard(0); and such a head
gathered (full_tensor) without process_group. The vocab-parallel path runs the fused loss: no
rank forms its logit slice (checked by refusing F.linear, which formed it before)."""

import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reference import rel_err

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install fastkd[hf])")

from fastkd.integrations import hf  # noqa: E402
from fastkd.kernels.fused_linear import driver  # noqa: E402

TOLERANCE = 1e-10  # float64 models


def _model(config, seed):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 40.0 / config.hidden_size ** 0.5)
    return model.eval()


def _llama(vocab, hidden, tied):
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)


def _gemma2(vocab, hidden):
    return transformers.Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     final_logit_softcapping=30.0)


def _batch():
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 300, (2, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :2] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _grads(model):
    return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for name, p in model.named_parameters() if p.grad is not None}


def _compare(student, teacher, group, sharded_student=None, vocab_parallel=True, **options):
    batch = _batch()
    student.zero_grad(set_to_none=True)
    one = hf.distillation_loss(student, teacher, batch, return_entropy=True, **options)
    one.loss.backward()
    expected = _grads(student)
    parallel_student = sharded_student or student
    parallel_student.zero_grad(set_to_none=True)
    if vocab_parallel:
        options["process_group"] = group
    out = _without_lm_head_linear(parallel_student, teacher, batch, vocab_parallel, **options)
    out.loss.backward()
    assert rel_err(out.loss, one.loss) < TOLERANCE
    assert rel_err(out.entropy, one.entropy) < TOLERANCE
    assert int(out.n_tokens) == int(one.n_tokens)
    grads = _grads(parallel_student)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert rel_err(grad, expected[name]) < TOLERANCE, name


def _without_lm_head_linear(student, teacher, batch, vocab_parallel, **options):
    """The loss, F.linear refused on a weight of 150 rows: this rank's slice of the 300-token
    vocabulary (the models' own layers have at most 64 output features)."""
    if not vocab_parallel:
        return hf.distillation_loss(student, teacher, batch, return_entropy=True, **options)
    real_linear = torch.nn.functional.linear

    def refuse_slice(input, weight, bias=None):
        assert weight.shape[0] != 150, "an lm_head slice went through F.linear: its logits were formed"
        return real_linear(input, weight, bias)

    torch.nn.functional.linear = refuse_slice
    try:
        return hf.distillation_loss(student, teacher, batch, return_entropy=True, **options)
    finally:
        torch.nn.functional.linear = real_linear


def _shard_head(model, group):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    sharded = copy.deepcopy(model)
    mesh = DeviceMesh.from_group(group, "cpu")
    weight = distribute_tensor(sharded.lm_head.weight.detach(), mesh, [Shard(0)])
    sharded.lm_head.weight = torch.nn.Parameter(weight)
    return sharded


def _main(rank, world_size, store_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        group = dist.group.WORLD
        # Blocks of 3 token rows (vocab_size 300 over 2 ranks: 150 columns), so each call exchanges per block.
        driver.BLOCK_ELEMENTS["cpu"] = 450
        _compare(_model(_llama(300, 32, False), 1), _model(_llama(300, 48, False), 2), group, temperature=2.0,
                 hard_weight=0.5)
        # Tied, padded heads (320 and 300 rows; the real vocabulary of 300 split 150 + 150).
        _compare(_model(_llama(320, 32, True), 3), _model(_llama(300, 48, True), 4), group, divergence="jsd",
                 beta=0.3, num_items_in_batch=torch.tensor(17))
        _compare(_model(_gemma2(300, 32), 5), _model(_gemma2(300, 48), 6), group, divergence="reverse_kl",
                 hard_weight=0.25)
        student = _model(_llama(300, 32, False), 7)
        teacher = _model(_llama(300, 32, False), 8)
        _compare(student, teacher, group, sharded_student=_shard_head(student, group))
        # A top-k teacher (taken over the whole teacher head on every rank) with the hard term.
        _compare(student, teacher, group, teacher_top_k=20, missing_mass="tail", hard_weight=0.5)
        # Without process_group a DTensor head (FSDP2's) is gathered once: the one-process numbers.
        _compare(student, teacher, group, sharded_student=_shard_head(student, group), vocab_parallel=False)
        with pytest.raises(ValueError, match="grad_hidden_reduction is not an option"):
            hf.distillation_loss(student, student, _batch(), process_group=group, grad_hidden_reduction="none")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_vocab_parallel_matches_one_process(tmp_path):
    mp.spawn(_main, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
