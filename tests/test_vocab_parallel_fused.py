"""fused_linear_kd_loss and fused_linear_sparse_kd_loss with process_group
(fastkd/kernels/fused_linear/vocab_parallel.py): groups of 2 and 3 CPU processes on gloo, from one
spawn of 3 (a spawn costs seconds: the 2-rank group is a subgroup), running every case.
Every rank builds the same full tensors from one seed and keeps its rows of the lm_head weights
and biases; the loss must equal, and the gradients be (student_hidden: all of; weight and bias:
the rank's slice of), both the one-process fastkd result on the full tensors and the float64
definition written here. Token blocks are made a few rows high, so each call exchanges per block."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastkd
from conftest import TOLERANCE
from fastkd.kernels import registry
from fastkd.kernels.fused_linear import driver, vocab_parallel
from reference import reduce, rel_err, row_losses
from reference import sparse_rows as reference_sparse_rows
from test_vocab_parallel import _dkd_rows, _finite_or_zero, _transformed

BACKENDS = registry.usable_backends("fused_linear_vocab_parallel", "cpu")
N_SHAPE = (2, 3)  # leading shape: N = 6 rows
HS, HT = 16, 24  # the student's and the teacher's hidden sizes differ
DIVERGENCES = (("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("skew_forward_kl", {"skew": 0.2}),
               ("skew_reverse_kl", {"skew": 0.3}), ("tvd", {}), ("dkd", {"alpha": 1.5, "beta": 4.0}))


# ---------------------------------------------------------------------------------------------
# Inputs and the float64 definition.
# ---------------------------------------------------------------------------------------------


def _inputs(vocab, dtype, seed, real_vocab=None):
    """(student_hidden (2, 3, HS), student_weight (V, HS), student_bias (V,), teacher_hidden
    (2, 3, HT), teacher_weight (V, HT), teacher_bias (V,), labels (2, 3)). One row of each model
    has logits of about ±100; labels include two ignored rows, the first and last real classes
    and the first columns of rank 1's slice."""
    real_vocab = real_vocab or vocab
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    student_hidden, teacher_hidden = randn(*N_SHAPE, HS), randn(*N_SHAPE, HT)
    student_hidden[0, 1] *= 12  # logits of about ±100
    teacher_hidden[0, 1] *= 10
    tensors = (student_hidden, randn(vocab, HS, scale=0.5), randn(vocab), teacher_hidden,
               randn(vocab, HT, scale=0.5), randn(vocab))
    labels = torch.tensor([[0, real_vocab - 1, -100], [vocab // 2, -100, vocab // 2 - 1]])
    return (*(x.to(dtype) for x in tensors), labels)


def reference(tensors, options, grad_output, dtype=torch.float64):
    """(loss, (∂/∂student_hidden, ∂/∂student_weight, ∂/∂student_bias), entropy) of Σ loss·grad_output
    from the formulas: logits = h·Wᵀ + b over the first vocab_size rows, the divergence of the
    transformed logits at T, CE of the raw student logits; the student's entropy
    −Σ q log q of its transformed logits at T per row (0 on ignored rows)."""
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels = tensors
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in (student_hidden, student_weight, student_bias)]
    vocab = options.get("vocab_size") or student_weight.shape[0]
    with_bias = options.get("biases", False)
    student = leaves[0] @ leaves[1][:vocab].T + (leaves[2][:vocab] if with_bias else 0)
    teacher = teacher_hidden.to(dtype) @ teacher_weight[:vocab].to(dtype).T + (
        teacher_bias[:vocab].to(dtype) if with_bias else 0)
    student, teacher, flat_labels = student.reshape(-1, vocab), teacher.reshape(-1, vocab), labels.reshape(-1)
    standardize = options.get("standardize", False)
    s = _transformed(student, 1.0, options.get("student_softcap"), standardize)
    t = _transformed(teacher, options.get("teacher_logit_scale", 1.0), None, standardize)
    temperature = options.get("temperature", 1.0)
    divergence = options["divergence"]
    if divergence == "dkd":
        rows = _dkd_rows(s, t, torch.where(flat_labels >= 0, flat_labels, 0), options.get("alpha", 1.0),
                         options.get("beta", 8.0), temperature)
    else:
        rows = row_losses(divergence, s, t, temperature, options.get("beta", 0.5), options.get("skew", 0.1))
    if options.get("temperature_squared"):
        rows = rows * temperature ** 2
    rows = options.get("soft_weight", 1.0) * rows
    if options.get("hard_weight", 0.0):
        rows = rows + options["hard_weight"] * F.cross_entropy(student, flat_labels, reduction="none")
    loss = reduce(rows.reshape(labels.shape), labels, -100, options.get("reduction", "mean"),
                  options.get("normalizer"))
    grads = torch.autograd.grad(loss, leaves, grad_output.to(dtype), allow_unused=True)
    log_q = torch.log_softmax(s.detach() / temperature, -1)
    entropy = -(log_q.exp() * log_q).sum(-1).reshape(labels.shape)
    return loss.detach(), grads, torch.where(labels != -100, entropy, 0.0)


def _cases(vocab):
    """(options, dtype): every divergence with biases and the hard term, with padding (the last
    rank's final rows) in bf16 and fp32, with the logit transforms and a normalizer, and
    standardised, without and with padding; each reduction."""
    cases = []
    for divergence, extra in DIVERGENCES:
        base = dict(divergence=divergence, **extra)
        cases += [
            (dict(base, temperature=2.0, hard_weight=0.5, biases=True), torch.float32),
            (dict(base, reduction="none", vocab_size=vocab - 7, hard_weight=0.3, fp32_logits=True), torch.bfloat16),
            (dict(base, reduction="sum", temperature=0.7, temperature_squared=True, hard_weight=1.0,
                  vocab_size=vocab - 3, biases=True), torch.float32),
            (dict(base, normalizer=torch.tensor(7.0), student_softcap=30.0, teacher_logit_scale=0.5,
                  soft_weight=0.8), torch.float32),
            (dict(base, standardize=True, temperature=3.0), torch.float64),
            # The row mean and std over the real columns only.
            (dict(base, standardize=True, vocab_size=vocab - 5, hard_weight=0.5, reduction="none"), torch.float64),
        ]
    return cases


def _slice(x, split, rank):
    start = sum(split[:rank])
    return x[start:start + split[rank]].contiguous()


def _call(tensors, options, split=None, rank=None, **extra):
    """fastkd's loss on the full tensors (split None) or on this rank's rows of the weights."""
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels = tensors
    kwargs = {key: value for key, value in options.items() if key != "biases"}
    if not options.get("biases"):
        student_bias = teacher_bias = None
    if split is not None:
        student_weight, teacher_weight = _slice(student_weight, split, rank), _slice(teacher_weight, split, rank)
        student_bias = None if student_bias is None else _slice(student_bias, split, rank)
        teacher_bias = None if teacher_bias is None else _slice(teacher_bias, split, rank)
    leaves = [x if x is None else x.detach().clone().requires_grad_(True)
              for x in (student_hidden, student_weight, student_bias)]
    loss = fastkd.fused_linear_kd_loss(leaves[0], leaves[1], teacher_hidden, teacher_weight, labels,
                                       student_bias=leaves[2], teacher_bias=teacher_bias, **kwargs, **extra)
    return loss, leaves


def _entropy_budget(dtype, one_process, ref):
    return max(TOLERANCE[dtype], 2 * rel_err(one_process, ref))


def _check_case(options, dtype, split, rank, group, seed, backend):
    vocab = sum(split)
    tensors = _inputs(vocab, dtype, seed, options.get("vocab_size"))
    reduction = options.get("reduction", "mean")
    generator = torch.Generator().manual_seed(seed + 1)
    grad_output = torch.rand(N_SHAPE, generator=generator) + 0.5 if reduction == "none" else torch.tensor(1.0)

    # Every case also asks for the student's entropy (one more statistic in the soft term's exchange).
    one_process, full = _call(tensors, options, return_entropy=True)
    one_process.loss.backward(grad_output.to(one_process.loss.dtype))
    ref_loss, ref_grads, ref_entropy = reference(tensors, options, grad_output)
    parts, local = _call(tensors, options, split, rank, process_group=group, backend=backend, return_entropy=True)
    parts.loss.backward(grad_output.to(parts.loss.dtype))
    # The budget: the dtype's tolerance, or where larger 2× one process's error or 10× eager fp32
    # PyTorch's (peaked ±100 rows at small T cancel in any fp32 softmax gradient: tests/reference.py).
    eager_loss, eager_grads, _ = reference(tensors, options, grad_output, torch.float32)

    where = f"rank {rank}, {options}, {dtype}"
    assert torch.all(parts.entropy[tensors[-1] == -100] == 0), where
    budget = _entropy_budget(dtype, one_process.entropy, ref_entropy)
    assert rel_err(parts.entropy, ref_entropy) <= budget, (where, rel_err(parts.entropy, ref_entropy))
    loss, one_process = parts.loss, one_process.loss
    assert loss.dtype == one_process.dtype and loss.shape == one_process.shape, where
    assert torch.isfinite(loss).all(), where
    loss_budget = max(TOLERANCE[torch.float32], 2 * rel_err(one_process, ref_loss),
                      _finite_or_zero(10 * rel_err(eager_loss, ref_loss)))
    assert rel_err(loss, ref_loss) <= loss_budget, (where, rel_err(loss, ref_loss))
    assert rel_err(loss, one_process) <= 2 * loss_budget, (where, rel_err(loss, one_process))
    for name, mine, one, ref, eager, sliced in zip(("grad_hidden", "grad_weight", "grad_bias"), local, full,
                                                   ref_grads, eager_grads, (False, True, True)):
        if mine is None:
            continue
        assert mine.grad.dtype == dtype and mine.grad.shape == mine.shape, (where, name)
        assert torch.isfinite(mine.grad.float()).all(), (where, name)
        if sliced:
            one_grad, ref, eager = (_slice(x, split, rank) for x in (one.grad, ref, eager))
        else:
            one_grad = one.grad
        budget = max(TOLERANCE[dtype], 2 * rel_err(one_grad, ref), _finite_or_zero(10 * rel_err(eager, ref)))
        assert rel_err(mine.grad, ref) <= budget, (where, name, rel_err(mine.grad, ref))
        assert rel_err(mine.grad, one_grad) <= 2 * budget, (where, name, rel_err(mine.grad, one_grad))
    # Ignored rows get exactly nothing; padding rows of the weight get a zero gradient.
    assert torch.all(local[0].grad[tensors[-1] == -100] == 0), where
    if options.get("vocab_size"):
        start = sum(split[:rank])
        padding = torch.arange(start, start + split[rank]) >= options["vocab_size"]
        assert torch.all(local[1].grad[padding] == 0), where


def _check_partial_grad_hidden(rank, group, split):
    """grad_hidden_reduction="none": this rank's partial product; the partials sum to the total."""
    tensors = _inputs(sum(split), torch.float64, seed=31)
    options = dict(divergence="jsd", hard_weight=0.5, biases=True)
    loss, local = _call(tensors, options, split, rank, process_group=group, grad_hidden_reduction="none")
    loss.backward()
    partial = local[0].grad.clone()
    dist.all_reduce(partial, group=group)
    one_process, full = _call(tensors, options)
    one_process.backward()
    assert rel_err(partial, full[0].grad) <= 1e-12
    assert rel_err(local[0].grad, full[0].grad) > 1e-3  # partial indeed


def _check_components_and_module(rank, group, split):
    tensors = _inputs(sum(split), torch.float32, seed=33)
    options = dict(divergence="forward_kl", hard_weight=0.25, temperature=2.0)
    parts, _ = _call(tensors, options, split, rank, process_group=group, return_components=True)
    expected, _ = _call(tensors, options, return_components=True)
    for name in ("loss", "soft", "hard", "n_tokens", "soft_per_token", "hard_per_token"):
        assert rel_err(getattr(parts, name), getattr(expected, name)) <= 4 * TOLERANCE[torch.float32], name
    module = fastkd.FusedLinearKDLoss("forward_kl", hard_weight=0.25, temperature=2.0, process_group=group)
    student_hidden, student_weight, _, teacher_hidden, teacher_weight, _, labels = tensors
    loss = module(student_hidden, _slice(student_weight, split, rank), teacher_hidden,
                  _slice(teacher_weight, split, rank), labels)
    assert rel_err(loss, expected.loss) <= 4 * TOLERANCE[torch.float32]


def _check_edges(rank, group, split):
    """No rows at all: loss 0, empty gradients, on every rank. A label past vocab_size (a padding
    column) or past the vocabulary is NaN on every rank, as on one device."""
    empty = torch.zeros(0, HS, requires_grad=True)
    weight = torch.randn(split[rank], HS, requires_grad=True)
    loss = fastkd.fused_linear_kd_loss(empty, weight, torch.zeros(0, HT), torch.randn(split[rank], HT),
                                       hard_weight=0.5, labels=torch.zeros(0, dtype=torch.long), process_group=group)
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == empty.shape and torch.all(weight.grad == 0)
    tensors = _inputs(sum(split), torch.float64, seed=41)
    labels = torch.tensor([[sum(split) - 4, sum(split), 3], [-100, 0, 1]])
    tensors = (*tensors[:-1], labels)
    options = dict(divergence="forward_kl", hard_weight=1.0, vocab_size=sum(split) - 4, reduction="none")
    loss, _ = _call(tensors, options, split, rank, process_group=group)
    one_process, _ = _call(tensors, options)
    bad = torch.zeros_like(labels, dtype=torch.bool)
    bad[0, :2] = True
    assert torch.isnan(loss[bad]).all() and torch.isnan(one_process[bad]).all()
    assert rel_err(loss[~bad], one_process[~bad]) <= 1e-12


def _check_compiled(rank, group, split):
    """A function calling the vocab-parallel fused loss compiles with fullgraph=True (the op and
    its collectives are one traced call) and gives the eager values and gradients."""
    tensors = _inputs(sum(split), torch.float32, seed=17)
    student_hidden, student_weight, _, teacher_hidden, teacher_weight, _, labels = tensors
    local_weight = _slice(student_weight, split, rank).requires_grad_(True)
    local_teacher = _slice(teacher_weight, split, rank)

    def loss_fn(hidden, weight, teacher_weight, labels):
        return 2 * fastkd.fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels,
                                               divergence="jsd", beta=0.4, hard_weight=0.5, process_group=group)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    hidden = student_hidden.clone().requires_grad_(True)
    loss = compiled(hidden, local_weight, local_teacher, labels)
    loss.backward()
    expected, full = _call(tensors, dict(divergence="jsd", beta=0.4, hard_weight=0.5))
    (2 * expected).backward()
    assert rel_err(loss, 2 * expected) <= 4 * TOLERANCE[torch.float32]
    assert rel_err(hidden.grad, full[0].grad) <= 4 * TOLERANCE[torch.float32]
    assert rel_err(local_weight.grad, _slice(full[1].grad, split, rank)) <= 4 * TOLERANCE[torch.float32]


def _sparse_teacher(vocab, top_k, seed):
    """Top-k ids (2, 3, k), in no particular order, spread over every rank's slice, and their
    log-probabilities under a random teacher."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(*N_SHAPE, vocab, generator=generator, dtype=torch.float64) * 3
    logprobs, indices = torch.log_softmax(teacher, -1).topk(top_k, dim=-1)
    order = torch.argsort(torch.rand(*N_SHAPE, top_k, generator=generator), dim=-1)
    return indices.gather(-1, order), logprobs.gather(-1, order)


def _check_sparse(rank, group, split):
    """fused_linear_sparse_kd_loss with process_group: both divergences and missing-mass modes,
    padding, the hard term, biases, each reduction; against one process and the float64
    definition (tests/reference.py: sparse_rows) of the materialised logits."""
    vocab = sum(split)
    cases = (
        (dict(divergence="forward_kl", missing_mass="renormalize", temperature=2.0, hard_weight=0.5, biases=True),
         torch.float32),
        (dict(divergence="reverse_kl", missing_mass="tail", reduction="none", vocab_size=vocab - 5), torch.float64),
        (dict(divergence="forward_kl", missing_mass="tail", reduction="sum", hard_weight=1.0, vocab_size=vocab - 2,
              fp32_logits=True), torch.bfloat16),
        (dict(divergence="reverse_kl", missing_mass="renormalize", temperature=0.7, biases=True), torch.float64),
        # Padding ids (ragged k) and a row without entries: against one process only, whose padding
        # is checked against float64 in tests/test_sparse_divergences.py.
        (dict(divergence="forward_kl", missing_mass="renormalize", padded=True), torch.float64),
        (dict(divergence="reverse_kl", missing_mass="tail", reduction="none", padded=True), torch.float64),
    )
    for seed, (options, dtype) in enumerate(cases):
        real = options.get("vocab_size") or vocab
        student_hidden, student_weight, student_bias, *_, labels = _inputs(vocab, dtype, 50 + seed, real)
        indices, logprobs = _sparse_teacher(real, 9, 60 + seed)
        logprobs = logprobs.to(dtype if dtype != torch.bfloat16 else torch.float32)
        padded = options.pop("padded", False)
        if padded:
            indices = indices.clone()
            indices[0, 1, 6:] = -1
            indices[1, 2, :] = -1
        reduction = options.get("reduction", "mean")
        grad_output = torch.rand(N_SHAPE, generator=torch.Generator().manual_seed(seed)) + 0.5 \
            if reduction == "none" else torch.tensor(1.0)
        kwargs = {key: value for key, value in options.items() if key != "biases"}
        bias = student_bias if options.get("biases") else None

        def run(weight, bias, **extra):
            leaves = [x if x is None else x.detach().clone().requires_grad_(True) for x in (student_hidden, weight,
                                                                                             bias)]
            parts = fastkd.fused_linear_sparse_kd_loss(leaves[0], leaves[1], indices, logprobs, labels,
                                                       student_bias=leaves[2], return_entropy=True, **kwargs, **extra)
            parts.loss.backward(grad_output.to(parts.loss.dtype))
            return parts, leaves

        one_process, full = run(student_weight, bias)
        loss, local = run(_slice(student_weight, split, rank), None if bias is None else _slice(bias, split, rank),
                          process_group=group)
        entropy, one_entropy = loss.entropy, one_process.entropy
        loss, one_process = loss.loss, one_process.loss
        if padded:
            where = f"rank {rank}, padded sparse {options}"
            assert torch.isfinite(loss).all() and rel_err(loss, one_process) <= 1e-10, where
            assert rel_err(entropy, one_entropy) <= 1e-10, where
            for name, mine, one, sliced in zip(("grad_hidden", "grad_weight"), local, full, (False, True)):
                one_grad = _slice(one.grad, split, rank) if sliced else one.grad
                assert rel_err(mine.grad, one_grad) <= 1e-10, (where, name, rel_err(mine.grad, one_grad))
            continue
        # The definition in float64 on the materialised logits.
        leaves = [x.detach().double().requires_grad_(True) for x in (student_hidden, student_weight, student_bias)]
        logits = leaves[0] @ leaves[1][:real].T + (leaves[2][:real] if bias is not None else 0)
        flat = logits.reshape(-1, real)
        rows = reference_sparse_rows(flat, indices.reshape(-1, 9), logprobs.reshape(-1, 9).double(),
                                     options["divergence"], options.get("temperature", 1.0), options["missing_mass"])
        if options.get("hard_weight"):
            rows = rows + options["hard_weight"] * F.cross_entropy(flat, labels.reshape(-1), reduction="none")
        ref_loss = reduce(rows.reshape(N_SHAPE), labels, -100, reduction, None)
        ref_grads = torch.autograd.grad(ref_loss, leaves, grad_output.double(), allow_unused=True)
        where = f"rank {rank}, sparse {options}, {dtype}"
        log_q = torch.log_softmax(flat.detach() / options.get("temperature", 1.0), -1)
        ref_entropy = torch.where(labels != -100, -(log_q.exp() * log_q).sum(-1).reshape(N_SHAPE), 0.0)
        budget = _entropy_budget(dtype, one_entropy, ref_entropy)
        assert rel_err(entropy, ref_entropy) <= budget, (where, rel_err(entropy, ref_entropy))
        budget = max(TOLERANCE[torch.float32], 2 * rel_err(one_process, ref_loss))
        assert rel_err(loss, ref_loss) <= budget and rel_err(loss, one_process) <= 2 * budget, where
        for name, mine, one, ref, sliced in zip(("grad_hidden", "grad_weight", "grad_bias"), local, full, ref_grads,
                                                (False, True, True)):
            if mine is None:
                continue
            one_grad, ref = (_slice(one.grad, split, rank), _slice(ref, split, rank)) if sliced else (one.grad, ref)
            budget = max(TOLERANCE[dtype], 2 * rel_err(one_grad, ref))
            assert rel_err(mine.grad, ref) <= budget, (where, name, rel_err(mine.grad, ref))
            assert rel_err(mine.grad, one_grad) <= 2 * budget, (where, name, rel_err(mine.grad, one_grad))


def _check_errors(rank, group, split):
    tensors = _inputs(sum(split), torch.float32, seed=3)
    student_hidden, student_weight, _, teacher_hidden, teacher_weight, _, labels = tensors
    local = (student_hidden, _slice(student_weight, split, rank), teacher_hidden, _slice(teacher_weight, split, rank),
             labels)
    with pytest.raises(ValueError, match="backend='native' has no fused_linear_vocab_parallel kernels"):
        fastkd.fused_linear_kd_loss(*local, backend="native", process_group=group)
    with pytest.raises(ValueError, match="same vocabulary rows on each rank"):
        fastkd.fused_linear_kd_loss(*local[:3], local[3][:-1], labels, process_group=group)
    with pytest.raises(ValueError, match="grad_hidden_reduction must be 'sum' or 'none'"):
        fastkd.fused_linear_kd_loss(*local, process_group=group, grad_hidden_reduction="mean")
    with pytest.raises(ValueError, match="grad_hidden_reduction='none' needs a process_group"):
        fastkd.fused_linear_kd_loss(*local, grad_hidden_reduction="none")
    with pytest.raises(ValueError, match="divergence='dkd' needs labels"):
        fastkd.fused_linear_kd_loss(*local[:4], divergence="dkd", process_group=group)
    with pytest.raises(ValueError, match="grad_hidden_reduction must be 'sum' or 'none'"):
        fastkd.fused_linear_sparse_kd_loss(student_hidden, local[1], torch.zeros(*N_SHAPE, 2, dtype=torch.long),
                                           torch.full((*N_SHAPE, 2), -1.0), process_group=group,
                                           grad_hidden_reduction="avg")


def _check_dtensor(rank, group):
    """DTensor lm_head weights and biases placed Shard(0) (V = 1001 over 3 ranks: 334, 334, 333)
    need no group and give a replicated DTensor loss; their gradients come back placed alike."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (group.size(),))
    tensors = _inputs(1001, torch.float32, seed=21)
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels = tensors
    for reduction in ("mean", "none"):
        options = dict(divergence="skew_reverse_kl", skew=0.25, temperature=1.5, reduction=reduction, hard_weight=0.5,
                       biases=True)
        one_process, full = _call(tensors, options)
        one_process.sum().backward()
        weight = distribute_tensor(student_weight.clone(), mesh, [Shard(0)]).requires_grad_(True)
        bias = distribute_tensor(student_bias.clone(), mesh, [Shard(0)]).requires_grad_(True)
        hidden = distribute_tensor(student_hidden.clone(), mesh, [Replicate()]).requires_grad_(True)
        loss = fastkd.fused_linear_kd_loss(hidden, weight, teacher_hidden,
                                           distribute_tensor(teacher_weight, mesh, [Shard(0)]), labels,
                                           student_bias=bias, teacher_bias=distribute_tensor(teacher_bias, mesh,
                                                                                             [Shard(0)]),
                                           divergence="skew_reverse_kl", skew=0.25, temperature=1.5,
                                           reduction=reduction, hard_weight=0.5)
        assert isinstance(loss, DTensor) and tuple(loss.placements) == (Replicate(),)
        assert rel_err(loss.to_local(), one_process) <= 4 * TOLERANCE[torch.float32]
        loss.sum().backward()
        assert isinstance(weight.grad, DTensor) and tuple(weight.grad.placements) == (Shard(0),)
        assert rel_err(weight.grad.full_tensor(), full[1].grad) <= 4 * TOLERANCE[torch.float32]
        assert rel_err(bias.grad.full_tensor(), full[2].grad) <= 4 * TOLERANCE[torch.float32]
        assert rel_err(hidden.grad.full_tensor(), full[0].grad) <= 4 * TOLERANCE[torch.float32]
    sharded = distribute_tensor(student_weight, mesh, [Shard(0)])
    with pytest.raises(ValueError, match="process_group must be None for DTensor weights"):
        fastkd.fused_linear_kd_loss(student_hidden, sharded, teacher_hidden,
                                    distribute_tensor(teacher_weight, mesh, [Shard(0)]), process_group=group)
    with pytest.raises(TypeError, match="teacher_weight must be DTensors placed Shard\\(0\\)"):
        fastkd.fused_linear_kd_loss(student_hidden, sharded, teacher_hidden, teacher_weight)


# ---------------------------------------------------------------------------------------------
# Bytes sent: every collective is wrapped; all-reduce payloads are counted, anything else fails.
# ---------------------------------------------------------------------------------------------


def _bytes_per_step(rank, group, vocab, n_rows, options):
    """Bytes this rank hands to collectives in one forward and backward (fp32, Hs = HS), the
    vocabulary split as evenly as the group allows, one token block per call."""
    sent = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return real_all_reduce(tensor, *args, **kwargs)

    world = group.size()
    split = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    generator = torch.Generator().manual_seed(vocab)
    student_hidden = torch.randn(n_rows, HS, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(n_rows, HT, generator=generator)
    student_weight = torch.randn(vocab, HS, generator=generator)
    teacher_weight = torch.randn(vocab, HT, generator=generator)
    labels = torch.randint(0, vocab, (n_rows,), generator=generator)
    local_weight = _slice(student_weight, split, rank).requires_grad_(True)
    options = dict(options)
    top_k = options.pop("top_k", None)
    if top_k is not None:
        logprobs, indices = torch.log_softmax(teacher_hidden @ teacher_weight.T, -1).topk(top_k, -1)
    dist.all_reduce = counting_all_reduce
    try:
        if top_k is None:
            loss = fastkd.fused_linear_kd_loss(student_hidden, local_weight, teacher_hidden,
                                               _slice(teacher_weight, split, rank), labels, process_group=group,
                                               **options)
        else:
            loss = fastkd.fused_linear_sparse_kd_loss(student_hidden, local_weight, indices, logprobs, labels,
                                                      process_group=group, **options)
        getattr(loss, "loss", loss).backward()
    finally:
        dist.all_reduce = real_all_reduce
    return sum(sent)


def _check_bytes(rank, group):
    forbidden = ("all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "gather",
                 "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "isend")
    real = {name: getattr(dist, name) for name in forbidden}

    def refuse(*args, **kwargs):
        raise AssertionError("a collective other than all_reduce was called")

    for name in forbidden:
        setattr(dist, name, refuse)
    sizes = 8 * group.size()  # the slice sizes, once per call
    try:
        # fp32 values per row: the soft term's 2 + 2 + 2, the hard term's 1 + 2, grad_hidden's HS,
        for options, per_row in (({"divergence": "forward_kl"}, 6 + HS),
                                 ({"divergence": "forward_kl", "hard_weight": 0.5}, 6 + 3 + HS),
                                 ({"divergence": "jsd", "hard_weight": 0.5, "grad_hidden_reduction": "none"}, 6 + 3),
                                 # top-k: the support's k student logits (+ 4 for the tail bucket)
                                 ({"top_k": 5}, 5 + HS), ({"top_k": 5, "missing_mass": "tail"}, 5 + 4 + HS),
                                 # the entropy: 1 more with a dense teacher, 1 + 2 with a top-k one
                                 ({"divergence": "forward_kl", "return_entropy": True}, 6 + 1 + HS),
                                 ({"top_k": 5, "return_entropy": True}, 5 + 3 + HS)):
            counts = {(vocab, n): _bytes_per_step(rank, group, vocab, n, options)
                      for vocab in (301, 4816) for n in (8, 40)}
            # Independent of V (16× the vocabulary, the same bytes) ...
            assert counts[(301, 8)] == counts[(4816, 8)] and counts[(301, 40)] == counts[(4816, 40)], counts
            # ... and linear in N, at the documented number of values per row.
            assert counts[(301, 40)] - counts[(301, 8)] == 4 * per_row * 32, (options, counts)
            assert counts[(301, 8)] == 4 * per_row * 8 + sizes, (options, counts)
    finally:
        for name, function in real.items():
            setattr(dist, name, function)


# ---------------------------------------------------------------------------------------------
# The spawned groups.
# ---------------------------------------------------------------------------------------------


# 64 and 65 rows: slices that size their token blocks differently when each rank rounds its own
# width up to a power of two (64 and 128), which mismatched the ranks' collectives before blocks
# were sized from what every rank knows alike.
PAIR_SPLIT, TRIPLE_SPLIT = (64, 65), (70, 67, 66)


def _group_main(rank, world_size, store_path, backend):
    """One spawn of 3 processes (a spawn, with its imports, costs more than the checks): ranks 0
    and 1 first run the 2-rank checks on a subgroup while rank 2 waits, then all 3 run theirs."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        triple = dist.group.WORLD
        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        _check_bytes(rank, triple)  # one block per call: before the block budget shrinks below
        # Blocks of 2 rows without vocab_size (4 with it), so each call exchanges per block.
        driver.BLOCK_ELEMENTS["cpu"] = 256
        vocab_parallel.ASSUMED_SLICE_COLUMNS = 128
        if rank < 2:
            _check_group(rank, pair, PAIR_SPLIT, backend)
            _check_partial_grad_hidden(rank, pair, PAIR_SPLIT)
            _check_components_and_module(rank, pair, PAIR_SPLIT)
            _check_errors(rank, pair, PAIR_SPLIT)
            _check_compiled(rank, pair, PAIR_SPLIT)
        dist.barrier()
        _check_group(rank, triple, TRIPLE_SPLIT, backend)
        _check_edges(rank, triple, TRIPLE_SPLIT)
        _check_sparse(rank, triple, TRIPLE_SPLIT)
        _check_dtensor(rank, triple)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_group(rank, group, split, backend):
    # The two groups share the cases (CI time): each case runs once, on 2 or on 3 ranks.
    for seed, (options, dtype) in enumerate(_cases(sum(split))):
        if seed % 2 == group.size() % 2:
            _check_case(options, dtype, split, rank, group, seed, backend)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.family("fused_linear_vocab_parallel")
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_and_three_uneven_ranks_match_one_process_send_bytes_independent_of_v_take_dtensors_and_compile(
        tmp_path, backend):
    mp.spawn(_group_main, args=(3, str(tmp_path / "store"), backend), nprocs=3, join=True)


def test_process_group_must_be_a_process_group():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        fastkd.fused_linear_kd_loss(hidden, weight, hidden, weight, process_group="tp")
