"""The distillation loss of a Hugging Face causal-LM pair, never forming their logits.

Each model's body runs to its final hidden states (after its final norm: ``model.base_model``);
the loss then multiplies them by the lm_head weights block by block inside
:func:`fastkd.fused_linear_kd_loss`, applying each model's own post-head logit transform read from
its config, so the numbers are those of the eager loss on ``model(...).logits``:

    logits = scale · (hidden @ lm_head.weightᵀ + bias)        scale from the config (below), else 1
    logits = softcap · tanh(logits / softcap)                 Gemma-2/3 ``final_logit_softcapping``

Scale names, read as TRL's DistillationTrainer reads them (first one set wins): ``logit_scale``
(Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), then ``logits_scaling``
(Granite, MiniCPM3: logits divided by it; HyperCLOVA X: multiplied).

Only torch is imported: the models are read by duck typing (``config``, ``base_model``,
``get_output_embeddings()``), so this module works with any transformers version that has them.
"""

from collections.abc import Mapping
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..functional import FusedLoss, fused_linear_kd_loss, fused_linear_sparse_kd_loss
from ..kernels.sparse.contract import SPARSE_DIVERGENCES
from ..topk import fused_linear_topk

# Keys of a Trainer batch that the model body takes; the rest (labels, …) are the loss's.
_BODY_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


class LogitTransform(NamedTuple):
    """How a model turns ``hidden @ lm_head.weightᵀ`` into its logits: ``scale`` first, then the
    ``softcap`` (None: no cap)."""

    scale: float = 1.0
    softcap: Optional[float] = None


def logit_transform_of(config) -> LogitTransform:
    """The logit scale and soft-cap of a model config (its text config for multimodal models).

    scale = ``logit_scale`` or ``output_multiplier`` or ``lm_head_multiplier`` (the first that is not
    None), else 1/``logits_scaling`` (``logits_scaling`` itself for model_type "hyperclovax"), else 1;
    softcap = ``final_logit_softcapping`` (None or 0: none)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            break
    scaling = getattr(config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(1.0 if scale is None else float(scale), float(softcap) if softcap else None)


def lm_head_of(model, gather: bool = True):
    """(weight (V, H), bias (V,) or None) of a causal LM's output layer; a tied head is the input
    embedding itself (gradients reach it). A DTensor (FSDP2) weight or bias is gathered once with
    ``full_tensor()``, whose backward scatters the gradient back to the shards (``gather=False``:
    left as it is)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding layer with a weight "
                         "(get_output_embeddings()); fastkd.integrations.hf needs a causal LM head")
    if hasattr(head, "base_layer"):  # a PEFT adapter: the loss reads the weight, the adapter would get nothing
        raise ValueError(f"{type(model).__name__}'s lm_head carries a PEFT adapter, which the fused loss would "
                         "bypass (it reads lm_head.weight); leave 'lm_head' out of the adapter's target_modules")
    if not gather:
        return head.weight, getattr(head, "bias", None)
    return _full(head.weight), _full(getattr(head, "bias", None))


