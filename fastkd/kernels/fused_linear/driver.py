"""The block driver of the fused linear losses: vocabulary-chunked distillation from hidden states.

Tokens are processed in blocks of C rows. For each block the student logits (C, V) are formed
with one matmul (tensor cores on a GPU); the teacher of the block (dense: its own matmul and the
kd_rows kernels; sparse: top-k ids and log-probs and the sparse_kd kernels; sampled: ids and
weights and the sampled_kd kernels) gives the divergence rows and, when gradients are wanted,
∂/∂(student logits); the optional hard-label cross-entropy (the ce kernels) adds its rows and
gradient; the gradient block is at once contracted into
grad_hidden (C, Hs) and accumulated into grad_weight (V, Hs). Nothing (N, V) is ever allocated:
the workspace is three (C, V) blocks, C chosen from a fixed element budget.

This is a driver, not a backend: the kernels of each family come from the registry, on the
backends the public function chose (options.soft_backend, options.ce_backend). A top-k teacher
renormalised over its support without a hard term takes the path of support.py instead: the
loss reads k logits per row, formed as k dot products, never a (C, V) block.
"""

import torch

from ... import logit_transforms
from .. import registry
from ..layout import compute_dtype
from . import block_logits, support
from .entropy import entropy_rows

# Elements of one (C, V) logit block. GPU: 256M (512 MiB in bf16, three blocks live: 1.5 GiB),
# C ≈ 2k rows at V = 128k; each block adds its grad_weight contribution with one addmm that reads
# and writes the whole (V, Hs) gradient, so fewer, larger blocks cut that traffic (4 blocks at
# N = 8192: 8 GB, ~3 ms at 3 TB/s). CPU: 2M, where the torch backend's fp32 temporaries dominate.
BLOCK_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 21}


class DenseTeacher:
    """Teacher hidden states (N, Ht) and lm_head (V, Ht) (+ bias): logit blocks by matmul."""

    family = "kd_rows"

    def __init__(self, hidden, weight, bias):
        self.hidden = hidden
        self.weight, self.bias = _in_dtype(weight, hidden.dtype), _in_dtype(bias, hidden.dtype)
        self.row_dtype_source = hidden

    def block(self, kernels, options, start, stop, student_logits, labels, scale):
        teacher_logits = block_logits.block(self.hidden[start:stop], self.weight, self.bias, options.fp32_logits)
        spec, ignore_index = options.spec, options.ignore_index
        soft, stats = kernels.kd_rows_forward(student_logits, teacher_logits, labels, spec, ignore_index)
        if scale is None:
            return soft, None
        return soft, kernels.kd_rows_backward(scale, student_logits, teacher_logits, labels, stats, spec,
                                              ignore_index)


class SparseTeacher:
    """Top-k teacher: token ids (N, k) and log-probabilities (N, k)."""

    family = "sparse_kd"

    def __init__(self, indices, logprobs):
        self.indices, self.logprobs = indices, logprobs
        self.row_dtype_source = logprobs

    def block(self, kernels, options, start, stop, student_logits, labels, scale):
        # The sparse kernels take the student's logits as its model outputs them: the scale and
        # soft-cap are applied here, block by block, and the gradient chained back through them.
        model_logits = _model_logits(student_logits, options.spec)
        loss, grad = kernels.block_loss(model_logits, self.indices[start:stop], self.logprobs[start:stop], labels,
                                        options.spec, options.missing_mass, options.ignore_index, scale)
        if grad is None or model_logits is student_logits:
            return loss, grad
        spec = options.spec
        dtype = compute_dtype(student_logits)
        return loss, logit_transforms.backward(student_logits.to(dtype), grad.to(dtype), spec.student_scale,
                                               spec.student_softcap, False, 0.0).to(grad.dtype)


def _model_logits(student_logits, spec):
    """The student's logits as its model outputs them (logit scale, then soft-cap): what the hard
    cross-entropy sees. Standardisation and the temperature belong to the distillation term only."""
    if spec.student_scale == 1.0 and spec.student_softcap == 0:
        return student_logits
    return logit_transforms.scale_and_cap(student_logits, spec.student_scale, spec.student_softcap)


