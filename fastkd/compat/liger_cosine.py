"""Drop-in for Liger-Kernel 0.8.5's ``LigerFusedLinearCosineSimilarityLoss`` (chunked-loss API;
Liger not needed).

Student logits x = student_input @ student_weight.T (+ student_bias), teacher logits t likewise
(no gradient). Per token whose label is not ``ignore_index``:

    soft = beta·(1 − cos(normalize(x / T), normalize(t / T)))    (F.normalize then
           F.cosine_similarity, with their eps; a teacher vocabulary larger than the student's
           pads the student's tempered logits with zeros)
    hard = cross-entropy of the untempered student logits against the label

each summed and divided by the number of non-ignored tokens (at least 1); loss =
weight_hard_loss·hard + weight_soft_loss·soft. Note Liger's defaults: ``beta=0.5`` scales the
soft term, and T cancels in the cosine. ``return_soft_hard_loss=True`` returns
(loss, soft, hard). ``compiled`` and ``chunk_size`` are accepted and unused (the blocks are sized
by an element budget).

Deliberate differences: ``soft`` and ``hard`` come back detached (Liger returns them attached but
ignores their gradient); the logits are raised to float32 for the loss (Liger keeps the inputs'
dtype for the cosine), float64 inputs stay float64 throughout. fastkd has no cosine divergence,
so this runs on the token-chunked path of ``_chunked_linear`` (a GEMM per block, the formula in
PyTorch, gradients formed in the forward as in Liger).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .. import validation
from ._chunked_linear import chunked_linear_loss
from .liger_fused_linear import _check_temperature


def _check_inputs(student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
                  teacher_bias):
    validation.check_linear("student_input", student_input, "student_weight", student_weight,
                            "student_bias", student_bias)
    validation.check_linear("teacher_input", teacher_input, "teacher_weight", teacher_weight,
                            "teacher_bias", teacher_bias)
    rows = student_input.numel() // student_input.shape[-1]
    if teacher_input.numel() // teacher_input.shape[-1] != rows:
        raise ValueError(f"teacher_input has {teacher_input.numel() // teacher_input.shape[-1]} rows but "
                         f"student_input has {rows}")
    if teacher_input.device != student_input.device:
        raise ValueError(f"teacher_input is on {teacher_input.device} but student_input is on {student_input.device}")
    if teacher_weight.shape[0] < student_weight.shape[0]:
        raise ValueError(f"teacher_weight has V={teacher_weight.shape[0]} rows, fewer than student_weight's "
                         f"V={student_weight.shape[0]} (Liger pads the student, never the teacher)")
    if not isinstance(true_labels, torch.Tensor) or true_labels.dtype.is_floating_point:
        raise TypeError("true_labels must be an integer tensor of the tokens' labels")
    if true_labels.numel() != rows:
        raise ValueError(f"true_labels has {true_labels.numel()} elements but student_input has {rows} rows")
    if true_labels.device != student_input.device:
        raise ValueError(f"true_labels are on {true_labels.device} but student_input is on {student_input.device}")
    return rows


class LigerFusedLinearCosineSimilarityLoss(nn.Module):
    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False):
        super().__init__()
        _check_temperature(temperature)
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.beta = beta
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias=None,
                teacher_bias=None):
        """student_input: (BT, H); student_weight: (V, H); teacher_input: (BT, H'); teacher_weight:
        (V', H') with V' ≥ V; true_labels: (BT,). Returns the loss, or (loss, soft, hard)."""
        rows = _check_inputs(student_input, student_weight, teacher_input, teacher_weight, true_labels,
                             student_bias, teacher_bias)
        for name in ("weight_hard_loss", "weight_soft_loss", "beta"):
            validation.check_finite_number(name, getattr(self, name))
        validation.check_ignore_index(self.ignore_index)
        validation.check_flag("return_soft_hard_loss", self.return_soft_hard_loss)
        ignore_index, temperature, beta = self.ignore_index, self.temperature, self.beta
        with_hard = self.weight_hard_loss != 0 or self.return_soft_hard_loss
        labels = true_labels.reshape(-1)
        dtype = torch.float64 if student_input.dtype == torch.float64 else torch.float32
        count = (labels != ignore_index).sum().clamp(min=1).to(dtype)
        pad = teacher_weight.shape[0] - student_weight.shape[0]

        def block_loss(logits, teacher_block, labels_block):
            with torch.no_grad():
                teacher = teacher_block @ teacher_weight.t()
                if teacher_bias is not None:
                    teacher = teacher + teacher_bias
                teacher = teacher.to(dtype) / temperature
            keep = labels_block != ignore_index
            hard = torch.zeros((), dtype=dtype, device=logits.device)
            if with_hard:
                hard = F.cross_entropy(logits, labels_block.long(), ignore_index=ignore_index, reduction="sum")
            student = F.pad(logits / temperature, (0, pad))
            cosine = F.cosine_similarity(F.normalize(student, p=2, dim=-1), F.normalize(teacher, p=2, dim=-1), dim=-1)
            soft = torch.where(keep, beta * (1 - cosine), torch.zeros_like(cosine)).sum()
            soft, hard = soft / count, hard / count
            return self.weight_hard_loss * hard + self.weight_soft_loss * soft, soft, hard

        hidden = student_input.reshape(rows, -1)
        loss, soft, hard = chunked_linear_loss(block_loss, hidden, student_weight, student_bias,
                                               teacher_input.reshape(rows, -1), labels)
        return (loss, soft, hard) if self.return_soft_hard_loss else loss
