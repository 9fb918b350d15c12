"""Preference pairs built from the real dialogs of ``chatterbot-corpus`` (no download).

The data package ``chatterbot-corpus==1.3.3`` ships 21 English YAML files,
``chatterbot_corpus/data/english/<category>.yml`` (``ai``, ``botprofile``, ``coding``, ...,
``tech_support``, ``trivia``), each with a ``conversations`` list of conversations, each a list of
turns. Consecutive turns ``(turn i, turn i + 1)`` give 2,306 (prompt, reply) pairs, with 1,014
distinct prompts: many prompts recur with several replies (``tech_support`` repeats 10 prompts about
100 times each). One reply per prompt is short: median 6 words (prompts too), 99th percentile 58,
longest 111. Conversations longer than two turns also make a reply the prompt of the next turn.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path

from tidpo.apps.assets import package_data_dir

logger = logging.getLogger(__name__)

#: Data package of the dialogs, and the folder of its English files inside it.
CORPUS_PACKAGE = "chatterbot_corpus"
CORPUS_SUBDIR = ("data", "english")


def corpus_dir() -> Path:
    """Folder of the English ``*.yml`` dialog files of ``chatterbot-corpus``.

    Raises:
        ModuleNotFoundError: the package is not installed (the message names the pip command).
        FileNotFoundError: the package lacks its English YAML files.
    """
    folder = package_data_dir(CORPUS_PACKAGE).joinpath(*CORPUS_SUBDIR)
    if not any(folder.glob("*.yml")):
        raise FileNotFoundError(f"no *.yml dialog files in {folder}: reinstall it with `pip install --no-deps "
                                "--force-reinstall chatterbot-corpus==1.3.3`")
    return folder


def dialog_turns(folder: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Every consecutive (prompt, reply) turn of the corpus, in file and conversation order.

    Files are read in name order as UTF-8 with PyYAML's safe loader (its libyaml binding
    ``CSafeLoader`` where available: same result, 20x faster). Each turn is stripped; a pair whose
    prompt or reply is not a string or is empty is dropped, as is any ``conversations`` entry that is
    not a list (``trivia.yml`` has one such malformed entry).

    Args:
        folder: a folder of ``*.yml`` files in the corpus format; default :func:`corpus_dir`.

    Returns:
        Dicts ``{"category": file stem, "prompt": str, "reply": str}``.
    """
    import yaml

    folder = corpus_dir() if folder is None else Path(folder)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    turns, malformed = [], 0
    for path in sorted(folder.glob("*.yml")):
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        conversations = data.get("conversations") if isinstance(data, dict) else None
        if not isinstance(conversations, list):
            raise ValueError(f"{path} has no `conversations` list")
        for conversation in conversations:
            if not isinstance(conversation, list):
                malformed += 1
                continue
            for prompt, reply in pairwise(conversation):
                if isinstance(prompt, str) and isinstance(reply, str) and prompt.strip() and reply.strip():
                    turns.append({"category": path.stem, "prompt": prompt.strip(), "reply": reply.strip()})
    if malformed:
        logger.debug("skipped %d conversation entries that are not lists in %s", malformed, folder)
    return turns


