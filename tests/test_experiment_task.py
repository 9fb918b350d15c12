"""The synthetic preference task of the token-weighting experiment and its metrics."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from tidpo.apps.experiment.metrics import mean_std, roc_auc, weight_auc
from tidpo.apps.experiment.task import SyntheticTask, TaskConfig
from tidpo.data import tokenize_preference_rows
from tidpo.weights import TRANSFORMS
from tidpo.weights.estimate import METHOD_PARAMS, weights_from_scores

SMALL = TaskConfig(num_train=64, num_heldout=32, seed=3)


@pytest.fixture(scope="module")
def task() -> SyntheticTask:
    return SyntheticTask(dataclasses.replace(SMALL, noise=0.25))


def _reward(task: SyntheticTask, row: dict, side: str) -> float:
    return task.response_reward(row["prompt"], row[side])


def _unflipped(row: dict) -> tuple[str, str, str]:
    """``(prompt, higher-reward response, lower-reward response)`` of a row, undoing its flip."""
    if row["flipped"]:
        return row["prompt"], row["rejected"], row["chosen"]
    return row["prompt"], row["chosen"], row["rejected"]


# ----------------------------------------------------------------------------------------------------
# rows: determinism, noise, held-out
# ----------------------------------------------------------------------------------------------------


def test_same_config_same_rows_other_seed_other_rows():
    first, second = SyntheticTask(SMALL), SyntheticTask(SMALL)
    assert first.train_rows == second.train_rows
    assert first.heldout_rows == second.heldout_rows
    assert torch.equal(first.token_reward, second.token_reward)
    assert first.pretrain_rows(20, seed=1) == second.pretrain_rows(20, seed=1)
    assert first.pretrain_rows(20, seed=1) != first.pretrain_rows(20, seed=2)
    other = SyntheticTask(dataclasses.replace(SMALL, seed=4))
    assert other.train_rows != first.train_rows
    assert other.heldout_rows != first.heldout_rows


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.3, 0.49])
def test_noise_flips_exact_count_and_shares_pairs(noise):
    clean = SyntheticTask(SMALL)
    noisy = SyntheticTask(dataclasses.replace(SMALL, noise=noise))
    assert noisy.heldout_rows == clean.heldout_rows
    assert [_unflipped(row) for row in noisy.train_rows] == [_unflipped(row) for row in clean.train_rows]
    assert sum(row["flipped"] for row in noisy.train_rows) == round(noise * SMALL.num_train)
    assert not any(row["flipped"] for row in clean.train_rows + noisy.heldout_rows)
    for row in noisy.train_rows + noisy.heldout_rows:
        chosen, rejected = _reward(noisy, row, "chosen"), _reward(noisy, row, "rejected")
        assert (chosen < rejected) if row["flipped"] else (chosen > rejected), row


def test_flips_are_nested_across_noise_levels():
    flipped = [{i for i, row in enumerate(SyntheticTask(dataclasses.replace(SMALL, noise=n)).train_rows)
                if row["flipped"]} for n in (0.1, 0.2, 0.4)]
    assert flipped[0] < flipped[1] < flipped[2]


def test_rows_format(task):
    for row in task.train_rows + task.heldout_rows:
        assert set(row) == {"prompt", "chosen", "rejected", "flipped"}
        words = row["prompt"].split()
        assert words[0].startswith("t") and len(words) == 1 + task.config.context_length
        for side in ("chosen", "rejected"):
            response = row[side].split()
            assert task.config.min_response_length <= len(response) <= task.config.max_response_length
            assert " ".join(response) == row[side] and "<eos>" not in response
            assert all(word.startswith("w") for word in response)


# ----------------------------------------------------------------------------------------------------
# tokenizer and rewards
# ----------------------------------------------------------------------------------------------------


def test_tokenizer_one_id_per_word(task):
    tok = task.tokenizer
    assert task.vocab_size == len(tok) == 5 + task.config.num_topics + task.config.num_words
    assert tok.pad_token == "<pad>" and tok.pad_token_id is not None
    assert tok.eos_token == "<eos>" and tok.eos_token_id is not None and tok.eos_token_id != tok.pad_token_id
    assert tok.padding_side == "right"
    vocab = tok.get_vocab()
    for word in ["<unk>", "<good>", "<bad>", *(f"t{c}" for c in range(task.config.num_topics))]:
        assert word in vocab
    assert tok("t1 w3 w5", add_special_tokens=False).input_ids == [vocab["t1"], vocab["w3"], vocab["w5"]]
    for row in task.train_rows[:10]:
        text = f"<good> {row['prompt']} {row['chosen']} <eos>"
        ids = tok(text, add_special_tokens=True).input_ids
        assert len(ids) == len(text.split())
        assert tok.convert_ids_to_tokens(ids) == text.split()
        assert tok.decode(ids) == text


def test_token_reward_table(task):
    cfg = task.config
    assert task.token_reward.dtype == torch.float32
    assert tuple(task.token_reward.shape) == (cfg.num_topics, task.vocab_size)
    for topic in range(cfg.num_topics):
        row = task.token_reward[topic]
        assert int((row == 1).sum()) == int((row == -1).sum()) == cfg.keys_per_topic // 2
        assert int((row != 0).sum()) == cfg.keys_per_topic
        assert torch.all(row[:task.content_offset] == 0)  # specials, tags, topic words
    distractor_ids = [task.word_ids[word] for word in task.distractors]
    assert torch.all(task.token_reward[:, distractor_ids] == 0)
    assert cfg.disjoint_keys and int((task.token_reward != 0).sum(0).max()) == 1


def test_shared_key_pool_when_keys_do_not_fit():
    task = SyntheticTask(TaskConfig(num_topics=3, num_words=10, keys_per_topic=4, num_train=8, num_heldout=4))
    assert not task.config.disjoint_keys
    assert len({frozenset(keys) for keys in task.keys}) == 1
    assert len(task.distractors) == 6
    assert torch.all((task.token_reward != 0).sum(1) == 4)


def test_rewards_agree(task):
    rows = task.train_rows + task.heldout_rows
    for row in rows:
        for side in ("chosen", "rejected"):
            rewards = task.token_rewards(row["prompt"], row[side])
            assert len(rewards) == len(row[side].split())
            assert task.response_reward(row["prompt"], row[side]) == sum(rewards)
            assert task.response_reward(row["prompt"], row[side] + " <eos> w0 w1") == sum(rewards)
    tok = task.tokenizer
    prompts = tok([f"<bad> {row['prompt']}" for row in rows], add_special_tokens=False)["input_ids"]
    width = max(map(len, prompts))
    left_padded = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    topics = task.topic_ids(left_padded)
    assert topics.tolist() == [task.topic_of(row["prompt"]) for row in rows]
    assert task.topic_of("<good> t2 w1") == 2
    batch = tok([row["chosen"] for row in rows], add_special_tokens=False, padding=True, return_tensors="pt")
    rewards = task.rewards_of_ids(topics, batch["input_ids"], batch["attention_mask"])
    assert rewards.dtype == torch.float32
    expected = torch.tensor([task.response_reward(row["prompt"], row["chosen"]) for row in rows])
    assert torch.equal(rewards, expected)
    garbage = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 10**6)
    assert torch.equal(task.rewards_of_ids(topics, garbage, batch["attention_mask"].bool()), expected)


def test_topic_ids_rejects_rows_without_topic(task):
    ids = torch.tensor([[task.word_ids["t0"], 7], [task.word_ids["<good>"], task.word_ids["w1"]]])
    with pytest.raises(ValueError, match="no topic"):
        task.topic_ids(ids)
    with pytest.raises(ValueError, match="topic"):
        task.topic_of("<good> w1 w2")


# ----------------------------------------------------------------------------------------------------
# oracle scores, weights and labels
# ----------------------------------------------------------------------------------------------------


def test_oracle_scores_align_with_tokenized_weights(task):
    assert "rank_based" in TRANSFORMS and "rank_based" in METHOD_PARAMS
    rows = task.train_rows[:16]
    scored = task.oracle_scores(rows)
    assert [dict(row) for row in rows] == [{k: v for k, v in s.items() if not k.endswith("_scores")} for s in scored]
    weighted = weights_from_scores(scored, method="rank_based")
    dataset = tokenize_preference_rows(weighted, task.tokenizer, max_length=64, max_prompt_length=16,
                                       require_weights=True, progress=False)
    for index, row in enumerate(weighted):
        item = dataset[index]
        for side in ("chosen", "rejected"):
            ids = item[f"{side}_input_ids"]
            assert len(row[f"{side}_scores"]) == len(ids) - 1 == len(row[side].split())
            assert ids[-1] == task.tokenizer.eos_token_id
            assert item[f"{side}_weights"] == pytest.approx(row[f"{side}_weights"] + [0.0])


def test_key_labels(task):
    rows = task.train_rows
    scored = task.oracle_scores(rows)
    keys = task.key_labels(rows, mode="key")
    decisive = task.key_labels(rows)
    for scores, key, dec in zip(scored, keys, decisive, strict=True):
        for side, sign in (("chosen", 1), ("rejected", -1)):
            rewards = scores[f"{side}_scores"]
            assert key[side] == [int(r != 0) for r in rewards]
            assert dec[side] == [int(r * sign > 0) for r in rewards]
    # the oracle's own rank-based weights separate the decisive tokens perfectly
    weighted = weights_from_scores(scored, method="rank_based")
    assert weight_auc(weighted, decisive) > 0.95
    with pytest.raises(ValueError, match="mode"):
        task.key_labels(rows, mode="nope")


def test_key_density_of_the_generator():
    task = SyntheticTask(dataclasses.replace(SMALL, key_density=0.3))
    rows = task.pretrain_rows(800, seed=5, tag_fraction=0.0)
    rewards = [r for row in rows for r in task.token_rewards(row["prompt"], row["response"])]
    assert len(rewards) > 5000
    assert abs(sum(r != 0 for r in rewards) / len(rewards) - 0.3) < 0.03
    assert abs(sum(r > 0 for r in rewards) / len(rewards) - 0.15) < 0.03


def test_pretrain_rows_tags(task):
    rows = task.pretrain_rows(600, seed=0, tag_fraction=0.4)
    tags = {"<good>": 0, "<bad>": 0, None: 0}
    for row in rows:
        assert set(row) == {"prompt", "response"}
        first = row["prompt"].split()[0]
        tag = first if first in ("<good>", "<bad>") else None
        tags[tag] += 1
        reward = task.response_reward(row["prompt"], row["response"])
        if tag == "<good>":
            assert reward > 0
        elif tag == "<bad>":
            assert reward < 0
    assert abs((tags["<good>"] + tags["<bad>"]) / len(rows) - 0.4) < 0.07
    assert abs(tags["<good>"] - tags["<bad>"]) < 0.15 * len(rows)
    assert all(not row["prompt"].startswith("<") for row in task.pretrain_rows(50, seed=0, tag_fraction=0.0))
    with pytest.raises(ValueError, match="tag_fraction"):
        task.pretrain_rows(5, seed=0, tag_fraction=1.5)


# ----------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------


def _brute_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pair_count(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 120)
    scores = [rng.randint(0, 6) / 2 for _ in range(n)]          # many ties
    labels = [rng.randint(0, 1) for _ in range(n)]
    labels[0], labels[1] = 0, 1
    assert roc_auc(scores, labels) == pytest.approx(_brute_auc(scores, labels), abs=1e-12)
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(_brute_auc(scores, labels), abs=1e-12)


def test_roc_auc_extremes_and_errors():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert roc_auc([1.0, 1.0, 1.0], [0, 1, 1]) == 0.5
    with pytest.raises(ValueError, match="length"):
        roc_auc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="scores"):
        roc_auc([math.nan, 0.2], [0, 1])


def test_weight_auc_uses_leading_weights_and_checks_lengths():
    weights = [{"chosen_weights": [1.3, 0.7, 0.0], "rejected_weights": [0.7, 1.3, 0.0]}]
    labels = [{"chosen": [1, 0], "rejected": [0, 1]}]
    assert weight_auc(weights, labels) == 1.0
    assert weight_auc(weights, [{"chosen": [0, 1], "rejected": [1, 0]}]) == 0.0
    with pytest.raises(ValueError, match="chosen_weights"):
        weight_auc([{"chosen_weights": [1.0], "rejected_weights": [1.0, 1.0]}], labels)
    with pytest.raises(ValueError, match="same length"):
        weight_auc(weights, labels * 2)


def test_mean_std():
    assert mean_std([2.0]) == (2.0, 0.0)
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std().item())
    with pytest.raises(ValueError, match="empty"):
        mean_std([])


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("num_topics", 0), ("num_topics", 1.5), ("num_words", 1), ("keys_per_topic", 3), ("keys_per_topic", 0),
    ("keys_per_topic", 40), ("key_density", 0.0), ("key_density", 1.5), ("key_density", math.nan),
    ("min_response_length", 0), ("max_response_length", 5), ("context_length", -1), ("num_train", 0),
    ("num_heldout", 0), ("noise", 0.5), ("noise", -0.1), ("noise", "0.1"), ("seed", -1), ("seed", True),
])
def test_config_validation_names_the_field(field, value):
    wrong_kind = isinstance(value, (str, bool)) or (field in ("num_topics", "seed") and isinstance(value, float))
    with pytest.raises(TypeError if wrong_kind else ValueError, match=field):
        TaskConfig(**{field: value})


def test_task_requires_a_config():
    with pytest.raises(TypeError, match="TaskConfig"):
        SyntheticTask({"seed": 0})
