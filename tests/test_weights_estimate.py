"""TIS-DPO weight estimation (tidpo.weights.estimate / scoring / visualize / weights_cli) on tiny GPT-2s.

What must hold: the scores are log π⁺ − log π⁻ of every response token but the last, equal to a float64
reference computed from each model's logits on the unpadded sequence; templates change only the prompt;
scores and weights line up with the trainer's tokens (truncated tokens: score 0, weight 0) and the file
trains with loss="tis_dpo"; an interrupted run resumes to the same file, and a file of another job is
refused; mismatched models / tokenizers raise; the pictures are valid and show every token.
"""

from __future__ import annotations

import html
import json
import math

import pytest
import torch

from tidpo.apps.assets import gpt2_tokenizer, tiny_gpt2
from tidpo.apps.models import load_model_and_tokenizer
from tidpo.cli.weights import estimate_main, show_main
from tidpo.data import load_preference_rows, tokenize_preference_rows
from tidpo.weights import TRANSFORMS
from tidpo.weights import records as weight_records
from tidpo.weights.estimate import METHOD_PARAMS, summarize_weights, weights_from_scores
from tidpo.weights.estimate import estimate_weights as _estimate_weights
from tidpo.weights.scoring import PROMPT_TEMPLATES, apply_template, resolve_template, score_pairs
from tidpo.weights.visualize import readable_token, show_weights


def estimate_weights(*args, model_loader=load_model_and_tokenizer, **kwargs):
    """The library call with the command line's loader, which knows 'tiny-gpt2' (the core loads folders only)."""
    return _estimate_weights(*args, model_loader=model_loader, **kwargs)

ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris, a city on the Seine.",
     "rejected": " a large city in Spain, I think, or maybe in Italy."},
    {"prompt": "Two plus two equals", "chosen": " four.", "rejected": " five <b>&amp;</b> naïve $x$."},
    {"prompt": "Water freezes at", "chosen": " zero degrees Celsius at sea level, or thirty-two degrees Fahrenheit.",
     "rejected": " fifty."},
]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def models():
    return tiny_gpt2(seed=0), tiny_gpt2(seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer, models):
    """A data file and a model folder holding tiny_gpt2(seed=1) (π⁻; π⁺ is "tiny-gpt2", seed 0)."""
    root = tmp_path_factory.mktemp("estimate")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    negative = root / "negative"
    models[1].save_pretrained(negative)
    tokenizer.save_pretrained(negative)
    return data, negative


def reference_scores(positive, negative, tokenizer, prompt_pos: str, prompt_neg: str, response: str) -> list[float]:
    """float64 log π⁺ − log π⁻ of each response token but the EOS, each model on its own unpadded sequence."""
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    logps = []
    for model, prompt in ((positive, prompt_pos), (negative, prompt_neg)):
        prompt_ids = tokenizer(prompt).input_ids
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.double().log_softmax(-1)[0]
        start = len(prompt_ids) - 1
        logps.append([float(logp[start + j, token]) for j, token in enumerate(response_ids[:-1])])
    return [p - n for p, n in zip(*logps, strict=True)]


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------


def test_scores_equal_float64_reference_and_do_not_depend_on_batching(tokenizer, models):
    positive, negative = models
    positive.train()
    negative.eval()
    scored = score_pairs(positive, negative, tokenizer, ROWS, batch_size=2, progress=False)
    assert positive.training and not negative.training  # each model's mode is restored
    one_by_one = score_pairs(positive, negative, tokenizer, ROWS, batch_size=1, progress=False)
    for row, out, single in zip(ROWS, scored, one_by_one, strict=True):
        for name in ("chosen", "rejected"):
            truth = reference_scores(positive, negative, tokenizer, row["prompt"], row["prompt"], row[name])
            ids = tokenizer(row[name], add_special_tokens=False).input_ids
            assert len(out[f"{name}_scores"]) == len(ids) == out[f"{name}_num_scored"]  # n − 1 with the EOS
            assert out[f"{name}_tokens"] == tokenizer.convert_ids_to_tokens(ids)
            assert out[f"{name}_scores"] == pytest.approx(truth, abs=3e-5)
            assert single[f"{name}_scores"] == pytest.approx(out[f"{name}_scores"], abs=3e-5)
            assert any(abs(v) > 1e-3 for v in truth)  # two different models: a non-trivial test


