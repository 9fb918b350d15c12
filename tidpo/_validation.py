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
import numbers
import os

import torch

#: The label of positions without a loss term (prompt, padding), as in PyTorch's cross-entropy, TRL and Liger.
IGNORE_INDEX = -100
#: Label dtypes every backend takes. Narrower integers cannot even hold -100 or a 50k vocabulary.
LABEL_DTYPES = (torch.int64, torch.int32)


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether content checks run for ``t`` (always on CPU; on GPU only with TIDPO_CHECK_VALUES=1)."""
    if t.device.type == "cpu":
        return True
    return os.environ.get("TIDPO_CHECK_VALUES", "0") == "1"


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def is_fused_logits(x) -> bool:
    """Whether ``x`` is :class:`tidpo.FusedLogits` (an LM head and hidden states standing in for logits)."""
    from tidpo.ops.lm_head import FusedLogits

    return isinstance(x, FusedLogits)


def check_logits(x, name: str) -> torch.Tensor:
    if is_fused_logits(x):  # its constructor checked the hidden states and the head
        if x.dim() not in (2, 3):
            raise ValueError(f"{name} must have shape [N, V] or [R, T, V] (hidden [N, H] or [R, T, H]), got "
                             f"{tuple(x.shape)}")
        return x
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
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of token ids (int64 or int32), got dtype {labels.dtype}")
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


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An ``int`` (not a bool) in ``[low, high]`` (either bound optional).

    Raises:
        TypeError: not an integer. ValueError: out of range (the message names ``name`` and the bounds).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in {_interval(low, high, False, False)}, got {value!r}")
    return int(value)


def check_number(value, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) in the interval from ``low`` to ``high`` (open ends optional).

    Raises:
        TypeError: not a number. ValueError: not finite or out of range (the message gives the interval).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (v < low or (low_open and v == low))
    too_high = high is not None and (v > high or (high_open and v == high))
    if too_low or too_high:
        raise ValueError(f"{name} must be in {_interval(low, high, low_open, high_open)}, got {value!r}")
    return v


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    left = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
    right = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
    return f"{left}, {right}"


def check_positive(value, name: str) -> float:
    """A finite number > 0."""
    return check_number(value, name, low=0.0, low_open=True)


def check_non_negative(value, name: str) -> float:
    """A finite number >= 0."""
    return check_number(value, name, low=0.0)


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def check_finite_positions(values: torch.Tensor, valid: torch.Tensor, name: str, what: str) -> None:
    """Raise naming the first valid position whose per-position ``values`` are not finite (a value check).

    Used on the per-position log-sum-exp of logits: NaN or +inf anywhere in a row, or a row that is all -inf,
    makes it non-finite, and with it the log-probs and gradients of that position. Ignored positions are not
    looked at. Runs only where :func:`value_checks_enabled` (always on CPU; it reads tensor values).
    """
    if not value_checks_enabled(values) or values.numel() == 0:
        return
    bad = valid & ~torch.isfinite(values)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} at position {first} {what} (log-sum-exp {float(values[first])}): NaN or +inf "
                         "in the row, or every entry -inf; positions labelled ignore_index may hold anything")
