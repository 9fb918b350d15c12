"""What a new user meets on the command line and in the README: one-line errors, flags that follow
``--max-length``, reruns a refused job cannot block, one set of names, helpers for your own loop, and the
layout (the library core never imports the applications or the commands)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tidpo
from tidpo.apps.assets import gpt2_tokenizer
from tidpo.cli import main as cli_main
from tidpo.cli.train import parse_train_args
from tidpo.data import load_preference_rows, tokenize_preference_rows

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pairs(n: int = 6) -> list[dict]:
    return [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
             "rejected": f" Maybe {2 * i + 1}."} for i in range(n)]


def one_line_error(capsys, call) -> str:
    """Run a CLI call that must fail: exit status 2 and one stderr line ``tidpo <command>: error: ...``."""
    try:
        code = call()
    except SystemExit as stop:  # argparse errors
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


# ------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("case", ["loss", "truncation_mode", "no_rejected", "empty_chosen", "empty_after_split",
                                  "model_path", "weights_rows", "negative_steps", "zero_accumulation"])
def test_train_errors_are_one_line(tmp_path, capsys, case):
    good = write_rows(tmp_path / "pairs.jsonl", pairs())
    argv = ["train", "--model", "tiny-gpt2", "--data", str(good), "--eval-size", "0", "--max-steps", "1",
            "--output-dir", str(tmp_path / "out")]
    expected = {
        "loss": (["--loss", "tisdpo"], "argument --loss: invalid choice: 'tisdpo' (choose from 'dpo'"),
        "truncation_mode": (["--truncation-mode", "keepend"], "invalid choice: 'keepend'"),
        "no_rejected": (["--data", str(write_rows(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "c"}]))],
                        "a.jsonl line 1 has no 'rejected' column"),
        "empty_chosen": (["--data", str(write_rows(tmp_path / "b.jsonl", [{**pairs()[0], "chosen": " "}] * 3))],
                         "b.jsonl line 1: 'chosen' is empty"),
        # The held-out split reorders the rows: the message still names the file line of the bad row.
        "empty_after_split": (["--eval-size", "3", "--data", str(write_rows(
            tmp_path / "c.jsonl", [*pairs(9), {**pairs()[0], "chosen": " "}]))], "c.jsonl line 10: 'chosen' is"),
        "model_path": (["--model", str(tmp_path / "nowhere")], "is not a local folder"),
        "weights_rows": (["--loss", "tis_dpo", "--weights", str(write_rows(tmp_path / "w.jsonl", [
            {"chosen_weights": [1.0], "rejected_weights": [1.0]}] * 2))], "weights has 2 rows but"),
        "negative_steps": (["--max-steps", "-5"], "--max-steps must be a positive integer or -1"),
        "zero_accumulation": (["--gradient-accumulation-steps", "0"],
                              "--gradient-accumulation-steps must be in [1, inf)"),
    }[case]
    line = one_line_error(capsys, lambda: cli_main([*argv, *expected[0]]))
    assert line.startswith("tidpo train: error: ") and expected[1] in line, line
    if case in ("no_rejected", "model_path"):
        with pytest.raises((ValueError, FileNotFoundError)):  # --debug: the exception itself, with its traceback
            cli_main([*argv, *expected[0], "--debug"])


def test_other_commands_fail_in_one_line_too(tmp_path, capsys):
    line = one_line_error(capsys, lambda: cli_main(["demo", "--max-steps", "0"]))
    assert line.startswith("tidpo demo: error: argument --max-steps: must be a positive integer")
    line = one_line_error(capsys, lambda: cli_main(["estimate-weights", "--positive", "x", "--negative", "x",
                                                    "--data", str(tmp_path / "none.jsonl"), "--out",
                                                    str(tmp_path / "w.jsonl")]))
    assert line.startswith("tidpo estimate-weights: error: --data file or folder") and "does not exist" in line
    line = one_line_error(capsys, lambda: cli_main(["experiment", "--noise", "0.7", "--output-dir",
                                                    str(tmp_path)]))
    assert line.startswith("tidpo experiment: error: --noise")
    line = one_line_error(capsys, lambda: cli_main(["nope"]))
    assert line.startswith("tidpo: error: argument COMMAND: invalid choice")


@pytest.mark.parametrize("argv, expected", [
    # Library names become the command's flags (dashes) in errors.
    (["train", "--max-length", "64", "--max-prompt-length", "64"],
     "tidpo train: error: --max-prompt-length (64) must be smaller than --max-length (64)"),
    (["train", "--eval-size", "-1"], "tidpo train: error: --eval-size must be in [0, inf)"),
    (["train", "--lora-last-layers", "5"], "tidpo train: error: --lora-last-layers (5) exceeds the model's 2 layers"),
    (["train", "--gamma", "0.5"], "tidpo train: error: --gamma=0.5 is not read by --loss='dpo'"),
    (["estimate-weights", "--positive", "tiny-gpt2", "--negative", "tiny-gpt2", "--transform", "exp_clamp",
      "--lower", "2", "--upper", "1"], "tidpo estimate-weights: error: --lower must be <= upper, got --lower=2"),
    (["estimate-weights", "--positive", "tiny-gpt2", "--negative", "tiny-gpt2", "--transform", "exp_clamp",
      "--k", "1e308"], "tidpo estimate-weights: error: the 'exp_clamp' transform with these parameters gives "
                       "weights beyond float32's range"),
    (["demo", "--eval-size", "5000", "--model", "tiny-gpt2"],
     "tidpo demo: error: --eval-size (5000) must leave at least 2 of the corpus's"),
    # Unknown flags are the command's error, not the top-level parser's; --debug may precede the command.
    (["demo", "--bogus"], "tidpo demo: error: unrecognized arguments: --bogus"),
    (["export-pairs", "--out", "x.jsonl", "extra"], "tidpo export-pairs: error: unrecognized arguments: extra"),
    (["demo", "--learning-rate", "-1"], "tidpo demo: error: argument --learning-rate: must be a positive number"),
])
def test_errors_speak_in_flags(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "estimate-weights":
        argv = [*argv, "--data", str(write_rows(tmp_path / "d.jsonl", pairs(2))), "--out", "w.jsonl"]
    elif argv[0] == "train":
        argv = [*argv, "--model", "tiny-gpt2", "--data", str(write_rows(tmp_path / "d.jsonl", pairs(4))),
                "--eval-size" if "--eval-size" not in argv else "--max-steps", "0" if "--eval-size" not in argv
                else "1", "--output-dir", "out"]
    line = one_line_error(capsys, lambda: cli_main(argv))
    assert line.startswith(expected), line


def test_debug_before_the_command_and_one_line_warnings(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="is not a local folder"):
        cli_main(["--debug", "train", "--model", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        cli_main(["--debug", "quickstart", "--bogus"])
    assert "tidpo quickstart: error: unrecognized arguments: --bogus" in capsys.readouterr().err
    assert cli_main(["quickstart", "--steps", "1", "--log-every", "1"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tidpo quickstart: warning: --steps is deprecated and will be removed in the next release; use "
                   "--max-steps"], err
    line = one_line_error(capsys, lambda: cli_main(["export-pairs", "--out", str(tmp_path)]))
    assert line.startswith(f"tidpo export-pairs: error: {str(tmp_path)!r} is a folder"), line


def test_experiment_takes_the_shared_names():
    from tidpo.cli.experiment import config_from_args

    parser = __import__("tidpo.cli", fromlist=["build_parser"]).build_parser()
    config = config_from_args(parser.parse_args(["experiment", "--preset", "smoke", "--train-size", "24",
                                                 "--eval-size", "8"]))
    assert (config.num_train, config.num_heldout) == (24, 8)
    with pytest.warns(FutureWarning, match="--num-train is deprecated .* use --train-size"):
        old = config_from_args(parser.parse_args(["experiment", "--preset", "smoke", "--num-train", "24"]))
    assert old.num_train == 24


def test_preference_inputs_refuses_bad_ids():
    for prompt, match in (([[1.5]], r"prompt_ids\[0\]\[0\] is 1.5"), ([[-1]], r"prompt_ids\[0\]\[0\] is -1"),
                          ([torch.tensor([1.0])], r"prompt_ids\[0\] must be a 1-D integer tensor")):
        with pytest.raises(ValueError, match=match):
            tidpo.preference_inputs(prompt, [[3]], [[4]], pad_token_id=0)
    with pytest.raises(ValueError, match=r"chosen_ids\[0\] is empty"):
        tidpo.preference_inputs([[1]], [[]], [[4]], pad_token_id=0)


# ------------------------------------------------------------------------------------------------------
# a refused estimate-weights job does not block the corrected one


def test_a_refused_weights_job_leaves_nothing_behind(tmp_path, capsys):
    data = write_rows(tmp_path / "pairs.jsonl", pairs(4))
    out = tmp_path / "w.jsonl"
    base = ["estimate-weights", "--data", str(data), "--out", str(out), "--no-progress"]
    # Same model and template on both sides: every score would be 0.
    line = one_line_error(capsys, lambda: cli_main([*base, "--positive", "tiny-gpt2", "--negative", "tiny-gpt2"]))
    assert "same model with the same prompt" in line and not out.exists() and not Path(f"{out}.meta.json").exists()
    # A model path that does not exist is reported as such, and leaves nothing either.
    line = one_line_error(capsys, lambda: cli_main([*base, "--positive", "tiny-gpt2", "--negative",
                                                    str(tmp_path / "missing")]))
    assert "is not a local folder" in line and not Path(f"{out}.meta.json").exists()
    # The corrected command runs.
    assert cli_main([*base, "--positive", "tiny-gpt2", "--negative", "tiny-gpt2", "--positive-template",
                     "harmless", "--negative-template", "harmful"]) == 0
    assert len(load_preference_rows(data, weights=out)) == 4


def test_weights_for_other_tokens_are_refused(tmp_path):
    tok = gpt2_tokenizer()
    rows = pairs(2)
    records = []
    for row in rows:
        record = {}
        for side in ("chosen", "rejected"):
            ids = tok(row[side], add_special_tokens=False).input_ids
            record[f"{side}_weights"] = [1.0] * len(ids)
            record[f"{side}_tokens"] = tok.convert_ids_to_tokens(ids)
        records.append(record)
    weights = write_rows(tmp_path / "w.jsonl", records)
    data = write_rows(tmp_path / "d.jsonl", rows)
    assert len(tokenize_preference_rows(load_preference_rows(data, weights=weights), tok, progress=False)) == 2
    # Same number of tokens, other tokens (e.g. weights estimated for other text or another tokenizer).
    records[1]["chosen_tokens"] = ["Ġx"] + records[1]["chosen_tokens"][1:]
    write_rows(weights, records)
    with pytest.raises(ValueError, match=r"d.jsonl line 2: the weights were estimated for other tokens .* "
                                         r"chosen_tokens differs at token 0 \('Ġx' vs 'ĠIt'\)"):
        tokenize_preference_rows(load_preference_rows(data, weights=weights), tok, progress=False)


# ------------------------------------------------------------------------------------------------------
# defaults that follow --max-length; --bf16 on CPU; the example on a tiny file


def test_max_length_alone_is_enough(tmp_path, caplog):
    run, config = parse_train_args(["--max-length", "128"])
    assert config.max_length == 128 and config.max_prompt_length is None
    tok = gpt2_tokenizer()
    long_prompt = {"prompt": " ".join(["word"] * 400), "chosen": " yes.", "rejected": " no, not at all."}
    with caplog.at_level("WARNING", logger="tidpo.data.tokenization"):
        item = tokenize_preference_rows([long_prompt, pairs(1)[0]], tok, max_length=64, progress=False)[0]
    # The prompt makes room for the longer response; nothing else is cut.
    rejected = tok(long_prompt["rejected"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert len(item["prompt_input_ids"]) + len(rejected) == 64 and item["rejected_input_ids"] == rejected
    assert "1 of 2 pairs are longer than max_length=64: 1 prompts" in caplog.text
    with pytest.raises(ValueError, match="max_prompt_length .* must be smaller than max_length"):
        parse_train_args(["--max-length", "128", "--max-prompt-length", "128"])


def test_bf16_works_on_cpu():
    _, config = parse_train_args(["--bf16"])
    assert config.bf16 and (config.use_cpu or torch.cuda.is_available())


def test_example_keeps_the_adapter_of_a_four_row_file(tmp_path):
    data = write_rows(tmp_path / "pairs.jsonl", pairs(4))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_lora.py"), "--model", "tiny-gpt2",
                           "--data", str(data), "--max-steps", "1", "--output-dir", str(tmp_path / "out")],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------------
# one set of names, help texts, python -m tidpo


def test_python_m_tidpo_and_every_command_has_a_description():
    proc = subprocess.run([sys.executable, "-m", "tidpo", "export-pairs", "--help"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "as JSON Lines files" in " ".join(proc.stdout.split())
    for command in ("demo", "quickstart", "experiment"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])


def test_train_help_puts_the_method_first_with_dashes(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    groups = [text.index(title) for title in ("model, data and adapters:", "method: the loss and its",
                                               "training: transformers.TrainingArguments:")]
    assert groups == sorted(groups)
    assert text.index("--beta BETA") < groups[2] < text.index("--learning-rate LEARNING_RATE")
    assert "--max-length MAX_LENGTH, --max_length MAX_LENGTH" in text
    assert len(text.split("\n", 1)[0]) < 120  # a one-line usage, not every flag


# ------------------------------------------------------------------------------------------------------
# your own loop


def test_preference_inputs_and_per_sequence_reference_sums():
    torch.manual_seed(0)
    prompts, chosen, rejected = [[5, 6], [7]], [[1, 2, 3], [4]], [[8], [9, 10, 11, 12]]
    inputs = tidpo.preference_inputs(prompts, chosen, rejected, pad_token_id=0)
    assert inputs["labels"].shape == (4, 4) and inputs["input_ids"].shape == (4, 5)
    # labels[:, t] is the token after input position t, on response positions only.
    assert inputs["labels"][0].tolist() == [-100, 1, 2, 3] and inputs["labels"][3].tolist() == [9, 10, 11, 12]
    assert torch.equal(inputs["response_mask"], inputs["labels"] != -100)
    logits = torch.randn(4, 5, 13, dtype=torch.float64, requires_grad=True)
    ref_tokens = -torch.rand(4, 4, dtype=torch.float64)
    per_token = tidpo.dpo_loss(logits[:, :-1], inputs["labels"], ref_logps=ref_tokens)
    sums = torch.where(inputs["response_mask"], ref_tokens, 0.0).sum(-1)  # TRL's precomputed form
    per_sequence = tidpo.dpo_loss(logits[:, :-1], inputs["labels"], ref_logps=sums)
    torch.testing.assert_close(per_sequence.losses, per_token.losses, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="per-sequence sums .* weights every token's log-ratio"):
        tidpo.tis_dpo_loss(logits[:, :-1], inputs["labels"], torch.ones(4, 4, dtype=torch.float64), ref_logps=sums)


# ------------------------------------------------------------------------------------------------------
# layout: the core never imports the applications or the command line

CORE = ["ops", "losses", "weights", "trainer", "data", "_validation.py", "_model_state.py", "reference.py",
        "__init__.py"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_imports_neither_applications_nor_commands():
    files = []
    for entry in CORE:
        path = ROOT / "tidpo" / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    files.extend(sorted((ROOT / "csrc_triton").glob("*.py")))
    assert len(files) > 30
    for path in files:
        bad = {name for name in _imports(path) if name.startswith(("tidpo.apps", "tidpo.cli"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
