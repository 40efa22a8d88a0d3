"""kd_loss with process_group (fastkd/distributed.py): groups of 2 and 3 CPU processes on gloo,
each spawned once and running every case, since a spawn costs seconds. Every rank builds the same
full tensors from one seed and keeps its columns; the loss must equal, and the gradient be the
slice of, both the one-process fastkd result on the full tensors and the float64 definition."""

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
from conftest import TOLERANCE
from fastkd.kernels import registry
from reference import reduce, rel_err, row_losses

VOCAB_PARALLEL_BACKENDS = registry.usable_backends("kd_rows_vocab_parallel", "cpu")
N_SHAPE = (2, 3)  # leading shape: N = 6 rows


# ---------------------------------------------------------------------------------------------
# The float64 definition, written from the formulas (tests/reference.py for the six softmax
# divergences), with the logit transforms and dkd added here; differentiated by autograd.
# ---------------------------------------------------------------------------------------------


def _transformed(x, scale, cap, standardize):
    y = x * scale
    if cap is not None:
        y = cap * torch.tanh(y / cap)
    if standardize:
        y = (y - y.mean(-1, keepdim=True)) / (y.std(-1, keepdim=True) + 1e-7)
    return y


def _dkd_rows(s, t, target, alpha, beta, temperature):
    q, p = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    q_y, p_y = q.gather(-1, target[:, None])[:, 0], p.gather(-1, target[:, None])[:, 0]
    tckd = p_y * (p_y.log() - q_y.log()) + (1 - p_y) * ((1 - p_y).log() - (1 - q_y).log())
    others = torch.ones_like(q, dtype=torch.bool).scatter_(-1, target[:, None], False)
    q_hat = q[others].view(q.shape[0], -1) / (1 - q_y)[:, None]
    p_hat = p[others].view(p.shape[0], -1) / (1 - p_y)[:, None]
    return alpha * tckd + beta * (p_hat * (p_hat.log() - q_hat.log())).sum(-1)


def reference(student, teacher, labels, options, grad_output, dtype=torch.float64):
    """(loss, ∂(Σ loss·grad_output)/∂student) over the whole vocabulary, computed in ``dtype``
    (float64: the definition; float32: what eager PyTorch gets, for the error budget)."""
    leaf = student.detach().to(dtype).requires_grad_(True)
    s = _transformed(leaf, 1.0, options.get("student_softcap"), options.get("standardize", False))
    t = _transformed(teacher.to(dtype), options.get("teacher_logit_scale", 1.0), None,
                     options.get("standardize", False))
    temperature = options.get("temperature", 1.0)
    divergence = options["divergence"]
    flat_s, flat_t, flat_labels = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), labels.reshape(-1)
    if divergence == "dkd":
        target = torch.where(flat_labels >= 0, flat_labels, 0)
        rows = _dkd_rows(flat_s, flat_t, target, options.get("alpha", 1.0), options.get("beta", 8.0), temperature)
    else:
        rows = row_losses(divergence, flat_s, flat_t, temperature, options.get("beta", 0.5), options.get("skew", 0.1))
    if options.get("temperature_squared"):
        rows = rows * temperature ** 2
    loss = reduce(rows.reshape(labels.shape), labels, -100, options.get("reduction", "mean"),
                  options.get("normalizer"))
    (grad,) = torch.autograd.grad(loss, leaf, grad_output.to(dtype))
    return loss.detach(), grad


# ---------------------------------------------------------------------------------------------
# Inputs and cases.
# ---------------------------------------------------------------------------------------------


