"""TIS-DPO token weights of the training pairs, six ways (docs/methods.md §2.4–2.5), all with one transform.

- ``P``: the pretrained base model scored twice, with the prompt templates ``"<good> {prompt}"`` (π⁺) and
  ``"<bad> {prompt}"`` (π⁻) — the base model learnt what the tags mean during pretraining;
- ``S``: π⁺ = SFT on the chosen responses, π⁻ = SFT on the rejected responses (both from the base);
- ``D``: π⁺ = DPO on the pairs, π⁻ = DPO on the swapped pairs (both from the SFT model);
- ``oracle``: the hidden token reward as the score r̂ (``task.oracle_scores``);
- ``uniform``: every weight 1;
- ``random``: ``weights_from_scores(..., method="random")``, uniform in [0.7, 1.3], seeded per row.

Scores become weights with :func:`tidpo.weights.weights_from_scores` and its default transform
(``rank_based`` → [0.7, 1.3] per response, the released recipe): chosen = transform(+r̂), rejected =
transform(−r̂).
"""

from __future__ import annotations

from tidpo.apps.experiment.training import MAX_LENGTH, MAX_PROMPT_LENGTH
from tidpo.weights import score_pairs, weights_from_scores
from tidpo.weights.estimate import summarize_weights

__all__ = ["GOOD_TEMPLATE", "BAD_TEMPLATE", "contrastive_weights", "oracle_weights", "random_weights",
           "uniform_weights", "with_weights"]

GOOD_TEMPLATE = "<good> {prompt}"
BAD_TEMPLATE = "<bad> {prompt}"
_SIDES = ("chosen", "rejected")


def contrastive_weights(positive, negative, tokenizer, rows: list[dict], *, positive_template: str | None = None,
                        negative_template: str | None = None) -> tuple[list[dict], dict]:
    """Score ``rows`` with (π⁺, π⁻) and transform: ``(weighted rows, summary of the scores)``."""
    scored = score_pairs(positive, negative, tokenizer, rows, positive_template=positive_template,
                         negative_template=negative_template, max_length=MAX_LENGTH,
                         max_prompt_length=MAX_PROMPT_LENGTH, batch_size=64, progress=False)
    weighted = weights_from_scores(scored)
    return weighted, summarize_weights(weighted)


def oracle_weights(task, rows: list[dict]) -> list[dict]:
    """Weights from the hidden token reward (the same transform as the estimated ones)."""
    return weights_from_scores(task.oracle_scores(rows))


def uniform_weights(task, rows: list[dict]) -> list[dict]:
    """Every response token but the EOS weighs 1 (the EOS gets 0 from the data pipeline, as always)."""
    return [{**row, **{f"{side}_weights": [1.0] * len(row[f"{side}_scores"]) for side in _SIDES}}
            for row in task.oracle_scores(rows)]


def random_weights(task, rows: list[dict], *, seed: int) -> list[dict]:
    """Weights uniform in [0.7, 1.3], independent of the tokens (row ``r`` draws from ``seed + r``)."""
    return weights_from_scores(task.oracle_scores(rows), method="random", seed=seed)


def with_weights(rows: list[dict], weighted: list[dict]) -> list[dict]:
    """``rows`` (prompt / chosen / rejected) with the ``chosen_weights`` / ``rejected_weights`` of ``weighted``."""
    return [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
             "chosen_weights": w["chosen_weights"], "rejected_weights": w["rejected_weights"]}
            for row, w in zip(rows, weighted, strict=True)]
