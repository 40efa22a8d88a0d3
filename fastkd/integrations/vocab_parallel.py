"""The Hugging Face distillation loss with the vocabulary split over a process group: each rank
forms the logits of its own contiguous slice of the vocabulary only, (N, V/world), and
:func:`fastkd.kd_loss` with ``process_group`` exchanges per-row statistics, never logits.

Every rank of the group holds the same batch and the same models (tensor parallelism's layout),
with full lm_heads or lm_heads placed ``Shard(0)`` as DTensors on a one-dimensional mesh over the
group (then each rank reads its local shard, and no head is gathered). Slices of a full head follow
``torch.chunk`` over the real vocabulary: ranks in order, ⌈V/world⌉ rows each, the last fewer.

Gradients are those of the one-process loss on every rank: the hidden states' gradient and a full
head's gradient are summed over the group in the backward (one all-reduce each, as a
column-parallel lm_head's backward does); a Shard(0) head gets its own slice's rows.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from .. import logit_transforms
from ..distributed import CHUNK_ELEMENTS
from ..functional import FusedLoss, kd_loss
from ..kernels.layout import compute_dtype, row_chunks

# kd_loss options a caller may pass through (the fused losses' other options have no meaning here).
_KD_OPTIONS = ("divergence", "beta", "skew", "alpha", "temperature_squared", "standardize", "standardize_eps",
               "ignore_index", "backend")


def vocab_parallel_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, transforms, group, *,
                        vocab_size, temperature=1.0, reduction="mean", normalizer=None, soft_weight=1.0,
                        hard_weight=0.0, fp32_logits=None, return_entropy=False, **options) -> FusedLoss:
    """``soft_weight`` · kd_loss over the whole vocabulary from this rank's slice of it.

    student_head, teacher_head: (weight (V', H), bias or None) each, full or DTensor Shard(0);
    transforms: the (student, teacher) LogitTransform; vocab_size: the real vocabulary (≤ V').
    ``return_entropy``: the student's entropy at T per token, from two more all-reduces ((N,), (2, N))."""
    unknown = sorted(set(options) - set(_KD_OPTIONS))
    if unknown:
        raise ValueError(f"with process_group (vocab-parallel) the loss takes none of {unknown}")
    if hard_weight != 0:
        raise ValueError("hard_weight must be 0 with process_group: the vocab-parallel loss has no hard term")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup; got {type(group).__name__}")
    student_transform, teacher_transform = transforms
    student_hidden = _SumGradient.apply(student_hidden, group)
    student_weight, student_bias = _local_slice(*student_head, vocab_size, group)
    with torch.no_grad():
        teacher_weight, teacher_bias = _local_slice(*teacher_head, vocab_size, group)
        teacher_logits = _logits(teacher_hidden.detach(), teacher_weight, teacher_bias, fp32_logits)
    student_logits = _logits(student_hidden, student_weight, student_bias, fp32_logits)
    soft = kd_loss(student_logits, teacher_logits, labels, temperature=temperature, reduction=reduction,
                   normalizer=normalizer, process_group=group, student_logit_scale=student_transform.scale,
                   student_softcap=student_transform.softcap, teacher_logit_scale=teacher_transform.scale,
                   teacher_softcap=teacher_transform.softcap, **options)
    ignore_index = options.get("ignore_index", -100)
    n_tokens = (torch.tensor(student_logits[..., 0].numel(), device=soft.device) if labels is None
                else (labels != ignore_index).sum())
    entropy = None
    if return_entropy:
        entropy = _entropy(student_logits.detach(), student_transform, temperature, group)
        if labels is not None:
            entropy = torch.where(labels != ignore_index, entropy, torch.zeros_like(entropy))
    return FusedLoss(soft_weight * soft, soft.detach(), torch.zeros_like(soft.detach()), n_tokens, entropy=entropy)


def _local_slice(weight, bias, vocab, group):
    """This rank's rows of the real vocabulary, as plain tensors (gradients reach the full ones)."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(weight, DTensor):
        if tuple(weight.placements) != (Shard(0),) or weight.device_mesh.get_group() != group:
            raise NotImplementedError("a DTensor lm_head with process_group must be placed Shard(0) on a "
                                      "one-dimensional mesh over that group")
        if weight.shape[0] != vocab:
            raise NotImplementedError(f"a Shard(0) lm_head with padding rows ({weight.shape[0]} > vocab_size="
                                      f"{vocab}) is not supported with process_group")
        return weight.to_local(), None if bias is None else bias.to_local()
    weight = _SumGradient.apply(weight, group) if weight.requires_grad else weight
    bias = _SumGradient.apply(bias, group) if bias is not None and bias.requires_grad else bias
    rows = -(-vocab // group.size())
    start = min(dist.get_rank(group) * rows, vocab)
    stop = min(start + rows, vocab)
    if start == stop:
        raise ValueError(f"vocab_size={vocab} leaves rank {dist.get_rank(group)} of {group.size()} no rows")
    return weight[start:stop], None if bias is None else bias[start:stop]


def _logits(hidden, weight, bias, fp32_logits):
    if fp32_logits and hidden.dtype in (torch.float16, torch.bfloat16):
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    return torch.nn.functional.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))


def _entropy(logits, transform, temperature, group):
    """H(q) = log Σ e^(z−m) − Σ e^(z−m)·(z−m) / Σ e^(z−m) over the whole vocabulary, z the
    transformed logits / T, m the row max; row blocks of CHUNK_ELEMENTS (no full fp32 copy)."""
    dtype = compute_dtype(logits)
    flat = logits.reshape(-1, logits.shape[-1])
    blocks = list(row_chunks(flat.shape[0], flat.shape[1], CHUNK_ELEMENTS))

    def transformed(start, stop):
        z = logit_transforms.scale_and_cap(flat[start:stop].to(dtype), transform.scale, transform.softcap or 0.0)
        return z / temperature

    top = torch.cat([transformed(*block).amax(-1) for block in blocks]) if blocks else flat.new_zeros(0, dtype=dtype)
    dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
    sums = top.new_zeros(2, flat.shape[0])
    for start, stop in blocks:
        shifted = transformed(start, stop) - top[start:stop, None]
        exps = shifted.exp()
        sums[0, start:stop] = exps.sum(-1)
        sums[1, start:stop] = torch.linalg.vecdot(exps, shifted)
    dist.all_reduce(sums, group=group)
    return (sums[0].log() - sums[1] / sums[0]).reshape(logits.shape[:-1])


class _SumGradient(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (each rank's logit slice
    gives its part of ∂L/∂input)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