def _inputs(vocab, dtype, seed):
    """Student and teacher (2, 3, V) logits with rows at ±100 and a wide row; labels with two
    ignored rows and targets at the slice edges (dkd)."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*N_SHAPE, vocab, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(*N_SHAPE, vocab, generator=generator, dtype=torch.float64) * 3
    sign = torch.randn(vocab, generator=generator).sign().double()
    student[0, 1] = 100 * sign
    teacher[0, 1] = -100 * sign.roll(1)
    student[1, 0] = torch.randn(vocab, generator=generator, dtype=torch.float64) * 30
    labels = torch.tensor([[0, 400, -100], [vocab - 1, -100, vocab // 2]])
    return student.to(dtype), teacher.to(dtype), labels


def _cases():
    """(options, dtype): every divergence under several option sets."""
    cases = []
    for divergence, extra in (("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}),
                              ("skew_forward_kl", {"skew": 0.2}), ("skew_reverse_kl", {"skew": 0.3}),
                              ("tvd", {}), ("dkd", {"alpha": 1.5, "beta": 4.0})):
        base = dict(divergence=divergence, **extra)
        cases += [
            (dict(base, temperature=2.0), torch.float32),
            (dict(base, reduction="none"), torch.bfloat16),
            (dict(base, reduction="sum", temperature=0.7, temperature_squared=True), torch.float32),
            (dict(base, normalizer=torch.tensor(7.0), student_softcap=30.0, teacher_logit_scale=0.5),
             torch.float32),
            (dict(base, standardize=True, temperature=3.0), torch.float32),
        ]
    return cases


def _finite_or_zero(error):
    # Eager fp32 overflows to NaN on some ±100 rows (log of an underflowed probability): no budget.
    return error if math.isfinite(error) else 0.0


def _slice(x, split, rank):
    start = sum(split[:rank])
    return x[..., start:start + split[rank]].contiguous()


def _check_case(options, dtype, split, rank, group, seed, backend):
    student, teacher, labels = _inputs(sum(split), dtype, seed)
    reduction = options.get("reduction", "mean")
    generator = torch.Generator().manual_seed(seed + 1)
    grad_output = torch.rand(N_SHAPE, generator=generator) + 0.5 if reduction == "none" else torch.tensor(1.0)

    full = student.clone().requires_grad_(True)
    one_process = fastkd.kd_loss(full, teacher, labels, **options)
    one_process.backward(grad_output)
    ref_loss, ref_grad = reference(student, teacher, labels, options, grad_output)

    local = _slice(student, split, rank).requires_grad_(True)
    loss = fastkd.kd_loss(local, _slice(teacher, split, rank), labels, process_group=group, backend=backend,
                          **options)
    loss.backward(grad_output)

    where = f"rank {rank}, {options}, {dtype}"
    assert loss.dtype == one_process.dtype and loss.shape == one_process.shape, where
    assert local.grad.dtype == dtype and local.grad.shape == local.shape, where
    assert torch.isfinite(loss).all() and torch.isfinite(local.grad.float()).all(), where
    # The budget: the dtype's tolerance, or where larger 10× eager fp32 PyTorch's error or 2× one
    # process's (peaked rows at small T cancel in any fp32 softmax gradient: tests/reference.py).
    grad_one, ref_slice = _slice(full.grad, split, rank), _slice(ref_grad, split, rank)
    eager_loss, eager_grad = reference(student, teacher, labels, options, grad_output, torch.float32)
    loss_budget = max(TOLERANCE[torch.float32], 2 * rel_err(one_process, ref_loss),
                      _finite_or_zero(10 * rel_err(eager_loss, ref_loss)))
    grad_budget = max(TOLERANCE[dtype], 2 * rel_err(grad_one, ref_slice),
                      _finite_or_zero(10 * rel_err(_slice(eager_grad, split, rank), ref_slice)))
    assert rel_err(loss, ref_loss) <= loss_budget, (where, rel_err(loss, ref_loss))
    assert rel_err(loss, one_process) <= 2 * loss_budget, (where, rel_err(loss, one_process))
    assert rel_err(local.grad, ref_slice) <= grad_budget, (where, rel_err(local.grad, ref_slice))
    assert rel_err(local.grad, grad_one) <= 2 * grad_budget, (where, rel_err(local.grad, grad_one))
    # Ignored rows get exactly nothing.
    assert torch.all(local.grad[labels == -100] == 0), where


def _check_dkd_edges(rank, group):
    """dkd with a rank holding one column, the target's; a label outside the whole vocabulary is NaN
    on every rank (one process: NaN too), whichever rank's slice it is past."""
    split = (1, 60) if group.size() == 2 else (1, 30, 30)
    student, teacher, _ = _inputs(sum(split), torch.float64, seed=11)
    labels = torch.tensor([[0, 0, 5], [sum(split), -100, sum(split) - 1]])
    full = student.clone().requires_grad_(True)
    one_process = fastkd.kd_loss(full, teacher, labels, divergence="dkd", reduction="none")
    one_process.sum().backward()
    local = _slice(student, split, rank).requires_grad_(True)
    loss = fastkd.kd_loss(local, _slice(teacher, split, rank), labels, divergence="dkd", reduction="none",
                          process_group=group)
    loss.sum().backward()
    bad = labels == sum(split)
    assert torch.isnan(loss[bad]).all() and torch.isnan(one_process[bad]).all()
    assert rel_err(loss[~bad], one_process[~bad]) <= 1e-12
    kept = (~bad).reshape(-1)
    grad_one = _slice(full.grad, split, rank).reshape(-1, split[rank])[kept]
    assert rel_err(local.grad.reshape(-1, split[rank])[kept], grad_one) <= 1e-12


