"""nn.Module wrappers of the public loss functions."""

from torch import nn

from .divergences import make_spec
from .functional import fused_linear_kd_loss, kd_loss
from .validation import check_reduction


class KDLoss(nn.Module):
    """Module form of :func:`fastkd.kd_loss`; the options are fixed at construction.

    ``forward(student_logits, teacher_logits, labels=None, normalizer=None)``.
    """

    def __init__(self, divergence="forward_kl", *, temperature=1.0, beta=0.5, skew=0.1,
                 temperature_squared=False, ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__()
        self.options = dict(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                            temperature_squared=temperature_squared, ignore_index=ignore_index,
                            reduction=reduction, backend=backend)
        # Fail at construction, not at the first batch.
        make_spec(divergence, temperature, beta, skew)
        check_reduction(reduction, None, None)

    def forward(self, student_logits, teacher_logits, labels=None, normalizer=None):
        return kd_loss(student_logits, teacher_logits, labels=labels, normalizer=normalizer, **self.options)

    def extra_repr(self):
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fastkd.fused_linear_kd_loss`; the options are fixed at construction.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
    student_bias=None, teacher_bias=None, normalizer=None)``.
    """

    def __init__(self, divergence="forward_kl", *, soft_weight=1.0, hard_weight=0.0, vocab_size=None,
                 temperature=1.0, beta=0.5, skew=0.1, temperature_squared=False, ignore_index=-100,
                 reduction="mean", backend="auto"):
        super().__init__()
        self.options = dict(divergence=divergence, soft_weight=soft_weight, hard_weight=hard_weight,
                            vocab_size=vocab_size, temperature=temperature, beta=beta, skew=skew,
                            temperature_squared=temperature_squared, ignore_index=ignore_index,
                            reduction=reduction, backend=backend)
        make_spec(divergence, temperature, beta, skew)
        check_reduction(reduction, None, None)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, normalizer=None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    student_bias=student_bias, teacher_bias=teacher_bias, normalizer=normalizer,
                                    **self.options)

    def extra_repr(self):
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
