"""Models by name for the commands: a local folder, ``embedded`` (SmolLM2-135M-Instruct from its GGUF package)
or ``tiny-gpt2`` (a random 2-layer GPT-2 with the real GPT-2 tokenizer, for smoke tests)."""

from __future__ import annotations

import torch

from tidpo.trainer.models import load_local_model, with_pad_token

EMBEDDED = "embedded"
TINY_GPT2 = "tiny-gpt2"


def load_model_and_tokenizer(name: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for a local folder, ``embedded`` or ``tiny-gpt2``; the tokenizer has a pad token.

    Raises:
        FileNotFoundError: ``name`` is neither a built-in name nor a local folder (naming the choices).
    """
    if name == EMBEDDED:
        from tidpo.apps.embedded import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
        return model, with_pad_token(tokenizer, name)
    if name == TINY_GPT2:
        from tidpo.apps.assets import gpt2_tokenizer, tiny_gpt2

        return tiny_gpt2().to(dtype), with_pad_token(gpt2_tokenizer(), name)
    try:
        return load_local_model(name, dtype)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}, {EMBEDDED!r} or {TINY_GPT2!r}") from None
