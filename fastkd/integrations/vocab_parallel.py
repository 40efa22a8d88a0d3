"""The Hugging Face distillation loss with the vocabulary split over a process group: each rank
takes its own contiguous slice of the lm_head rows and calls the fused vocab-parallel loss
(:func:`fastkd.fused_linear_kd_loss`, or :func:`fastkd.fused_linear_sparse_kd_loss` for a top-k
teacher, with ``process_group``), which forms that slice's logits one token block at a time and
exchanges per-row statistics only: no rank holds an (N, V/world) logit slice, and no logits are
sent.

Every rank of the group holds the same batch and the same models (tensor parallelism's layout),
with full lm_heads or lm_heads placed ``Shard(0)`` as DTensors on a one-dimensional mesh over the
group (then each rank reads its local shard, and no head is gathered). Slices of a full head follow
``torch.chunk`` over the real vocabulary: ranks in order, ⌈V/world⌉ rows each, the last fewer.

Gradients are those of the one-process loss on every rank: the fused loss sums the hidden states'
gradient over the group (grad_hidden_reduction="sum", as a column-parallel lm_head's backward
does), a full head's gradient is summed over the group here (one all-reduce: each rank fills its
own rows), and a Shard(0) head gets its own slice's rows.

A top-k teacher (``teacher_top_k``) takes its top-k from the whole teacher head on every rank (a
Shard(0) teacher head is gathered once): the ids are global and the same everywhere; only the
student's side is split.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional import FusedLoss, fused_linear_kd_loss, fused_linear_sparse_kd_loss


def vocab_parallel_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, transforms, group, *,
                        vocab_size, teacher_top=None, missing_mass="renormalize", **options) -> FusedLoss:
    """The fused loss over the whole vocabulary from this rank's slice of the lm_heads.

    student_hidden: (…, Hs); teacher_hidden: (…, Ht); student_head, teacher_head: (weight (V', H),
    bias or None) each, full or DTensor Shard(0); transforms: the (student, teacher) LogitTransform;
    vocab_size: the real vocabulary (≤ V'); teacher_top: a sparse teacher, (indices, logprobs)
    (…, k) over the whole vocabulary, or None for the dense teacher_hidden and teacher_head.
    options: those of the fused loss (temperature, reduction, normalizer, soft_weight, hard_weight,
    return_entropy, fp32_logits, divergence, …). Returns its FusedLoss."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup; got {type(group).__name__}")
    if "grad_hidden_reduction" in options:
        raise ValueError("grad_hidden_reduction is not an option of the HF helper: the hidden states' gradient is "
                         "always summed over the group (each rank's model body needs the whole of it)")
    student_transform, teacher_transform = transforms
    student_weight, student_bias = _local_slice(*student_head, vocab_size, group)
    # vocab_size sizes the token blocks alike on every rank; the slices hold no padding rows.
    common = dict(process_group=group, vocab_size=vocab_size, return_components=True, **options)
    if teacher_top is not None:
        indices, logprobs = teacher_top
        return fused_linear_sparse_kd_loss(student_hidden, student_weight, indices, logprobs, labels,
                                           student_bias=student_bias, missing_mass=missing_mass,
                                           student_logit_scale=student_transform.scale,
                                           student_softcap=student_transform.softcap, **common)
    with torch.no_grad():
        teacher_weight, teacher_bias = _local_slice(*teacher_head, vocab_size, group)
    return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                student_bias=student_bias, teacher_bias=teacher_bias,
                                student_logit_scale=student_transform.scale, student_softcap=student_transform.softcap,
                                teacher_logit_scale=teacher_transform.scale, teacher_softcap=teacher_transform.softcap,
                                **common)


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


class _SumGradient(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (each rank's slice gives
    its own rows of a full head's gradient, zeros elsewhere)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
