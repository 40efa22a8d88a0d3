"""TRL's distillation trainers with fastkd's fused loss: the same training loop, data handling,
generation and logging as TRL's classes, only the loss computation replaced.

    fastkd.integrations.trl.DistillationTrainer   subclass of trl.DistillationTrainer (TRL ≥ 1.16)
    fastkd.integrations.trl.GKDTrainer            subclass of trl.experimental.gkd.GKDTrainer

With the default options the numbers are TRL's own: DistillationTrainer's chunked generalized JSD
(``trl.kernels.chunked_divergence``: beta = 0 forward KL(teacher ‖ student), beta = 1 reverse KL,
otherwise beta·KL(p ‖ M) + (1 − beta)·KL(q ‖ M), M = beta·p + (1 − beta)·q, at ``args.temperature``
after each model's config logit scale and soft-cap), and GKDTrainer's ``generalized_jsd_loss`` on the
models' logits (at temperature 1, as TRL's ``compute_loss`` calls it: ``args.temperature`` is the
sampling temperature there). Both normalise by ``num_items_in_batch`` when the Trainer gives it,
else by the number of tokens in the loss.

``fastkd_options`` (a dict, keyword of both constructors) selects anything else fastkd computes:
``divergence`` (any :func:`fastkd.kd_loss` divergence; default "jsd" with TRL's beta), ``skew``,
``alpha``, ``temperature_squared``, ``standardize``, ``soft_weight``, ``hard_weight`` (cross-entropy on
the sampled tokens), ``vocab_size`` (heads padded differently), ``teacher_top_k`` and ``missing_mass``
(a sparse teacher: its top-k tokens from its hidden states), ``fp32_logits``, ``backend``, and
``process_group``: the vocabulary split over a tensor-parallel group whose ranks hold the same batch
(the fused loss over each rank's lm_head rows; fastkd/integrations/vocab_parallel.py).

Needs TRL and transformers: ``pip install fastkd[hf]``.
"""

import functools

try:
    import torch
    import trl as _trl
    from trl.models.utils import _ForwardRedirection
except ImportError as error:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(f"fastkd.integrations.trl needs TRL (>= 1.16) and transformers: pip install fastkd[hf] "
                      f"({error})") from error

from ..kernels.sparse.contract import SPARSE_DIVERGENCES
from . import hf

__all__ = ["DistillationTrainer", "GKDTrainer"]

# fastkd_options keys: the loss's options beyond TRL's beta and temperature.
OPTIONS = ("divergence", "skew", "alpha", "temperature_squared", "standardize", "soft_weight", "hard_weight",
           "vocab_size", "teacher_top_k", "missing_mass", "fp32_logits", "backend", "process_group")

# Multimodal inputs TRL's DistillationTrainer forwards to the model bodies.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _checked_options(options):
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"fastkd_options has unknown keys {unknown}; allowed: {', '.join(OPTIONS)}")
    return options


def _loss_options(options, beta, temperature):
    """fastkd_options with TRL's beta and temperature: beta = 0 is "forward_kl", 1 "reverse_kl",
    else "jsd" with weight beta, unless ``divergence`` says otherwise."""
    options = dict(options)
    options.setdefault("divergence", {0.0: "forward_kl", 1.0: "reverse_kl"}.get(float(beta), "jsd"))
    if options["divergence"] == "jsd":
        options["beta"] = float(beta)
    options["temperature"] = float(temperature)
    return options


def _check_sparse(options, beta):
    divergence = _loss_options(options, beta, 1.0)["divergence"]
    parallel = options.get("process_group") is not None
    allowed = ("forward_kl", "reverse_kl") if parallel else SPARSE_DIVERGENCES
    if options.get("teacher_top_k") is not None and divergence not in allowed:
        raise ValueError(f"fastkd_options teacher_top_k (a sparse teacher) needs divergence "
                         f"{' or '.join(map(repr, allowed))}{' with process_group' if parallel else ''}; "
                         f"got {divergence!r} (beta={beta})")


class DistillationTrainer(_trl.DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is :func:`fastkd.fused_linear_kd_loss` on the student's
    and teacher's final hidden states and lm_heads, over the completion tokens (``completion_mask``,
    times ``tool_mask`` when present): TRL's loss, reduction and entropy metric by default, any
    fastkd divergence, a hard term or a sparse teacher through ``fastkd_options``.

    Unlike TRL's chunked loss, every position is projected (ignored ones add nothing): selecting
    the valid ones would make the shapes depend on the data, a host synchronisation."""

    def __init__(self, *args, fastkd_options=None, **kwargs):
        self.fastkd_options = _checked_options(fastkd_options)
        super().__init__(*args, **kwargs)
        _check_sparse(self.fastkd_options, self.beta)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """(loss, summed student entropy (detached), number of tokens in the loss): what TRL's
        ``compute_loss`` reduces and logs. Runs inside the student wrapper's forward, as TRL's."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

        # TRL's own hidden states: the body's, shifted by one and cut to the completion tokens.
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep, **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, keep, **multimodal)
        device = unwrapped_student.get_output_embeddings().weight.device
        # The completion tokens are the targets of these positions (the hard term's labels).
        labels = inputs["completion_ids"].masked_fill(loss_mask == 0, -100).to(device)
        out = hf.hidden_states_loss(unwrapped_student, student_hidden.to(device), unwrapped_teacher,
                                    teacher_hidden.to(device), labels, num_items_in_batch=num_items_in_batch,
                                    return_entropy=True,
                                    **_loss_options(self.fastkd_options, self.beta, self.temperature))
        return out.loss, out.entropy.sum(), out.n_tokens


def __getattr__(name):
    # GKDTrainer is built on first use: importing trl.experimental warns that it is experimental,
    # which users of DistillationTrainer alone should not see.
    if name == "GKDTrainer":
        return _gkd_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _gkd_trainer_class():
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    namespace = {"__module__": __name__, "__qualname__": "GKDTrainer", "__doc__": _GKDLoss.__doc__}
    return type("GKDTrainer", (_GKDLoss, TRLGKDTrainer), namespace)


class _GKDLoss:
    """``trl.experimental.gkd.GKDTrainer`` whose loss is :func:`fastkd.integrations.hf.distillation_loss`:
    TRL's ``generalized_jsd_loss`` on the shifted logits (labels -100 dropped, ``num_items_in_batch``
    or the kept-token mean), without forming the logits. ``compute_loss(..., return_outputs=True)``
    (evaluation that wants logits) runs TRL's own eager loss."""

    def __init__(self, *args, fastkd_options=None, **kwargs):
        self.fastkd_options = _checked_options(fastkd_options)
        super().__init__(*args, **kwargs)
        _check_sparse(self.fastkd_options, self.beta)
        self._forward_redirection = _ForwardRedirection()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        # Through the student wrapper's forward, so DDP/FSDP see the backbone and the head used.
        unwrapped_student = self.accelerator.unwrap_model(model)
        return self._forward_redirection(model, unwrapped_student, self._fused_loss, unwrapped_student, inputs,
                                         num_items_in_batch)

    def _fused_loss(self, unwrapped_student, inputs, num_items_in_batch):
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                 "labels": inputs["labels"]}
        out = hf.distillation_loss(unwrapped_student, teacher, batch, num_items_in_batch=num_items_in_batch,
                                   **_loss_options(self.fastkd_options, self.beta, 1.0))
        return out.loss
