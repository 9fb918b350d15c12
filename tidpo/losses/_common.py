"""Pieces shared by the losses: input checks, per-token log-ratios, pair reduction, metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidpo import _validation as v
from tidpo.losses.output import PreferenceLossOutput, per_pair
from tidpo.losses.packing import SequencePacking, check_packing
from tidpo.ops import token_kl, token_logps
from tidpo.ops.sequence import sequence_rows, sequence_sums, weighted_sequence_logps


@dataclass
class PairBatch:
    """Validated inputs of B preference pairs, their per-token quantities and how to reduce them per sequence.

    ``policy_logits`` / ``ref_logits`` / ``labels`` / ``weights`` are the inputs in one layout: padded
    ``[2B, T(, V)]``, or packed ``[N(, V)]`` (a ``[1, N, ...]`` packed input is viewed as ``[N, ...]``, never
    copied). ``policy_logps``/``ref_logps`` are fp32 (fp64 for fp64 logits) shaped like ``labels`` and 0 where
    masked; ``mask`` is ``labels != ignore_index``; ``segments`` is ``None`` (padded: row r is sequence r) or the
    stacked per-token sequence index ``[N]``. ``weighted_margins`` is ``[2B]``:
    ``sum_t w_t (log pi(y_t) - log ref(y_t))`` per sequence (``w = 1`` without weights), differentiable through
    the fused pair reduction. Sequences [0, B) are the chosen responses, [B, 2B) the rejected ones.
    """

    policy_logits: torch.Tensor
    ref_logits: torch.Tensor | None
    labels: torch.Tensor
    weights: torch.Tensor | None
    policy_logps: torch.Tensor
    ref_logps: torch.Tensor | None  # None: the reference came as per-sequence sums [2B] (TRL's form)
    mask: torch.Tensor
    num_pairs: int
    weighted_margins: torch.Tensor
    segments: torch.Tensor | None
    ignore_index: int
    backend: str | None
    chunk_size: int | None

    @property
    def log_ratios(self) -> torch.Tensor:
        """``rho_t = log pi(y_t) - log ref(y_t)`` on valid tokens, 0 elsewhere."""
        if self.ref_logps is None:
            raise ValueError("this loss needs per-token reference log-probs shaped like labels (ref_logps [2B, T] "
                             "or ref_logits), not per-sequence sums [2B]")
        return torch.where(self.mask, self.policy_logps - self.ref_logps, 0.0)

    def rows(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``values`` as one row per sequence: ``([2B, L], mask [2B, L])``."""
        return sequence_rows(values, self.mask, self.segments, 2 * self.num_pairs)

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """``[2B]``: per-sequence sum of ``values`` over valid tokens (the same in padded and packed layouts)."""
        return sequence_sums(values, self.mask, self.segments, 2 * self.num_pairs)

    def counts(self) -> torch.Tensor:
        """``[2B]``: number of valid tokens per sequence."""
        return self.sums(self.mask.to(self.policy_logps.dtype))

    def kl_sums(self, p_logits: torch.Tensor, q_logits: torch.Tensor, weighted: bool = False) -> torch.Tensor:
        """``[2B]``: per-sequence ``sum_t (w_t) KL_t(p || q)`` over valid tokens, with the token weights if
        ``weighted``."""
        kl = token_kl(p_logits, q_logits, self.labels, self.ignore_index, backend=self.backend,
                      chunk_size=self.chunk_size)
        if weighted and self.weights is not None:
            kl = kl * self.weights.detach().to(kl.dtype)
        return self.sums(kl)


def _packed_view(x: torch.Tensor, num_tokens: int, name: str, vocab: bool = False) -> torch.Tensor:
    """A packed input as ``[N]`` (``[N, V]`` for logits): ``[N]`` / ``[N, V]`` as given, ``[1, N(, V)]`` viewed."""
    if not (vocab and v.is_fused_logits(x)):
        v.check_tensor(x, name)
    shape = (num_tokens, x.shape[-1]) if vocab else (num_tokens,)
    if tuple(x.shape) == shape or tuple(x.shape) == (1, *shape):
        return x.reshape(shape)  # drops the leading 1: a view
    expected = "[N, V] or [1, N, V]" if vocab else "[N] or [1, N]"
    raise ValueError(f"packed {name} must have shape {expected} with N = {num_tokens}, got {tuple(x.shape)}")


