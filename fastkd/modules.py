"""nn.Module forms of every public loss: options fixed (and checked) at construction, tensors in
``forward`` in the function's order (``labels`` third for the logits losses), per-call values such
as ``normalizer`` keyword-only."""

from typing import Optional, Union

from torch import Tensor, nn

from . import functional, ot, sampled
from . import ot_validation as ot_checks
from .divergences import make_spec
from .functional import FusedLoss, Normalizer
from .kernels.sparse.contract import DEFAULT_PAD_ID
from .sparse_inputs import check_pad_id
from .validation import check_reduction


class _LossModule(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options
        # Fail at construction, not at the first batch.
        if "reduction" in options:
            check_reduction(options["reduction"], None, None)

    def extra_repr(self):
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


def _spec_options(divergence, temperature, beta, skew, alpha, transforms):
    """The divergence and transform options of a logits module, checked at construction."""
    make_spec(divergence, temperature, beta, skew, alpha=alpha, **transforms)
    return dict(divergence=divergence, temperature=temperature, beta=beta, skew=skew, alpha=alpha, **transforms)


class KDLoss(_LossModule):
    """:func:`fastkd.kd_loss`. ``forward(student_logits, teacher_logits, labels=None, *, normalizer=None)``.
    ``transforms``: student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap,
    standardize, standardize_eps, as :func:`fastkd.kd_loss` takes them. ``process_group``: the
    group the vocabulary is split over (vocab-parallel logits), as :func:`fastkd.kd_loss` takes it."""

    def __init__(self, divergence: str = "forward_kl", *, temperature: float = 1.0, beta: Optional[float] = None,
                 skew: float = 0.1, alpha: Optional[float] = None, temperature_squared: bool = False,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", process_group=None,
                 **transforms):
        super().__init__(**_spec_options(divergence, temperature, beta, skew, alpha, transforms),
                         temperature_squared=temperature_squared, ignore_index=ignore_index, reduction=reduction,
                         backend=backend, process_group=process_group)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                normalizer: Normalizer = None) -> Tensor:
        return functional.kd_loss(student_logits, teacher_logits, labels, normalizer=normalizer, **self.options)


class FusedLinearKDLoss(_LossModule):
    """:func:`fastkd.fused_linear_kd_loss`. ``forward(student_hidden, student_weight, teacher_hidden,
    teacher_weight, labels=None, *, student_bias=None, teacher_bias=None, normalizer=None)``;
    ``transforms`` as for :class:`KDLoss`; ``process_group`` and ``grad_hidden_reduction`` for an
    lm_head split by vocabulary rows (see the function)."""

    def __init__(self, divergence: str = "forward_kl", *, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 vocab_size: Optional[int] = None, temperature: float = 1.0, beta: Optional[float] = None,
                 skew: float = 0.1, alpha: Optional[float] = None, temperature_squared: bool = False,
                 ignore_index: int = -100, reduction: str = "mean", return_components: bool = False,
                 return_entropy: bool = False, fp32_logits: Optional[bool] = None, backend: str = "auto",
                 process_group=None, grad_hidden_reduction: str = "sum", **transforms):
        super().__init__(**_spec_options(divergence, temperature, beta, skew, alpha, transforms),
                         soft_weight=soft_weight, hard_weight=hard_weight, vocab_size=vocab_size,
                         temperature_squared=temperature_squared, ignore_index=ignore_index, reduction=reduction,
                         return_components=return_components, return_entropy=return_entropy,
                         fp32_logits=fp32_logits, backend=backend, process_group=process_group,
                         grad_hidden_reduction=grad_hidden_reduction)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, labels: Optional[Tensor] = None, *, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None, normalizer: Normalizer = None) -> Union[Tensor, FusedLoss]:
        return functional.fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                               student_bias=student_bias, teacher_bias=teacher_bias,
                                               normalizer=normalizer, **self.options)


