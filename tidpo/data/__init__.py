"""Preference data for the trainer: loading, tokenisation and collation.

- :func:`load_preference_rows`: rows ``{"prompt", "chosen", "rejected"}`` from a ``datasets.Dataset``, a list,
  JSON / JSONL / Parquet files or folders, with optional per-row token weights merged in
  (:mod:`tidpo.data.loading`).
- :func:`tokenize_preference_rows`: token ids for plain-text or conversational rows, token weights aligned
  to the response ids (EOS weight 0) and truncation (:mod:`tidpo.data.tokenization`,
  :mod:`tidpo.data.encoding`) into a :class:`PreferenceDataset` (:mod:`tidpo.data.dataset`).
- :class:`PreferenceCollator`: padded ``[2B, T]`` batches in the stacked layout (rows ``[0, B)`` chosen,
  ``[B, 2B)`` rejected) with labels, weights and reference log-probs (:mod:`tidpo.data.collator`).
"""

from tidpo.data.collator import PreferenceCollator, preference_inputs
from tidpo.data.dataset import PreferenceDataset
from tidpo.data.loading import load_preference_rows, swap_chosen_rejected
from tidpo.data.tokenization import tokenize_preference_rows

__all__ = ["PreferenceCollator", "PreferenceDataset", "load_preference_rows", "preference_inputs",
           "swap_chosen_rejected", "tokenize_preference_rows"]