def test_prompt_templates_score_one_model_under_two_prompts(tokenizer, models):
    model = models[0]
    scored = score_pairs(model, model, tokenizer, ROWS[:2], positive_template="harmless",
                         negative_template="harmful", progress=False)
    plain = score_pairs(model, models[1], tokenizer, ROWS[:2], progress=False)
    for row, out, other in zip(ROWS[:2], scored, plain, strict=True):
        for name in ("chosen", "rejected"):
            truth = reference_scores(model, model, tokenizer,
                                     PROMPT_TEMPLATES["harmless"].replace("{prompt}", row["prompt"]),
                                     PROMPT_TEMPLATES["harmful"].replace("{prompt}", row["prompt"]), row[name])
            assert out[f"{name}_scores"] == pytest.approx(truth, abs=3e-5)
            assert out[f"{name}_scores"] != pytest.approx(other[f"{name}_scores"], abs=1e-3)
    literal = score_pairs(model, model, tokenizer, ROWS[:1], positive_template=PROMPT_TEMPLATES["harmless"],
                          negative_template="harmful", progress=False)
    assert literal[0]["chosen_scores"] == scored[0]["chosen_scores"]


def test_template_and_model_validation(tokenizer, models):
    assert resolve_template("harmful") == PROMPT_TEMPLATES["harmful"]
    assert resolve_template("Q: {prompt} A:") == "Q: {prompt} A:"
    with pytest.raises(ValueError, match="positive_template.*'{prompt}'"):
        score_pairs(models[0], models[0], tokenizer, ROWS, positive_template="no placeholder", progress=False)
    with pytest.raises(TypeError, match="negative_template"):
        resolve_template(3, "negative_template")
    with pytest.raises(ValueError, match="same model with the same prompt"):
        score_pairs(models[0], models[0], tokenizer, ROWS, progress=False)
    with pytest.raises(ValueError, match="rows is empty"):
        score_pairs(*models, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="50257.*50300"):
        score_pairs(models[0], tiny_gpt2(vocab_size=50300), tokenizer, ROWS, progress=False)
    other = gpt2_tokenizer()
    other.add_tokens(["<an-extra-token>"])
    with pytest.raises(ValueError, match="different tokenizers: weights would not align"):
        score_pairs(*models, tokenizer, ROWS, negative_tokenizer=other, progress=False)
    score_pairs(*models, tokenizer, ROWS[:1], negative_tokenizer=gpt2_tokenizer(), progress=False)  # equal: fine
    long_row = {"prompt": "Say it", "chosen": " word" * 300, "rejected": " no."}
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): the positive model input has 303 tokens but the"
                                         r" model takes at most "
                                         "256 positions"):
        score_pairs(*models, tokenizer, [long_row], max_length=1000, progress=False)


def test_conversational_rows_template_the_last_user_message(models):
    tokenizer = gpt2_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Capital of France?"}],
           "chosen": [{"role": "assistant", "content": "Paris."}],
           "rejected": [{"role": "assistant", "content": "Rome, I believe."}]}
    templated = apply_template(row, "Q: {prompt}", 0)
    assert [m["content"] for m in templated["prompt"]] == ["Be brief.", "Hi", "Hello", "Q: Capital of France?"]
    assert row["prompt"][3]["content"] == "Capital of France?"  # the input row is not modified
    out = score_pairs(models[0], models[0], tokenizer, [row], positive_template="harmless",
                      negative_template="harmful", progress=False)[0]
    ids = tokenize_preference_rows([row], tokenizer, progress=False)[0]
    assert len(out["chosen_scores"]) == len(ids["chosen_input_ids"]) - 1
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): a prompt template applies to .* last 'user' message"):
        apply_template({**row, "prompt": [{"role": "system", "content": "x"}]}, "Q: {prompt}", 0)
    # A chat template that renders the reply depending on the prompt: the response ids change.
    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "{{ m['content'] }}\n", "{{ m['content'] }}{% if m['role'] == 'assistant' and loop.last %} "
                                "[{{ messages[-2]['content'] | length }}]{% endif %}\n")
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): the chosen response tokenises differently with"
                                         r" the positive"):
        score_pairs(models[0], models[0], tokenizer, [row], positive_template="harmless",
                    negative_template="harmful", progress=False)


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------


