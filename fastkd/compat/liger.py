"""Drop-in for Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked-loss API; Liger not needed).

Same constructor and forward signature; the same values and gradients as Liger 0.8's definition:
soft = Σ over non-ignored tokens of JSD_beta(student / T, teacher / T), hard = Σ of cross-entropy
of the student logits (T = 1), both divided by the number of non-ignored tokens (at least 1);
loss = weight_hard_loss·hard + weight_soft_loss·soft. beta = 0 / 1 are forward / reverse KL. A
teacher lm_head with more rows than the student's is matched, as in Liger, by zero student logits
for the extra rows. ``compiled`` and ``chunk_size`` are accepted and unused (fastkd sizes its own
blocks).
"""

import torch
from torch import nn

from ..functional import fused_linear_kd_loss


class LigerFusedLinearJSDLoss(nn.Module):
    def __init__(self, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, ignore_index=-100, temperature=1.0,
                 compiled=True, chunk_size=1024, return_soft_hard_loss=False):
        super().__init__()
        if temperature == 0:
            raise ValueError("temperature cannot be 0")
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.beta = beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias=None,
                teacher_bias=None):
        """student_input: (BT, Hs); student_weight: (V, Hs); teacher_input: (BT, Ht); teacher_weight:
        (V', Ht) with V' ≥ V; true_labels: (BT,). Returns the loss, or (loss, soft, hard)."""
        extra = teacher_weight.shape[0] - student_weight.shape[0]
        if extra < 0:
            raise ValueError(f"student_weight has {student_weight.shape[0]} rows, more than teacher_weight's "
                             f"{teacher_weight.shape[0]}")
        if not extra:
            return self._call(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                              teacher_bias, true_labels, self.weight_soft_loss, self.weight_hard_loss)
        # Liger gives the teacher's extra vocabulary rows zero student logits in the soft term only
        # (its cross-entropy sees the student's own vocabulary): two calls, the second one for the
        # hard term with the student as its own (unused) teacher.
        padded_weight = torch.cat([student_weight, student_weight.new_zeros(extra, student_weight.shape[1])])
        padded_bias = None if student_bias is None else torch.cat([student_bias, student_bias.new_zeros(extra)])
        soft = self._call(student_input, padded_weight, padded_bias, teacher_input, teacher_weight, teacher_bias,
                          true_labels, 1.0, 0.0)
        hard = self._call(student_input, student_weight, student_bias, student_input.detach(),
                          student_weight.detach(), None, true_labels, 0.0, 1.0)
        if not self.return_soft_hard_loss:
            return self.weight_soft_loss * soft + self.weight_hard_loss * hard
        return (self.weight_soft_loss * soft[0] + self.weight_hard_loss * hard[0], soft[1], hard[2])

    def _call(self, student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias,
              labels, soft_weight, hard_weight):
        out = fused_linear_kd_loss(student_input, student_weight, teacher_input, teacher_weight, labels,
                                   student_bias=student_bias, teacher_bias=teacher_bias, soft_weight=soft_weight,
                                   hard_weight=hard_weight, divergence="jsd", temperature=self.temperature,
                                   beta=self.beta, ignore_index=self.ignore_index, return_components=True)
        return out[:3] if self.return_soft_hard_loss else out.loss
