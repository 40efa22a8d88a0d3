"""Row addressing and launch sizes shared by the Triton kernels of the logits families (one program
per row). The host side of the addressing (row_shape, row_layout) lives in layout.py."""

import triton
import triton.language as tl  # noqa: F401  (Triton requires it in every module with a @triton.jit)


@triton.jit
def row_offset(row, inner, stride_outer, stride_inner):
    # Rows of a (B, T, V) tensor are (row // T, row % T); a 2-D tensor passes inner = 1, which
    # Triton specialises away. row is int64, so offsets past 2³¹ elements are exact.
    return (row // inner) * stride_outer + (row % inner) * stride_inner


def launch_config(n_cols):
    # Blocks of up to 4096 columns keep ~16 fp32 values per thread and tensor at 8 warps.
    block_v = min(4096, max(16, triton.next_power_of_2(n_cols)))
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


