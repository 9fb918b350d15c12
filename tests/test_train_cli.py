"""``tidpo train`` and ``examples/train_lora.py`` end to end on the tiny GPT-2 with the real tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tidpo.apps.assets import gpt2_tokenizer, tiny_gpt2
from tidpo.cli import main as cli_main
from tidpo.cli.train import parse_train_args

ROOT = Path(__file__).resolve().parents[1]


def write_pairs(path: Path, n: int = 10, weights: bool = False) -> Path:
    tok = gpt2_tokenizer()
    g = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for i in range(n):
            row = {"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
                   "rejected": f" Maybe {2 * i + 1}, or something else."}
            if weights:
                for side in ("chosen", "rejected"):
                    n_tok = len(tok(row[side], add_special_tokens=False).input_ids)
                    row[f"{side}_weights"] = (0.7 + 0.6 * torch.rand(n_tok, generator=g)).tolist()
            f.write(json.dumps(row) + "\n")
    return path


def test_help_lists_method_lora_and_training_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--loss", "--beta", "--lora-r", "--lora-target-modules", "--merge-adapter", "--weights",
                 "--learning-rate", "--per-device-train-batch-size", "--output-dir", "--precompute-ref-logps"):
        assert flag in text, flag


def test_parse_applies_cli_defaults_and_validates():
    run, config = parse_train_args(["--model", "tiny-gpt2", "--loss", "tdpo2", "--lora-r", "4",
                                    "--lora-target-modules", "c_attn", "c_proj"])
    assert run.lora_r == 4 and run.lora_target_modules == ["c_attn", "c_proj"]
    assert config.loss == "tdpo2" and config.learning_rate == 5e-5 and config.remove_unused_columns is False
    with pytest.raises(SystemExit):  # argparse refuses it, listing the losses
        parse_train_args(["--loss", "orpo"])
    with pytest.raises(ValueError, match=r"lora_r must be in \[1, inf\)"):
        parse_train_args(["--lora-r", "0"])


def test_train_saves_adapter_and_merged_model(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", weights=True)
    out = tmp_path / "out"
    code = cli_main(["train", "--model", "tiny-gpt2", "--data", str(data), "--eval-size", "2", "--loss", "tis_dpo",
                     "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "3", "--learning-rate", "5e-3",
                     "--per-device-train-batch-size", "2", "--output-dir", str(out), "--use-cpu",
                     "--disable-tqdm", "true", "--merge-adapter"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "eval_rewards/margins" in printed and "saved adapter" in printed
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    summary = json.loads((out / "tidpo_summary.json").read_text())
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]

    # The adapter loads with PEFT on the same base, and the merged model computes the same logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = gpt2_tokenizer()("Question 3: what is 3 plus 3? It is 6.", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(tiny_gpt2(), str(out)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
        base = tiny_gpt2().eval()(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert (merged - base).abs().max() > 1e-4, "the adapter changed nothing"


def test_train_with_separate_weights_file(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    weighted = write_pairs(tmp_path / "weighted.jsonl", weights=True)
    weights = tmp_path / "weights.jsonl"
    weights.write_text("".join(json.dumps({k: json.loads(line)[k] for k in ("chosen_weights", "rejected_weights")})
                               + "\n" for line in weighted.read_text().splitlines()))
    code = cli_main(["train", "--model", "tiny-gpt2", "--data", str(data), "--weights", str(weights), "--eval-size",
                     "0", "--loss", "tis_dpo", "--max-steps", "1", "--output-dir", str(tmp_path / "o"), "--use-cpu",
                     "--disable-tqdm", "true"])
    assert code == 0
    short = tmp_path / "short.jsonl"
    short.write_text("".join(weights.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match="10.*9|9.*10"):
        cli_main(["train", "--model", "tiny-gpt2", "--data", str(data), "--weights", str(short), "--loss", "tis_dpo",
                  "--max-steps", "1", "--output-dir", str(tmp_path / "o2"), "--use-cpu", "--debug"])


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        cli_main(["train", "--model", str(tmp_path / "nope"), "--data", str(write_pairs(tmp_path / "p.jsonl")),
                  "--output-dir", str(tmp_path / "o"), "--debug"])


def test_example_script_runs(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=12)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_lora.py"), "--model", "tiny-gpt2",
                           "--data", str(data), "--max-steps", "2", "--output-dir", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "eval_rewards/margins" in proc.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_export_pairs_writes_the_embedded_splits(tmp_path):
    from tidpo.apps.embedded import chatterbot_pairs
    from tidpo.data import load_preference_rows
    from tidpo.data.loading import ROW_ORIGIN

    out, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    assert cli_main(["export-pairs", "--out", str(out), "--heldout-out", str(held), "--max-train-pairs", "10",
                     "--eval-size", "4", "--plain"]) == 0
    train_rows, held_rows = ([{k: v for k, v in row.items() if k != ROW_ORIGIN} for row in load_preference_rows(path)]
                             for path in (out, held))
    expected_train, expected_held = chatterbot_pairs(num_heldout=4, conversational=False, max_reply_words=24)
    assert train_rows == expected_train[:10] and held_rows == expected_held
    assert all(isinstance(r["chosen"], str) for r in train_rows)


def test_sft_and_reverse_builders_run(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    for extra in (["--loss", "sft"], ["--loss", "sft", "--reverse"], ["--loss", "dpo", "--reverse"]):
        out = tmp_path / "_".join(extra).replace("-", "")
        assert cli_main(["train", "--model", "tiny-gpt2", "--data", str(data), "--eval-size", "2", *extra,
                         "--max-steps", "2", "--output-dir", str(out), "--use-cpu", "--disable-tqdm", "true",
                         "--merge-adapter"]) == 0
        assert (out / "merged" / "config.json").is_file()
        summary = json.loads((out / "tidpo_summary.json").read_text())
        key = "eval_sft/nll" if "sft" in extra else "eval_rewards/margins"
        assert key in summary["eval_after"]


@pytest.mark.parametrize("eval_size", [0, 1, 3])
def test_embedded_data_holds_out_exactly_eval_size_pairs(eval_size):
    from tidpo.cli.train import RunArguments, load_train_eval_rows

    train, held_out = load_train_eval_rows(RunArguments(data="embedded", eval_size=eval_size))
    everything, _ = load_train_eval_rows(RunArguments(data="embedded", eval_size=0))
    assert (held_out is None) if eval_size == 0 else len(held_out) == eval_size
    assert train and all(row not in train for row in held_out or [])
    assert len(everything) >= len(train) + eval_size
