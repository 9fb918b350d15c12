"""Pieces shared by the losses: input checks, per-token log-ratios, pair reduction, metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidpo import _validation as v
from tidpo.losses.output import PreferenceLossOutput
from tidpo.ops import token_kl, token_logps


@dataclass
class PairBatch:
    """Validated per-token quantities of 2B stacked rows (rows [0, B) chosen, [B, 2B) rejected).

    ``policy_logps``/``ref_logps`` are fp32 ``[2B, T]`` (fp64 for fp64 logits), 0 where masked;
    ``mask`` is ``labels != ignore_index``.
    """

    policy_logps: torch.Tensor
    ref_logps: torch.Tensor
    mask: torch.Tensor

    @property
    def log_ratios(self) -> torch.Tensor:
        """``rho_t = log pi(y_t) - log ref(y_t)`` on valid tokens, 0 elsewhere; ``[2B, T]``."""
        return torch.where(self.mask, self.policy_logps - self.ref_logps, 0.0)


def check_pair_logits(policy_logits, labels, ignore_index: int) -> int:
    """Checks shared by every pair loss; returns B."""
    v.check_logits(policy_logits, "policy_logits")
    if policy_logits.dim() != 3:
        raise ValueError(
            f"policy_logits must have shape [2B, T, V] for a preference loss, got {tuple(policy_logits.shape)}"
        )
    v.check_labels(labels, policy_logits, ignore_index, logits_name="policy_logits")
    return v.check_pair_rows(policy_logits, "policy_logits")


def check_ref_logits(ref_logits, policy_logits) -> None:
    v.check_logits(ref_logits, "ref_logits")
    v.check_same_logits_shape(ref_logits, policy_logits, "ref_logits", "policy_logits")


def check_weights(weights, labels) -> torch.Tensor:
    return v.check_per_token(weights, labels, "weights", finite=True)


def pair_batch(policy_logits, labels, *, ref_logps=None, ref_logits=None, ignore_index: int,
               backend, chunk_size, require_ref_logits: bool = False) -> PairBatch:
    """Validate inputs and compute policy (differentiable) and reference (constant) log-probs.

    Exactly one of ``ref_logps`` (precomputed per-token reference log-probs) and ``ref_logits``
    must be given; the reference is never differentiated.
    """
    check_pair_logits(policy_logits, labels, ignore_index)
    if require_ref_logits and ref_logits is None:
        raise ValueError("ref_logits is required here: the KL term needs the reference's full-vocab logits")
    if ref_logps is None and ref_logits is None:
        raise ValueError("pass the reference as ref_logps ([2B, T] per-token log-probs) or ref_logits")
    if ref_logps is not None and ref_logits is not None:
        raise ValueError("pass either ref_logps or ref_logits, not both")
    if ref_logits is not None:
        check_ref_logits(ref_logits, policy_logits)
    else:
        v.check_per_token(ref_logps, labels, "ref_logps")
    policy_logps = token_logps(policy_logits, labels, ignore_index, backend=backend, chunk_size=chunk_size)
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = token_logps(ref_logits.detach(), labels, ignore_index, backend=backend,
                                    chunk_size=chunk_size)
    mask = labels != ignore_index
    ref_logps = torch.where(mask, ref_logps.detach().to(policy_logps.dtype), 0.0)
    return PairBatch(policy_logps, ref_logps, mask)


def sequence_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[R, T] -> [R]``: sum of ``values`` over valid positions (masked entries never leak)."""
    return torch.where(mask, values, 0.0).sum(-1)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2B, ...] -> ([B, ...] chosen, [B, ...] rejected)``."""
    half = x.shape[0] // 2
    return x[:half], x[half:]


def seq_kl(p_logits, q_logits, labels, mask, ignore_index, backend, chunk_size, weights=None):
    """Per-sequence ``sum_t w_t KL_t(p || q)`` over valid tokens (``w = 1`` without weights); ``[2B]``."""
    kl = token_kl(p_logits, q_logits, labels, ignore_index, backend=backend, chunk_size=chunk_size)
    if weights is not None:
        kl = kl * weights.to(kl.dtype)
    return sequence_sums(kl, mask)


def build_output(losses, chosen_rewards, rejected_rewards, batch: PairBatch,
                 extra: dict[str, torch.Tensor] | None = None) -> PreferenceLossOutput:
    """Assemble the output object and the TRL-style detached batch-mean metrics."""
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    pol_w, pol_l = split_pairs(sequence_sums(batch.policy_logps.detach(), batch.mask))
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "logps/chosen": pol_w.mean(),
        "logps/rejected": pol_l.mean(),
    }
    for key, value in (extra or {}).items():
        metrics[key] = value.detach().mean()
    return PreferenceLossOutput(losses.mean(), losses, chosen_rewards, rejected_rewards, metrics)


def weight_metrics(weights: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean token weight over valid tokens of chosen and rejected responses (per pair)."""
    w = torch.where(mask, weights.detach().to(torch.promote_types(weights.dtype, torch.float32)), 0.0)
    count = mask.sum(-1).clamp(min=1)
    mean_w, mean_l = split_pairs(w.sum(-1) / count)
    return {"weights/chosen_mean": mean_w, "weights/rejected_mean": mean_l}
