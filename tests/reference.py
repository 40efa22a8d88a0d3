"""Independent float64 definitions of the divergences, written from the textbook formulas and
differentiated by autograd (not by the analytic gradients fastkd uses)."""

import math

import torch


def _kl(a, log_a, log_b):
    """KL(a ‖ b) per row with the 0·log 0 = 0 convention."""
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def row_losses(divergence, student, teacher, temperature=1.0, beta=0.5, skew=0.1):
    """student, teacher: (…, V) float64 logits without -inf. Returns (…) per-row losses."""
    log_q = torch.log_softmax(student / temperature, dim=-1)
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _kl(p, log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _kl(q, log_q, log_p)
    # log of a mixture a·x + b·y, formed in log space: with ±1e4 logits both x and y underflow
    # to 0, and log(0) would put 0·inf = NaN into the autograd reference.
    def log_mix(a, log_x, log_y):
        return torch.logaddexp(math.log(a) + log_x, math.log1p(-a) + log_y)

    if divergence == "jsd":
        log_m = log_mix(beta, log_p, log_q)
        return beta * _kl(p, log_p, log_m) + (1 - beta) * _kl(q, log_q, log_m)
    if divergence == "skew_forward_kl":
        return _kl(p, log_p, log_mix(skew, log_p, log_q))
    if divergence == "skew_reverse_kl":
        return _kl(q, log_q, log_mix(skew, log_q, log_p))
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(divergence)


def kd_loss(student, teacher, *, divergence="forward_kl", temperature=1.0, beta=0.5, skew=0.1,
            temperature_squared=False, labels=None, ignore_index=-100, reduction="mean",
            normalizer=None, finite_columns=None, dtype=torch.float64):
    """Reference kd_loss computed in ``dtype``. ``finite_columns`` (bool, (V,)) restricts both
    distributions to the columns where the logits are finite (the rest are -inf in both)."""
    s, t = student.to(dtype), teacher.to(dtype)
    if finite_columns is not None:
        s, t = s[..., finite_columns], t[..., finite_columns]
    rows = row_losses(divergence, s, t, temperature, beta, skew)
    if temperature_squared:
        rows = rows * temperature ** 2
    return reduce(rows, labels, ignore_index, reduction, normalizer)


def reduce(rows, labels, ignore_index, reduction, normalizer):
    """Zero the ignored rows, then 'none', 'sum', or 'mean' over the kept rows (or / normalizer)."""
    if labels is not None:
        rows = torch.where(labels != ignore_index, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if normalizer is not None:
        return rows.sum() / float(normalizer)
    count = rows.numel() if labels is None else int((labels != ignore_index).sum())
    return rows.sum() / max(count, 1)


def loss_and_grad(student, teacher, grad_output=None, dtype=torch.float64, **options):
    """Reference loss and ∂(Σ loss·grad_output)/∂student, computed by autograd in ``dtype``."""
    leaf = student.detach().to(dtype).requires_grad_(True)
    loss = kd_loss(leaf, teacher.detach(), dtype=dtype, **options)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, leaf, grad_output.to(dtype))
    return loss.detach(), grad


def allowed_errors(student, teacher, grad_output, ref_loss, ref_grad, tolerance, **options):
    """Error budget for (loss, grad) relative errors: the dtype's tolerance, or 10× the error of
    the same formulas run by eager PyTorch in float32 where that is larger. Peaked distributions
    (small T) make the softmax gradient q·(g − Σq·g) cancel in any fp32 implementation; the budget
    follows it. The loss also gets an absolute floor: each row's fp32 log-sum-exps carry a few
    ulps of their magnitude (log V + max|logit|/T), which nearly equal distributions, whose
    divergence is tiny, turn into a large relative error."""
    eager_loss, eager_grad = loss_and_grad(student, teacher, grad_output, dtype=torch.float32, **options)
    temperature = options.get("temperature", 1.0)
    magnitude = math.log(student.shape[-1]) + 1 + max(student.abs().max().item() if student.numel() else 0,
                                                       teacher.abs().max().item() if teacher.numel() else 0) / temperature
    abs_floor = 8 * 2.0 ** -23 * magnitude * math.sqrt(max(ref_loss.numel(), 1))
    loss_floor = abs_floor / max(ref_loss.detach().double().norm().item(), 1e-300)
    return (max(tolerance[torch.float32], 10 * rel_err(eager_loss, ref_loss), loss_floor),
            max(tolerance[student.dtype], 10 * rel_err(eager_grad, ref_grad)))


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (absolute error where ref is 0)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    diff = (out - ref).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def sparse_rows(student, indices, logprobs, divergence, temperature, missing_mass):
    """float64 per-row losses, written from the definitions."""
    s = student.double() / temperature
    if missing_mass == "renormalize":
        # A dense problem built from the top-k: everything outside the support is masked in both.
        outside = torch.ones_like(s, dtype=torch.bool).scatter_(1, indices, False)
        dense_teacher = torch.full_like(s, -1e300).scatter(1, indices, logprobs.double() / temperature)
        dense_student = s.masked_fill(outside, -1e300)
        return row_losses(divergence, dense_student, dense_teacher)
    # "tail": one more bucket for the mass outside the support; when the support is the whole
    # vocabulary that bucket does not exist and the loss is the dense KL over the k entries.
    q = torch.softmax(s, -1)
    q_support = q.gather(1, indices)
    p_support = logprobs.double().exp()
    outside = torch.ones_like(s, dtype=torch.bool).scatter_(1, indices, False)
    has_tail = outside.any(-1, keepdim=True)
    q_tail = torch.where(outside, q, torch.zeros_like(q)).sum(-1, keepdim=True)
    q_buckets = torch.cat([q_support, q_tail], 1)
    p_tail = (1 - p_support.sum(-1, keepdim=True)).clamp(min=1e-12 if divergence == "reverse_kl" else 0)
    p_tail = torch.where(has_tail, p_tail, torch.zeros_like(p_tail))
    p_buckets = torch.cat([p_support, p_tail], 1)
    a, b = (p_buckets, q_buckets) if divergence == "forward_kl" else (q_buckets, p_buckets)
    return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)


def fused_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                      student_bias=None, teacher_bias=None, soft_weight=1.0, hard_weight=0.0, vocab_size=None,
                      divergence="forward_kl", temperature=1.0, beta=0.5, skew=0.1, temperature_squared=False,
                      ignore_index=-100, reduction="mean", normalizer=None):
    """The definition, in float64 with the full (N, V) logits."""
    vocab = vocab_size or student_weight.shape[0]
    student = student_hidden.double() @ student_weight[:vocab].double().t()
    teacher = teacher_hidden.double() @ teacher_weight[:vocab].double().t()
    if student_bias is not None:
        student = student + student_bias[:vocab].double()
    if teacher_bias is not None:
        teacher = teacher + teacher_bias[:vocab].double()
    soft = row_losses(divergence, student, teacher, temperature, beta, skew)
    if temperature_squared:
        soft = soft * temperature ** 2
    rows = soft_weight * soft
    if labels is not None:
        log_probs = torch.log_softmax(student, dim=-1)
        picked = log_probs.gather(-1, torch.where(labels != ignore_index, labels, 0).unsqueeze(-1)).squeeze(-1)
        rows = rows + hard_weight * -picked
    return reduce(rows, labels, ignore_index, reduction, normalizer)
