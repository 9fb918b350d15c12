"""The embedded default: chatterbot preference pairs and SmolLM2-135M-Instruct converted from its GGUF file.

The pair tests parse the corpus YAML themselves and check every row against it. The model tests
(``slow``) convert the GGUF once into the default cache, which later runs reuse, and compare the
converted folder with the GGUF-loaded model and tokenizer; the concurrency test converts again into
an empty temporary cache from two processes at once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

from tidpo.apps.assets import package_data_dir
from tidpo.apps.embedded import (
    SMOLLM2_PAD_TOKEN,
    chatterbot_pairs,
    dialog_turns,
    load_smollm2,
    smollm2_dir,
    smollm2_gguf,
    write_jsonl,
)
from tidpo.apps.embedded import model as embedded_model

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


@pytest.fixture(scope="module")
def corpus():
    """The corpus parsed here, independently: consecutive string turns of each conversation list."""
    folder = package_data_dir("chatterbot_corpus") / "data" / "english"
    turns = []
    for path in sorted(folder.glob("*.yml")):
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
        for conv in data["conversations"]:
            if isinstance(conv, list):
                for i in range(len(conv) - 1):
                    a, b = conv[i], conv[i + 1]
                    if isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip():
                        turns.append((path.stem, a.strip(), b.strip()))
    replies_by_prompt, categories_by_reply = defaultdict(set), defaultdict(set)
    for category, prompt, reply in turns:
        replies_by_prompt[_norm(prompt)].add(_norm(reply))
        categories_by_reply[reply].add(category)
    return {"turns": set(turns), "ordered": turns, "stems": {p.stem for p in folder.glob("*.yml")},
            "replies_by_prompt": replies_by_prompt, "categories_by_reply": categories_by_reply}


def _text(field):
    return field[0]["content"] if isinstance(field, list) else field


# ---------------------------------------------------------------------------------------------- pairs


def test_pairs_are_deterministic_per_seed_and_differ_across_seeds():
    assert chatterbot_pairs(seed=0) == chatterbot_pairs(seed=0)
    (train0, held0), (train1, held1) = chatterbot_pairs(seed=0), chatterbot_pairs(seed=1)
    assert {_text(r["prompt"]) for r in held0} != {_text(r["prompt"]) for r in held1}
    assert [r["rejected"] for r in train0] != [r["rejected"] for r in train1]


def test_every_chosen_reply_follows_its_prompt_in_the_corpus(corpus):
    train, held = chatterbot_pairs(seed=3)
    replies = {reply for _, _, reply in corpus["turns"]}
    for row in train + held:
        prompt, chosen, rejected = _text(row["prompt"]), _text(row["chosen"]), _text(row["rejected"])
        assert (row["category"], prompt, chosen) in corpus["turns"]
        assert rejected in replies


def test_rejected_is_an_off_topic_reply_never_a_reply_to_the_prompt(corpus):
    train, held = chatterbot_pairs(seed=0)
    for row in train + held:
        prompt, chosen, rejected = _text(row["prompt"]), _text(row["chosen"]), _text(row["rejected"])
        assert rejected != chosen
        assert _norm(rejected) not in corpus["replies_by_prompt"][_norm(prompt)]
        # Drawn from another category file: the rejected text occurs in a category other than the row's.
        assert corpus["categories_by_reply"][rejected] - {row["category"]}


def test_splits_have_disjoint_prompts_and_the_requested_sizes():
    for seed, num_heldout in ((0, 64), (5, 10), (2, 0)):
        train, held = chatterbot_pairs(seed=seed, num_heldout=num_heldout)
        assert len(held) == num_heldout
        train_prompts = [_norm(_text(r["prompt"])) for r in train]
        held_prompts = [_norm(_text(r["prompt"])) for r in held]
        assert len(set(train_prompts)) == len(train_prompts) and len(set(held_prompts)) == len(held_prompts)
        assert not set(train_prompts) & set(held_prompts)
        # Rejected replies come from the same split: held-out chosen replies never appear in training.
        held_chosen = {_text(r["chosen"]) for r in held}
        assert not held_chosen & {_text(r["rejected"]) for r in train} - {_text(r["chosen"]) for r in train}


def test_counts_match_the_corpus(corpus):
    """One row per distinct prompt (whitespace/case-insensitive) that has a reply within the word limit."""
    for limit in (64, 12, None):
        train, held = chatterbot_pairs(max_reply_words=limit)
        expected = {_norm(p) for _, p, r in corpus["turns"] if limit is None or len(r.split()) <= limit}
        assert len(train) + len(held) == len(expected)
        assert {_norm(_text(r["prompt"])) for r in train + held} == expected
        if limit is not None:
            for row in train + held:
                assert len(_text(row["chosen"]).split()) <= limit and len(_text(row["rejected"]).split()) <= limit
    train, held = chatterbot_pairs()
    assert 900 < len(train) + len(held) < len(corpus["ordered"])  # many prompts recur with several replies
    assert {r["category"] for r in train + held} == corpus["stems"]  # every category file contributes


def test_first_reply_to_each_prompt_is_kept(corpus):
    train, held = chatterbot_pairs(max_reply_words=None)
    first = {}
    for _, prompt, reply in corpus["ordered"]:
        first.setdefault(_norm(prompt), reply)
    for row in train + held:
        assert _text(row["chosen"]) == first[_norm(_text(row["prompt"]))]


def test_conversational_and_plain_formats():
    conv_train, conv_held = chatterbot_pairs(seed=4, conversational=True)
    plain_train, plain_held = chatterbot_pairs(seed=4, conversational=False)
    for conv, plain in zip(conv_train + conv_held, plain_train + plain_held, strict=True):
        assert set(conv) == set(plain) == {"prompt", "chosen", "rejected", "category"}
        assert conv["prompt"] == [{"role": "user", "content": plain["prompt"]}]
        assert conv["chosen"] == [{"role": "assistant", "content": plain["chosen"]}]
        assert conv["rejected"] == [{"role": "assistant", "content": plain["rejected"]}]
        assert conv["category"] == plain["category"]
        assert all(isinstance(plain[k], str) and plain[k] == plain[k].strip() and plain[k]
                   for k in ("prompt", "chosen", "rejected"))


@pytest.mark.parametrize("kwargs", [{"num_heldout": 1}, {"num_heldout": -1}, {"num_heldout": 10_000},
                                    {"num_heldout": 2.0}, {"max_reply_words": 0}])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        chatterbot_pairs(**kwargs)


def test_dialog_turns_skips_malformed_entries(tmp_path):
    (tmp_path / "mini.yml").write_text(
        "categories:\n- mini\nconversations:\n"
        "- - '  Hello there '\n  - General Kenobi.\n  - You are a bold one.\n"
        "- A malformed entry, not a list\n"
        "- - What year?\n  - 1963\n"          # an int reply: dropped
        "- - ''\n  - orphan reply\n"          # an empty prompt: dropped
        "- - Lonely prompt\n",
        encoding="utf-8")
    assert dialog_turns(tmp_path) == [
        {"category": "mini", "prompt": "Hello there", "reply": "General Kenobi."},
        {"category": "mini", "prompt": "General Kenobi.", "reply": "You are a bold one."},
    ]
    (tmp_path / "broken.yml").write_text("categories: [x]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="conversations"):
        dialog_turns(tmp_path)


def test_write_jsonl_round_trip(tmp_path):
    train, _ = chatterbot_pairs(seed=0)
    rows = [*train[:5], {"prompt": "café 東京 🙂", "chosen": "a\nb", "rejected": "\"q\"", "category": "x"}]
    path = write_jsonl(rows, tmp_path / "sub" / "pairs.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert "東京" in lines[-1]  # non-ASCII kept as is
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temporary file left


# ------------------------------------------------------------------------------- conversion mechanics


def _fake_folder(path: Path, *, marker: bool, gguf: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (path / name).write_text("{}", encoding="utf-8")
    if marker:
        import transformers

        (path / embedded_model.MARKER_FILE).write_text(json.dumps({
            "format": embedded_model.CONVERSION_FORMAT, "source": gguf.name, "source_bytes": gguf.stat().st_size,
            "versions": {"transformers": transformers.__version__}}), encoding="utf-8")
    return path


def test_completeness_is_defined_by_the_marker(tmp_path):
    gguf = smollm2_gguf()
    good = _fake_folder(tmp_path / "good", marker=True, gguf=gguf)
    assert embedded_model.is_complete(good, gguf)
    assert not embedded_model.is_complete(_fake_folder(tmp_path / "bare", marker=False, gguf=gguf), gguf)
    marker = json.loads((good / embedded_model.MARKER_FILE).read_text(encoding="utf-8"))
    for key, value in (("source_bytes", 1), ("format", -1), ("versions", {"transformers": "1.0.0"})):
        (good / embedded_model.MARKER_FILE).write_text(json.dumps({**marker, key: value}), encoding="utf-8")
        assert not embedded_model.is_complete(good, gguf), key
    (good / embedded_model.MARKER_FILE).write_text("{not json", encoding="utf-8")
    assert not embedded_model.is_complete(good, gguf)


def test_publish_discards_its_copy_when_another_process_won(tmp_path):
    gguf = smollm2_gguf()
    dst = _fake_folder(tmp_path / "SmolLM2", marker=True, gguf=gguf)
    (dst / "winner").touch()
    tmp = _fake_folder(tmp_path / ".SmolLM2.tmp-x", marker=True, gguf=gguf)
    assert embedded_model._publish(tmp, dst, gguf) is False
    assert not tmp.exists() and (dst / "winner").exists()


def test_publish_replaces_an_incomplete_folder(tmp_path):
    gguf = smollm2_gguf()
    dst = _fake_folder(tmp_path / "SmolLM2", marker=False, gguf=gguf)
    tmp = _fake_folder(tmp_path / ".SmolLM2.tmp-x", marker=True, gguf=gguf)
    assert embedded_model._publish(tmp, dst, gguf) is True
    assert embedded_model.is_complete(dst, gguf) and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2"]  # the incomplete copy is gone too


def test_stale_builds_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    host, dst = socket.gethostname(), tmp_path / "SmolLM2"
    stale = tmp_path / f".SmolLM2.tmp-{host}-{int(dead.stdout)}-abcd1234"
    live = tmp_path / f".SmolLM2.tmp-{host}-{os.getpid()}-abcd1234"
    stale.mkdir()
    live.mkdir()
    embedded_model._remove_stale_builds(dst)
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def folder():
    """The converted folder in the default cache (converted on the first run, reused afterwards)."""
    return smollm2_dir()


@pytest.fixture(scope="module")
def gguf_model():
    """Tokenizer and fp32 model loaded from the GGUF file itself (the reference; ~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    return model.eval(), tok


@pytest.fixture(scope="module")
def smollm2(folder):
    return load_smollm2()


@pytest.mark.slow
def test_folder_is_a_complete_plain_checkpoint(folder):
    assert embedded_model.is_complete(folder)
    marker = json.loads((folder / "tidpo-conversion.json").read_text(encoding="utf-8"))
    assert marker["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert marker["source_bytes"] == smollm2_gguf().stat().st_size
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"]) == ("llama", 49152, 30)
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}  # noqa: SIM118
    assert smollm2_dir() == folder  # a second call reuses it


@pytest.mark.slow
def test_folder_model_gives_the_gguf_logits(smollm2, gguf_model):
    model, tok = smollm2
    reference, _ = gguf_model
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    chat = [*CHAT, {"role": "assistant", "content": "Paris is the capital of France."}]
    ids = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = model(**ids).logits, reference(**ids).logits
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_tokenizer_matches_the_gguf_tokenizer(smollm2, gguf_model):
    tok, (_, ref) = smollm2[1], gguf_model
    texts = ["Hello world", "  leading spaces and trailing  ", "naïve café 東京 🙂\n\ttab",
             "<|im_start|>user\nHi<|im_end|>\n", "x = [1, 2, 3]  # 42"]
    chats = [CHAT, [{"role": "system", "content": "Be terse."}, *CHAT],
             [*CHAT, {"role": "assistant", "content": "Paris."}]]
    for chat in chats:
        for generation_prompt in (False, True):
            rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
            assert rendered == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
            texts.append(rendered)
    for text in texts:
        assert tok(text).input_ids == ref(text).input_ids, text
        assert tok.decode(tok(text).input_ids) == text
    assert len(tok) == len(ref) == 49152
    # Pinned behaviour (transformers >= 5): no BOS is added to plain text.
    assert tok("Hello world").input_ids == [19556, 905]
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)


