"""Turning one preference row into token ids: plain-text rows and conversational (chat-template) rows.

Both paths produce ``(prompt_ids, chosen_ids, rejected_ids)`` where every response id list ends with the
token that terminates the reply:

- **plain text** (``prompt``, ``chosen``, ``rejected`` are strings), as in TRL::

      prompt_ids   = tokenizer(prompt, add_special_tokens=True).input_ids      # BOS if the tokenizer adds one
      response_ids = tokenizer(response, add_special_tokens=False).input_ids + [eos_token_id]

- **conversational** (``prompt`` is a list of ``{"role", "content"}`` messages, ``chosen`` / ``rejected``
  lists of the reply messages), via the tokenizer's chat template::

      prompt_ids   = apply_chat_template(prompt, add_generation_prompt=True)
      full_ids     = apply_chat_template(prompt + response)
      response_ids = full_ids[len(prompt_ids):]     # full_ids must start with prompt_ids

  The reply's terminator is whatever the template writes after the reply (e.g. ``<|im_end|>\\n``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["encode_chat_batch", "encode_plain_batch", "is_conversational"]


def is_conversational(row: Mapping, index: int) -> bool:
    """Whether row ``index`` is conversational (``prompt`` is a list of messages) rather than plain text.

    Raises:
        ValueError: ``prompt`` is neither a string nor a list of messages, or ``chosen`` / ``rejected`` are
            not of the same kind as ``prompt``; the message names the row and the column.
    """
    prompt = row["prompt"]
    if isinstance(prompt, str):
        for column in ("chosen", "rejected"):
            if not isinstance(row[column], str):
                raise ValueError(
                    f"row {index}: {column!r} must be a string like 'prompt' (plain-text row), "
                    f"got {type(row[column]).__name__}")
        return False
    if isinstance(prompt, (list, tuple)):
        for column in ("prompt", "chosen", "rejected"):
            _check_messages(row[column], index, column)
        return True
    raise ValueError(
        f"row {index}: 'prompt' must be a string (plain-text row) or a list of {{'role', 'content'}} messages "
        f"(conversational row), got {type(prompt).__name__}")


def encode_plain_batch(tokenizer, rows: Sequence[Mapping], indices: Sequence[int]):
    """Token ids of plain-text rows, tokenised in one batched call per column.

    Args:
        tokenizer: a Hugging Face tokenizer with an ``eos_token_id``.
        rows: the plain-text rows.
        indices: their source row indices (for the error messages).

    Returns:
        One ``(prompt_ids, chosen_ids, rejected_ids)`` tuple per row; each response ends with EOS.

    Raises:
        ValueError: an empty or whitespace-only text (naming the row and column), or a tokenizer without an
            EOS token.
    """
    if not rows:
        return []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"row {indices[0]}: the tokenizer has no eos_token_id, but plain-text rows end each response with "
            "EOS; set tokenizer.eos_token")
    for row, index in zip(rows, indices, strict=True):
        for column in ("prompt", "chosen", "rejected"):
            if not row[column].strip():
                raise ValueError(f"row {index}: {column!r} is empty or only whitespace")
    prompts = tokenizer([row["prompt"] for row in rows], add_special_tokens=True)["input_ids"]
    chosen = tokenizer([row["chosen"] for row in rows], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([row["rejected"] for row in rows], add_special_tokens=False)["input_ids"]
    return [(list(p), [*c, eos], [*r, eos]) for p, c, r in zip(prompts, chosen, rejected, strict=True)]


def encode_chat_batch(tokenizer, rows: Sequence[Mapping], indices: Sequence[int]):
    """Token ids of conversational rows through the tokenizer's chat template.

    Returns:
        One ``(prompt_ids, chosen_ids, rejected_ids)`` tuple per row.

    Raises:
        ValueError: the tokenizer has no chat template, the template renders ``prompt + response`` so that
            it does not start with the rendered prompt (with generation prompt), or a response renders to
            no tokens; the message names the row.
    """
    encoded = []
    for row, index in zip(rows, indices, strict=True):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"row {index} is conversational (its prompt is a list of messages) but the tokenizer has no "
                "chat_template; set tokenizer.chat_template, or pass plain-text rows (strings), which need none")
        prompt = list(row["prompt"])
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True, index=index)
        responses = []
        for column in ("chosen", "rejected"):
            full_ids = _chat_ids(tokenizer, prompt + list(row[column]), add_generation_prompt=False, index=index)
            if full_ids[: len(prompt_ids)] != prompt_ids:
                raise ValueError(
                    f"row {index}: the chat template renders prompt + {column} so that it does not start with "
                    "the rendered prompt (add_generation_prompt=True); the response tokens cannot be separated "
                    "from the prompt with this template")
            response_ids = full_ids[len(prompt_ids):]
            if not response_ids:
                raise ValueError(f"row {index}: {column!r} renders to no tokens after the prompt")
            responses.append(response_ids)
        encoded.append((prompt_ids, responses[0], responses[1]))
    return encoded


def _check_messages(messages, index: int, column: str) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f"row {index}: {column!r} must be a non-empty list of {{'role', 'content'}} messages "
            f"(conversational row), got {_kind(messages)}")
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(
                f"row {index}: {column!r} message {position} must be a dict with 'role' and 'content', "
                f"got {_kind(message)}")


def _chat_ids(tokenizer, messages: list, *, add_generation_prompt: bool, index: int) -> list[int]:
    """``apply_chat_template(..., tokenize=True)`` as a list of ids (transformers 4 returns a list, 5 a dict)."""
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
    if isinstance(out, Mapping):
        out = out["input_ids"]
    ids = list(out)
    if not all(isinstance(token, int) for token in ids):
        raise ValueError(f"row {index}: apply_chat_template did not return a flat list of token ids")
    return ids


def _kind(value) -> str:
    if isinstance(value, (list, tuple)) and not value:
        return f"an empty {type(value).__name__}"
    return type(value).__name__