def pair_batch(policy_logits, labels, *, ref_logps=None, ref_logits=None, weights=None, ignore_index: int,
               backend, chunk_size, require_ref_logits: bool = False,
               packing: SequencePacking | None = None) -> PairBatch:
    """Validate inputs; compute policy log-probs and weighted margins (differentiable), reference (constant).

    Exactly one of ``ref_logps`` (precomputed per-token reference log-probs, or — padded layout, no weights —
    per-sequence sums ``[2B]`` as TRL precomputes them) and ``ref_logits`` must be given; the reference is never
    differentiated. ``weights`` (constants) weight the margins. Packed inputs may mix ``[N, ...]`` and
    ``[1, N, ...]`` shapes (logits, labels, per-token tensors, segment ids).
    """
    v.check_logits(policy_logits, "policy_logits")
    if require_ref_logits and ref_logits is None:
        raise ValueError("ref_logits is required here: the KL term needs the reference's full-vocab logits")
    if ref_logps is None and ref_logits is None:
        raise ValueError("pass the reference as ref_logps (per-token log-probs shaped like labels) or ref_logits")
    if ref_logps is not None and ref_logits is not None:
        raise ValueError("pass either ref_logps or ref_logits, not both")
    if packing is None:
        if policy_logits.dim() != 3:
            raise ValueError(f"policy_logits must have shape [2B, T, V] for a preference loss (or pass packing= for "
                             f"packed [N, V] / [1, N, V] logits), got {tuple(policy_logits.shape)}")
        num_pairs = v.check_pair_rows(policy_logits, "policy_logits")
    else:
        v.check_tensor(labels, "labels")
        num_tokens = labels.numel()
        policy_logits = _packed_view(policy_logits, num_tokens, "policy_logits", vocab=True)
        labels = labels.reshape(-1)
        ref_logits = None if ref_logits is None else _packed_view(ref_logits, num_tokens, "ref_logits", vocab=True)
        ref_logps = None if ref_logps is None else _packed_view(ref_logps, num_tokens, "ref_logps")
        weights = None if weights is None else _packed_view(weights, num_tokens, "weights")
        num_pairs = check_packing(packing, labels, ignore_index)
    v.check_labels(labels, policy_logits, ignore_index, logits_name="policy_logits")
    per_sequence = (packing is None and ref_logps is not None and isinstance(ref_logps, torch.Tensor)
                    and ref_logps.dim() == 1 and labels.dim() == 2)
    if per_sequence:
        if weights is not None:
            raise ValueError("ref_logps are per-sequence sums [2B], but this loss weights every token's log-ratio: "
                             "give per-token reference log-probs shaped like labels [2B, T], or ref_logits")
        if not ref_logps.is_floating_point() or tuple(ref_logps.shape) != (2 * num_pairs,):
            raise ValueError(f"ref_logps must be per-token [2B, T] = {tuple(labels.shape)} or per-sequence sums "
                             f"[2B] = [{2 * num_pairs}] (floating point), got {ref_logps.dtype} "
                             f"{tuple(ref_logps.shape)}")
        v.check_same_device(ref_logps, labels, "ref_logps", "labels")
    elif ref_logits is not None:
        v.check_logits(ref_logits, "ref_logits")
        v.check_same_logits_shape(ref_logits, policy_logits, "ref_logits", "policy_logits")
    else:
        v.check_per_token(ref_logps, labels, "ref_logps")
    if weights is not None:
        v.check_per_token(weights, labels, "weights", finite=True)
    segments = None if packing is None else packing.stacked_segment_ids()
    policy_logps, policy_sums = weighted_sequence_logps(
        policy_logits, labels, weights, segments=segments, num_sequences=2 * num_pairs, ignore_index=ignore_index,
        backend=backend, chunk_size=chunk_size)
    mask = labels != ignore_index
    if per_sequence:
        ref_sums, ref_logps = ref_logps.detach().to(policy_logps.dtype), None
    else:
        if ref_logps is None:
            with torch.no_grad():
                ref_logps = token_logps(ref_logits.detach(), labels, ignore_index, backend=backend,
                                        chunk_size=chunk_size)
        ref_logps = torch.where(mask, ref_logps.detach().to(policy_logps.dtype), 0.0)
        w = 1.0 if weights is None else weights.detach().to(policy_logps.dtype)
        ref_sums = sequence_sums(w * ref_logps, mask, segments, 2 * num_pairs)
    return PairBatch(policy_logits, ref_logits, labels, weights, policy_logps, ref_logps, mask, num_pairs,
                     policy_sums - ref_sums, segments, ignore_index, backend, chunk_size)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2B, ...] -> ([B, ...] chosen, [B, ...] rejected)``."""
    half = x.shape[0] // 2
    return x[:half], x[half:]


def build_output(losses, chosen_rewards, rejected_rewards, batch: PairBatch, *,
                 pair_metrics: dict[str, torch.Tensor] | None = None,
                 token_metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> PreferenceLossOutput:
    """Assemble the output object and its metrics as per-pair sums and counts.

    Args:
        pair_metrics: ``{key: [B] per-pair values}``, averaged over the pairs.
        token_metrics: ``{key: ([B] per-sequence sums over valid tokens, [B] valid-token counts)}``, averaged
            over the tokens (a sequence without valid tokens adds nothing).
    """
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    pol_w, pol_l = split_pairs(batch.sums(batch.policy_logps.detach()))
    pairs = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "logps/chosen": pol_w,
        "logps/rejected": pol_l,
        # The policy's own preference (summed log-probs): at step 0 the base model's preference rate.
        "logps/accuracies": (pol_w > pol_l).to(chosen_rewards.dtype),
        **(pair_metrics or {}),
    }
    parts = {key: per_pair(values) for key, values in pairs.items()}
    parts.update({key: per_pair(sums, counts) for key, (sums, counts) in (token_metrics or {}).items()})
    return PreferenceLossOutput(losses.mean(), losses, chosen_rewards, rejected_rewards, metric_parts=parts)


def side_counts(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B], [B])``: valid-token counts of the chosen and of the rejected responses."""
    return split_pairs(batch.counts())


def weight_metrics(weights: torch.Tensor, batch: PairBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Token metrics: the mean token weight over the valid tokens of the chosen and of the rejected responses."""
    sum_w, sum_l = split_pairs(batch.sums(weights.detach().to(batch.policy_logps.dtype)))
    count_w, count_l = side_counts(batch)
    return {"weights/chosen_mean": (sum_w, count_w), "weights/rejected_mean": (sum_l, count_l)}


def kl_metrics(k_w: torch.Tensor, k_l: torch.Tensor, batch: PairBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Token metrics: the per-token KL term (per-sequence sums ``k_w`` / ``k_l``) over the valid tokens."""
    count_w, count_l = side_counts(batch)
    return {"kl/chosen": (k_w, count_w), "kl/rejected": (k_l, count_l)}
