"""Drop-in replacements with the exact signatures of other libraries' losses.

    fastkd.compat.KLDivLoss, fastkd.compat.kl_div      torch.nn.KLDivLoss / F.kl_div
    fastkd.compat.generalized_jsd_loss                  TRL GKDTrainer.generalized_jsd_loss
    fastkd.compat.LigerFusedLinearJSDLoss               Liger-Kernel's chunked fused linear JSD
"""

from .liger import LigerFusedLinearJSDLoss
from .torch_kl import KLDivLoss, kl_div
from .trl import generalized_jsd_loss

__all__ = ["KLDivLoss", "LigerFusedLinearJSDLoss", "generalized_jsd_loss", "kl_div"]
