"""Drop-ins for torchtune 0.6.1's KD losses (``torchtune.modules.loss``; torchtune not needed).

``ForwardKLLoss``, ``ReverseKLLoss``, ``SymmetricKLLoss`` and their ``…WithChunkedOutputLoss``
forms, with torchtune's constructors, forward signatures and numbers. Per row, with
p = softmax(teacher), q = softmax(student) in float32 (float64 for float64 inputs):

    ForwardKLLoss   −Σ_v p_v·log q_v over the v whose student logit is finite. This is torchtune's
                    definition: the cross-entropy H(p, q) = KL(p ‖ q) + H(p), not KL alone.
    ReverseKLLoss   Σ_v q_v·(log q_v − log p_v) over the v where both logits are finite.
    SymmetricKLLoss sym_kd_ratio·forward + (1 − sym_kd_ratio)·reverse.

Terms at infinite logits are dropped, as torchtune does (so a −inf student logit where the
teacher has mass adds nothing, where the true KL would be +inf). Rows whose label is
``ignore_index`` count for nothing; ``normalize=True`` divides by the number of the others (no
such row: 0), ``normalize=False`` returns the sum. The chunked forms take lists (or tuples) of
logits chunks, split along the tokens as ``labels.chunk(num_output_chunks, dim=1)`` splits the
labels, and divide the sum over every chunk by the number of non-ignored labels.

Deliberate differences: ``ReverseKLWithChunkedOutputLoss`` and ``SymmetricKLWithChunkedOutputLoss``
return 0 when every label is ignored (torchtune: 0/0 = NaN); the reverse-KL gradient of a row with
an infinite logit is finite (the dropped terms contribute 0; torchtune's autograd gives NaN for the
whole row, from 0·inf); no host synchronisation (torchtune
tests ``sum(mask) == 0`` on the host); the loss of float64 inputs is computed and returned in
float64 (torchtune rounds them to float32); chunk lists whose count or sizes do not match the
label chunks raise a ValueError (torchtune pairs them with ``zip``, dropping the extra ones).
The loss runs in row blocks (``_chunked_rows``) with bounded extra memory: fastkd's fused
``kd_loss`` computes KL without the teacher-entropy term and returns +inf where torchtune drops
terms at infinite logits.
"""

import torch
from torch import nn

from .. import validation
from ._chunked_rows import chunked_rows


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _dropped(mask, value):
    # Zero where torchtune's masked_fill drops the term; the inner where keeps an infinite log out
    # of the product, so the gradients of the kept terms stay finite.
    return torch.where(mask, torch.zeros((), dtype=value.dtype, device=value.device), value)


def _forward_rows(student, teacher):
    """(R, V) logits → (R,) −Σ p·log q over the finite student logits."""
    dtype = _compute_dtype(student, teacher)
    p = torch.softmax(teacher.to(dtype), -1)
    log_q = torch.log_softmax(student.to(dtype), -1)
    inf = torch.isinf(student)
    return -(p * _dropped(inf, log_q)).sum(-1)


def _reverse_rows(student, teacher):
    """(R, V) logits → (R,) Σ q·(log q − log p) over the entries where both logits are finite."""
    dtype = _compute_dtype(student, teacher)
    log_q = torch.log_softmax(student.to(dtype), -1)
    log_p = torch.log_softmax(teacher.to(dtype), -1)
    inf = torch.isinf(student) | torch.isinf(teacher)
    return (log_q.exp() * _dropped(inf, log_q - log_p)).sum(-1)


def _symmetric_rows(ratio):
    def rows(student, teacher):
        return ratio * _forward_rows(student, teacher) + (1 - ratio) * _reverse_rows(student, teacher)
    return rows


def _check_chunk(student_logits, teacher_logits, labels, student_name="student_logits",
                 teacher_name="teacher_logits"):
    validation.check_logits(student_name, student_logits)
    validation.check_logits(teacher_name, teacher_logits)
    validation.check_pair(student_name, student_logits, teacher_name, teacher_logits)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"labels must be an integer tensor (e.g. torch.long); got {labels.dtype}")
    rows = student_logits.numel() // student_logits.shape[-1]
    if labels.numel() != rows:
        raise ValueError(f"labels has {labels.numel()} elements but {student_name} has {rows} rows "
                         f"(shape {tuple(student_logits.shape)})")
    if labels.device != student_logits.device:
        raise ValueError(f"labels are on {labels.device} but {student_name} is on {student_logits.device}")


