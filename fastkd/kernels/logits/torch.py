"""Pure-PyTorch implementation of the logits families (kd_rows, kl_div, ce): the divergence
formulas of fastkd/divergences.py applied to chunks of rows.

Runs on any device and dtype (float64 included, which makes it the oracle for gradcheck).
Extra memory is bounded by ``CHUNK_ELEMENTS`` compute-dtype elements per temporary, whatever N is.
"""

import math

import torch

from ... import divergences, logit_transforms
from ..layout import compute_dtype, row_chunks, rows_slice
from ..torch_scratch import Scratch
from .contract import AUX, LOG_SUM_S, LOG_SUM_T, MAX_S, MAX_T, N_CE_STATS, stats_width

# Elements of one (rows × V) temporary: 1M fp32 elements = 4 MiB; JSD keeps about a dozen alive.
CHUNK_ELEMENTS = 1 << 20


def _row_chunks(n_rows, n_cols):
    return row_chunks(n_rows, n_cols, CHUNK_ELEMENTS)


def _active_rows(labels, ignore_index, start, stop):
    if labels is None:
        return None
    return labels[start:stop] != ignore_index


def _scaled(x, inv_temperature, dtype, scratch):
    """x / T in the compute dtype, in a scratch buffer (x itself is never written)."""
    out = scratch(x, dtype)
    if inv_temperature == 1.0:
        return out.copy_(x)
    return torch.mul(x.to(dtype) if x.dtype != dtype else x, inv_temperature, out=out)


def _side_logits(x, spec, side, dtype, scratch, moments=None):
    """The logits one side's softmax sees: its transforms (logit_transforms.py), then / T; with
    standardize, ``moments`` (a list) receives the row mean and std."""
    if not spec.transforms_logits:
        return _scaled(x, spec.inv_temperature, dtype, scratch)
    transformed = logit_transforms.forward(x.to(dtype), *_transform_args(spec, side), moments=moments)
    # Out of place: a side without transforms gets x itself back, the caller's logits.
    return torch.mul(transformed, spec.inv_temperature, out=scratch(x, dtype))


def _transform_args(spec, side):
    return (getattr(spec, f"{side}_scale"), getattr(spec, f"{side}_softcap"), spec.standardize,
            spec.standardize_eps)


def _targets(labels, start, stop, n_cols, ignore_index):
    """dkd's target class per row, in range for the gather (ignored rows: 0), and the rows whose
    label is neither a class nor ignored (they get NaN)."""
    labels = labels[start:stop].long()
    in_range = (labels >= 0) & (labels < n_cols)
    return torch.where(in_range, labels, 0), ~in_range & (labels != ignore_index)


def kd_rows_forward(student, teacher, labels, spec, ignore_index):
    """student, teacher: (N, V) or (B, T, V) logits; labels: (N,) int or None (dkd: required,
    the target class of each row).

    Returns (loss (N,), stats (N, 5)) in the compute dtype: per row the max and log-sum-exp
    offset of student / T and teacher / T (dkd: over the non-target classes), and the gradient
    constant ``aux``; with ``standardize`` (N, 9): also each side's row mean and std
    (contract.STANDARDIZE_COLUMNS; this backend's backward recomputes them). Rows whose label is
    ``ignore_index`` get zeros.
    """
    n_cols = student.shape[-1]
    n_rows = student.numel() // n_cols
    dtype = compute_dtype(student, teacher)
    loss = torch.empty(n_rows, dtype=dtype, device=student.device)
    stats = torch.empty(n_rows, stats_width(spec), dtype=dtype, device=student.device)
    scratch = Scratch()
    for start, stop in _row_chunks(n_rows, n_cols):
        scratch.next_chunk()
        moments = []  # standardize: mean and std of each side, saved in the stats
        s = _side_logits(rows_slice(student, start, stop), spec, "student", dtype, scratch, moments)
        t = _side_logits(rows_slice(teacher, start, stop), spec, "teacher", dtype, scratch, moments)
        if spec.name == "dkd":
            target, bad = _targets(labels, start, stop, n_cols, ignore_index)
            student_side = divergences.dkd_side(s, target, scratch)
            teacher_side = divergences.dkd_side(t, target, scratch)
            row_loss, aux = divergences.dkd_loss_and_aux(spec, student_side, teacher_side, scratch)
            row_loss = torch.where(bad, math.nan, row_loss)
            max_s, log_sum_s, max_t, log_sum_t = (*student_side[2:4], *teacher_side[2:4])
        else:
            lq, max_s, log_sum_s = divergences.log_probs_and_parts(s, scratch)
            lp, max_t, log_sum_t = divergences.log_probs_and_parts(t, scratch)
            row_loss, aux = divergences.row_loss_and_aux(spec, lq, lp, scratch)
        row_stats = torch.stack([max_s, log_sum_s, max_t, log_sum_t, aux, *moments], dim=1)
        active = _active_rows(labels, ignore_index, start, stop)
        if active is not None:
            row_loss = torch.where(active, row_loss, 0.0)
            row_stats = torch.where(active[:, None], row_stats, 0.0)
        loss[start:stop] = row_loss
        stats[start:stop] = row_stats
    return loss, stats