def _check_masked_columns(rank, group, split):
    """−inf logits (a masked vocabulary) in both models, covering rank 0's whole slice on some
    rows: zero probability, zero gradient there, no NaN; the float64 definition over the finite
    columns. And no rows at all (N = 0): zero loss, empty gradient."""
    vocab = sum(split)
    student, teacher, labels = _inputs(vocab, torch.float32, seed=9)
    finite = torch.ones(vocab, dtype=torch.bool)
    finite[::7] = False
    finite[:split[0]] = False
    finite[0] = True  # one finite column on rank 0 ...
    student[..., ~finite] = -math.inf
    teacher[..., ~finite] = -math.inf
    student[0, 0, 0] = teacher[0, 0, 0] = -math.inf  # ... masked on one row: rank 0 holds nothing there
    for divergence in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
        local = _slice(student, split, rank).requires_grad_(True)
        loss = fastkd.kd_loss(local, _slice(teacher, split, rank), labels, divergence=divergence, temperature=2.0,
                              reduction="none", process_group=group)
        loss.sum().backward()
        leaf = student.double().requires_grad_(True)
        flat_leaf, flat_teacher = leaf.reshape(-1, vocab), teacher.double().reshape(-1, vocab)
        # Per row, the definition over that row's finite columns (row (0, 0) lacks column 0 too).
        rows = [row_losses(divergence, flat_leaf[i, kept][None], flat_teacher[i, kept][None], 2.0)[0]
                for i, kept in enumerate(torch.isfinite(flat_teacher))]
        expected = torch.where(labels != -100, torch.stack(rows).reshape(labels.shape), 0.0)
        (grad,) = torch.autograd.grad(expected.sum(), leaf)
        assert torch.isfinite(loss).all() and torch.isfinite(local.grad).all(), divergence
        assert rel_err(loss, expected) <= 4 * TOLERANCE[torch.float32], (divergence, rel_err(loss, expected))
        assert rel_err(local.grad, _slice(grad, split, rank)) <= 4 * TOLERANCE[torch.float32], divergence
        assert torch.all(local.grad[..., ~_slice(finite, split, rank)] == 0), divergence
    empty = torch.zeros(0, split[rank], requires_grad=True)
    loss = fastkd.kd_loss(empty, torch.zeros(0, split[rank]), divergence="jsd", process_group=group)
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == empty.shape


def _check_module_form(rank, group, split):
    student, teacher, labels = _inputs(sum(split), torch.float32, seed=5)
    module = fastkd.KDLoss("jsd", beta=0.2, temperature=1.5, process_group=group)
    loss = module(_slice(student, split, rank), _slice(teacher, split, rank), labels)
    expected = fastkd.kd_loss(student, teacher, labels, divergence="jsd", beta=0.2, temperature=1.5)
    assert rel_err(loss, expected) <= 4 * TOLERANCE[torch.float32]


