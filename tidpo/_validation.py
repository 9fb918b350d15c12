"""Argument checks shared by every public op and loss.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
value or hyper-parameter) with the argument's name in the message, so a user sees at once which
input is wrong.

Value checks (labels inside ``[0, V)``, finite weights) need to look at tensor contents. On a CPU
tensor that is free; on an accelerator it forces a host synchronisation, which the loss path must
not do. They therefore run on CPU tensors always and on accelerator tensors only when
``TIDPO_CHECK_VALUES=1`` is set (useful while debugging a data pipeline).
"""

from __future__ import annotations

import math
import os

import torch

#: The label of positions without a loss term (prompt, padding), as in PyTorch's cross-entropy, TRL and Liger.
IGNORE_INDEX = -100


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether content checks run for ``t`` (always on CPU; on GPU only with TIDPO_CHECK_VALUES=1)."""
    if t.device.type == "cpu":
        return True
    return os.environ.get("TIDPO_CHECK_VALUES", "0") == "1"


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_logits(x, name: str) -> torch.Tensor:
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of logits, got dtype {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(
            f"{name} must have shape [N, V] or [R, T, V], got {tuple(x.shape)} ({x.dim()} dims)"
        )
    if x.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(x.shape)}")
    return x


def check_labels(labels, logits: torch.Tensor, ignore_index: int, name: str = "labels",
                 logits_name: str = "logits") -> torch.Tensor:
    check_tensor(labels, name)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} shape {tuple(labels.shape)} does not match {logits_name} shape "
            f"{tuple(logits.shape)} without its vocabulary dimension ({tuple(logits.shape[:-1])})"
        )
    check_same_device(labels, logits, name, logits_name)
    if value_checks_enabled(labels) and labels.numel() > 0:
        vocab = logits.shape[-1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name} holds token id {int(labels[first])} at index {first}, outside [0, {vocab}) "
                f"and not ignore_index={ignore_index}"
            )
    return labels


def check_same_device(x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; move them to one device")


def check_per_token(x, labels: torch.Tensor, name: str, *, finite: bool = False) -> torch.Tensor:
    """A per-token float tensor aligned with ``labels`` (weights, reference log-probs)."""
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(labels.shape):
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match labels shape {tuple(labels.shape)}")
    check_same_device(x, labels, name, "labels")
    if finite and value_checks_enabled(x) and x.numel() > 0:
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name} holds a non-finite value ({float(x[first])}) at index {first}")
    return x


def check_pair_rows(x: torch.Tensor, name: str) -> int:
    """Preference tensors stack B chosen rows then B rejected rows; return B."""
    rows = x.shape[0]
    if rows % 2 != 0 or rows == 0:
        raise ValueError(
            f"{name} has {rows} rows; preference losses need an even, non-zero number of rows "
            "(rows [0, B) chosen, rows [B, 2B) rejected)"
        )
    return rows // 2


def check_same_logits_shape(q: torch.Tensor, p: torch.Tensor, q_name: str, p_name: str) -> None:
    if tuple(q.shape) != tuple(p.shape):
        raise ValueError(f"{q_name} shape {tuple(q.shape)} does not match {p_name} shape {tuple(p.shape)}")
    check_same_device(q, p, q_name, p_name)


def check_positive(value, name: str) -> float:
    v = _as_float(value, name)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_non_negative(value, name: str) -> float:
    v = _as_float(value, name)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return v


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def _as_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)