class SparseKDLoss(_LossModule):
    """:func:`fastkd.sparse_kd_loss`. ``forward(student_logits, teacher_indices, teacher_logprobs,
    labels=None, *, teacher_mask=None, normalizer=None)``."""

    def __init__(self, divergence: str = "forward_kl", *, temperature: float = 1.0, beta: Optional[float] = None,
                 student_logit_scale: Optional[float] = None, student_softcap: Optional[float] = None,
                 teacher_temperature: float = 1.0, missing_mass: str = "renormalize",
                 pad_id: Optional[int] = DEFAULT_PAD_ID, temperature_squared: bool = False, ignore_index: int = -100,
                 reduction: str = "mean", validate: bool = False, backend: str = "auto"):
        super().__init__(divergence=divergence, temperature=temperature, beta=beta,
                         student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                         teacher_temperature=teacher_temperature, missing_mass=missing_mass, pad_id=pad_id,
                         temperature_squared=temperature_squared, ignore_index=ignore_index, reduction=reduction,
                         validate=validate, backend=backend)
        functional._sparse_spec(divergence, temperature, missing_mass, teacher_temperature, beta, student_logit_scale,
                                student_softcap)

    def forward(self, student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor,
                labels: Optional[Tensor] = None, *, teacher_mask: Optional[Tensor] = None,
                normalizer: Normalizer = None) -> Tensor:
        return functional.sparse_kd_loss(student_logits, teacher_indices, teacher_logprobs, labels,
                                         teacher_mask=teacher_mask, normalizer=normalizer, **self.options)


class FusedLinearSparseKDLoss(_LossModule):
    """:func:`fastkd.fused_linear_sparse_kd_loss`. ``forward(student_hidden, student_weight,
    teacher_indices, teacher_logprobs, labels=None, *, student_bias=None, teacher_mask=None,
    normalizer=None)``; ``process_group`` and ``grad_hidden_reduction`` for a student lm_head split by
    vocabulary rows."""

    def __init__(self, divergence: str = "forward_kl", *, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 vocab_size: Optional[int] = None, temperature: float = 1.0, beta: Optional[float] = None,
                 student_logit_scale: Optional[float] = None, student_softcap: Optional[float] = None,
                 teacher_temperature: float = 1.0, missing_mass: str = "renormalize",
                 pad_id: Optional[int] = DEFAULT_PAD_ID, temperature_squared: bool = False, ignore_index: int = -100,
                 reduction: str = "mean", return_components: bool = False, return_entropy: bool = False,
                 fp32_logits: Optional[bool] = None, validate: bool = False, backend: str = "auto",
                 process_group=None, grad_hidden_reduction: str = "sum"):
        super().__init__(divergence=divergence, soft_weight=soft_weight, hard_weight=hard_weight,
                         vocab_size=vocab_size, temperature=temperature, beta=beta,
                         student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                         teacher_temperature=teacher_temperature, missing_mass=missing_mass, pad_id=pad_id,
                         temperature_squared=temperature_squared, ignore_index=ignore_index, reduction=reduction,
                         return_components=return_components, return_entropy=return_entropy,
                         fp32_logits=fp32_logits, validate=validate, backend=backend,
                         process_group=process_group, grad_hidden_reduction=grad_hidden_reduction)
        functional._sparse_spec(divergence, temperature, missing_mass, teacher_temperature, beta, student_logit_scale,
                                student_softcap)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_indices: Tensor,
                teacher_logprobs: Tensor, labels: Optional[Tensor] = None, *, student_bias: Optional[Tensor] = None,
                teacher_mask: Optional[Tensor] = None, normalizer: Normalizer = None) -> Union[Tensor, FusedLoss]:
        return functional.fused_linear_sparse_kd_loss(student_hidden, student_weight, teacher_indices,
                                                      teacher_logprobs, labels, student_bias=student_bias,
                                                      teacher_mask=teacher_mask, normalizer=normalizer,
                                                      **self.options)


class SampledKDLoss(_LossModule):
    """:func:`fastkd.sampled_kd_loss`. ``forward(student_logits, sampled_ids, sample_weights,
    labels=None, *, teacher_mask=None, normalizer=None)``."""

    def __init__(self, *, temperature: float = 1.0, num_samples: Optional[float] = None,
                 pad_id: Optional[int] = DEFAULT_PAD_ID, temperature_squared: bool = False, ignore_index: int = -100,
                 reduction: str = "mean", validate: bool = False, backend: str = "auto"):
        super().__init__(temperature=temperature, num_samples=num_samples, pad_id=pad_id,
                         temperature_squared=temperature_squared, ignore_index=ignore_index, reduction=reduction,
                         validate=validate, backend=backend)
        _check_sampled_options(temperature, num_samples, pad_id)

    def forward(self, student_logits: Tensor, sampled_ids: Tensor, sample_weights: Tensor,
                labels: Optional[Tensor] = None, *, teacher_mask: Optional[Tensor] = None,
                normalizer: Normalizer = None) -> Tensor:
        return sampled.sampled_kd_loss(student_logits, sampled_ids, sample_weights, labels, teacher_mask=teacher_mask,
                                       normalizer=normalizer, **self.options)