def _masked_sum(row_fn, student_logits, teacher_logits, labels, ignore_index):
    """Σ over the non-ignored rows of row_fn, and their number (a 0-d tensor)."""
    vocab = student_logits.shape[-1]
    rows = chunked_rows(row_fn, student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab))
    keep = labels.reshape(-1) != ignore_index
    return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device)).sum(), keep.sum()


def _mean(total, count):
    # 0 tokens → 0, on the device: torch.where picks the branch without a host read.
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros((), dtype=total.dtype, device=total.device))


class _KDLoss(nn.Module):
    def _rows(self):
        raise NotImplementedError

    def forward(self, student_logits, teacher_logits, labels, normalize=True):
        """student_logits, teacher_logits: (…, V); labels: as many elements as rows. Returns a 0-d
        float32 tensor (float64 for float64 inputs)."""
        validation.check_ignore_index(self.ignore_index)
        validation.check_flag("normalize", normalize)
        _check_chunk(student_logits, teacher_logits, labels)
        total, count = _masked_sum(self._rows(), student_logits, teacher_logits, labels, self.ignore_index)
        return _mean(total, count) if normalize else total


class ForwardKLLoss(_KDLoss):
    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def _rows(self):
        return _forward_rows


class ReverseKLLoss(_KDLoss):
    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def _rows(self):
        return _reverse_rows


def _check_ratio(sym_kd_ratio):
    if isinstance(sym_kd_ratio, bool) or not isinstance(sym_kd_ratio, (int, float)):
        raise TypeError(f"sym_kd_ratio must be a number; got {type(sym_kd_ratio).__name__}")
    if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
        raise ValueError(f"sym_kd_ratio must be in the range [0, 1]; got {sym_kd_ratio}")


class SymmetricKLLoss(_KDLoss):
    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        super().__init__()
        _check_ratio(sym_kd_ratio)
        self.ignore_index = ignore_index
        self.sym_kd_ratio = sym_kd_ratio

    def _rows(self):
        return _symmetric_rows(self.sym_kd_ratio)


class _ChunkedKDLoss(nn.Module):
    def _rows(self):
        raise NotImplementedError

    def forward(self, student_logits, teacher_logits, labels):
        """student_logits, teacher_logits: lists of (B, T_i, V) chunks; labels: (B, T)."""
        validation.check_ignore_index(self.ignore_index)
        if isinstance(self.num_output_chunks, bool) or not isinstance(self.num_output_chunks, int) \
                or self.num_output_chunks < 1:
            raise ValueError(f"num_output_chunks must be a positive int; got {self.num_output_chunks!r}")
        for name, chunks in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            if not isinstance(chunks, (list, tuple)) or not chunks:
                raise TypeError(f"{name} must be a non-empty list of logits chunks; got {type(chunks).__name__}")
        if not isinstance(labels, torch.Tensor) or labels.dim() < 2:
            raise ValueError("labels must be a (batch_size, num_tokens) tensor")
        label_chunks = labels.chunk(self.num_output_chunks, dim=1)
        if not len(student_logits) == len(teacher_logits) == len(label_chunks):
            raise ValueError(f"student_logits has {len(student_logits)} chunks and teacher_logits "
                             f"{len(teacher_logits)}, but labels.chunk({self.num_output_chunks}, dim=1) gives "
                             f"{len(label_chunks)}")
        total = 0.0
        for index, (student, teacher, label_chunk) in enumerate(zip(student_logits, teacher_logits, label_chunks)):
            _check_chunk(student, teacher, label_chunk, f"student_logits[{index}]", f"teacher_logits[{index}]")
            total = total + _masked_sum(self._rows(), student, teacher, label_chunk, self.ignore_index)[0]
        return _mean(total, (labels != self.ignore_index).sum())


class ForwardKLWithChunkedOutputLoss(_ChunkedKDLoss):
    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100):
        super().__init__()
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index

    def _rows(self):
        return _forward_rows


class ReverseKLWithChunkedOutputLoss(_ChunkedKDLoss):
    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100):
        super().__init__()
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index

    def _rows(self):
        return _reverse_rows


class SymmetricKLWithChunkedOutputLoss(_ChunkedKDLoss):
    def __init__(self, num_output_chunks: int = 8, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        super().__init__()
        _check_ratio(sym_kd_ratio)
        self.num_output_chunks = num_output_chunks
        self.sym_kd_ratio = sym_kd_ratio
        self.ignore_index = ignore_index

    def _rows(self):
        return _symmetric_rows(self.sym_kd_ratio)
