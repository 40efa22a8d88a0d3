"""TRL's reductions of per-token divergences (``generalized_jsd_loss`` and the on-policy trainers'
``_reduce_divergence_loss``), from per-row sums, without reading anything on the host.

TRL drops the tokens whose label is -100 (``jsd[mask]``) and then: ``num_items_in_batch`` →
sum / num_items_in_batch; 'batchmean' → sum / number of kept tokens (at least 1), or without
labels sum / size(0) of the inputs; 'sum'; 'mean' → the mean over the kept elements (kept tokens ×
their width). 'none' returns the kept element-wise terms and is left to the callers.
"""

import torch

REDUCTIONS = ("batchmean", "sum", "mean", "none")
IGNORE_INDEX = -100


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'batchmean', 'sum', 'mean', 'none'; got {reduction!r}")


def keep_mask(labels, rows):
    """(rows,) bool of the kept tokens, or None without labels."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point:
        raise TypeError("labels must be an integer tensor or None")
    if labels.numel() != rows:
        raise ValueError(f"labels has {labels.numel()} elements but the logits have {rows} rows")
    return labels.reshape(-1) != IGNORE_INDEX


def reduce_rows(rows, keep, width, first_dim, reduction, num_items_in_batch):
    """rows: (N,) per-token sums over ``width`` elements; keep: (N,) bool or None. A scalar."""
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    total = rows.sum() if keep is None else torch.where(keep, rows, zero).sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    count = torch.tensor(rows.shape[0], device=rows.device) if keep is None else keep.sum()
    if reduction == "batchmean":
        return total / (count.clamp(min=1) if keep is not None else max(first_dim, 1))
    # 'mean' over zero kept elements is 0 here (TRL: NaN)
    return total / (count * width).clamp(min=1)
