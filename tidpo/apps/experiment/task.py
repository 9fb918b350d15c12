"""A synthetic preference task with a known token-level reward, for "does token weighting work?" experiments.

Vocabulary (one token per word, :attr:`SyntheticTask.tokenizer`), in id order::

    <pad> <eos> <unk>   <good> <bad>   t0 .. t{K-1}   w0 .. w{N-1}
    specials            tags           topic words    content words

**Hidden reward.** Each topic ``c`` has ``keys_per_topic`` *key* words, half worth ``+1`` and half ``-1``
(:attr:`SyntheticTask.token_reward`, ``[K, V]``); every other token (specials, tags, topic words,
*distractor* words) is worth 0. The reward of a response is the sum of its token rewards under the prompt's
topic. Key words are **disjoint across topics** when ``num_topics * keys_per_topic <= num_words - 2`` (the
default 4 × 8 of 40 words leaves 8 distractors); otherwise all topics share ONE pool of ``keys_per_topic``
key words, each topic with its own random signs (so a word can be ``+1`` for one topic and ``-1`` for
another). Either way the distractors are the content words that are a key of no topic.

**Base generator** (the policy that wrote the data). A prompt is ``"t{c}"`` followed by ``context_length``
random distractor words. A response has a length uniform in ``[min_response_length, max_response_length]``;
each word is, with probability ``key_density``, a key of the topic drawn uniformly (so ``+`` and ``-`` keys
are equally likely), otherwise the next distractor of a fixed sparse bigram chain over the distractors
(each has up to 3 preferred successors holding 90% of the mass). The chain starts at the prompt's last
context word (a uniform distractor without context) and key words do not advance it.

**Pairs.** Two independent responses to one prompt, the second redrawn until the rewards differ (then
the prompt is redrawn); chosen = the higher reward. Then exactly ``round(noise * num_train)`` training pairs
(seeded, nested across noise levels) are swapped and marked ``flipped``. Every random draw comes from a
``random.Random`` seeded from ``(config.seed, stream)``, with separate streams for the task structure, the
training pairs, the held-out pairs and the flips, so for a given seed all noise levels share the same
structure, the same training pairs (up to the flips) and the same held-out set. Responses are stored
WITHOUT ``<eos>``: the tidpo data pipeline appends the EOS token.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from tidpo._validation import check_int, check_number

__all__ = ["EOS", "GOOD_TAG", "BAD_TAG", "PAD", "UNK", "SyntheticTask", "TaskConfig", "build_tokenizer"]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
GOOD_TAG, BAD_TAG = "<good>", "<bad>"
SPECIAL_WORDS = (PAD, EOS, UNK)
TAG_WORDS = (GOOD_TAG, BAD_TAG)
#: Successors per distractor that hold most of the bigram mass, and that mass.
BIGRAM_SUCCESSORS = 3
BIGRAM_MASS = 0.9
#: Redraws of the second response before the prompt is redrawn, and prompt redraws before giving up.
_RESPONSE_REDRAWS = 32
_PROMPT_REDRAWS = 10_000
_MODEL_MAX_LENGTH = 1_000_000
_SIDES = ("chosen", "rejected")
_LABEL_MODES = ("key", "decisive")


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig:
    """Parameters of :class:`SyntheticTask` (see the module docstring for their meaning)."""

    num_topics: int = 4            # prompt topics; the hidden reward depends on the topic
    num_words: int = 40            # content words w0..w{num_words-1} (keys + distractors)
    keys_per_topic: int = 8        # per topic: half positive (+1), half negative (-1); even, < num_words
    key_density: float = 0.25      # probability that a response token is one of the topic's key words
    min_response_length: int = 6   # content words per response (EOS not counted)
    max_response_length: int = 12
    context_length: int = 2        # reward-free context words after the topic word in the prompt
    num_train: int = 512           # training pairs
    num_heldout: int = 128         # held-out pairs (labels never flipped)
    noise: float = 0.0             # fraction of TRAINING pairs with chosen/rejected swapped, in [0, 0.5)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("num_topics", 1), ("num_words", 2), ("keys_per_topic", 2), ("min_response_length", 1),
                          ("max_response_length", 1), ("context_length", 0), ("num_train", 1),
                          ("num_heldout", 1), ("seed", 0)):
            check_int(getattr(self, name), name, low=low)
        if self.keys_per_topic % 2:
            raise ValueError(f"keys_per_topic must be even (half +1, half -1), got {self.keys_per_topic}")
        if self.keys_per_topic >= self.num_words:
            raise ValueError(f"keys_per_topic must be < num_words ({self.num_words}) so that distractor words "
                             f"remain, got {self.keys_per_topic}")
        if self.max_response_length < self.min_response_length:
            raise ValueError(f"max_response_length ({self.max_response_length}) must be >= min_response_length "
                             f"({self.min_response_length})")
        check_number(self.key_density, "key_density", low=0.0, low_open=True, high=1.0)
        check_number(self.noise, "noise", low=0.0, high=0.5, high_open=True)

    @property
    def disjoint_keys(self) -> bool:
        """Whether the topics' key words are disjoint (else they share one pool with per-topic signs)."""
        return self.num_topics * self.keys_per_topic <= self.num_words - 2

    @property
    def num_flipped(self) -> int:
        """Training pairs with chosen/rejected swapped: ``round(noise * num_train)``."""
        return round(self.noise * self.num_train)

    def to_dict(self) -> dict:
        """The fields as a plain dict (for logging / JSON)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------


def build_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words`` (ids in order), splitting on whitespace.

    ``words`` must start with ``<pad>``, ``<eos>``, ``<unk>``; no BOS / post-processor, right padding.
    """
    if tuple(words[:3]) != SPECIAL_WORDS:
        raise ValueError(f"words must start with {SPECIAL_WORDS}, got {tuple(words[:3])}")
    model = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token=UNK))
    model.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="right", model_max_length=_MODEL_MAX_LENGTH)


