"""Row-chunked evaluation of a peer's per-row formula, for the drop-ins no fused op serves.

``chunked_rows(row_fn, *inputs)`` applies ``row_fn`` to blocks of rows and concatenates what it
returns. Nothing of the autograd graph is kept between forward and backward: the backward
recomputes each block under autograd and writes that block's gradients into the gradient
tensors, so the extra memory is one block's temporaries (a fixed element budget), never
(N, V) — only the gradients themselves, which the caller needs anyway, are full size.

The formulas are the peers' own definitions transcribed in the compute dtype (float32, float64
for float64 inputs); autograd differentiates them, so the gradients are exactly those the peer
defines (including its clamps and masks), not re-derived ones.
"""

import torch

# Elements of the widest input per block. A block's formula allocates a handful of temporaries of
# that size in float32: about 16 MiB each, small next to any (N, V) tensor worth chunking.
BLOCK_ELEMENTS = 1 << 22


def chunked_rows(row_fn, *inputs):
    """inputs: tensors whose dim 0 is the row (N, …), or None. ``row_fn(*blocks)`` returns a
    tensor whose dim 0 is the block's rows. Returns the blocks' results concatenated: (N, …),
    differentiable with respect to every input that requires a gradient."""
    return _ChunkedRows.apply(row_fn, *inputs)


def _row_blocks(inputs):
    n_rows = next(t.shape[0] for t in inputs if t is not None)
    width = max((t[0].numel() if t.shape[0] else 1) for t in inputs if t is not None)
    step = max(1, BLOCK_ELEMENTS // max(width, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)], n_rows


def _block(tensor, start, stop):
    return None if tensor is None else tensor[start:stop]


class _ChunkedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, row_fn, *inputs):
        blocks, n_rows = _row_blocks(inputs)
        ctx.row_fn = row_fn
        ctx.save_for_backward(*inputs)
        if not blocks:  # N = 0: one call on the empty block gives the output's shape and dtype
            blocks = [(0, 0)]
        with torch.no_grad():
            return torch.cat([row_fn(*(_block(t, start, stop) for t in inputs)) for start, stop in blocks])

    @staticmethod
    def backward(ctx, grad_out):
        inputs = ctx.saved_tensors
        wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i + 1]]
        grads = [None] * len(inputs)
        for i in wanted:
            grads[i] = torch.zeros_like(inputs[i])
        blocks, _ = _row_blocks(inputs)
        for start, stop in blocks:
            with torch.enable_grad():
                leaves = [_block(t, start, stop) for t in inputs]
                for i in wanted:
                    leaves[i] = leaves[i].detach().requires_grad_(True)
                out = ctx.row_fn(*leaves)
                block_grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out[start:stop],
                                                  allow_unused=True)
            # A row whose output gets no gradient (an ignored row) has none: 0·inf from an infinite
            # term inside the formula must not turn into NaN there.
            idle = (grad_out[start:stop].reshape(stop - start, -1) == 0).all(-1)
            for i, grad in zip(wanted, block_grads):
                if grad is not None:
                    idle_rows = idle.reshape(-1, *([1] * (grad.dim() - 1)))
                    grads[i][start:stop] = torch.where(idle_rows, torch.zeros((), dtype=grad.dtype,
                                                                              device=grad.device), grad)
        return (None, *grads)