def final_hidden_states(model, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                        **model_kwargs) -> Tensor:
    """(B, T, H): the last hidden states of a causal LM's body, those its lm_head reads (after the
    final norm), by calling ``model.base_model`` (the body behind a PEFT wrapper too)."""
    body = _body(model)
    model_kwargs.setdefault("use_cache", False)
    outputs = body(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError(f"{type(body).__name__} did not return (B, T, H) hidden states")
    return hidden


def distillation_loss(
    student,
    teacher,
    batch: Union[Mapping, Tensor],
    *,
    attention_mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    model_kwargs: Optional[dict] = None,
    **loss_options,
) -> FusedLoss:
    """Distillation loss of ``student`` against ``teacher`` on one batch, without forming logits.

    The causal shift is HF's (``ForCausalLMLoss``): the hidden state at position t is scored
    against the label at t + 1, and the last position against nothing (-100), so the loss over
    tokens t < T − 1 with ``labels[:, t + 1] != ignore_index`` is

        loss = (1 / n) Σ_t [ soft_weight · D(p_t ‖ q_t) (· T² with temperature_squared)
                             + hard_weight · CE(student logits_t, labels_{t+1}) ]

    with p = softmax(teacher logits / T), q = softmax(student logits / T), logits as the models'
    forwards make them (see the module docstring), D the ``divergence`` of :func:`fastkd.kd_loss`,
    and n = ``num_items_in_batch`` when given (a Trainer's gradient-accumulation normaliser), else
    the number of such tokens. The teacher runs under ``torch.no_grad()`` (put it in eval mode
    yourself); the student's parameters get the gradients the eager loss on its own logits gives.

    Args:
        student, teacher: causal LMs (``PreTrainedModel`` or a PEFT wrapper of one) with the same
            vocabulary up to padding rows of the lm_head (Qwen-style).
        batch: a mapping with ``input_ids`` and optionally ``attention_mask``, ``position_ids``,
            ``labels`` (the unshifted targets, -100 ignored) or ``shift_labels`` (already shifted,
            aligned with the positions), as a Trainer passes it; or the ``input_ids`` tensor.
        attention_mask, labels: override the batch's. Without labels, the targets are the
            input_ids, -100 where ``attention_mask`` is 0.
        num_items_in_batch: the divisor of the summed loss (reduction "mean" only).
        model_kwargs: extra keyword arguments for both model bodies.
        loss_options: those of :func:`fastkd.fused_linear_kd_loss` (divergence, temperature, beta,
            skew, alpha, temperature_squared, soft_weight, hard_weight, vocab_size, standardize,
            ignore_index, reduction, return_entropy, fp32_logits, backend), and ``teacher_top_k``:
            a sparse teacher, its top-k tokens taken from its hidden states by
            :func:`fastkd.fused_linear_topk` (the sparse divergences "forward_kl", "reverse_kl", "jsd",
            "tvd"; only the first two with ``process_group``; with ``missing_mass``), and ``process_group``: the vocabulary split over the group's ranks
            (see :func:`hidden_states_loss`). vocab_size defaults to the smaller lm_head when they differ.

    Returns:
        A :class:`fastkd.FusedLoss` (loss, soft, hard, n_tokens and per-token parts of shape (B, T)).
    """
    input_ids, attention_mask, labels, shift_labels, body_kwargs = _read_batch(batch, attention_mask, labels)
    _check_models(student, teacher, loss_options)  # before either model runs
    body_kwargs.update(model_kwargs or {})
    ignore_index = loss_options.get("ignore_index", -100)
    if shift_labels is None:
        shift_labels = _shifted_targets(input_ids, attention_mask, labels, ignore_index)
    student_hidden = final_hidden_states(student, input_ids, attention_mask, **body_kwargs)
    with torch.no_grad():
        teacher_hidden = final_hidden_states(teacher, input_ids, attention_mask, **body_kwargs)
    return hidden_states_loss(student, student_hidden, teacher, teacher_hidden, shift_labels,
                              num_items_in_batch=num_items_in_batch, **loss_options)


def hidden_states_loss(
    student,
    student_hidden: Tensor,
    teacher,
    teacher_hidden: Tensor,
    labels: Optional[Tensor],
    *,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    teacher_top_k: Optional[int] = None,
    missing_mass: str = "renormalize",
    vocab_size: Optional[int] = None,
    hard_weight: float = 0.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    process_group=None,
    **loss_options,
) -> FusedLoss:
    """The loss of :func:`distillation_loss` from hidden states already aligned with ``labels``
    ((…, Hs), (…, Ht), (…); no shift here), the models supplying lm_heads and logit transforms.

    ``process_group``: split the vocabulary over this group, whose ranks hold the same batch and
    models (tensor parallelism): each rank runs the fused vocab-parallel loss on its slice of the
    lm_head rows, never forming its logit slice, and the ranks exchange per-row statistics
    (fastkd/integrations/vocab_parallel.py); the hard term and a top-k teacher work as without a
    group (the top-k is taken over the whole teacher head on every rank)."""
    student_transform, teacher_transform = _check_models(student, teacher, dict(
        loss_options, hard_weight=hard_weight, teacher_top_k=teacher_top_k, process_group=process_group))
    gather = process_group is None
    student_weight, student_bias = lm_head_of(student, gather)
    teacher_weight, teacher_bias = lm_head_of(teacher, gather)
    if vocab_size is None and student_weight.shape[0] != teacher_weight.shape[0]:
        vocab_size = min(student_weight.shape[0], teacher_weight.shape[0])
    normalizer = num_items_in_batch
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.to(student_hidden.device)
    teacher_hidden = teacher_hidden.detach()
    top = None
    if teacher_top_k is not None:
        # The teacher's logits are scale · x: its log-probabilities are the top-k of x at temperature
        # 1 / scale, and they are its distribution at T = 1 (the loss's teacher_temperature). With a
        # process group every rank takes them from the whole head (a Shard(0) one gathered once).
        top = fused_linear_topk(teacher_hidden, _full(teacher_weight).detach(), teacher_top_k,
                                temperature=1.0 / teacher_transform.scale, bias=_detached(_full(teacher_bias)),
                                vocab_size=vocab_size, labels=labels,
                                ignore_index=loss_options.get("ignore_index", -100),
                                backend=loss_options.get("backend", "auto"))
    if process_group is not None:
        from .vocab_parallel import vocab_parallel_loss

        return vocab_parallel_loss(student_hidden, (student_weight, student_bias), teacher_hidden,
                                   (teacher_weight, teacher_bias), labels, (student_transform, teacher_transform),
                                   process_group, vocab_size=vocab_size or student_weight.shape[0],
                                   teacher_top=None if top is None else (top.indices, top.logprobs),
                                   missing_mass=missing_mass, temperature=temperature, reduction=reduction,
                                   normalizer=normalizer, hard_weight=hard_weight, **loss_options)
    common = dict(hard_weight=hard_weight, temperature=temperature, reduction=reduction, normalizer=normalizer,
                  vocab_size=vocab_size, return_components=True)
    if top is None:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight.detach(), labels,
                                    student_bias=student_bias, teacher_bias=_detached(teacher_bias),
                                    student_logit_scale=student_transform.scale,
                                    student_softcap=student_transform.softcap,
                                    teacher_logit_scale=teacher_transform.scale,
                                    teacher_softcap=teacher_transform.softcap, **common, **loss_options)
    return fused_linear_sparse_kd_loss(student_hidden, student_weight, top.indices, top.logprobs, labels,
                                       student_bias=student_bias, missing_mass=missing_mass,
                                       student_logit_scale=student_transform.scale,
                                       student_softcap=student_transform.softcap, **common, **loss_options)