def _check_compiled(rank, group, split):
    """A function calling the vocab-parallel loss compiles with fullgraph=True (the collectives are
    traced, no graph break) and gives the eager values and gradients."""
    student, teacher, labels = _inputs(sum(split), torch.float32, seed=17)
    # standardize puts an all-reduce in the backward too; one compile (CI time).
    for options in (dict(divergence="jsd", beta=0.4, standardize=True),):
        def loss_fn(local_student, local_teacher, labels):
            return fastkd.kd_loss(local_student, local_teacher, labels, process_group=group, **options)

        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        local = _slice(student, split, rank).requires_grad_(True)
        loss = compiled(local, _slice(teacher, split, rank), labels)
        loss.backward()
        full = student.clone().requires_grad_(True)
        expected = fastkd.kd_loss(full, teacher, labels, **options)
        expected.backward()
        assert rel_err(loss, expected) <= 4 * TOLERANCE[torch.float32], options
        assert rel_err(local.grad, _slice(full.grad, split, rank)) <= 4 * TOLERANCE[torch.float32], options


def _check_errors(rank, group, split):
    student, teacher, labels = _inputs(sum(split), torch.float32, seed=3)
    local = (_slice(student, split, rank), _slice(teacher, split, rank), labels)
    with pytest.raises(ValueError, match="backend='native' has no kd_rows_vocab_parallel kernels"):
        fastkd.kd_loss(*local, backend="native", process_group=group)
    with pytest.raises(ValueError, match="divergence='dkd' needs labels"):
        fastkd.kd_loss(*local[:2], divergence="dkd", process_group=group)
    real_get_backend = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"  # a CUDA-only group, which cannot serve CPU tensors
    try:
        with pytest.raises(ValueError, match="process_group's backend 'nccl' cannot all-reduce tensors on 'cpu'"):
            fastkd.kd_loss(*local, process_group=group)
    finally:
        dist.get_backend = real_get_backend


