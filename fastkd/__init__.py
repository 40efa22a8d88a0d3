"""fastkd: fused knowledge-distillation losses for PyTorch."""

from . import compat
from .divergences import DIVERGENCES
from .functional import FusedLoss, fused_linear_kd_loss, fused_linear_sparse_kd_loss, kd_loss, sparse_kd_loss
from .kernels.registry import available_backends
from .modules import (FusedLinearKDLoss, FusedLinearSampledKDLoss, FusedLinearSparseKDLoss, KDLoss, SampledKDLoss,
                      SinkhornKDLoss, SparseKDLoss, ULDLoss, WassersteinKDLoss)
from .ot import SinkhornResult, sinkhorn, sinkhorn_kd_loss, uld_loss, wasserstein_kd_loss
from .sampled import fused_linear_sampled_kd_loss, sampled_kd_loss
from .topk import TopK, fused_linear_topk
from .topk_cache import TopKCache, TopKCacheWriter

__version__ = "0.1.0"

__all__ = ["available_backends", "compat", "DIVERGENCES", "fused_linear_kd_loss", "fused_linear_sampled_kd_loss",
           "fused_linear_sparse_kd_loss", "fused_linear_topk", "FusedLinearKDLoss", "FusedLinearSampledKDLoss",
           "FusedLinearSparseKDLoss", "FusedLoss", "kd_loss", "KDLoss", "sampled_kd_loss", "SampledKDLoss", "sinkhorn",
           "sinkhorn_kd_loss", "SinkhornKDLoss", "SinkhornResult", "sparse_kd_loss", "SparseKDLoss", "TopK",
           "TopKCache", "TopKCacheWriter", "uld_loss", "ULDLoss", "wasserstein_kd_loss", "WassersteinKDLoss"]