def test_weights_from_scores_methods_and_truncated_tokens():
    scored = [{"row": 0, "chosen_scores": [0.5, -0.2, 2.0, 0.0], "chosen_num_scored": 3,
               "rejected_scores": [0.1, -1.0], "rejected_num_scored": 2}]
    ranked = weights_from_scores(scored)[0]
    assert ranked["chosen_weights"] == pytest.approx([1.0, 0.7, 1.3, 0.0])  # ranks of +r̂; cut token → 0
    assert ranked["rejected_weights"] == pytest.approx([0.7, 1.3])  # ranks of −r̂
    paper = weights_from_scores(scored, method="exp_clamp", k=1.0, lower=-0.5, upper=1.5)[0]
    assert paper["chosen_weights"] == pytest.approx([math.exp(0.5), math.exp(-0.2), math.exp(1.5), 0.0], abs=1e-6)
    assert paper["rejected_weights"] == pytest.approx([math.exp(-0.1), math.exp(0.5)], abs=1e-6)
    assert set(METHOD_PARAMS) == set(TRANSFORMS)
    two = scored + [{**scored[0], "row": 1}]
    random_a = weights_from_scores(two, method="random", seed=3)
    assert weights_from_scores(two[1:], method="random", seed=3)[0] == random_a[1]  # grouping-independent
    assert random_a[0]["chosen_weights"] != random_a[1]["chosen_weights"]  # rows draw from seed + row
    with pytest.raises(TypeError, match="'rank_based' does not use the parameter.*k"):
        weights_from_scores(scored, k=2.0)
    with pytest.raises(ValueError, match="method must be one of"):
        weights_from_scores(scored, method="softmax")
    with pytest.raises(ValueError, match="scored row 0: chosen_num_scored"):
        weights_from_scores([{**scored[0], "chosen_num_scored": 9}])


