"""Rows in, reduction out, for every public loss: how (…, V) inputs become the rows the ops
take, and how per-row losses become the requested output."""

import torch


def as_rows(x):
    """(…, V) logits → (N, V) for inputs of up to two dims, else (B, T, V), over the same memory
    where possible.

    Shifted LLM logits such as ``logits[:, :-1]`` cannot be flattened to (N, V) without a copy;
    the kernels address (B, T, V) tensors directly instead. Tensors of the same shape always get
    the same layout, so student and teacher rows line up. Rare layouts are copied once.
    """
    if x.dim() <= 3:
        return x.reshape(-1, x.shape[-1]) if x.dim() <= 2 else x
    leading = x.dim() - 2
    if all(x.shape[k] == 1 or x.stride(k) == x.stride(k + 1) * x.shape[k + 1] for k in range(leading - 1)):
        return x.view(-1, x.shape[-2], x.shape[-1])
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def row_shape(x):
    """(rows, V, inner) of an as_rows tensor: 2-D (N, V) or 3-D (B, T, V); inner = T, or 1 for 2-D."""
    n_cols = x.shape[-1]
    return (x.numel() // n_cols if n_cols else 0), n_cols, (x.shape[1] if x.dim() == 3 else 1)


def row_layout(x):
    """(stride_outer, stride_inner, stride_col) of the rows of an as_rows tensor, in elements: row r
    starts at (r // inner)·stride_outer + (r % inner)·stride_inner (every kernel addresses rows so)."""
    if x.dim() == 2:
        return x.stride(0), 0, x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def reduce_rows(row_loss, leading_shape, reduction, normalizer=None, labels=None, ignore_index=-100):
    """row_loss: (N,) with zeros on ignored rows → scalar ('mean', 'sum') or leading_shape ('none').

    'mean' divides by the number of non-ignored rows (at least 1, so no rows gives 0, not NaN),
    or by ``normalizer`` when given. Everything stays on the device: no host synchronisation.
    """
    if reduction == "none":
        return row_loss.reshape(leading_shape)
    total = row_loss.sum()
    return total * row_weight(row_loss.numel(), reduction, normalizer, labels, ignore_index, total)


def row_weight(n_rows, reduction, normalizer, labels, ignore_index, like):
    """The weight of each row's loss in a 'mean' or 'sum' reduction: 1 for 'sum'; 1 / normalizer,
    or 1 / (number of non-ignored rows, at least 1), for 'mean'. A Python float where it is known
    on the host, else a 0-d tensor on ``like``'s device and dtype (never copied to the host)."""
    if reduction == "sum":
        return 1.0
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            return 1.0 / normalizer.reshape(()).to(device=like.device, dtype=like.dtype)
        return 1.0 / normalizer
    if labels is None:
        return 1.0 / max(n_rows, 1)
    return 1.0 / (labels != ignore_index).sum().clamp(min=1).to(like.dtype)
