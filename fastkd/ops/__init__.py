"""torch.library custom ops: importing this package registers them."""

from .fused_linear import fused_linear_kd_rows, fused_linear_kd_weighted
from .kd_rows import kd_rows, kd_rows_backward
from .kl_div_rows import kl_div_rows, kl_div_rows_backward
from .sparse_kd import sparse_kd_rows, sparse_kd_rows_backward
from .sinkhorn import sinkhorn, sinkhorn_backward  # noqa: F401  (registers fastkd::sinkhorn*)

__all__ = ["fused_linear_kd_rows", "fused_linear_kd_weighted", "kd_rows", "kd_rows_backward", "kl_div_rows",
           "kl_div_rows_backward", "sparse_kd_rows", "sparse_kd_rows_backward"]
