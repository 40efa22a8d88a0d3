"""torch.library custom ops: importing this package registers them. Each op module owns its schema,
fake implementation and autograd, and calls the kernels of the backend its options name."""

from .fused_linear import fused_linear_kd_rows, fused_linear_kd_weighted
from .kd_rows import kd_rows
from .kl_div_rows import kl_div_rows
from .sampled_kd import sampled_kd_rows
from .sinkhorn import sinkhorn
from .sparse_kd import sparse_kd_rows
from .topk import linear_topk

__all__ = ["fused_linear_kd_rows", "fused_linear_kd_weighted", "kd_rows", "kl_div_rows", "linear_topk",
           "sampled_kd_rows", "sinkhorn", "sparse_kd_rows"]