def _dkd_exps(x, spec, side, shift, target, dtype, scratch):
    """exp(x' − shift) with 0 at the target, x' the side's logits / T as the forward saw them: (R, V)."""
    if spec.transforms_logits:
        shifted = _side_logits(x, spec, side, dtype, scratch).sub_(shift[:, None])
    else:  # scale and shift in one pass
        shifted = torch.add(-shift[:, None], x, alpha=spec.inv_temperature, out=scratch(x, dtype))
    return shifted.exp_().scatter_(1, target[:, None], 0.0)


def _dkd_backward_rows(grad_loss, student, teacher, labels, row_stats, spec, ignore_index, start, stop, dtype,
                       scratch, out):
    """dkd's ∂output/∂(scaled student) for rows start:stop into ``out`` (R, V), the row scale folded
    into per-row weights: two full-size exps and two multiply-adds."""
    target, bad = _targets(labels, start, stop, student.shape[-1], ignore_index)
    active = _active_rows(labels, ignore_index, start, stop)
    # Ignored rows saved zero statistics; a +inf shift makes their exps 0, whatever their logits.
    shift_s = torch.where(active, row_stats[:, MAX_S], math.inf)
    shift_t = torch.where(active, row_stats[:, MAX_T], math.inf)
    exps_s = _dkd_exps(student, spec, "student", shift_s, target, dtype, scratch)
    exps_t = _dkd_exps(teacher, spec, "teacher", shift_t, target, dtype, scratch)
    row_scale = torch.where(active, grad_loss[start:stop].to(dtype) * spec.inv_temperature, 0.0)
    row_scale = torch.where(bad, math.nan, row_scale)  # out-of-range labels: NaN loss, NaN gradient
    return divergences.dkd_grad_scaled_student(spec, exps_s, exps_t, row_stats[:, LOG_SUM_S],
                                               row_stats[:, LOG_SUM_T], row_stats[:, AUX], target, row_scale, out)


def kd_rows_backward(grad_loss, student, teacher, labels, stats, spec, ignore_index):
    """grad_loss: (N,) ∂output/∂L_row; stats: (N, 5) or (N, 9) from the forward.
    Returns ∂output/∂student: contiguous, the student's shape and dtype."""
    n_cols = student.shape[-1]
    n_rows = student.numel() // n_cols
    dtype = compute_dtype(student, teacher)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    grad_rows = grad.view(-1, n_cols)
    inv_t = spec.inv_temperature
    scratch = Scratch()
    for start, stop in _row_chunks(n_rows, n_cols):
        scratch.next_chunk()
        row_stats = stats[start:stop].to(dtype)
        if spec.name == "dkd":
            direct = not spec.transforms_logits and grad.dtype == dtype
            out = grad_rows[start:stop] if direct else scratch(grad_rows[start:stop], dtype)
            g = _dkd_backward_rows(grad_loss, rows_slice(student, start, stop), rows_slice(teacher, start, stop),
                                   labels, row_stats, spec, ignore_index, start, stop, dtype, scratch, out)
            if spec.transforms_logits:
                g = logit_transforms.backward(rows_slice(student, start, stop).to(dtype), g,
                                              *_transform_args(spec, "student"))
            if not direct:
                grad_rows[start:stop] = g
            continue
        s = _side_logits(rows_slice(student, start, stop), spec, "student", dtype, scratch)
        t = _side_logits(rows_slice(teacher, start, stop), spec, "teacher", dtype, scratch)
        lq = divergences.log_probs(s, row_stats[:, MAX_S], row_stats[:, LOG_SUM_S], scratch)
        lp = divergences.log_probs(t, row_stats[:, MAX_T], row_stats[:, LOG_SUM_T], scratch)
        g = divergences.grad_scaled_student(spec, lq, lp, row_stats[:, AUX], scratch)
        row_scale = grad_loss[start:stop].to(dtype) * inv_t
        active = _active_rows(labels, ignore_index, start, stop)
        if active is not None:
            # Ignored rows carry zero statistics: their g may be inf or NaN; zero them, never scale them.
            g.masked_fill_(~active[:, None], 0.0)
            row_scale = torch.where(active, row_scale, 0.0)
        g.mul_(row_scale[:, None])
        if spec.transforms_logits:
            g = logit_transforms.backward(rows_slice(student, start, stop).to(dtype), g,
                                          *_transform_args(spec, "student"))
        grad_rows[start:stop] = g
    return grad


