"""fused_linear_topk: a teacher's top-k token ids and exact log-probabilities from its hidden states
and lm_head, never forming the (N, V) logits, for offline caches and sparse-teacher losses."""

from typing import NamedTuple, Optional

from torch import Tensor

from . import validation
from .divergences import make_spec
from .kernels import registry
from .kernels.topk.contract import PAD_ID
from .ops import linear_topk
from .options import TopKOptions

__all__ = ["PAD_ID", "TopK", "fused_linear_topk"]


class TopK(NamedTuple):
    """A sparse teacher, in the order :func:`fastkd.sparse_kd_loss` takes it:
    ``sparse_kd_loss(student_logits, *topk)``."""

    indices: Tensor
    logprobs: Tensor


def fused_linear_topk(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    bias: Optional[Tensor] = None,
    vocab_size: Optional[int] = None,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> TopK:
    """The k most probable tokens of each row of ``softmax((hidden @ weight.T + bias) / temperature)``
    and their log-probabilities, normalised over the whole vocabulary.

    The logits are formed and reduced block by block (rows × a slice of the vocabulary): a running
    log-sum-exp and a running top-k merged per block, so the memory beyond the outputs does not
    grow with N (nor with V). The cost is the lm_head GEMM.

    Args:
        hidden: (…, H) fp32|fp16|bf16|fp64, the teacher's last hidden states. A constant: no
            gradient flows to it or to ``weight``.
        weight: (V', H), the teacher's lm_head; another float dtype than ``hidden`` is cast block
            by block (logits are formed in ``hidden``'s dtype, as the teacher's own forward would).
        k: entries per row, 1 ≤ k ≤ V.
        temperature: T > 0; the log-probabilities are those of softmax(logits / T), the ids are
            the same for every T. Store T with the cache and pass it to the loss as
            ``teacher_temperature``.
        bias: (V',) or None.
        vocab_size: the real vocabulary when the lm_head is padded: rows ≥ vocab_size are left out.
        labels: (…) int or None; rows equal to ``ignore_index`` are not reported: their ids are
            ``PAD_ID`` (-1) and their log-probabilities -inf (a loss given the same labels skips
            them; NaN or padding hidden states there do not leak into the result).
        backend: "auto" or "torch" (see ``fastkd.available_backends()["topk"]``).

    Returns:
        TopK(indices (…, k) int64, logprobs (…, k) float32, float64 for float64 ``hidden``), each
        row in decreasing order of log-probability. Among tied logits, which ids are kept is
        torch.topk's choice; their log-probabilities are equal.
    """
    validation.check_linear("hidden", hidden, "weight", weight, "bias", bias)
    vocab = _check_vocab_size(vocab_size, weight.shape[0])
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int; got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, V={vocab}]; got {k}")
    temperature = make_spec("forward_kl", temperature).temperature
    leading_shape = hidden.shape[:-1]
    validation.check_labels(labels, leading_shape, hidden.device)
    validation.check_ignore_index(ignore_index)
    backend = registry.select("topk", backend, hidden.device, (hidden.dtype,))

    if vocab != weight.shape[0]:  # padded rows are left out by slicing (a view)
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    flat_labels = None if labels is None else labels.reshape(-1)
    options = TopKOptions(k, temperature, ignore_index, backend)
    indices, logprobs = linear_topk(hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach(),
                                    None if bias is None else bias.detach(), flat_labels, options)
    return TopK(indices.reshape(*leading_shape, k), logprobs.reshape(*leading_shape, k))


def _check_vocab_size(vocab_size, rows):
    if vocab_size is None:
        return rows
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None; got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= rows:
        raise ValueError(f"vocab_size must lie in [1, {rows}] (weight has V={rows} rows); got {vocab_size}")
    return vocab_size
