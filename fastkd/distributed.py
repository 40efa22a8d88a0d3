"""Vocab-parallel kd_loss on torch.distributed: each rank of a process group holds a contiguous
slice of the vocabulary (ranks in order, slices of any size, e.g. V = 1001 over 3 ranks), and the
ranks exchange per-row statistics only, never logits.

Per call, each step one all-reduce of a (k, N) tensor in the compute dtype:

    [dkd or standardize]  the slice sizes, for offsets and V        (world,) int64 SUM
    [standardize]         Σy, then Σ(y − mean)², per side            (2, N) SUM, twice
    row max of each side's x = logits / T (dkd: off the target)      (2, N) MAX
    Σ exp(x − max) per side (dkd: and the target's x)               (2, N) SUM (dkd: (4, N))
    the divergence's per-row sums: loss and gradient constant aux    (2, N) SUM (tvd: (4, N);
                                                                      dkd: NCKD (1, N))

The backward is local: every divergence's gradient is q_j·(g_j − aux) with aux a per-row sum
already exchanged (fastkd/divergences.py; tvd exchanges the masses that aux is made of, so that
½ − aux does not cancel). Only ``standardize`` needs one more (3, N) SUM there.

Gradient convention. The per-row loss comes out replicated: every rank holds the same (N,)
values, runs the same reduction and calls backward with the same upstream gradient. The
autograd.Function below returns that replicated loss and, in backward, this rank's slice of the
full gradient. The all-reduces are not differentiated through: the usual all-reduce backward
(all-reduce the incoming gradients) would add the same replicated gradient world-size times.
"""

import math
import sys
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from . import divergences, logit_transforms
from .kernels.layout import compute_dtype, row_chunks

# Elements of one (rows × V_local) temporary, as the torch backend (4 MiB in fp32).
CHUNK_ELEMENTS = 1 << 20

# Which device types each collective backend serves (a plain "gloo" group runs CUDA tensors too).
_BACKEND_DEVICES = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",), "mpi": ("cpu",), "ucc": ("cpu", "cuda"),
                    "xccl": ("xpu",)}


def check_process_group(group, device):
    """A usable group for tensors on ``device``: initialised, this process a member, a collective
    backend that serves the device type. (The fastkd backend is the registry's choice: family
    "kd_rows_vocab_parallel".)"""
    if not dist.is_available():
        raise RuntimeError("process_group needs torch.distributed, which this PyTorch build lacks")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None; got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if dist.get_rank(group) < 0:
        raise ValueError("process_group does not include this process")
    served = _served_devices(dist.get_backend(group))
    if served is not None and device.type not in served:
        raise ValueError(f"process_group's backend {dist.get_backend(group)!r} cannot all-reduce tensors on "
                         f"{device.type!r} devices (the logits' device); use a group whose backend serves it "
                         f"(gloo for CPU tensors, nccl for CUDA tensors)")


def _served_devices(name):
    """Device types a group backend string serves ('gloo', or 'cpu:gloo,cuda:nccl'); None when
    the backend is unknown (a third-party backend: let it speak for itself)."""
    devices = set()
    for part in str(name).split(","):
        if ":" in part:
            device_type, _ = part.split(":", 1)
            devices.add(device_type.strip())
        elif part.strip() in _BACKEND_DEVICES:
            devices.update(_BACKEND_DEVICES[part.strip()])
        else:
            return None
    return devices


