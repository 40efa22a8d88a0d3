"""Custom op of the topk family: a teacher's top-k ids and log-probabilities from hidden states and
lm_head, without the (N, V) logits. No autograd: the outputs are data for a cache or a sparse loss."""

import torch

from ..kernels import registry
from ..kernels.layout import compute_dtype
from ..options import TopKOptions
from .schema import define, flatten, unflatten


@define("linear_topk", "Tensor hidden, Tensor weight, Tensor? bias, Tensor? labels", TopKOptions, "(Tensor, Tensor)")
def _linear_topk(hidden, weight, bias, labels, *values):
    """hidden: (N, H); weight: (V, H). Returns (indices (N, k) int64, logprobs (N, k))."""
    options, _ = unflatten(TopKOptions, values)
    kernels = registry.implementation("topk", options.backend, hidden.device.type)
    return kernels.linear_topk(hidden, weight, bias, labels, options.top_k, options.temperature,
                               options.ignore_index)


@_linear_topk.register_fake
def _linear_topk_fake(hidden, weight, bias, labels, *values):
    options, _ = unflatten(TopKOptions, values)
    torch._check(options.top_k <= weight.shape[0], lambda: "k must not exceed the vocabulary")
    shape = (hidden.shape[0], options.top_k)
    return hidden.new_empty(shape, dtype=torch.int64), hidden.new_empty(shape, dtype=compute_dtype(hidden))


def linear_topk(hidden, weight, bias, labels, options):
    """(indices (N, k), logprobs (N, k)) of (N, H) hidden states against a (V, H) lm_head."""
    return _linear_topk(hidden, weight, bias, labels, *flatten(options))
