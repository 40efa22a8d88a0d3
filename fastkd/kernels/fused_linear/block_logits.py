"""The logits of one token block of the fused linear losses: hidden (C, H) @ weight (V, H)ᵀ (+ bias).

With ``fp32=True`` and fp16/bf16 operands the block's logits are kept in fp32, never rounded to
the operands' dtype before the softmax. Rounding a logit x to bf16 moves it by up to |x|·2⁻⁹, so
a logit of 20 moves by 0.04 and its probability by 4%: the gradient error Liger reports (4–23%,
its issue 1432) and TRL avoids with fp32 GEMM outputs.

  * CUDA: ``torch.mm(..., out_dtype=torch.float32)`` returns the GEMM's fp32 accumulator as it is
    (same tensor-core GEMM, an fp32 output tile).
  * Elsewhere (the CPU has no ``out_dtype`` matmul in PyTorch 2.13): the weight is upcast one
    vocabulary chunk at a time into a reused fp32 buffer of ``UPCAST_ELEMENTS`` elements, so the
    extra memory is bounded by that buffer, not by V·H (2 GiB at V = 128k, H = 4096). The price
    is time: an fp32 GEMM instead of a bf16 one, and the upcast repeated for every token block
    (docs/perf-notes.md, 2026-12-06): why fp32 logits are opt-in on the CPU.
"""

import torch

# Elements of the fp32 copy of one vocabulary chunk of the weight on the upcast path: 4M (16 MiB,
# 1024 rows at H = 4096). Smaller chunks make skinny GEMMs (a CPU block has ~65 token rows at
# V = 32k) that run several times slower than one wide GEMM (2-core CPU, 2026-12-06).
UPCAST_ELEMENTS = 1 << 22

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# aten::mm.dtype (the fp32-output GEMM) arrived in PyTorch 2.8; fastkd runs on 2.4 and later.
_HAS_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def default_fp32(device):
    """fp32_logits=None: on where it costs little. CUDA: the same GEMM with an fp32 output tile.
    The CPU: off (the upcast path above costs time; see the module docstring)."""
    return device.type == "cuda"


def keeps_fp32(hidden, fp32):
    """Whether ``block`` returns fp32 logits that the operands' own matmul would have rounded."""
    return fp32 and hidden.dtype in _LOW_PRECISION


def block(hidden, weight, bias, fp32):
    """(C, V) logits of hidden (C, H) and weight (V, H) (+ bias (V,)), all of one dtype: in that
    dtype, or in fp32 when ``keeps_fp32(hidden, fp32)``."""
    if not keeps_fp32(hidden, fp32):
        return torch.matmul(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())
    if hidden.is_cuda and _HAS_MM_OUT_DTYPE:
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    else:
        logits = _upcast_chunks(hidden, weight)
    return logits if bias is None else logits.add_(bias)


def _upcast_chunks(hidden, weight):
    n_rows, n_vocab = hidden.shape[0], weight.shape[0]
    hidden = hidden.float()
    logits = torch.empty(n_rows, n_vocab, dtype=torch.float32, device=hidden.device)
    chunk = max(1, min(n_vocab, UPCAST_ELEMENTS // max(weight.shape[1], 1)))
    buffer = torch.empty(chunk, weight.shape[1], dtype=torch.float32, device=hidden.device)
    for start in range(0, n_vocab, chunk):
        stop = min(start + chunk, n_vocab)
        torch.mm(hidden, buffer[:stop - start].copy_(weight[start:stop]).t(), out=logits[:, start:stop])
    return logits