def unwrap_dtensors(student, teacher, labels, group):
    """DTensor logits placed Shard(-1) on one mesh dimension (Replicate on the others) become
    their local slices and that dimension's group. Returns (student, teacher, labels, group,
    wrap): ``wrap`` turns the loss into a DTensor replicated over the mesh, or is None for plain
    tensors. Gradients reach the DTensor student as a DTensor placed like it."""
    if not (_is_dtensor(student) or _is_dtensor(teacher)):
        return student, teacher, labels, group, None
    from torch.distributed.tensor import DTensor, Replicate

    if not (_is_dtensor(student) and _is_dtensor(teacher)):
        raise TypeError("student_logits and teacher_logits must both be DTensors, or neither")
    if group is not None:
        raise ValueError("process_group must be None for DTensor logits: the group comes from their device mesh")
    if student.device_mesh != teacher.device_mesh or tuple(student.placements) != tuple(teacher.placements):
        raise ValueError(f"student_logits and teacher_logits must share a device mesh and placements; got "
                         f"{student.placements} and {teacher.placements}")
    last = student.dim() - 1
    placements = tuple(student.placements)
    vocab_dims = [d for d, p in enumerate(placements) if p.is_shard() and p.dim in (-1, last)]
    if len(vocab_dims) != 1 or any(not p.is_replicate() for d, p in enumerate(placements) if d != vocab_dims[0]):
        raise NotImplementedError(f"DTensor logits are supported placed Shard(-1) on one mesh dimension and "
                                  f"Replicate on the others; got placements {placements}")
    if _is_dtensor(labels):
        if not all(p.is_replicate() for p in labels.placements):
            raise NotImplementedError(f"DTensor labels must be replicated; got placements {labels.placements}")
        labels = labels.to_local()
    mesh = student.device_mesh
    replicated = [Replicate()] * mesh.ndim

    def wrap(loss):
        return DTensor.from_local(loss, mesh, replicated, run_check=False)

    return student.to_local(), teacher.to_local(), labels, mesh.get_group(vocab_dims[0]), wrap


def unwrap_sharded_weights(sharded, replicated, group):
    """DTensor lm_head weights (and biases) placed Shard(0) on one mesh dimension (Replicate on
    the others) become their local rows and that dimension's group, for the fused linear losses.

    sharded: {name: weight or bias or None}, rows split over the vocabulary; replicated: {name:
    tensor or None} (hidden states, labels), plain tensors or DTensors replicated over the mesh.
    Returns (sharded locals, replicated locals, group, wrap) as for :func:`unwrap_dtensors`; the
    gradients reach the DTensors placed like them.
    """
    present = {name: x for name, x in {**sharded, **replicated}.items() if x is not None}
    if not any(_is_dtensor(x) for x in present.values()):
        return sharded, replicated, group, None
    from torch.distributed.tensor import DTensor, Replicate

    weights = {name: x for name, x in sharded.items() if x is not None}
    plain = [name for name, x in weights.items() if not _is_dtensor(x)]
    if plain:
        raise TypeError(f"{', '.join(plain)} must be DTensors placed Shard(0) like the other lm_head tensors "
                        f"(or no argument a DTensor)")
    if group is not None:
        raise ValueError("process_group must be None for DTensor weights: the group comes from their device mesh")
    first_name, first = next(iter(weights.items()))
    mesh, placements = first.device_mesh, tuple(first.placements)
    vocab_dims = [d for d, p in enumerate(placements) if p.is_shard() and p.dim == 0]
    if len(vocab_dims) != 1 or any(not p.is_replicate() for d, p in enumerate(placements) if d != vocab_dims[0]):
        raise NotImplementedError(f"DTensor lm_head weights are supported placed Shard(0) on one mesh dimension "
                                  f"and Replicate on the others; got {first_name} placed {placements}")
    for name, x in weights.items():
        if x.device_mesh != mesh or tuple(x.placements) != placements:
            raise ValueError(f"{name} must share {first_name}'s device mesh and placements {placements}; got "
                             f"{tuple(x.placements)}")
    local_replicated = {}
    for name, x in replicated.items():
        if _is_dtensor(x):
            if x.device_mesh != mesh or not all(p.is_replicate() for p in x.placements):
                raise NotImplementedError(f"DTensor {name} must be replicated on the weights' mesh; got placements "
                                          f"{tuple(x.placements)}")
            x = x.to_local()
        local_replicated[name] = x
    replicated_placements = [Replicate()] * mesh.ndim

    def wrap(loss):
        return DTensor.from_local(loss, mesh, replicated_placements, run_check=False)

    local_sharded = {name: None if x is None else x.to_local() for name, x in sharded.items()}
    return local_sharded, local_replicated, mesh.get_group(vocab_dims[0]), wrap


def global_rows(weight):
    """The global row count of a DTensor lm_head weight (known alike on every rank), else None."""
    return weight.shape[0] if _is_dtensor(weight) else None


def _is_dtensor(x):
    # No DTensor exists unless its module was imported; importing it here would cost seconds.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def kd_rows_vocab_parallel(student, teacher, labels, spec, ignore_index, group):
    """Per-row divergence over the whole vocabulary from this rank's slices.

    student, teacher: (N, V_r) logits, this rank's columns; labels: (N,) int global ids or None
    (dkd: required). Returns (N,) losses in the compute dtype, equal on every rank; ignored rows 0.
    The gradient reaching ``student`` is this rank's (N, V_r) slice of the full gradient.
    """
    return _VocabParallelKDRows.apply(student, teacher, labels, spec, ignore_index, group)


