"""Reductions of every public loss: how per-row losses become the requested output."""

import torch


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
