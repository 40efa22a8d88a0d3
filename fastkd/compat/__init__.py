"""Drop-in replacements with the exact signatures of other libraries' losses.

    fastkd.compat.KLDivLoss, fastkd.compat.kl_div      torch.nn.KLDivLoss / F.kl_div
    fastkd.compat.generalized_jsd_loss                  TRL GKDTrainer.generalized_jsd_loss (tensor beta/temperature too)
    fastkd.compat.gold_generalized_jsd_loss             TRL GOLDTrainer.generalized_jsd_loss (logits_are_probs)
    fastkd.compat.topk_generalized_jsd_loss             TRL on-policy distillation's top-k / tail-bucket divergence
    fastkd.compat.LigerFusedLinearJSDLoss               Liger-Kernel's chunked fused linear JSD
    fastkd.compat.LigerFusedLinearCosineSimilarityLoss  Liger-Kernel's chunked fused linear cosine + CE
    fastkd.compat.LigerFusedLinearJSD,
    fastkd.compat.liger_fused_linear_jsd                Liger-Kernel's fused linear JSD (transformers API)
    fastkd.compat.LigerFusedLinearKLDivLoss,
    fastkd.compat.liger_fused_linear_kl_div             Liger-Kernel's fused linear KL against a target distribution
    fastkd.compat.LigerJSD, fastkd.compat.liger_jsd     Liger-Kernel's JSD of log-probabilities
    fastkd.compat.torchtune                             torchtune's ForwardKLLoss, ReverseKLLoss, SymmetricKLLoss
                                                        and their …WithChunkedOutputLoss forms
    fastkd.compat.distillkit                            DistillKit's sparse_kl_div and MissingProbabilityHandling
                                                        (ZERO, SYMMETRIC_UNIFORM)
    fastkd.compat.mdistiller                            mdistiller's kd_loss and dkd_loss (with logit_stand,
                                                        the logit-standardisation paper's variant)
"""

from . import distillkit, mdistiller, torchtune
from .liger import LigerFusedLinearJSDLoss
from .liger_cosine import LigerFusedLinearCosineSimilarityLoss
from .liger_fused_linear import (LigerFusedLinearJSD, LigerFusedLinearKLDivLoss, liger_fused_linear_jsd,
                                 liger_fused_linear_kl_div)
from .liger_jsd import LigerJSD, liger_jsd
from .torch_kl import KLDivLoss, kl_div
from .trl import generalized_jsd_loss
from .trl_gold import gold_generalized_jsd_loss
from .trl_topk import topk_generalized_jsd_loss

__all__ = ["KLDivLoss", "distillkit", "gold_generalized_jsd_loss", "topk_generalized_jsd_loss", "LigerFusedLinearCosineSimilarityLoss", "LigerFusedLinearJSD", "LigerFusedLinearJSDLoss",
           "LigerFusedLinearKLDivLoss", "LigerJSD", "generalized_jsd_loss", "kl_div", "liger_fused_linear_jsd",
           "liger_fused_linear_kl_div", "liger_jsd", "mdistiller", "torchtune"]