def _check_models(student, teacher, options):
    """The checks that need the models but not their outputs: (student, teacher) LogitTransform."""
    for name, model in (("student", student), ("teacher", teacher)):
        if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
            raise TypeError(f"{name} must be a causal LM (a config and get_output_embeddings()); "
                            f"got {type(model).__name__}")
        lm_head_of(model, gather=False)
    student_transform, teacher_transform = logit_transform_of(student.config), logit_transform_of(teacher.config)
    if options.get("teacher_top_k") is not None:
        divergence = options.get("divergence", "forward_kl")
        allowed = SPARSE_DIVERGENCES if options.get("process_group") is None else ("forward_kl", "reverse_kl")
        if divergence not in allowed:
            raise ValueError(f"teacher_top_k (a sparse teacher) takes divergence {' or '.join(map(repr, allowed))}"
                             f"{' with a process_group' if options.get('process_group') is not None else ''}; "
                             f"got {divergence!r}")
        if teacher_transform.softcap is not None:
            # fused_linear_topk takes the teacher's scale as a temperature; it has no soft-cap.
            raise ValueError(f"teacher_top_k (a sparse teacher) does not take a soft-capped teacher; got "
                             f"{teacher_transform}")
    return student_transform, teacher_transform


def _read_batch(batch, attention_mask, labels):
    """(input_ids, attention_mask, labels, shift_labels, other body kwargs) of a batch."""
    shift_labels = None
    body_kwargs = {}
    if isinstance(batch, Tensor):
        input_ids = batch
    elif isinstance(batch, Mapping):
        input_ids = batch.get("input_ids")
        attention_mask = batch.get("attention_mask") if attention_mask is None else attention_mask
        labels = batch.get("labels") if labels is None else labels
        shift_labels = batch.get("shift_labels")
        body_kwargs = {k: batch[k] for k in _BODY_KEYS[2:] if batch.get(k) is not None}
    else:
        raise TypeError(f"batch must be a mapping (input_ids, attention_mask, labels, …) or the input_ids tensor; "
                        f"got {type(batch).__name__}")
    if input_ids is None and "inputs_embeds" not in body_kwargs:
        raise ValueError("batch has no input_ids (nor inputs_embeds)")
    if input_ids is not None and (not isinstance(input_ids, Tensor) or input_ids.dim() != 2):
        raise ValueError("input_ids must be a (B, T) tensor")
    if labels is None and shift_labels is None and input_ids is None:
        raise ValueError("labels are required with inputs_embeds (there are no input_ids to take targets from)")
    return input_ids, attention_mask, labels, shift_labels, body_kwargs


def _shifted_targets(input_ids, attention_mask, labels, ignore_index):
    """(B, T): the target of each position, labels[:, t + 1], and ignore_index at the last one.
    Shifting the labels instead of slicing the hidden states keeps those contiguous (no copy)."""
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise ValueError("labels must be a (B, T) integer tensor")
    last = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], last], dim=1)


def _body(model):
    if hasattr(model, "get_base_model"):  # a PEFT wrapper: its transformers model, adapters injected
        model = model.get_base_model()
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        body = getattr(model, "model", None)
    if body is None:
        raise ValueError(f"cannot find the body of {type(model).__name__} (no base_model nor model attribute)")
    return body


def _full(tensor):
    if tensor is None or not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _detached(tensor):
    return None if tensor is None else tensor.detach()