def _stream(seed: int, name: str) -> random.Random:
    """An independent, reproducible random stream for ``(seed, name)`` (string seeds hash with SHA-512)."""
    return random.Random(f"tidpo.experiment.task:{seed}:{name}")  # a fixed seed namespace: never rename


# ----------------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------------


class SyntheticTask:
    """The synthetic preference task of a :class:`TaskConfig` (module docstring).

    Attributes:
        config: the configuration.
        tokenizer: word-level ``PreTrainedTokenizerFast``, one id per word.
        vocab_size: ``len(tokenizer)``.
        words: the vocabulary in id order.
        topic_offset: id of ``t0`` (topic ``c`` has id ``topic_offset + c``).
        content_offset: id of ``w0``.
        keys: per topic, ``{key word: +1 or -1}``.
        distractors: the distractor words (content words that are a key of no topic).
        token_reward: float32 ``[num_topics, vocab_size]``, the hidden reward of each token per topic.
        train_rows / heldout_rows: ``{"prompt", "chosen", "rejected", "flipped"}`` dicts.
    """

    def __init__(self, config: TaskConfig):
        if not isinstance(config, TaskConfig):
            raise TypeError(f"config must be a TaskConfig, got {type(config).__name__}")
        self.config = config
        topics = [f"t{c}" for c in range(config.num_topics)]
        content = [f"w{i}" for i in range(config.num_words)]
        self.words: list[str] = [*SPECIAL_WORDS, *TAG_WORDS, *topics, *content]
        self.word_ids: dict[str, int] = {word: i for i, word in enumerate(self.words)}
        self.topic_offset = len(SPECIAL_WORDS) + len(TAG_WORDS)
        self.content_offset = self.topic_offset + config.num_topics
        self.tokenizer = build_tokenizer(self.words)
        self.vocab_size = len(self.tokenizer)
        self._build_structure(_stream(config.seed, "structure"), content)
        self.token_reward = self._reward_table()
        self._rewards: list[dict[str, float]] = [{w: float(s) for w, s in keys.items()} for keys in self.keys]
        pairs = self._draw_pairs(config.num_train, _stream(config.seed, "train"))
        flips = set(self.flip_order()[:config.num_flipped])
        self.train_rows: list[dict] = [self._pair_row(pair, index in flips) for index, pair in enumerate(pairs)]
        heldout = self._draw_pairs(config.num_heldout, _stream(config.seed, "heldout"))
        self.heldout_rows: list[dict] = [self._pair_row(pair, False) for pair in heldout]

    # -- structure ----------------------------------------------------------------------------------

    def _build_structure(self, rng: random.Random, content: list[str]) -> None:
        """Draw the key words with their signs, the distractors and the distractor bigram."""
        cfg = self.config
        order = rng.sample(content, len(content))
        half = cfg.keys_per_topic // 2
        self.keys: list[dict[str, int]] = []
        for topic in range(cfg.num_topics):
            start = topic * cfg.keys_per_topic if cfg.disjoint_keys else 0
            words = order[start:start + cfg.keys_per_topic]
            signs = [1] * half + [-1] * half
            rng.shuffle(signs)
            self.keys.append(dict(zip(words, signs, strict=True)))
        used = {word for keys in self.keys for word in keys}
        self.distractors: list[str] = [word for word in content if word not in used]
        self._key_lists = [sorted(keys, key=self.word_ids.__getitem__) for keys in self.keys]
        self.bigram: dict[str, list[float]] = {word: self._bigram_row(rng) for word in self.distractors}

    def _bigram_row(self, rng: random.Random) -> list[float]:
        """Cumulative successor weights over :attr:`distractors`: a few preferred successors, then uniform."""
        count = len(self.distractors)
        preferred = rng.sample(range(count), min(BIGRAM_SUCCESSORS, count))
        probs = [(1.0 - BIGRAM_MASS) / count] * count
        for index in preferred:
            probs[index] += BIGRAM_MASS / len(preferred)
        cumulative, total = [], 0.0
        for p in probs:
            total += p
            cumulative.append(total)
        return cumulative

    def _reward_table(self) -> torch.Tensor:
        """float32 ``[num_topics, vocab_size]``: ±1 on each topic's keys, 0 elsewhere."""
        table = torch.zeros(self.config.num_topics, self.vocab_size, dtype=torch.float32)
        for topic, keys in enumerate(self.keys):
            for word, sign in keys.items():
                table[topic, self.word_ids[word]] = float(sign)
        return table

    def flip_order(self) -> list[int]:
        """A seeded permutation of the training rows; the first ``num_flipped`` are flipped (nested over noise)."""
        return _stream(self.config.seed, "flips").sample(range(self.config.num_train), self.config.num_train)

    # -- generator ----------------------------------------------------------------------------------

    def sample_prompt(self, rng: random.Random) -> tuple[int, list[str]]:
        """``(topic, context words)`` of a new prompt; the prompt text is :meth:`prompt_text`."""
        topic = rng.randrange(self.config.num_topics)
        return topic, [rng.choice(self.distractors) for _ in range(self.config.context_length)]

    @staticmethod
    def prompt_text(topic: int, context: Sequence[str]) -> str:
        """``"t{topic} w.. w.."``."""
        return " ".join([f"t{topic}", *context])

    def sample_response(self, topic: int, context: Sequence[str], rng: random.Random) -> list[str]:
        """Words of one base-generator response (no ``<eos>``) to the prompt ``(topic, context)``."""
        cfg = self.config
        length = rng.randint(cfg.min_response_length, cfg.max_response_length)
        state = context[-1] if context else rng.choice(self.distractors)
        keys = self._key_lists[topic]
        words = []
        for _ in range(length):
            if rng.random() < cfg.key_density:
                words.append(rng.choice(keys))
            else:
                state = rng.choices(self.distractors, cum_weights=self.bigram[state])[0]
                words.append(state)
        return words

    def _words_reward(self, topic: int, words: Sequence[str]) -> float:
        rewards = self._rewards[topic]
        return sum(rewards.get(word, 0.0) for word in words)

    def _draw_pair(self, rng: random.Random) -> tuple[str, list[str], list[str]]:
        """``(prompt, higher-reward words, lower-reward words)`` of one pair with distinct rewards."""
        for _ in range(_PROMPT_REDRAWS):
            topic, context = self.sample_prompt(rng)
            first = self.sample_response(topic, context, rng)
            first_reward = self._words_reward(topic, first)
            for _ in range(_RESPONSE_REDRAWS):
                second = self.sample_response(topic, context, rng)
                second_reward = self._words_reward(topic, second)
                if second_reward != first_reward:
                    better, worse = (first, second) if first_reward > second_reward else (second, first)
                    return self.prompt_text(topic, context), better, worse
        raise RuntimeError(f"could not draw a pair with distinct rewards after {_PROMPT_REDRAWS} prompts")

    def _draw_pairs(self, num: int, rng: random.Random) -> list[tuple[str, list[str], list[str]]]:
        return [self._draw_pair(rng) for _ in range(num)]

    @staticmethod
    def _pair_row(pair: tuple[str, list[str], list[str]], flipped: bool) -> dict:
        prompt, better, worse = pair
        chosen, rejected = (worse, better) if flipped else (better, worse)
        return {"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected), "flipped": flipped}

    def pretrain_rows(self, num: int, *, seed: int, tag_fraction: float = 0.5) -> list[dict]:
        """Unlabelled LM corpus ``{"prompt": str, "response": str}`` from the base generator.

        With probability ``tag_fraction`` a row's prompt is prefixed by ``"<good> "`` (response reward > 0) or
        ``"<bad> "`` (reward < 0): the tag is drawn 50/50 and responses are redrawn until the reward's sign
        matches, so a model pretrained on it understands the tags (the TIS-DPO(P) contrastive pair: one
        model prompted with ``"<good> {prompt}"`` vs ``"<bad> {prompt}"``). Responses have no ``<eos>``
        (append ``tokenizer.eos_token`` when training on them so the model learns to stop). The rows
        depend on ``(config.seed, seed)`` only, drawn from a stream separate from the pairs'.
        """
        check_int(num, "num", low=0)
        check_int(seed, "seed", low=0)
        fraction = check_number(tag_fraction, "tag_fraction", low=0.0, high=1.0)
        rng = _stream(self.config.seed, f"pretrain:{seed}")
        rows = []
        for _ in range(num):
            tag = None
            if rng.random() < fraction:
                tag = GOOD_TAG if rng.random() < 0.5 else BAD_TAG
            prompt, words = self._draw_tagged(rng, tag)
            rows.append({"prompt": prompt, "response": " ".join(words)})
        return rows

    def _draw_tagged(self, rng: random.Random, tag: str | None) -> tuple[str, list[str]]:
        """``(prompt, response words)``; with a tag, the response's reward sign matches it."""
        for _ in range(_PROMPT_REDRAWS):
            topic, context = self.sample_prompt(rng)
            prompt = self.prompt_text(topic, context)
            for _ in range(_RESPONSE_REDRAWS):
                words = self.sample_response(topic, context, rng)
                if tag is None:
                    return prompt, words
                reward = self._words_reward(topic, words)
                if (reward > 0) if tag == GOOD_TAG else (reward < 0):
                    return f"{tag} {prompt}", words
        raise RuntimeError(f"could not draw a response matching {tag!r} after {_PROMPT_REDRAWS} prompts")

    # -- rewards ------------------------------------------------------------------------------------

    def topic_of(self, prompt: str) -> int:
        """The topic of a prompt: its first topic word (tags before it are allowed)."""
        for word in prompt.split():
            index = self.word_ids.get(word, -1) - self.topic_offset
            if 0 <= index < self.config.num_topics:
                return index
        raise ValueError(f"prompt has no topic word t0..t{self.config.num_topics - 1}: {prompt!r}")

    def topic_ids(self, prompt_input_ids: torch.Tensor) -> torch.Tensor:
        """long ``[B]``: the topic of each row of prompt token ids ``[B, P]`` (its first topic token).

        Rows may be padded on either side and may contain tag ids. Raises ``ValueError`` for a row without a
        topic token.
        """
        if not isinstance(prompt_input_ids, torch.Tensor) or prompt_input_ids.dim() != 2:
            raise ValueError("prompt_input_ids must be a 2-D tensor [B, P] of token ids")
        offsets = prompt_input_ids.long() - self.topic_offset
        is_topic = (offsets >= 0) & (offsets < self.config.num_topics)
        missing = (~is_topic.any(dim=1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"prompt_input_ids rows {missing[:10]} contain no topic token")
        first = is_topic.int().argmax(dim=1, keepdim=True)
        return offsets.gather(1, first).squeeze(1)

    @staticmethod
    def response_words(response: str) -> list[str]:
        """The words of a response, up to (excluding) the first ``<eos>``."""
        words = response.split()
        return words[:words.index(EOS)] if EOS in words else words

    def token_rewards(self, prompt: str, response: str) -> list[float]:
        """The hidden reward of each response word (up to ``<eos>``) under the prompt's topic."""
        rewards = self._rewards[self.topic_of(prompt)]
        return [rewards.get(word, 0.0) for word in self.response_words(response)]

    def response_reward(self, prompt: str, response: str) -> float:
        """The hidden reward of a response: the sum of :meth:`token_rewards`."""
        return float(sum(self.token_rewards(prompt, response)))

    def rewards_of_ids(self, topics: torch.Tensor, response_ids: torch.Tensor,
                       response_mask: torch.Tensor) -> torch.Tensor:
        """float32 ``[B]``: the hidden reward of token-id responses.

        Args:
            topics: long ``[B]`` topic per row (see :meth:`topic_ids`).
            response_ids: ``[B, L]`` response token ids (values under a 0 mask are never read).
            response_mask: ``[B, L]`` bool or 0/1, 1 where the token counts.
        """
        if response_ids.dim() != 2 or tuple(response_mask.shape) != tuple(response_ids.shape):
            raise ValueError(f"response_ids and response_mask must both be [B, L], got {tuple(response_ids.shape)} "
                             f"and {tuple(response_mask.shape)}")
        if tuple(topics.shape) != (response_ids.shape[0],):
            raise ValueError(f"topics must be [B] = [{response_ids.shape[0]}], got {tuple(topics.shape)}")
        mask = response_mask.bool()
        ids = response_ids.long().masked_fill(~mask, 0)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"response_ids must be in [0, {self.vocab_size}) where response_mask is set")
        table = self.token_reward.to(ids.device)[topics.long()]
        return (table.gather(1, ids) * mask).sum(dim=1)

    # -- oracle weights and labels --------------------------------------------------------------------

    def oracle_scores(self, rows: Sequence[Mapping]) -> list[dict]:
        """Rows with the hidden token rewards as TIS-DPO scores r̂_t, for ``tidpo.weights.weights_from_scores``.

        Each row is copied with ``chosen_scores`` / ``rejected_scores``: one reward per response word, i.e.
        one per response token but the EOS the data pipeline appends (``n`` tokens incl. EOS → ``n - 1``).
        """
        out = []
        for row in rows:
            new = dict(row)
            for side in _SIDES:
                new[f"{side}_scores"] = self.token_rewards(row["prompt"], row[side])
            out.append(new)
        return out

    def key_labels(self, rows: Sequence[Mapping], *, mode: str = "decisive") -> list[dict]:
        """Per row ``{"chosen": [0/1 per word], "rejected": [...]}``, aligned like :meth:`oracle_scores`.

        ``mode="key"``: 1 on key words (reward != 0). ``mode="decisive"``: 1 on the words that support the
        stated preference (reward > 0 in chosen, < 0 in rejected); flipped rows follow their stated sides.
        """
        if mode not in _LABEL_MODES:
            raise ValueError(f"mode must be one of {_LABEL_MODES}, got {mode!r}")
        out = []
        for row in rows:
            labels = {}
            for side in _SIDES:
                rewards = self.token_rewards(row["prompt"], row[side])
                labels[side] = [int(_is_labelled(r, side, mode)) for r in rewards]
            out.append(labels)
        return out


def _is_labelled(reward: float, side: str, mode: str) -> bool:
    if mode == "key":
        return reward != 0
    return reward > 0 if side == "chosen" else reward < 0