def kl_div_rows_forward(input, target, log_target):
    """torch.nn.functional.kl_div's pointwise terms summed per row, in float32 (float64 inputs: float64).

    input: (N, V) log-probabilities; target: (N, V) probabilities (log-probabilities if log_target).
    Terms where the target probability is 0 are 0, even against input = -inf; negative target
    probabilities give NaN, as in PyTorch.
    """
    n_cols = input.shape[-1]
    n_rows = input.numel() // n_cols
    dtype = compute_dtype(input, target)
    out = torch.empty(n_rows, dtype=dtype, device=input.device)
    for start, stop in _row_chunks(n_rows, n_cols):
        x = rows_slice(input, start, stop).to(dtype)
        y = rows_slice(target, start, stop).to(dtype)
        prob, log_prob = (y.exp(), y) if log_target else (y, y.log())
        # 0 where the target is 0 (even against input = -inf); NaN where it is negative, as PyTorch.
        out[start:stop] = torch.where(prob == 0, 0.0, prob * (log_prob - x)).sum(-1)
    return out


def kl_div_rows_backward(grad_rows, input, target, log_target):
    """∂/∂input of Σ_rows grad_rows · row_sum = −target_prob · grad_rows: input's shape and dtype."""
    n_cols = input.shape[-1]
    n_rows = input.numel() // n_cols
    dtype = compute_dtype(input, target)
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    grad_rows_out = grad.view(-1, n_cols)
    for start, stop in _row_chunks(n_rows, n_cols):
        y = rows_slice(target, start, stop).to(dtype)
        prob = y.exp() if log_target else y
        grad_rows_out[start:stop] = -prob * grad_rows[start:stop].to(dtype)[:, None]
    return grad


def ce_rows_forward(logits, labels, ignore_index):
    """Hard-label cross-entropy per row at temperature 1.

    logits: (N, V); labels: (N,) int. Returns (loss (N,), stats (N, 2): max and log-sum-exp
    offset) in the compute dtype; ignored rows get zeros, out-of-range labels NaN.
    """
    n_rows, n_cols = logits.shape
    dtype = compute_dtype(logits)
    loss = torch.empty(n_rows, dtype=dtype, device=logits.device)
    stats = torch.empty(n_rows, N_CE_STATS, dtype=dtype, device=logits.device)
    for start, stop in _row_chunks(n_rows, n_cols):
        x = logits[start:stop].to(dtype)
        label = labels[start:stop]
        row_max, log_sum = divergences.log_softmax_parts(x)
        in_range = (label >= 0) & (label < n_cols)
        picked = x.gather(1, torch.where(in_range, label, 0)[:, None])[:, 0]
        row_loss = torch.where(in_range, (row_max - picked) + log_sum, math.nan)
        active = label != ignore_index
        loss[start:stop] = torch.where(active, row_loss, 0.0)
        stats[start:stop] = torch.where(active[:, None], torch.stack([row_max, log_sum], 1), 0.0)
    return loss, stats


def ce_rows_backward(grad_loss, logits, labels, stats, ignore_index, out):
    """Adds grad_loss_i · (softmax(logits_i) − onehot(label_i)) into ``out`` (N, V), in place;
    NaN for rows whose label is out of range (their loss is NaN too)."""
    n_rows, n_cols = logits.shape
    dtype = compute_dtype(logits)
    for start, stop in _row_chunks(n_rows, n_cols):
        x = logits[start:stop].to(dtype)
        label = labels[start:stop]
        row_stats = stats[start:stop].to(dtype)
        active = label != ignore_index
        # Ignored rows carry zero statistics: exp(logit − 0) would overflow to inf and inf·0 = NaN.
        log_p = divergences.log_probs(x, row_stats[:, 0], row_stats[:, 1])
        g = torch.where(active[:, None], log_p, -math.inf).exp()
        in_range = (label >= 0) & (label < n_cols)
        g.scatter_add_(1, torch.where(in_range, label, 0)[:, None], -in_range[:, None].to(dtype))
        g = g * torch.where(active, grad_loss[start:stop].to(dtype), 0.0)[:, None]
        # An active row with an out-of-range label has a NaN loss; its gradient is NaN too, never
        # a quietly wrong number.
        g = torch.where((active & ~in_range)[:, None], math.nan, g)
        out[start:stop] += g.to(out.dtype)
    return out