def all_reduce(tensor, op, group):
    """In-place all-reduce of ``tensor`` over ``group`` (returns it)."""
    # Looked up on torch.distributed at call time, so a test can wrap it to count bytes.
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _chunks(n_rows, n_cols):
    return row_chunks(n_rows, n_cols, CHUNK_ELEMENTS)


class Layout:
    """Where this rank's columns sit in the vocabulary, on the device (no host synchronisation):
    the offset of its first column and the total V (the sum of the slices), both 0-d int64
    tensors. With ``vocab_limit`` ≥ 0 the global columns at or past it are padding: ``padding``
    is then this rank's (V_r,) bool mask of them (else None) and ``columns`` the real vocabulary,
    min(V, vocab_limit) (else V)."""

    def __init__(self, n_cols, device, group, vocab_limit=-1):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = torch.zeros(world, dtype=torch.int64, device=device)
        sizes[rank] = n_cols
        all_reduce(sizes, dist.ReduceOp.SUM, group)
        self.offset = sizes[:rank].sum()
        self.total = sizes.sum()
        self.padding = None
        self.columns = self.total
        if vocab_limit >= 0:
            self.padding = self.offset + torch.arange(n_cols, device=device) >= vocab_limit  # (V_r,)
            self.columns = torch.clamp(self.total, max=vocab_limit)


class _Targets:
    """dkd's target class of each row, seen from this rank: whether it owns the target's column,
    its local index (0 where it does not), and the rows whose label is neither a class of the
    whole vocabulary nor ignored (NaN, as on one device)."""

    def __init__(self, labels, layout, n_cols, ignore_index):
        labels = labels.long()
        local = labels - layout.offset
        self.owns = (local >= 0) & (local < n_cols)
        self.index = torch.where(self.owns, local, 0)[:, None]
        self.bad = ~((labels >= 0) & (labels < layout.columns)) & (labels != ignore_index)

    def rows(self, start, stop):
        return self.owns[start:stop], self.index[start:stop]


def _mask_target(x, owns, index):
    """x with −inf at the target column on rows this rank owns; other rows unchanged."""
    kept = x.gather(1, index)[:, 0]
    return x.clone().scatter_(1, index, torch.where(owns, -math.inf, kept)[:, None])


class _Standard:
    """Global per-row mean, std and std + eps of each side's scaled and capped logits y, for
    ``standardize`` (sample std, divisor V − 1, as logit_transforms.py), over the real columns
    only: padding columns (layout.padding, −inf) enter neither the sums nor the count."""

    def __init__(self, rows, n_rows, n_cols, spec, layout, dtype, device, group):
        self.padding = layout.padding
        total = layout.columns.to(dtype)
        sums = torch.zeros(2, n_rows, dtype=dtype, device=device)
        for start, stop in _chunks(n_rows, n_cols):
            for side in range(2):
                sums[side, start:stop] = self.real(rows(side, start, stop)).sum(-1)
        self.mean = all_reduce(sums, dist.ReduceOp.SUM, group) / total
        squares = torch.zeros(2, n_rows, dtype=dtype, device=device)
        for start, stop in _chunks(n_rows, n_cols):
            for side in range(2):
                centred = rows(side, start, stop) - self.mean[side, start:stop, None]
                squares[side, start:stop] = self.real(centred.square()).sum(-1)
        all_reduce(squares, dist.ReduceOp.SUM, group)
        self.std = (squares / (total - 1).clamp(min=1)).sqrt()
        self.denominator = self.std + spec.standardize_eps
        self.total = total

    def real(self, x):
        """x (rows, V_r) with 0 on the padding columns (whose −inf or NaN would poison a row sum)."""
        return x if self.padding is None else x.masked_fill(self.padding, 0.0)