def chatterbot_pairs(*, seed: int = 0, num_heldout: int = 64, max_reply_words: int | None = 64,
                     conversational: bool = True) -> tuple[list[dict], list[dict]]:
    """Preference triples from the real dialogs of ``chatterbot-corpus``: (train, held-out).

    Construction:

    1. The turns of :func:`dialog_turns` (2,306 with the installed corpus).
    2. Pairs whose reply is longer than ``max_reply_words`` words are dropped.
    3. One pair per prompt: the first remaining reply (in corpus order) to each prompt is kept,
       prompts being compared after collapsing whitespace and case-folding. With the defaults this
       leaves 1,006 pairs (1,014 without a length limit) over the 21 categories (``trivia`` 260,
       ``emotion`` 201, ``conversations`` 100, ``coding`` 88, ..., ``humor`` 2): 942 train and 64
       held-out.
    4. A seeded shuffle; the first ``num_heldout`` pairs are held out, the rest train. Each prompt
       appears once, so the two splits have disjoint prompts.
    5. ``chosen`` is the real reply. ``rejected`` is the reply of another pair of the *same split*,
       drawn at random (seeded) from a different category file when the split has one, so that it is
       clearly off-topic; it is never equal to the chosen reply nor to any reply the corpus gives to
       that prompt (compared like prompts). Drawing within the split keeps the held-out replies
       out of training altogether.

    The result depends only on ``seed`` and the arguments; different seeds give different splits,
    orders and rejected replies.

    Args:
        seed: seed of the shuffle and of the rejected draws.
        num_heldout: number of held-out pairs: 0, or at least 2 (a held-out rejected reply comes from
            another held-out pair), leaving at least 2 for training.
        max_reply_words: drop pairs whose reply has more words (whitespace-separated); None keeps all.
        conversational: TRL's conversational format, ``{"prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": a}], "rejected": [{"role": "assistant",
            "content": b}]}``; False gives the plain strings ``q``, ``a``, ``b`` (to be formatted by
            the caller).

    Returns:
        ``(train, heldout)``, lists of dicts with ``prompt``, ``chosen``, ``rejected`` and
        ``category`` (the YAML file stem of the prompt, e.g. ``"trivia"``), in shuffled order.

    Raises:
        ValueError: on an invalid argument, or when the corpus leaves too few pairs for the split.
    """
    if not isinstance(num_heldout, int) or isinstance(num_heldout, bool) or num_heldout < 0 or num_heldout == 1:
        raise ValueError(f"num_heldout must be 0 or an int >= 2, got {num_heldout!r}")
    if max_reply_words is not None and (not isinstance(max_reply_words, int) or max_reply_words < 1):
        raise ValueError(f"max_reply_words must be a positive int or None, got {max_reply_words!r}")

    turns = dialog_turns()
    replies_to = defaultdict(set)  # every reply the corpus gives to a prompt: never a rejected one for it
    for turn in turns:
        replies_to[_key(turn["prompt"])].add(_key(turn["reply"]))
    pairs, seen = [], set()
    for turn in turns:
        key = _key(turn["prompt"])
        if key in seen or (max_reply_words is not None and len(turn["reply"].split()) > max_reply_words):
            continue
        seen.add(key)
        pairs.append(turn)
    if len(pairs) - num_heldout < 2:
        raise ValueError(f"num_heldout ({num_heldout}) must leave at least 2 of the corpus's {len(pairs)} pairs for "
                         "training")

    rng = random.Random(seed)
    rng.shuffle(pairs)
    splits = pairs[num_heldout:], pairs[:num_heldout]
    train, heldout = (_with_rejected(split, rng, replies_to, conversational) for split in splits)
    logger.debug("chatterbot pairs: %d train, %d held-out (seed %d)", len(train), len(heldout), seed)
    return train, heldout


def write_jsonl(rows: Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Write ``rows`` as UTF-8 JSON Lines (one object per line, non-ASCII kept) and return the path.

    The parent folder is created if needed; the file is written under a temporary name and renamed,
    so readers never see a partial file.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder; give the path of the JSONL file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _key(text: str) -> str:
    """Comparison key of a prompt or reply: whitespace collapsed, case-folded."""
    return " ".join(text.split()).casefold()


def _with_rejected(split: list[dict], rng: random.Random, replies_to: Mapping[str, set],
                   conversational: bool) -> list[dict]:
    """Rows of ``split`` with a rejected reply drawn from another pair of the split (off-topic if possible)."""
    by_category = defaultdict(list)
    for i, pair in enumerate(split):
        by_category[pair["category"]].append(i)
    off_topic = {c: [i for other, idx in by_category.items() if other != c for i in idx] for c in by_category}

    rows = []
    for i, pair in enumerate(split):
        forbidden = replies_to[_key(pair["prompt"])] | {_key(pair["reply"])}
        rejected = _draw(split, off_topic[pair["category"]], forbidden, rng)
        if rejected is None:  # the split has a single category
            rejected = _draw(split, [j for j in by_category[pair["category"]] if j != i], forbidden, rng)
        if rejected is None:
            raise ValueError(f"no other pair of the split has a reply usable as rejected for {pair['prompt']!r}")
        prompt, chosen = pair["prompt"], pair["reply"]
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "category": pair["category"]})
    return rows


def _draw(split: list[dict], candidates: list[int], forbidden: set, rng: random.Random) -> str | None:
    """A random reply among ``split[candidates]`` whose key is not ``forbidden``; None if there is none."""
    for _ in range(min(len(candidates), 16)):  # almost always the first try
        reply = split[rng.choice(candidates)]["reply"]
        if _key(reply) not in forbidden:
            return reply
    usable = [split[j]["reply"] for j in candidates if _key(split[j]["reply"]) not in forbidden]
    return rng.choice(usable) if usable else None
