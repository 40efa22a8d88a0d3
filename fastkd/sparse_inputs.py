"""The sparse teacher formats people have, folded into the one rule the kernels read.

Teachers come as ids (…, k) with log-probs or sampling weights (…, k), and say which entries are
missing in one of three ways: a boolean mask (True = present; ragged k), a padding id (vLLM- and
axolotl-style batches, fastkd's TopKCache: PAD_ID = -1), or a log-prob of -inf. The kernels know
only the last (sparse_kd) or a zero weight (sampled_kd); these functions turn the first two into
it with one element-wise pass over the (…, k) values: no host synchronisation, nothing (…, V).
"""

import math

import torch

from .kernels.layout import compute_dtype


def _present(indices, mask, pad_id):
    """(…, k) bool of the entries that are present by mask and padding id, or None (all are)."""
    present = None if mask is None else mask
    if pad_id is not None:
        not_pad = indices != pad_id
        present = not_pad if present is None else present & not_pad
    return present


def logprobs_with_absent(indices, logprobs, mask, pad_id):
    """``logprobs`` with -inf at the absent entries (mask False or id == pad_id)."""
    present = _present(indices, mask, pad_id)
    return logprobs if present is None else logprobs.masked_fill(~present, -math.inf)


def weights_with_absent(indices, weights, mask, pad_id, like):
    """Sampling weights as floats (integer counts converted to the compute dtype of ``like``),
    with 0 at the absent entries."""
    if not weights.is_floating_point():
        weights = weights.to(compute_dtype(like))
    present = _present(indices, mask, pad_id)
    return weights if present is None else weights.masked_fill(~present, 0.0)


def check_mask(mask, indices):
    """``teacher_mask``: None, or a bool tensor of the ids' shape on their device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"teacher_mask must be a torch.Tensor or None; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"teacher_mask must be a bool tensor (True where an entry is present); got {mask.dtype}")
    if mask.shape != indices.shape:
        raise ValueError(f"teacher_mask shape {tuple(mask.shape)} does not match teacher_indices shape "
                         f"{tuple(indices.shape)}")
    if mask.device != indices.device:
        raise ValueError(f"teacher_mask is on {mask.device} but teacher_indices is on {indices.device}")


def check_pad_id(pad_id):
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
        raise TypeError(f"pad_id must be an int or None; got {type(pad_id).__name__}")