def _hard_backward(ce, grad_loss, student_logits, model_logits, labels, stats, options, out):
    """Adds grad_loss_i · ∂CE_i/∂(student logits) into ``out``; through the scale and soft-cap when
    the model transforms its logits (one more block-sized buffer then, never (N, V))."""
    spec = options.spec
    if model_logits is student_logits:
        ce.ce_rows_backward(grad_loss, student_logits, labels, stats, options.ignore_index, out=out)
        return
    grad_model = torch.zeros_like(out)
    ce.ce_rows_backward(grad_loss, model_logits, labels, stats, options.ignore_index, out=grad_model)
    out.add_(logit_transforms.backward(student_logits.to(out.dtype), grad_model, spec.student_scale,
                                       spec.student_softcap, False, 0.0))


class SampledTeacher:
    """Sampled teacher: token ids (N, K) drawn from it and their weights (N, K)."""

    family = "sampled_kd"

    def __init__(self, ids, weights):
        self.ids, self.weights = ids, weights
        self.row_dtype_source = weights

    def block(self, kernels, options, start, stop, student_logits, labels, scale):
        return kernels.block_loss(student_logits, self.ids[start:stop], self.weights[start:stop], labels,
                                  options.spec, options.sample_count, options.ignore_index, scale)


def block_rows(n_rows, vocab, device):
    budget = BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"])
    return max(1, min(n_rows, budget // max(vocab, 1)))


def _in_dtype(tensor, dtype):
    # Logits are formed in the hidden states' dtype: an fp32 lm_head next to bf16 activations (what
    # autocast leaves) is cast once per call, as autocast itself would cast it for the matmul.
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


def run(student_hidden, student_weight, student_bias, teacher, labels, options, soft_scale=None,
        hard_scale=None, need=(False, False, False)):
    """Per-row soft (divergence) and hard (cross-entropy) losses and, optionally, gradients.

    student_hidden: (N, Hs); student_weight: (V, Hs); student_bias: (V,) or None; teacher: a
    DenseTeacher or SparseTeacher over the same N rows; labels: (N,) int or None; options: a
    FusedLinearOptions (with options.group_name, the weight and bias are this rank's rows of a
    vocabulary split over that group: see vocab_parallel.py). With soft_scale and hard_scale (N,)
    given, also returns the gradients of Σ soft_scale·soft + hard_scale·hard with respect to the
    student hidden states, weight and bias, each only where ``need`` says so (else None).
    With options.with_entropy, also the student's entropy per row at temperature T (0 on ignored
    rows), from each logit block while it is in memory; else entropy is None.
    Returns (soft_rows (N,), hard_rows (N,), entropy (N,) or None, grad_hidden, grad_weight, grad_bias).
    """
    n_rows = student_hidden.shape[0]
    vocab = student_weight.shape[0]
    device_type = student_hidden.device.type
    weight_dtype, bias_dtype = student_weight.dtype, None if student_bias is None else student_bias.dtype
    student_weight, student_bias = _in_dtype(student_weight, student_hidden.dtype), _in_dtype(
        student_bias, student_hidden.dtype)
    exchange = None
    if options.group_name:
        # Vocab-parallel: this rank's weight rows are a slice of the vocabulary; one Exchange serves
        # both terms, all-reducing per-row statistics per block (vocab_parallel.py).
        parallel = registry.implementation("fused_linear_vocab_parallel", options.soft_backend, device_type)
        exchange = parallel.Exchange(options.group_name, vocab, student_hidden.device, options.vocab_limit,
                                     options.global_vocab, options.with_entropy)
        soft_kernels, ce = exchange, exchange if options.with_hard else None
    else:
        soft_kernels = registry.implementation(teacher.family, options.soft_backend, device_type)
        if support.serves(teacher.family, options):  # the k logits per row the loss reads, no (C, V) blocks
            return support.run(student_hidden, student_weight, student_bias, teacher.indices, teacher.logprobs,
                               labels, options, soft_kernels, soft_scale, need, weight_dtype, bias_dtype)
        ce = registry.implementation("ce", options.ce_backend, device_type) if options.with_hard else None
    ignore_index = options.ignore_index
    want_grad = soft_scale is not None
    need_hidden, need_weight, need_bias = need if want_grad else (False, False, False)
    grad_hidden = torch.empty_like(student_hidden) if need_hidden else None
    grad_weight = torch.zeros_like(student_weight, dtype=weight_dtype) if need_weight else None
    # The bias gradient is a sum over all N rows: accumulated in fp32 (fp64 for fp64 inputs). The
    # weight gradient is accumulated by addmm in the weight's own dtype, rounded once per block (a
    # few blocks on a GPU): an fp32 (V, Hs) accumulator would cost 2 GB at V = 128k, Hs = 4096.
    accumulate = compute_dtype(student_weight)
    grad_bias = torch.zeros(vocab, dtype=accumulate, device=student_weight.device) if need_bias else None
    soft_rows = hard_rows = entropy = None

    # Vocab-parallel ranks size their blocks alike (vocab_parallel.py), or their collectives would differ.
    rows = block_rows(n_rows, vocab if exchange is None else exchange.block_columns(), student_hidden.device)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        hidden = student_hidden[start:stop]
        block_labels = None if labels is None else labels[start:stop]
        student_logits = block_logits.block(hidden, student_weight, student_bias, options.fp32_logits)
        block_scale = None if soft_scale is None else soft_scale[start:stop]
        soft, grad_logits = teacher.block(soft_kernels, options, start, stop, student_logits, block_labels,
                                          block_scale)
        if soft_rows is None:
            soft_rows = soft.new_empty(n_rows)
            hard_rows = soft.new_zeros(n_rows)
            entropy = soft.new_empty(n_rows) if options.with_entropy else None
        soft_rows[start:stop] = soft
        if entropy is not None:
            entropy[start:stop] = (entropy_rows(student_logits, block_labels, options) if exchange is None
                                   else exchange.entropy_rows(student_logits, block_labels, options))
        if ce is not None:
            model_logits = _model_logits(student_logits, options.spec)
            hard, ce_stats = ce.ce_rows_forward(model_logits, block_labels, ignore_index)
            hard_rows[start:stop] = hard
        if not want_grad:
            continue
        if ce is not None:
            _hard_backward(ce, hard_scale[start:stop], student_logits, model_logits, block_labels, ce_stats,
                           options, grad_logits)
        if need_bias:
            grad_bias += grad_logits.sum(0, dtype=accumulate)
        # fp32 logits give an fp32 gradient block: rounded once to the GEMM operands' dtype (a
        # no-op otherwise); an fp32 weight's gradient takes the unrounded block.
        rounded = grad_logits.to(student_hidden.dtype)
        if need_hidden:
            torch.matmul(rounded, student_weight, out=grad_hidden[start:stop])
        if need_weight:
            # A weight kept in another dtype than the logits (fp32 next to bf16) accumulates in its
            # own: the block's operands are cast (block-sized copies), never the (V, Hs) gradient.
            block_grad = rounded if weight_dtype == rounded.dtype else grad_logits.to(weight_dtype)
            grad_weight.addmm_(block_grad.t(), hidden.to(weight_dtype))

    if exchange is not None and need_hidden and options.sum_grad_hidden:
        exchange.sum_over_group(grad_hidden)
    if soft_rows is None:  # no rows at all
        dtype = compute_dtype(student_hidden, teacher.row_dtype_source)
        soft_rows = torch.zeros(0, dtype=dtype, device=student_hidden.device)
        hard_rows = torch.zeros(0, dtype=dtype, device=student_hidden.device)
        entropy = hard_rows.new_zeros(0) if options.with_entropy else None
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias_dtype)
    return soft_rows, hard_rows, entropy, grad_hidden, grad_weight, grad_bias
