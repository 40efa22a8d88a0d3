"""Token-chunked ``hidden @ weight.T`` with a peer's loss on each block of logits, for the
fused-linear drop-ins whose loss no fused fastkd op computes.

``chunked_linear_loss(block_loss, hidden, weight, bias, *row_inputs)`` forms the logits of a block
of rows (a fixed element budget, so the extra memory does not grow with N), evaluates
``block_loss`` on them, differentiates it by autograd with respect to the logits, and contracts
that gradient into grad_hidden, grad_weight and grad_bias at once, as Liger does: the gradients
are computed in the forward and only scaled by grad_output in the backward.

The logits are formed in the inputs' dtype, as the peers form them, then raised to the compute
dtype (float32, float64 for float64 inputs) for the loss.
"""

import torch

# Logits elements per block (float32: 64 MiB). At V = 128k that is 128 rows: enough for the GEMMs
# to run near their rate, small next to the (N, V) logits this avoids.
BLOCK_ELEMENTS = 1 << 24


def chunked_linear_loss(block_loss, hidden, weight, bias, *row_inputs, accum_dtype=None):
    """hidden: (N, H); weight: (V, H); bias: (V,) or None; row_inputs: tensors (N, …) or None.
    ``block_loss(logits (R, V), *row_blocks)`` returns a tuple of 0-d tensors: the block's share of
    the loss (differentiated), then any number of further terms (reported, not differentiated).
    Returns the tuple of their sums over the blocks; only the first carries gradients.
    ``accum_dtype``: the dtype grad_weight is accumulated in (default: the weight's)."""
    return _ChunkedLinearLoss.apply(block_loss, accum_dtype, hidden, weight, bias, *row_inputs)


class _ChunkedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block_loss, accum_dtype, hidden, weight, bias, *row_inputs):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[2:5]
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=accum_dtype or weight.dtype) if needs_weight else None
        grad_bias = torch.zeros(vocab, dtype=dtype, device=hidden.device) if needs_bias else None
        step = max(1, BLOCK_ELEMENTS // max(vocab, 1))
        totals = None
        for start in range(0, max(n_rows, 1), step):
            stop = min(start + step, n_rows)
            block_hidden = hidden[start:stop]
            with torch.enable_grad():
                logits = block_hidden @ weight.t()
                if bias is not None:
                    logits = logits + bias
                logits = logits.detach().to(dtype).requires_grad_(True)
                terms = block_loss(logits, *(None if t is None else t[start:stop] for t in row_inputs))
                if needs_hidden or needs_weight or needs_bias:
                    (grad_logits,) = torch.autograd.grad(terms[0], logits)
            terms = [term.detach() for term in terms]
            totals = terms if totals is None else [a + b for a, b in zip(totals, terms)]
            if not (needs_hidden or needs_weight or needs_bias):
                continue
            # The peers take the logits' gradient back to the inputs' dtype before the GEMMs.
            grad_native = grad_logits.to(hidden.dtype)
            if needs_hidden:
                grad_hidden[start:stop] = grad_native @ weight
            if needs_weight:
                grad_weight += (grad_native.t() @ block_hidden).to(grad_weight.dtype)
            if needs_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                              None if grad_bias is None else grad_bias.to(bias.dtype))
        ctx.mark_non_differentiable(*totals[1:])
        return tuple(totals)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (None, None, *grads, *([None] * (len(ctx.needs_input_grad) - 5)))
