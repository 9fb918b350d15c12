"""tidpo: token-weighted preference optimisation (TIS-DPO, TI-DPO, TDPO, DPO) for LLMs.

The drop-in API: per-token ops and preference losses computed from logits without a full-size
vocab softmax in memory. Layout: a batch of B pairs is 2B rows, rows [0, B) chosen and [B, 2B)
rejected; ``logits[:, t]`` predicts ``labels[:, t]``; ``labels == -100`` marks prompt and padding.
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _expose_source_kernels() -> None:
    """Run from a source checkout without installing it (``PYTHONPATH=REPO``, e.g. on a machine whose Python
    environment is read-only), ``csrc_triton/`` becomes ``tidpo.kernels``, the name ``setup.py`` gives it in an
    install. An installed tidpo (editable or wheel) finds its kernels itself and is left alone."""
    if _importlib_util.find_spec(f"{__name__}.kernels") is not None:
        return
    source = _Path(__file__).resolve().parent.parent / "csrc_triton"
    if not (source / "__init__.py").is_file():
        return  # neither installed nor a checkout: the backend reports the kernels as missing
    spec = _importlib_util.spec_from_file_location(f"{__name__}.kernels", source / "__init__.py",
                                                   submodule_search_locations=[str(source)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_expose_source_kernels()

from tidpo.data.collator import preference_inputs  # noqa: E402
from tidpo.losses import (  # noqa: E402
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
from tidpo.ops import FusedLogits, LMHead, token_kl, token_logps  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DPOLoss", "FusedLogits", "LMHead", "PreferenceLossOutput", "SequencePacking", "TDPOLoss", "TIDPOLoss",
    "TISDPOLoss", "TripletAnchor",
    "dpo_loss", "preference_inputs", "tdpo_loss", "ti_dpo_loss", "tis_dpo_loss", "token_kl", "token_logps",
]
