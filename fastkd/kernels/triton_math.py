"""Base-2 arithmetic for the Triton kernels of the logits families, on the GPU's special-function
unit: one MUFU.EX2 per exponential and one MUFU.LG2 per logarithm.

Why (docs/perf-notes.md, "v2"): ``tl.exp`` compiles to ``ex2.approx.f32`` wrapped in denormal
handling (a multiply by log2(e), a compare and two predicated multiplies around the MUFU: five
instructions) and ``tl.log`` to a libdevice polynomial of about twenty. ``tl.exp2`` compiles to the
bare ``ex2.approx.ftz.f32`` and ``fast_log2`` below to ``lg2.approx.ftz.f32``, so the kernels keep
their exponents in base 2 (natural-log quantities times LOG2E, as flash-attention does) and convert
back with LN2 once per row.

Accuracy (PTX ISA; CUDA C++ Programming Guide, intrinsic functions): ex2.approx is the same
approximation ``tl.exp`` used (≤ 2 ulp relative error), now flushing results below 2^-126 to 0;
lg2.approx has an absolute error ≤ 2^-22 on the mantissa's logarithm, plus the rounding of the
result every fp32 logarithm has. What that does to losses and gradients: docs/perf-notes.md.

Under TRITON_INTERPRET=1 (the CPU tests) the same kernels run with numpy's exp2 and log2: the
interpreter has no libdevice. Triton decides interpreted or compiled when ``@triton.jit`` runs, at
import; this module decides the same way, at the same moment.
"""

import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The smallest normal fp32: lg2.approx.ftz reads anything smaller as 0 (log −inf).
FLT_MIN = tl.constexpr(1.1754943508222875e-38)
# A floor for base-2 log-probabilities: exp2 of it is exactly 0 in fp32 (ftz or not), and unlike
# −inf it gives 0, not NaN, when multiplied by that 0 (the 0·log 0 = 0 convention, without a select).
LOG2_FLOOR = tl.constexpr(-256.0)

if os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def fast_log2(x):
        return tl.log2(x)
else:
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def fast_log2(x):
        return libdevice.fast_log2f(x)  # lg2.approx.ftz.f32: one MUFU.LG2
