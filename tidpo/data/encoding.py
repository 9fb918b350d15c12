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

Special tokens already in the text are not doubled (as in TRL): a prompt whose text starts with the BOS text
keeps the one BOS (the tokenizer's own is not added a second time); a plain-text reply whose text ends with the
EOS text gets no second EOS; a conversational reply whose content ends with the token the template writes
after a reply (its EOS / end-of-turn text) has it removed from the content, so the template writes it once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tidpo.data.loading import row_label

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
                    f"{row_label(index, row)}: {column!r} must be a string like 'prompt' (plain-text row), "
                    f"got {type(row[column]).__name__}")
        return False
    if isinstance(prompt, (list, tuple)):
        for column in ("prompt", "chosen", "rejected"):
            _check_messages(row[column], row_label(index, row), column)
        return True
    raise ValueError(
        f"{row_label(index, row)}: 'prompt' must be a string (plain-text row) or a list of {{'role', 'content'}} "
        "messages "
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
            f"{row_label(indices[0], rows[0])}: the tokenizer has no eos_token_id, but plain-text rows end each "
            "response with EOS; set tokenizer.eos_token")
    for row, index in zip(rows, indices, strict=True):
        for column in ("prompt", "chosen", "rejected"):
            if not row[column].strip():
                raise ValueError(f"{row_label(index, row)}: {column!r} is empty or only whitespace")
    bos = tokenizer.bos_token_id
    bos_text, eos_text = getattr(tokenizer, "bos_token", None), tokenizer.eos_token
    prompts = tokenizer([_from_bos(row["prompt"], bos_text) for row in rows], add_special_tokens=True)["input_ids"]
    chosen = tokenizer([_to_eos(row["chosen"], eos_text) for row in rows], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([_to_eos(row["rejected"], eos_text) for row in rows], add_special_tokens=False)["input_ids"]
    return [(_single_leading_bos(list(p), bos), _ending_with_eos(c, eos), _ending_with_eos(r, eos))
            for p, c, r in zip(prompts, chosen, rejected, strict=True)]


def _from_bos(text: str, bos_text: str | None) -> str:
    """A prompt that starts with the BOS text after whitespace, from the BOS on (whitespace before it is noise)."""
    stripped = text.lstrip()
    return stripped if bos_text and stripped.startswith(bos_text) else text


def _to_eos(text: str, eos_text: str | None) -> str:
    """A reply that ends with the EOS text before whitespace, up to the EOS (whitespace after it is noise)."""
    stripped = text.rstrip()
    return stripped if eos_text and stripped.endswith(eos_text) else text


def _single_leading_bos(ids: list[int], bos: int | None) -> list[int]:
    """``ids`` without the first of two leading BOS (the text's own and the one the tokenizer added)."""
    return ids[1:] if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos else ids


def _ending_with_eos(ids: list[int], eos: int) -> list[int]:
    """``ids + [eos]``, unless the text already ended with the EOS token."""
    return list(ids) if ids and ids[-1] == eos else [*ids, eos]


def encode_chat_batch(tokenizer, rows: Sequence[Mapping], indices: Sequence[int]):
    """Token ids of conversational rows through the tokenizer's chat template.

    Returns:
        One ``(prompt_ids, chosen_ids, rejected_ids)`` tuple per row.

    Raises:
        ValueError: the tokenizer has no chat template, the template renders ``prompt + response`` so that
            it does not start with the rendered prompt (with generation prompt), or a response renders to
            no tokens; the message names the row.
    """
    if not rows:
        return []
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{row_label(indices[0], rows[0])} is conversational (its prompt is a list of messages) but the "
            "tokenizer has no chat_template; set tokenizer.chat_template, or pass plain-text rows (strings), which "
            "need none")
    terminator = _reply_terminator(tokenizer)
    encoded = []
    for row, index in zip(rows, indices, strict=True):
        label = row_label(index, row)
        prompt = list(row["prompt"])
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True, label=label)
        responses = []
        for column in ("chosen", "rejected"):
            reply = [_without_suffix(message, terminator) for message in row[column]]
            full_ids = _chat_ids(tokenizer, prompt + reply, add_generation_prompt=False, label=label)
            if full_ids[: len(prompt_ids)] != prompt_ids:
                raise ValueError(
                    f"{label}: the chat template renders prompt + {column} so that it does not start with "
                    "the rendered prompt (add_generation_prompt=True); the response tokens cannot be separated "
                    "from the prompt with this template")
            response_ids = full_ids[len(prompt_ids):]
            if not response_ids:
                raise ValueError(f"{label}: {column!r} renders to no tokens after the prompt")
            responses.append(response_ids)
        encoded.append((prompt_ids, responses[0], responses[1]))
    return encoded


def _reply_terminator(tokenizer) -> str:
    """The text the chat template writes right after a reply's content, whitespace stripped (may be empty).

    Found by rendering a probe conversation once per batch, so it works for any template; a template that
    cannot render the probe (one that insists on, say, a system turn) yields "" and replies are left as given.
    """
    marker = "tidpo-reply-probe"
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - template errors have no common type (jinja2, ValueError, ...)
        return ""
    if not isinstance(text, str) or marker not in text:
        return ""
    after = text[text.rindex(marker) + len(marker):].strip()
    special = [token for token in (getattr(tokenizer, "eos_token", None), *getattr(tokenizer, "all_special_tokens", ()))
               if isinstance(token, str) and token]
    # Only a special token the template writes after every reply counts (e.g. "<|im_end|>", "<|eot_id|>").
    return next((token for token in special if after.startswith(token)), "")


def _without_suffix(message, terminator: str):
    """The message with a trailing ``terminator`` removed from its content (the template writes it)."""
    content = message.get("content") if isinstance(message, Mapping) else None
    if not terminator or not isinstance(content, str) or not content.rstrip().endswith(terminator):
        return message
    return {**message, "content": content.rstrip()[:-len(terminator)]}


def _check_messages(messages, label: str, column: str) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f"{label}: {column!r} must be a non-empty list of {{'role', 'content'}} messages "
            f"(conversational row), got {_kind(messages)}")
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(
                f"{label}: {column!r} message {position} must be a dict with 'role' and 'content', "
                f"got {_kind(message)}")


def _chat_ids(tokenizer, messages: list, *, add_generation_prompt: bool, label: str) -> list[int]:
    """``apply_chat_template(..., tokenize=True)`` as a list of ids (transformers 4 returns a list, 5 a dict)."""
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
    if isinstance(out, Mapping):
        out = out["input_ids"]
    ids = _single_leading_bos(list(out), getattr(tokenizer, "bos_token_id", None))
    if not all(isinstance(token, int) for token in ids):
        raise ValueError(f"{label}: apply_chat_template did not return a flat list of token ids")
    return ids


def _kind(value) -> str:
    if isinstance(value, (list, tuple)) and not value:
        return f"an empty {type(value).__name__}"
    return type(value).__name__