class FusedLinearSampledKDLoss(_LossModule):
    """:func:`fastkd.fused_linear_sampled_kd_loss`. ``forward(student_hidden, student_weight,
    sampled_ids, sample_weights, labels=None, *, student_bias=None, teacher_mask=None,
    normalizer=None)``."""

    def __init__(self, *, soft_weight: float = 1.0, hard_weight: float = 0.0, vocab_size: Optional[int] = None,
                 temperature: float = 1.0, num_samples: Optional[float] = None,
                 pad_id: Optional[int] = DEFAULT_PAD_ID, temperature_squared: bool = False, ignore_index: int = -100,
                 reduction: str = "mean", return_components: bool = False, return_entropy: bool = False,
                 fp32_logits: Optional[bool] = None, validate: bool = False, backend: str = "auto"):
        super().__init__(soft_weight=soft_weight, hard_weight=hard_weight, vocab_size=vocab_size,
                         temperature=temperature, num_samples=num_samples, pad_id=pad_id,
                         temperature_squared=temperature_squared, ignore_index=ignore_index, reduction=reduction,
                         return_components=return_components, return_entropy=return_entropy,
                         fp32_logits=fp32_logits, validate=validate, backend=backend)
        _check_sampled_options(temperature, num_samples, pad_id)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, sampled_ids: Tensor, sample_weights: Tensor,
                labels: Optional[Tensor] = None, *, student_bias: Optional[Tensor] = None,
                teacher_mask: Optional[Tensor] = None, normalizer: Normalizer = None) -> Union[Tensor, FusedLoss]:
        return sampled.fused_linear_sampled_kd_loss(student_hidden, student_weight, sampled_ids, sample_weights,
                                                    labels, student_bias=student_bias, teacher_mask=teacher_mask,
                                                    normalizer=normalizer, **self.options)


class WassersteinKDLoss(_LossModule):
    """:func:`fastkd.wasserstein_kd_loss` with its class cost held by the module (a buffer, so it
    follows ``.to(device)``). ``forward(student_logits, teacher_logits, labels=None)``."""

    def __init__(self, cost: Tensor, *, temperature: float = 1.0, eps: float = ot.DEFAULT_EPS, max_iter: int = 10,
                 exclude_target: bool = True, grad: str = "unrolled", validate: bool = False, backend: str = "auto",
                 gemm_precision: str = "fp32"):
        super().__init__(temperature=temperature, eps=eps, max_iter=max_iter, exclude_target=exclude_target,
                         grad=grad, validate=validate, backend=backend, gemm_precision=gemm_precision)
        _check_ot_options(temperature, eps, max_iter, grad, gemm_precision)
        self.register_buffer("cost", cost)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return ot.wasserstein_kd_loss(student_logits, teacher_logits, labels, cost=self.cost, **self.options)


class SinkhornKDLoss(_LossModule):
    """:func:`fastkd.sinkhorn_kd_loss`. ``forward(student_logits, teacher_logits, labels=None)``."""

    def __init__(self, *, temperature: float = 1.0, eps: float = ot.DEFAULT_EPS, max_iter: int = 20,
                 ignore_index: int = -100, grad: str = "unrolled", backend: str = "auto",
                 gemm_precision: str = "fp32"):
        super().__init__(temperature=temperature, eps=eps, max_iter=max_iter, ignore_index=ignore_index, grad=grad,
                         backend=backend, gemm_precision=gemm_precision)
        _check_ot_options(temperature, eps, max_iter, grad, gemm_precision)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return ot.sinkhorn_kd_loss(student_logits, teacher_logits, labels, **self.options)


class ULDLoss(_LossModule):
    """:func:`fastkd.uld_loss`. ``forward(student_logits, teacher_logits, labels=None)``."""

    def __init__(self, *, temperature: float = 1.0, top_k: Optional[int] = None, ignore_index: int = -100,
                 reduction: str = "mean"):
        super().__init__(temperature=temperature, top_k=top_k, ignore_index=ignore_index, reduction=reduction)
        ot_checks.check_temperature(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return ot.uld_loss(student_logits, teacher_logits, labels, **self.options)


def _check_sampled_options(temperature, num_samples, pad_id):
    make_spec("forward_kl", temperature)
    sampled._sample_count(num_samples)
    check_pad_id(pad_id)


def _check_ot_options(temperature, eps, max_iter, grad, gemm_precision):
    ot_checks.check_temperature(temperature)
    ot_checks.check_eps(eps)
    ot_checks.check_iterations("max_iter", max_iter)
    ot_checks.check_loss_grad(grad)
    ot_checks.check_gemm_precision(gemm_precision)
