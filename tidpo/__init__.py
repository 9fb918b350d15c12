"""tidpo: token-weighted preference optimisation (TIS-DPO, TI-DPO, TDPO, DPO) for LLMs.

The drop-in API: per-token ops and preference losses computed from logits without a full-size
vocab softmax in memory. Layout: a batch of B pairs is 2B rows, rows [0, B) chosen and [B, 2B)
rejected; ``logits[:, t]`` predicts ``labels[:, t]``; ``labels == -100`` marks prompt and padding.
"""

from tidpo.data.collator import preference_inputs
from tidpo.losses import (
    DPOLoss,
    PreferenceLossOutput,
    SequencePacking,
    TDPOLoss,
    TIDPOLoss,
    TISDPOLoss,
    TripletAnchor,
    dpo_loss,
    tdpo_loss,
    ti_dpo_loss,
    tis_dpo_loss,
)
from tidpo.ops import token_kl, token_logps

__version__ = "0.1.0"

__all__ = [
    "DPOLoss", "PreferenceLossOutput", "SequencePacking", "TDPOLoss", "TIDPOLoss", "TISDPOLoss", "TripletAnchor",
    "dpo_loss", "preference_inputs", "tdpo_loss", "ti_dpo_loss", "tis_dpo_loss", "token_kl", "token_logps",
]
