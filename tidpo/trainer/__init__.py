"""The thin trainer: ``transformers.Trainer`` + the preference loss, and its ``TrainingArguments``."""

from tidpo.trainer.config import LOSSES, TokenWeightedDPOConfig
from tidpo.trainer.trainer import TokenWeightedDPOTrainer

__all__ = ["LOSSES", "TokenWeightedDPOConfig", "TokenWeightedDPOTrainer"]
