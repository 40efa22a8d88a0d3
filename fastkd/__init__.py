"""fastkd: fused knowledge-distillation losses for PyTorch."""

from . import compat
from .kernels.registry import available_backends
from .divergences import DIVERGENCES
from .functional import fused_linear_kd_loss, fused_linear_sparse_kd_loss, kd_loss, sparse_kd_loss
from .modules import FusedLinearKDLoss, FusedLinearSparseKDLoss, KDLoss, SparseKDLoss
from .ot import SinkhornResult, sinkhorn, sinkhorn_kd_loss, uld_loss, wasserstein_kd_loss

__version__ = "0.1.0"

__all__ = ["DIVERGENCES", "FusedLinearKDLoss", "FusedLinearSparseKDLoss", "KDLoss", "SparseKDLoss", "available_backends", "compat", "fused_linear_kd_loss",
           "fused_linear_sparse_kd_loss", "kd_loss", "sparse_kd_loss"]
__all__ += ["SinkhornResult", "sinkhorn", "sinkhorn_kd_loss", "uld_loss", "wasserstein_kd_loss"]