@pytest.mark.slow
def test_chat_template_adds_a_default_system_turn_and_ends_turns_with_im_end(smollm2):
    tok = smollm2[1]
    rendered = tok.apply_chat_template([*CHAT, {"role": "assistant", "content": "Paris."}], tokenize=False)
    assert rendered == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                        "<|im_start|>assistant\nParis.<|im_end|>\n")


@pytest.mark.slow
def test_load_smollm2_pads_with_a_token_other_than_eos(folder):
    model, tok = load_smollm2(dtype=torch.bfloat16)
    assert tok.pad_token == SMOLLM2_PAD_TOKEN and tok.pad_token_id == 0 != tok.eos_token_id
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # The checkpoint itself keeps the GGUF's choice (pad = eos = <|im_end|>).
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder, local_files_only=True).pad_token == "<|im_end|>"


@pytest.mark.slow
def test_greedy_answer_names_paris(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_concurrent_conversion_into_an_empty_cache(tmp_path):
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(message)s'); "
            "from tidpo.apps.embedded import smollm2_dir; print(smollm2_dir())")
    env = {**os.environ, "TIDPO_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert out.strip() == str(tmp_path / "SmolLM2-135M-Instruct")
    logs = "".join(err for _, err in results)
    assert logs.count("Converting SmolLM2-135M-Instruct.Q4_1.gguf") == 1, logs[-3000:]  # the other one waited
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["SmolLM2-135M-Instruct"]
    assert embedded_model.is_complete(tmp_path / "SmolLM2-135M-Instruct")