def test_truncated_rows_align_with_the_trainer_and_train(tmp_path, tokenizer, models, files):
    from tidpo.trainer import TokenWeightedDPOConfig, TokenWeightedDPOTrainer
    from tidpo.trainer.models import apply_lora

    data, negative = files
    limits = {"max_length": 16, "max_prompt_length": 4, "truncation_mode": "keep_end"}
    out = tmp_path / "w.jsonl"
    result = estimate_weights("tiny-gpt2", str(negative), data, out, progress=False, **limits)
    written = weight_records.read_records(out)
    kept = tokenize_preference_rows(ROWS, tokenizer, weights_columns=None, progress=False, **limits)
    truncated = 0
    for row, record, item in zip(ROWS, written, kept, strict=True):
        assert record["prompt"] == row["prompt"]
        for name in ("chosen", "rejected"):
            n = len(tokenizer(row[name], add_special_tokens=False).input_ids) + 1
            k = len(item[f"{name}_input_ids"])
            scores, weights = record[f"{name}_scores"], record[f"{name}_weights"]
            assert len(scores) == len(weights) == len(record[f"{name}_tokens"]) == n - 1
            assert record[f"{name}_num_scored"] == min(k, n - 1)
            if k < n:
                truncated += 1
                assert scores[k:] == [0.0] * (n - 1 - k) and weights[k:] == [0.0] * (n - 1 - k)
    summary = result["summary"]
    in_memory = score_pairs(*models, tokenizer, ROWS, progress=False, **limits)  # one tokenizer object
    for record, scored in zip(written, in_memory, strict=True):
        for name in ("chosen", "rejected"):
            assert record[f"{name}_scores"] == pytest.approx(scored[f"{name}_scores"], abs=1e-5)
    assert truncated >= 3 and all(summary[name]["scored"] < summary[name]["tokens"] for name in ("chosen", "rejected"))

    rows = load_preference_rows(data, weights=out)
    config = TokenWeightedDPOConfig(output_dir=str(tmp_path / "run"), use_cpu=True, per_device_train_batch_size=2,
                                    max_steps=2, learning_rate=5e-3, logging_steps=1, save_strategy="no",
                                    report_to=[], disable_tqdm=True, seed=0, loss="tis_dpo", **limits)
    model = apply_lora(tiny_gpt2(seed=0), r=4, alpha=8)
    trainer = TokenWeightedDPOTrainer(model, config, train_dataset=rows, processing_class=tokenizer)
    for index, record in enumerate(written):
        item = trainer.train_dataset[index]
        for name in ("chosen", "rejected"):
            k = len(item[f"{name}_input_ids"])
            assert k - 1 <= record[f"{name}_num_scored"]  # every trained token with a weight was scored
            assert item[f"{name}_weights"] == pytest.approx(record[f"{name}_weights"][:k - 1] + [0.0])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_interrupted_run_resumes_to_the_same_file(tmp_path, files, monkeypatch):
    data, negative = files
    kwargs = {"batch_size": 1, "progress": False, "max_length": 64, "max_prompt_length": 16}
    full = tmp_path / "full.jsonl"
    estimate_weights("tiny-gpt2", str(negative), data, full, **kwargs)

    out = tmp_path / "resumed.jsonl"
    original, calls = weight_records.append_records, []

    def interrupt_after_first_batch(path, records):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(records))
        original(path, records)

    monkeypatch.setattr(weight_records, "append_records", interrupt_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        estimate_weights("tiny-gpt2", str(negative), data, out, **kwargs)
    monkeypatch.undo()
    assert [r["row"] for r in weight_records.read_records(out)] == [0]
    with open(out, "a", encoding="utf-8") as handle:
        handle.write('{"row": 1, "prom')  # a write cut short by the interruption
    result = estimate_weights("tiny-gpt2", str(negative), data, out, **kwargs)
    assert (result["resumed"], result["scored"]) == (1, 2)
    assert out.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")

    with pytest.raises(ValueError, match="holds the weights of another job.*transform: 'rank_based' != 'exp_clamp'"):
        estimate_weights("tiny-gpt2", str(negative), data, out, transform="exp_clamp", **kwargs)
    with pytest.raises(ValueError, match="holds the weights of another job.*positive_template"):
        estimate_weights("tiny-gpt2", str(negative), data, out, positive_template="harmless", **kwargs)
    stray = tmp_path / "stray.jsonl"
    stray.write_text("{}\n")
    with pytest.raises(ValueError, match="has no job record"):
        estimate_weights("tiny-gpt2", str(negative), data, stray, **kwargs)
    again = estimate_weights("tiny-gpt2", str(negative), data, out, transform="exp_clamp", resume=False, **kwargs)
    assert again["resumed"] == 0 and json.loads(weight_records.meta_path(out).read_text())["transform"] == "exp_clamp"


def test_parquet_output_and_same_model_loaded_once(tmp_path, files, monkeypatch):
    data, _ = files
    loads = []
    out = tmp_path / "w.parquet"
    result = estimate_weights("tiny-gpt2", "tiny-gpt2", data, out, positive_template="harmless",
                              negative_template="harmful", transform="exp_clamp",
                              transform_params={"lower": -1.0, "upper": 1.0}, progress=False,
                              model_loader=lambda *a: loads.append(a[0]) or load_model_and_tokenizer(*a))
    assert loads == ["tiny-gpt2"]
    assert not weight_records.records_path(out).exists() and out.is_file()
    rows = load_preference_rows(data, weights=out)
    assert len(rows) == len(ROWS) and all(math.exp(-1) - 1e-6 <= w <= math.e + 1e-6
                                          for row in rows for w in row["chosen_weights"])
    assert estimate_weights("tiny-gpt2", "tiny-gpt2", data, out, positive_template="harmless",
                            negative_template="harmful", transform="exp_clamp",
                            transform_params={"lower": -1.0, "upper": 1.0}, progress=False)["scored"] == 0
    summary = summarize_weights(weight_records.read_records(out))
    assert summary == result["summary"] and 0.0 <= summary["chosen"]["rhat_positive"] <= 1.0
    with pytest.raises(ValueError, match="min_scale must be <= max_scale"):
        estimate_weights("tiny-gpt2", "tiny-gpt2", data, tmp_path / "bad.jsonl",
                         transform_params={"min_scale": 2.0, "max_scale": 1.0})
    assert not (tmp_path / "bad.jsonl").exists()
    with pytest.raises(ValueError, match="out must end in .jsonl or .parquet"):
        estimate_weights("tiny-gpt2", "tiny-gpt2", data, tmp_path / "w.csv")


# ----------------------------------------------------------------------------------------------------
# pictures and command line
# ----------------------------------------------------------------------------------------------------


def test_show_weights_pictures_and_html(tmp_path, files):
    data, negative = files
    weights = tmp_path / "w.jsonl"
    estimate_weights("tiny-gpt2", str(negative), data, weights, progress=False, max_length=24, max_prompt_length=8)
    paths = show_weights(weights, tmp_path / "view", rows=[0, 1, 2], max_tokens=200)
    for key in ("tokens_png", "histogram_png"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC
    page = paths["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    for record in weight_records.read_records(weights):
        for name in ("chosen", "rejected"):
            for token in record[f"{name}_tokens"]:
                assert f">{html.escape(readable_token(token))}</span>" in page
    assert readable_token("Ġworld") == " world" and readable_token("▁world") == " world"
    assert readable_token("Ã©") == "é" and readable_token("Ċ") == "\n" and readable_token("<0x0A>") == "\n"
    with pytest.raises(ValueError, match="row 7 is not in"):
        show_weights(weights, tmp_path / "view", rows=[7])


def test_cli_estimate_show_and_train(tmp_path, files, capsys):
    from tidpo.cli.train import main as train_main

    data, _ = files
    out, view = tmp_path / "w.jsonl", tmp_path / "view"
    common = ["--positive", "tiny-gpt2", "--negative", "tiny-gpt2", "--positive-template", "harmless",
              "--negative-template", "harmful", "--data", str(data), "--out", str(out), "--no-progress",
              "--max-length", "64", "--max-prompt-length", "32"]
    assert estimate_main([*common, "--min-scale", "0.5", "--max-scale", "1.5"]) == 0
    printed = capsys.readouterr().out
    assert "chosen" in printed and f"wrote {len(ROWS)} rows to {out}" in printed
    weights = [w for r in weight_records.read_records(out) for w in r["chosen_weights"] + r["rejected_weights"]]
    assert min(weights) == pytest.approx(0.5) and max(weights) == pytest.approx(1.5)
    assert show_main(["--weights", str(out), "--out", str(view), "--rows", "0", "2", "--max-tokens", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["html"] == str(view / "weights.html")
    with pytest.raises(SystemExit) as error:
        estimate_main([*common, "--k", "2"])
    assert error.value.code == 2 and "--k does not apply to --transform rank_based" in capsys.readouterr().err
    assert train_main(["--model", "tiny-gpt2", "--data", str(data), "--weights", str(out), "--loss", "tis_dpo",
                       "--eval-size", "0", "--max-steps", "1", "--max-length", "64", "--max-prompt-length", "32",
                       "--output-dir", str(tmp_path / "run"), "--use-cpu", "--disable-tqdm", "true"]) == 0
