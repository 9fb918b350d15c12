"""The thin trainer: ``transformers.Trainer`` + the preference loss, and its ``TrainingArguments``.

:data:`LOSS_REGISTRY` is the one table of the trainable losses: what each needs (reference log-probs or
logits, data or online token weights) and which config fields it reads.
"""

from tidpo.trainer.config import TokenWeightedDPOConfig
from tidpo.trainer.fused_head import FUSED_KWARG, add_fused_lm_head
from tidpo.trainer.loss_registry import LOSS_REGISTRY, LOSSES, LossSpec
from tidpo.trainer.models import apply_lora
from tidpo.trainer.trainer import TokenWeightedDPOTrainer

__all__ = ["FUSED_KWARG", "LOSSES", "LOSS_REGISTRY", "LossSpec", "TokenWeightedDPOConfig", "TokenWeightedDPOTrainer",
           "add_fused_lm_head", "apply_lora"]