class _Sides:
    """Each side's logits as its softmax sees them, x = transform(logits) / T, chunk by chunk."""

    def __init__(self, student, teacher, spec, dtype):
        self.inputs, self.spec, self.dtype = (student, teacher), spec, dtype
        self.standard = None

    def capped(self, side, start, stop):
        """scale·logits, soft-capped (element-wise: no communication needed)."""
        name = ("student", "teacher")[side]
        x = self.inputs[side][start:stop].to(self.dtype)
        return logit_transforms.scale_and_cap(x, getattr(self.spec, f"{name}_scale"),
                                              getattr(self.spec, f"{name}_softcap"))

    def centred(self, side, start, stop):
        return self.capped(side, start, stop) - self.standard.mean[side, start:stop, None]

    def scaled(self, side, start, stop):
        if self.standard is None:
            y = self.capped(side, start, stop)
        else:
            y = self.centred(side, start, stop) / self.standard.denominator[side, start:stop, None]
        return y * self.spec.inv_temperature


class RowState(NamedTuple):
    """What the backward of a block needs from its forward: per-row statistics already exchanged
    (row_max, log_sum (2, N); aux), the standardisation's statistics and dkd's targets (or None);
    and the student's entropy per row when asked for (a logged value, not needed by the backward)."""

    row_max: torch.Tensor
    log_sum: torch.Tensor
    aux: torch.Tensor
    standard: Optional["_Standard"]
    targets: Optional["_Targets"]
    entropy: Optional[torch.Tensor] = None


class _VocabParallelKDRows(torch.autograd.Function):

    @staticmethod
    def forward(ctx, student, teacher, labels, spec, ignore_index, group):
        row_loss, state = rows_forward(student, teacher, labels, spec, ignore_index, group)
        ctx.save_for_backward(student, teacher, labels, state.row_max, state.log_sum, state.aux)
        ctx.spec, ctx.ignore_index, ctx.group = spec, ignore_index, group
        ctx.standard, ctx.targets = state.standard, state.targets
        return row_loss

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, labels, row_max, log_sum, aux = ctx.saved_tensors
        state = RowState(row_max, log_sum, aux, ctx.standard, ctx.targets)
        grad = rows_backward(grad_loss, student, teacher, labels, state, ctx.spec, ctx.ignore_index, ctx.group)
        return grad, None, None, None, None, None


