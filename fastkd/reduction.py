"""Turning per-row losses into the requested output: shared by every public loss."""

import torch


def as_rows(x):
    """(…, V) logits → a 2-D (N, V) or 3-D (B, T, V) tensor over the same memory where possible.

    Shifted LLM logits such as ``logits[:, :-1]`` cannot be flattened to (N, V) without a copy;
    the kernels address such (B, T, V) views directly instead. Other layouts are copied once.
    """
    n_cols = x.shape[-1]
    if x.dim() <= 2:
        return x.reshape(-1, n_cols)  # a view for 1-D and 2-D inputs
    if _leading_dims_merge(x, x.dim() - 1):
        return x.view(-1, n_cols)
    if x.dim() == 3:
        return x
    if _leading_dims_merge(x, x.dim() - 2):
        return x.view(-1, x.shape[-2], n_cols)
    return x.reshape(-1, n_cols)


def _leading_dims_merge(x, n_dims):
    """Whether dims 0..n_dims-1 of x can be viewed as one (each stride = next stride × next size)."""
    for k in range(n_dims - 1):
        if x.shape[k] != 1 and x.stride(k) != x.stride(k + 1) * x.shape[k + 1]:
            return False
    return True


def reduce_rows(row_loss, leading_shape, reduction, normalizer=None, labels=None, ignore_index=-100):
    """row_loss: (N,) with zeros on ignored rows → scalar ('mean', 'sum') or leading_shape ('none').

    'mean' divides by the number of non-ignored rows (at least 1, so no rows gives 0, not NaN),
    or by ``normalizer`` when given. Everything stays on the device: no host synchronisation.
    """
    if reduction == "none":
        return row_loss.reshape(leading_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            normalizer = normalizer.reshape(()).to(device=total.device, dtype=total.dtype)
        return total / normalizer
    if labels is None:
        return total / max(row_loss.numel(), 1)
    return total / (labels != ignore_index).sum().clamp(min=1).to(total.dtype)
