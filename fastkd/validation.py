"""Argument checks shared by the public functions. Each raises before any kernel runs and names
the argument at fault. None of them reads tensor data (no host synchronisation), except
``check_sparse_values`` and ``check_sampled_values``, run only for the opt-in ``validate=True``."""

import torch

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_float_tensor(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64); "
                        f"got {tensor.dtype}")


def check_logits(name, tensor):
    check_float_tensor(name, tensor)
    if tensor.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary); got a 0-d tensor")
    if tensor.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")


def check_pair(student_name, student, teacher_name, teacher):
    """Same shape (hence the same vocabulary) and the same device."""
    if student.shape != teacher.shape:
        if student.shape[:-1] == teacher.shape[:-1]:
            raise ValueError(f"vocabulary sizes differ: {student_name} has V={student.shape[-1]}, "
                             f"{teacher_name} has V={teacher.shape[-1]}")
        raise ValueError(f"{teacher_name} shape {tuple(teacher.shape)} does not match "
                         f"{student_name} shape {tuple(student.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"{student_name} is on {student.device} but {teacher_name} is on {teacher.device}")


def check_labels(labels, leading_shape, device):
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None; got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor (e.g. torch.long); got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(f"labels must have the logits' leading shape {tuple(leading_shape)}; "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")


def check_ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")


def check_reduction(reduction, normalizer, device):
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")
    if normalizer is None:
        return
    if reduction != "mean":
        raise ValueError(f"normalizer replaces the divisor of reduction='mean'; it cannot be combined "
                         f"with reduction={reduction!r}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must hold one value; got shape {tuple(normalizer.shape)}")
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device} but the logits are on {device}")
        return
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(f"normalizer must be a number or a one-element tensor; got {type(normalizer).__name__}")
    if not normalizer > 0 or normalizer == float("inf"):
        raise ValueError(f"normalizer must be a finite number > 0; got {normalizer}")


def check_row_options(labels, leading_shape, device, ignore_index, reduction, normalizer, temperature_squared):
    """The options every per-row loss shares: labels, ignore_index, reduction with its normalizer, T²."""
    check_labels(labels, leading_shape, device)
    check_ignore_index(ignore_index)
    check_reduction(reduction, normalizer, device)
    check_flag("temperature_squared", temperature_squared)


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")


def check_linear(hidden_name, hidden, weight_name, weight, bias_name, bias):
    """hidden (…, H) and weight (V, H) of one model, and its optional bias (V,): floating point, one
    device. The dtypes may differ (bf16 activations next to fp32 parameters under autocast)."""
    check_logits(hidden_name, hidden)
    check_float_tensor(weight_name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be 2-D (V, H); got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{weight_name} has H={weight.shape[1]} columns but {hidden_name} has "
                         f"H={hidden.shape[-1]}")
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name} has no rows (V = 0)")
    for name, tensor in ((weight_name, weight), (bias_name, bias)):
        if tensor is None:
            continue
        check_float_tensor(name, tensor)
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but {hidden_name} is on {hidden.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},) to match {weight_name}; "
                         f"got {tuple(bias.shape)}")


def check_finite_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number; got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite; got {value}")


def check_sparse_teacher(indices, values, leading_shape, vocab, device, values_name="teacher_logprobs",
                         indices_name="teacher_indices", sampled=False):
    """Sparse teacher: ids (…, k) and their values (…, k) for the rows of shape ``leading_shape``:
    types, shapes and devices only (no tensor value is read). ``sampled``: the values may be
    integer counts and k may exceed V (draws with replacement)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{indices_name} must be a torch.Tensor; got {type(indices).__name__}")
    if indices.dtype not in _INT_DTYPES:
        raise TypeError(f"{indices_name} must be an integer tensor of token ids; got {indices.dtype}")
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{values_name} must be a torch.Tensor; got {type(values).__name__}")
    if values.dtype not in _FLOAT_DTYPES and not (sampled and values.dtype in _INT_DTYPES):
        kinds = "a floating-point or integer" if sampled else "a floating-point"
        raise TypeError(f"{values_name} must be {kinds} tensor; got {values.dtype}")
    if indices.dim() != len(leading_shape) + 1 or indices.shape[:-1] != leading_shape:
        raise ValueError(f"{indices_name} must have shape (*{tuple(leading_shape)}, k); got {tuple(indices.shape)}")
    if values.shape != indices.shape:
        raise ValueError(f"{values_name} shape {tuple(values.shape)} does not match {indices_name} shape "
                         f"{tuple(indices.shape)}")
    top_k = indices.shape[-1]
    if top_k < 1 or (not sampled and top_k > vocab):
        bound = f"[1, V={vocab}]" if not sampled else "≥ 1"
        raise ValueError(f"{indices_name} has k={top_k} entries per row; k must lie in {bound}")
    for name, tensor in ((indices_name, indices), (values_name, values)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the student is on {device}")


def check_sparse_values(indices, logprobs, vocab):
    """The opt-in ``validate=True`` of the sparse losses: reads the ids and log-probs (one host
    synchronisation) to reject present ids outside [0, vocab), ids repeated among a row's present
    entries, NaN or positive log-probabilities. Absent entries (log-prob -inf) are not checked."""
    if indices.numel() == 0:
        return
    present = logprobs != float("-inf")
    outside = present & ((indices < 0) | (indices >= vocab))
    if bool(outside.any()):
        bad = indices[outside]
        raise ValueError(f"teacher_indices holds token ids outside [0, {vocab}): min {int(bad.min())}, "
                         f"max {int(bad.max())} (absent entries may hold any id: mask them or use pad_id)")
    ordered = torch.where(present, indices.long(), -1 - torch.arange(indices.shape[-1], device=indices.device))
    ordered = ordered.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("teacher_indices repeats a token id within a row; each row's top-k ids must be distinct")
    if bool(torch.isnan(logprobs).any()) or bool((logprobs > 1e-3).any()):
        raise ValueError("teacher_logprobs must be log-probabilities (≤ 0, no NaN)")


def check_sampled_values(indices, weights, vocab):
    """The opt-in ``validate=True`` of the sampled losses: reads the ids and weights (one host
    synchronisation) to reject present ids (weight ≠ 0) outside [0, vocab) and negative or
    non-finite weights. Repeated ids are legal: draws with replacement."""
    if indices.numel() == 0:
        return
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("sample_weights must be finite and ≥ 0 (counts or importance weights)")
    outside = (weights != 0) & ((indices < 0) | (indices >= vocab))
    if bool(outside.any()):
        bad = indices[outside]
        raise ValueError(f"sampled_ids holds token ids outside [0, {vocab}): min {int(bad.min())}, "
                         f"max {int(bad.max())}")