def rows_forward(student, teacher, labels, spec, ignore_index, group, layout=None, with_entropy=False):
    """The forward of :func:`kd_rows_vocab_parallel` on one block of rows, for callers that
    drive their own autograd (the fused linear losses, per token block).

    student, teacher: (N, V_r) this rank's columns (padding columns, if any, −inf and marked in
    layout.padding); labels: (N,) global ids or None; layout: this rank's Layout, or None to
    exchange the slice sizes here when needed. Returns ((N,) losses, equal on every rank, and the
    RowState that :func:`rows_backward` takes).

    ``with_entropy``: RowState.entropy is the student's entropy over the whole vocabulary per row,
    H = −Σ_v q_v log q_v with q the student's softmax at T (after its transforms): one more row in
    the last (k, N) SUM, Σ over this rank's columns of −q log q (every term ≥ 0: no cancellation).
    dkd's softmaxes leave the target out; from the masked distribution's entropy H_m, with
    t = log q_target and r = log(1 − q_target) over the whole row:
    H = e^r·(H_m − r) − e^t·t. Ignored rows' entropy is whatever their logits give (the caller
    zeroes it).
    """
    n_rows, n_cols = student.shape
    device, dtype = student.device, compute_dtype(student, teacher)
    dkd = spec.name == "dkd"
    sides = _Sides(student, teacher, spec, dtype)
    if layout is None and (dkd or spec.standardize):
        layout = Layout(n_cols, device, group)
    if spec.standardize:
        sides.standard = _Standard(sides.capped, n_rows, n_cols, spec, layout, dtype, device, group)
    targets = _Targets(labels, layout, n_cols, ignore_index) if dkd else None

    def chunk(start, stop):
        """(x of both sides, as the softmaxes over the rows see them (dkd: target masked), raw x)."""
        raw = [sides.scaled(side, start, stop) for side in range(2)]
        if not dkd:
            return raw, raw
        owns, index = targets.rows(start, stop)
        return [_mask_target(x, owns, index) for x in raw], raw

    row_max = torch.empty(2, n_rows, dtype=dtype, device=device)
    for start, stop in _chunks(n_rows, n_cols):
        xs, _ = chunk(start, stop)
        for side in range(2):
            row_max[side, start:stop] = xs[side].amax(-1)
    all_reduce(row_max, dist.ReduceOp.MAX, group)

    # Σ exp(x − max) per side; dkd adds each side's target x (held by one rank, 0 elsewhere).
    sums = torch.zeros(4 if dkd else 2, n_rows, dtype=dtype, device=device)
    for start, stop in _chunks(n_rows, n_cols):
        xs, raw = chunk(start, stop)
        for side in range(2):
            sums[side, start:stop] = (xs[side] - row_max[side, start:stop, None]).exp().sum(-1)
            if dkd:
                owns, index = targets.rows(start, stop)
                sums[2 + side, start:stop] = torch.where(owns, raw[side].gather(1, index)[:, 0], 0.0)
    all_reduce(sums, dist.ReduceOp.SUM, group)
    log_sum = sums[:2].log()

    def log_probs(start, stop):
        xs, _ = chunk(start, stop)
        return [divergences.log_probs(xs[side], row_max[side, start:stop], log_sum[side, start:stop])
                for side in range(2)]

    tvd = spec.name == "tvd"
    n_partial = 1 if dkd else 4 if tvd else 2
    partial = torch.zeros(n_partial + with_entropy, n_rows, dtype=dtype, device=device)
    for start, stop in _chunks(n_rows, n_cols):
        lq, lp = log_probs(start, stop)
        if with_entropy:  # q·log q is 0·(−inf) = NaN on masked columns: they hold no probability
            partial[-1, start:stop] = -torch.where(lq > -math.inf, lq.exp() * lq, 0.0).sum(-1)
        if dkd:  # NCKD's terms over this rank's non-target classes
            partial[0, start:stop] = divergences._kl_terms(lp.exp(), lp, lq, divergences._fresh).sum(-1)
        elif tvd:
            partial[:4, start:stop] = _tvd_sums(lq, lp)
        else:  # every divergence's loss and aux are sums of element-wise terms
            partial[0, start:stop], partial[1, start:stop] = divergences.row_loss_and_aux(spec, lq, lp)
    all_reduce(partial, dist.ReduceOp.SUM, group)
    entropy = partial[-1] if with_entropy else None
    partial = partial[:n_partial]

    if dkd:
        target_shifted = sums[2:] - row_max
        log_all = torch.logaddexp(log_sum, target_shifted)
        log_target, log_rest = target_shifted - log_all, log_sum - log_all
        tckd = (divergences._binary_kl(log_target[1], log_target[0])
                + divergences._binary_kl(log_rest[1], log_rest[0]))
        row_loss = torch.where(targets.bad, math.nan, spec.alpha * tckd + spec.param * partial[0])
        aux = log_target[0].exp() - log_target[1].exp()
        if with_entropy:
            entropy = _with_target(entropy, log_target[0], log_rest[0])
    else:
        row_loss, aux = partial[0], partial[1:]
    active = None if labels is None else labels != ignore_index
    if active is not None:
        row_loss = torch.where(active, row_loss, 0.0)

    return row_loss, RowState(row_max, log_sum, aux, sides.standard, targets, entropy)


def _with_target(masked_entropy, log_target, log_rest):
    """The entropy of a whole row from that of its distribution without the target (dkd's), the
    target's log-probability t and the rest's r: e^r·(H_m − r) − e^t·t, each term 0 when its mass is."""
    zero = torch.zeros((), dtype=masked_entropy.dtype, device=masked_entropy.device)
    rest = torch.where(log_rest > -math.inf, log_rest.exp() * (masked_entropy - log_rest), zero)
    return rest - torch.where(log_target > -math.inf, log_target.exp() * log_target, zero)


