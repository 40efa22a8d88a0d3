"""fastkd: fused knowledge-distillation losses for PyTorch."""

from . import compat
from .backends import available_backends
from .divergences import DIVERGENCES
from .functional import kd_loss
from .modules import KDLoss

__version__ = "0.1.0"

__all__ = ["DIVERGENCES", "KDLoss", "available_backends", "compat", "kd_loss"]