def _check_dtensor(rank, group):
    """DTensor logits placed Shard(-1) (V = 1001 over 3 ranks: 334, 334, 333) need no group and
    give a replicated DTensor loss; the student's gradient comes back as a DTensor placed alike."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (group.size(),))
    student, teacher, labels = _inputs(1001, torch.float32, seed=21)
    for reduction in ("mean", "none"):
        options = dict(divergence="skew_reverse_kl", skew=0.25, temperature=1.5, reduction=reduction)
        full = student.clone().requires_grad_(True)
        one_process = fastkd.kd_loss(full, teacher, labels, **options)
        one_process.sum().backward()
        sharded = distribute_tensor(student.clone(), mesh, [Shard(-1)]).requires_grad_(True)
        loss = fastkd.kd_loss(sharded, distribute_tensor(teacher, mesh, [Shard(-1)]), labels, **options)
        assert isinstance(loss, DTensor) and tuple(loss.placements) == (Replicate(),)
        assert rel_err(loss.to_local(), one_process) <= 4 * TOLERANCE[torch.float32]
        loss.sum().backward()
        assert isinstance(sharded.grad, DTensor) and tuple(sharded.grad.placements) == tuple(sharded.placements)
        assert rel_err(sharded.grad.full_tensor(), full.grad) <= 4 * TOLERANCE[torch.float32]
    sharded_teacher = distribute_tensor(teacher, mesh, [Shard(-1)])
    with pytest.raises(ValueError, match="process_group must be None for DTensor logits"):
        fastkd.kd_loss(distribute_tensor(student, mesh, [Shard(-1)]), sharded_teacher, process_group=group)
    with pytest.raises(TypeError, match="must both be DTensors"):
        fastkd.kd_loss(student, sharded_teacher)
    with pytest.raises(NotImplementedError, match="Shard\\(-1\\) on one mesh dimension"):
        fastkd.kd_loss(distribute_tensor(student, mesh, [Shard(0)]), distribute_tensor(teacher, mesh, [Shard(0)]))


# ---------------------------------------------------------------------------------------------
# Bytes sent: every collective is wrapped; all-reduce payloads are counted, anything else fails.
# ---------------------------------------------------------------------------------------------


def _bytes_per_step(rank, group, vocab, n_rows, options):
    """Bytes this rank hands to collectives in one forward and backward, for a vocabulary of
    ``vocab`` split as evenly as 3 ranks allow."""
    sent = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return real_all_reduce(tensor, *args, **kwargs)

    world = group.size()
    split = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    generator = torch.Generator().manual_seed(vocab)
    student = torch.randn(n_rows, vocab, generator=generator)
    teacher = torch.randn(n_rows, vocab, generator=generator)
    labels = torch.randint(0, vocab, (n_rows,), generator=generator)
    local = _slice(student, split, rank).requires_grad_(True)
    dist.all_reduce = counting_all_reduce
    try:
        fastkd.kd_loss(local, _slice(teacher, split, rank), labels, process_group=group, **options).backward()
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
    try:
        for options, per_row in (({"divergence": "forward_kl"}, 3 * 2 * 4),
                                 ({"divergence": "dkd"}, (2 + 4 + 1) * 4),
                                 ({"divergence": "jsd", "standardize": True}, (2 + 2 + 2 + 2 + 2 + 3) * 4)):
            counts = {(vocab, n): _bytes_per_step(rank, group, vocab, n, options)
                      for vocab in (1001, 16016) for n in (8, 64)}
            # Independent of V (16× the vocabulary, the same bytes) ...
            assert counts[(1001, 8)] == counts[(16016, 8)] and counts[(1001, 64)] == counts[(16016, 64)], counts
            # ... and linear in N, at the documented number of fp32 values per row (plus the
            # slice sizes, world int64 values, where dkd or standardize need offsets).
            sizes = 0 if options == {"divergence": "forward_kl"} else 8 * group.size()
            assert counts[(1001, 64)] - counts[(1001, 8)] == per_row * 56, (options, counts)
            assert counts[(1001, 8)] == per_row * 8 + sizes, (options, counts)
    finally:
        for name, function in real.items():
            setattr(dist, name, function)


# ---------------------------------------------------------------------------------------------
# The spawned groups.
# ---------------------------------------------------------------------------------------------


def _group_main(rank, world_size, store_path, split, extra, backend):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        group = dist.group.WORLD
        for seed, (options, dtype) in enumerate(_cases()):
            _check_case(options, dtype, split, rank, group, seed, backend)
        _check_dkd_edges(rank, group)
        _check_masked_columns(rank, group, split)
        _check_module_form(rank, group, split)
        if "errors" in extra:
            _check_errors(rank, group, split)
        if "compile" in extra:
            _check_compiled(rank, group, split)
        if "bytes" in extra:
            _check_bytes(rank, group)
        if "dtensor" in extra:
            _check_dtensor(rank, group)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world_size, split, extra, tmp_path, backend):
    mp.spawn(_group_main, args=(world_size, str(tmp_path / "store"), split, extra, backend), nprocs=world_size,
             join=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.family("kd_rows_vocab_parallel")
@pytest.mark.parametrize("backend", VOCAB_PARALLEL_BACKENDS)
def test_two_ranks_match_one_process_check_their_arguments_and_compile(tmp_path, backend):
    _spawn(2, (600, 401), ("errors", "compile"), tmp_path, backend)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.family("kd_rows_vocab_parallel")
@pytest.mark.parametrize("backend", VOCAB_PARALLEL_BACKENDS)
def test_three_uneven_ranks_match_one_process_send_bytes_independent_of_v_and_take_dtensors(tmp_path, backend):
    _spawn(3, (400, 301, 300), ("bytes", "dtensor"), tmp_path, backend)


def test_process_group_must_be_a_process_group():
    logits = torch.randn(4, 10)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        fastkd.kd_loss(logits, logits.clone(), process_group="tp")
