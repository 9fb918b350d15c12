"""Preference losses from logits: DPO (sigmoid/ipo/hinge), TDPO1/2, TIS-DPO, TI-DPO (+ triplet)."""

from tidpo.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from tidpo.losses.modules import DPOLoss, TDPOLoss, TIDPOLoss, TISDPOLoss
from tidpo.losses.output import LossOutput, PreferenceLossOutput
from tidpo.losses.packing import SequencePacking
from tidpo.losses.tdpo import tdpo_loss
from tidpo.losses.ti_dpo import TripletAnchor, ti_dpo_loss
from tidpo.losses.tis_dpo import KL_FORMS, tis_dpo_loss
from tidpo.losses.triplet import triplet_loss

__all__ = [
    "DPO_LOSS_TYPES", "KL_FORMS", "DPOLoss", "LossOutput", "TDPOLoss", "TIDPOLoss", "TISDPOLoss",
    "PreferenceLossOutput", "SequencePacking", "TripletAnchor", "dpo_loss", "tdpo_loss", "ti_dpo_loss",
    "tis_dpo_loss", "triplet_loss",
]