def rows_backward(grad_loss, student, teacher, labels, state, spec, ignore_index, group):
    """∂(Σ grad_loss·loss)/∂student on this rank's (N, V_r) columns, in the student's dtype, from
    the RowState of :func:`rows_forward` (``standardize`` exchanges one (3, N) sum more)."""
    row_max, log_sum, aux, targets = state.row_max, state.log_sum, state.aux, state.targets
    n_rows, n_cols = student.shape
    dtype = row_max.dtype
    sides = _Sides(student, teacher, spec, dtype)
    sides.standard = state.standard
    row_scale = grad_loss.to(dtype) * spec.inv_temperature
    active = None if labels is None else labels != ignore_index
    if active is not None:
        row_scale = torch.where(active, row_scale, 0.0)

    def grad_scaled(start, stop):
        """∂(Σ grad_loss·L)/∂(transformed logits) on these rows: (rows, V_r)."""
        xs = [sides.scaled(side, start, stop) for side in range(2)]
        if targets is not None:
            owns, index = targets.rows(start, stop)
            xs = [_mask_target(x, owns, index) for x in xs]
        lq, lp = (divergences.log_probs(xs[side], row_max[side, start:stop], log_sum[side, start:stop])
                  for side in range(2))
        rows_aux = aux[..., start:stop]
        if spec.name == "tvd":
            g = _tvd_grad(lq, lp, rows_aux)
        elif targets is None:
            g = divergences.grad_scaled_student(spec, lq, lp, rows_aux[0])
        else:
            g = lq.exp().mul_((spec.param - spec.alpha * rows_aux)[:, None]).sub_(lp.exp().mul_(spec.param))
            # ∂/∂x_y = alpha·aux lands on the one rank that holds the target's column.
            g.scatter_(1, index, torch.where(owns, spec.alpha * rows_aux, g.gather(1, index)[:, 0])[:, None])
            g.masked_fill_(targets.bad[start:stop, None], math.nan)
        if active is not None:
            # Ignored rows' statistics may be inf or NaN: zero their gradient, never scale it.
            g.masked_fill_(~active[start:stop, None], 0.0)
        return g.mul_(row_scale[start:stop, None])

    through_std = None
    if spec.standardize:
        # The standardisation's backward needs Σg, Σg·c and Σc over the whole row (c = y − mean).
        sums = torch.zeros(3, n_rows, dtype=dtype, device=student.device)
        real = state.standard.real
        for start, stop in _chunks(n_rows, n_cols):
            g, centred = grad_scaled(start, stop), real(sides.centred(0, start, stop))
            sums[0, start:stop], sums[1, start:stop] = g.sum(-1), (g * centred).sum(-1)
            sums[2, start:stop] = centred.sum(-1)
        through_std = all_reduce(sums, dist.ReduceOp.SUM, group)

    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    for start, stop in _chunks(n_rows, n_cols):
        g = grad_scaled(start, stop)
        if through_std is not None:
            # Padding columns (centred −inf) get no gradient: they are not in the softmax.
            g = state.standard.real(_standardize_backward(g, sides.centred(0, start, stop),
                                                          through_std[:, start:stop], state.standard, start, stop))
        x = student[start:stop].to(dtype)
        grad[start:stop] = logit_transforms.backward(x, g, spec.student_scale, spec.student_softcap, False,
                                                     spec.standardize_eps)
    return grad


def _tvd_sums(lq, lp):
    """(½Σ|p − q|, Σ_{q<p} q, Σ_{q>p} q, Σ_{q=p} q) per row: (4, rows). The masses replace tvd's
    aux = ½Σ sign(q − p)·q, whose ½ − aux cancels in fp32 when most of q lies above p."""
    q, p = lq.exp(), lp.exp()
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    return torch.stack([0.5 * (q - p).abs().sum(-1), torch.where(q < p, q, zero).sum(-1),
                        torch.where(q > p, q, zero).sum(-1), torch.where(q == p, q, zero).sum(-1)])


def _tvd_grad(lq, lp, masses):
    """∂tvd/∂s_j = q_j·(½ sign_j − aux), with ½ − aux = below + ½ tied and −½ − aux = −(above +
    ½ tied) (Σq = 1 splits into the three masses): no cancellation."""
    q, p = lq.exp(), lp.exp()
    below, above, tied = masses[0, :, None], masses[1, :, None], masses[2, :, None]
    factor = torch.where(q > p, below + 0.5 * tied, torch.where(q < p, -(above + 0.5 * tied), 0.5 * (below - above)))
    return q * factor


def _standardize_backward(g, centred, sums, standard, start, stop):
    """logit_transforms.backward's standardisation step with the row sums taken over the whole
    vocabulary: sums = (Σg, Σg·c, Σc) per row; the student's statistics."""
    denominator = standard.denominator[0, start:stop, None]
    std = standard.std[0, start:stop, None]
    mean_g = sums[0, :, None] / standard.total
    grad = (g - mean_g) / denominator
    # Σ(grad·c) = (Σg·c − mean_g·Σc) / D; Σc is 0 up to rounding, kept as one device computes it.
    through_std = (sums[1, :, None] - mean_g * sums[2, :, None]) / denominator
    per_unit = torch.where(std > 0, through_std / (denominator * std * (standard.total - 1).clamp(min=1)),
                           torch.zeros((), dtype=grad.dtype, device=grad.device))
    return grad - per_unit * centred
