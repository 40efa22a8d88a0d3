"""nn.Module wrappers of the public loss functions: options fixed at construction, tensors in
``forward``."""

from torch import nn

from . import functional
from .divergences import make_spec
from .validation import check_reduction


class _LossModule(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options
        # Fail at construction, not at the first batch.
        check_reduction(options["reduction"], None, None)

    def extra_repr(self):
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class KDLoss(_LossModule):
    """:func:`fastkd.kd_loss`. ``forward(student_logits, teacher_logits, labels=None, normalizer=None)``."""

    def __init__(self, divergence="forward_kl", *, temperature=1.0, beta=0.5, skew=0.1, temperature_squared=False,
                 ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                         temperature_squared=temperature_squared, ignore_index=ignore_index, reduction=reduction,
                         backend=backend)
        make_spec(divergence, temperature, beta, skew)

    def forward(self, student_logits, teacher_logits, labels=None, normalizer=None):
        return functional.kd_loss(student_logits, teacher_logits, labels=labels, normalizer=normalizer,
                                  **self.options)


class FusedLinearKDLoss(_LossModule):
    """:func:`fastkd.fused_linear_kd_loss`. ``forward(student_hidden, student_weight, teacher_hidden,
    teacher_weight, labels=None, student_bias=None, teacher_bias=None, normalizer=None)``."""

    def __init__(self, divergence="forward_kl", *, soft_weight=1.0, hard_weight=0.0, vocab_size=None,
                 temperature=1.0, beta=0.5, skew=0.1, temperature_squared=False, ignore_index=-100,
                 reduction="mean", backend="auto"):
        super().__init__(divergence=divergence, soft_weight=soft_weight, hard_weight=hard_weight,
                         vocab_size=vocab_size, temperature=temperature, beta=beta, skew=skew,
                         temperature_squared=temperature_squared, ignore_index=ignore_index, reduction=reduction,
                         backend=backend)
        make_spec(divergence, temperature, beta, skew)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, normalizer=None):
        return functional.fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                               student_bias=student_bias, teacher_bias=teacher_bias,
                                               normalizer=normalizer, **self.options)


class SparseKDLoss(_LossModule):
    """:func:`fastkd.sparse_kd_loss`. ``forward(student_logits, teacher_indices, teacher_logprobs,
    labels=None, normalizer=None)``."""

    def __init__(self, divergence="forward_kl", *, temperature=1.0, missing_mass="renormalize",
                 temperature_squared=False, ignore_index=-100, reduction="mean", validate=True, backend="auto"):
        super().__init__(divergence=divergence, temperature=temperature, missing_mass=missing_mass,
                         temperature_squared=temperature_squared, ignore_index=ignore_index, reduction=reduction,
                         validate=validate, backend=backend)
        functional._sparse_spec(divergence, temperature, missing_mass)

    def forward(self, student_logits, teacher_indices, teacher_logprobs, labels=None, normalizer=None):
        return functional.sparse_kd_loss(student_logits, teacher_indices, teacher_logprobs, labels=labels,
                                         normalizer=normalizer, **self.options)


class FusedLinearSparseKDLoss(_LossModule):
    """:func:`fastkd.fused_linear_sparse_kd_loss`. ``forward(student_hidden, student_weight,
    teacher_indices, teacher_logprobs, labels=None, student_bias=None, normalizer=None)``."""

    def __init__(self, divergence="forward_kl", *, soft_weight=1.0, hard_weight=0.0, vocab_size=None,
                 temperature=1.0, missing_mass="renormalize", temperature_squared=False, ignore_index=-100,
                 reduction="mean", validate=True, backend="auto"):
        super().__init__(divergence=divergence, soft_weight=soft_weight, hard_weight=hard_weight,
                         vocab_size=vocab_size, temperature=temperature, missing_mass=missing_mass,
                         temperature_squared=temperature_squared, ignore_index=ignore_index, reduction=reduction,
                         validate=validate, backend=backend)
        functional._sparse_spec(divergence, temperature, missing_mass)

    def forward(self, student_hidden, student_weight, teacher_indices, teacher_logprobs, labels=None,
                student_bias=None, normalizer=None):
        return functional.fused_linear_sparse_kd_loss(student_hidden, student_weight, teacher_indices,
                                                      teacher_logprobs, labels, student_bias=student_bias,
                                                      normalizer=normalizer, **self.options)
