"""Integrations with training libraries, each an optional dependency (``pip install fastkd[hf]``).

    fastkd.integrations.hf    the distillation loss of a Hugging Face causal-LM pair, from their
                              final hidden states and lm_head weights (no logits formed);
                              needs only torch (the models are read by duck typing)
    fastkd.integrations.trl   TRL's DistillationTrainer and GKDTrainer with fastkd's fused loss;
                              imports TRL

Nothing is imported here, so ``import fastkd`` never needs transformers or TRL.
"""

__all__ = ["hf", "trl"]
