"""The thin trainer on a tiny GPT-2 (built from a config) with the real GPT-2 tokenizer.

What must hold: a few steps run with a finite, logged loss; only the LoRA weights move; the
reference is untouched; the three ways of getting the reference agree (adapter-disabled policy,
separate model, precomputed log-probs); resuming from a checkpoint reproduces the uninterrupted run;
every loss of the config runs; bad configuration and data raise naming what is wrong.
"""

from __future__ import annotations

import math

import pytest
import torch

from tidpo.apps.assets import gpt2_tokenizer, tiny_gpt2
from tidpo.trainer import LOSSES, TokenWeightedDPOConfig, TokenWeightedDPOTrainer
from tidpo.trainer.models import apply_lora

ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a large city in Spain, I think."},
    {"prompt": "Two plus two equals", "chosen": " four, of course.", "rejected": " five."},
    {"prompt": "Water freezes at", "chosen": " zero degrees Celsius.", "rejected": " fifty degrees."},
    {"prompt": "The opposite of hot is", "chosen": " cold.", "rejected": " loud and bright."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def with_weights(rows, tokenizer, seed=0):
    """Rows with per-token weights: one value per response token but the EOS the tokenizer appends."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in rows:
        n_c = len(tokenizer(row["chosen"], add_special_tokens=False).input_ids)
        n_r = len(tokenizer(row["rejected"], add_special_tokens=False).input_ids)
        out.append({**row, "chosen_weights": (0.7 + 0.6 * torch.rand(n_c, generator=g)).tolist(),
                    "rejected_weights": (0.7 + 0.6 * torch.rand(n_r, generator=g)).tolist()})
    return out


def lora_model(seed=0):
    torch.manual_seed(seed)
    return apply_lora(tiny_gpt2(seed=seed), r=4, alpha=8)


def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=2,
                  per_device_eval_batch_size=2, max_steps=4, learning_rate=5e-3, lr_scheduler_type="constant",
                  logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0, loss="dpo")
    kwargs.update(overrides)
    return TokenWeightedDPOConfig(**kwargs)


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def train(tmp_path, tokenizer, rows=ROWS, model=None, **overrides):
    trainer = TokenWeightedDPOTrainer(model if model is not None else lora_model(), config(tmp_path, **overrides),
                                      train_dataset=rows, eval_dataset=rows[:2], processing_class=tokenizer)
    trainer.train()
    return trainer


def test_steps_run_only_lora_moves_and_reference_is_untouched(tmp_path, tokenizer):
    model = lora_model()
    base_before = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k}
    lora_before = lora_state(model)
    batch = {k: v for k, v in TokenWeightedDPOTrainer(model, config(tmp_path), train_dataset=ROWS,
                                                      processing_class=tokenizer).data_collator(
        [TokenWeightedDPOTrainer._prepare_dataset(ROWS, tokenizer, config(tmp_path), "rows")[i] for i in range(2)]
    ).items()}
    with torch.no_grad(), model.disable_adapter():
        ref_before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    trainer = train(tmp_path, tokenizer, model=model)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    logged = trainer.state.log_history[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert key in logged and math.isfinite(logged[key])
    for name, value in base_before.items():
        torch.testing.assert_close(dict(model.named_parameters())[name], value, rtol=0, atol=0)
    moved = [name for name, value in lora_state(model).items() if not torch.equal(value, lora_before[name])]
    assert moved and all("lora_" in name for name in moved)
    with torch.no_grad(), model.disable_adapter():
        ref_after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ref_after, ref_before, rtol=0, atol=0)
    # Training makes the policy prefer the chosen responses of its own training data.
    assert losses[-1] < losses[0]


def test_peft_reference_equals_separate_reference_model(tmp_path, tokenizer):
    via_adapter = train(tmp_path / "a", tokenizer, model=lora_model())
    separate = TokenWeightedDPOTrainer(lora_model(), config(tmp_path / "b"), train_dataset=ROWS,
                                       processing_class=tokenizer, ref_model=tiny_gpt2(seed=0))
    separate.train()
    a, b = lora_state(via_adapter.model), lora_state(separate.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["dpo", "tis_dpo"])
def test_precomputed_reference_equals_live_reference(tmp_path, tokenizer, loss):
    rows = with_weights(ROWS, tokenizer) if loss == "tis_dpo" else ROWS
    live = train(tmp_path / "live", tokenizer, rows=rows, loss=loss)
    pre = train(tmp_path / "pre", tokenizer, rows=rows, loss=loss, precompute_ref_logps=True)
    assert pre.ref_model is None and "chosen_ref_logps" in pre.train_dataset.column_names
    a, b = lora_state(live.model), lora_state(pre.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    live_log = [h for h in live.state.log_history if "loss" in h]
    pre_log = [h for h in pre.state.log_history if "loss" in h]
    assert [h["rewards/margins"] for h in pre_log] == pytest.approx([h["rewards/margins"] for h in live_log],
                                                                     rel=1e-4, abs=1e-6)


def test_resume_from_checkpoint_reproduces_uninterrupted_run(tmp_path, tokenizer):
    full = train(tmp_path / "full", tokenizer, max_steps=6, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "full" / "out" / "checkpoint-3"
    assert checkpoint.is_dir()
    resumed = TokenWeightedDPOTrainer(lora_model(), config(tmp_path / "full", max_steps=6, save_strategy="no"),
                                      train_dataset=ROWS, processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    a, b = lora_state(full.model), lora_state(resumed.model)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains(tmp_path, tokenizer, loss):
    rows = with_weights(ROWS, tokenizer) if loss == "tis_dpo" else ROWS
    trainer = train(tmp_path, tokenizer, rows=rows, loss=loss, max_steps=2)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) for h in logged)
    if loss in ("tdpo1", "tdpo2"):
        assert any(k.startswith("kl/") for k in logged[0])
    if loss == "tis_dpo":
        assert any(k.startswith("weights/") for k in logged[0])
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert ("eval_sft/nll" if loss == "sft" else "eval_rewards/margins") in metrics


def test_token_level_tis_dpo_uses_reference_logits(tmp_path, tokenizer):
    trainer = train(tmp_path, tokenizer, rows=with_weights(ROWS, tokenizer), loss="tis_dpo", token_level=True,
                    max_steps=2)
    assert any(k.startswith("kl/") for k in trainer.state.log_history[0])


def test_loss_in_trainer_equals_the_functional_loss(tmp_path, tokenizer):
    """The trainer's loss of one batch is tidpo.dpo_loss on the shifted logits and labels."""
    import tidpo

    trainer = TokenWeightedDPOTrainer(lora_model(), config(tmp_path), train_dataset=ROWS, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    out = trainer.preference_loss(trainer.model, batch)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with trainer.model.disable_adapter():
            ref = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    # The adapter-disabled reference forward runs in eval mode and restores train mode afterwards.
    trainer.model.train()
    trainer.preference_loss(trainer.model, batch)
    assert trainer.model.training and all(m.training for m in trainer.model.modules())
    expected = tidpo.dpo_loss(logits[:, :-1], labels, ref_logits=ref[:, :-1], beta=0.1)
    torch.testing.assert_close(out.loss, expected.loss)
    # The stacked layout: the first half of the rows are the chosen responses.
    assert batch["input_ids"].shape[0] == 8


def test_tis_dpo_without_weights_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"row 0 \(0-based\).*chosen_weights|chosen_weights.*row 0 \(0-based\)"):
        TokenWeightedDPOTrainer(lora_model(), config(tmp_path, loss="tis_dpo"), train_dataset=ROWS,
                                processing_class=tokenizer)


@pytest.mark.parametrize("overrides, match", [
    ({"loss": "kto"}, "loss must be one of"),
    ({"beta": 0.0}, "beta must be in"),
    ({"loss": "tdpo2", "alpha": -1.0}, "alpha must be in"),
    ({"label_smoothing": 0.6}, "label_smoothing must be in"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "label_smoothing=0.1 is not read by loss='ipo': it applies to loss "),
    ({"token_level": True}, "token_level=True is not read by loss='dpo': it applies to loss 'tis_dpo'"),
    ({"gamma": 0.5}, "gamma=0.5 is not read by loss='dpo': it applies to loss 'ti_dpo' only"),
    ({"loss": "sft", "beta": 0.2}, "beta=0.2 is not read by loss='sft'"),
    ({"ti_preset": "official"}, "ti_preset='official' is not read by loss='dpo'"),
    ({"loss": "tis_dpo", "kl_form": "paper_tdpo1"}, "needs token_level=True"),
    ({"max_prompt_length": 600}, "max_prompt_length .* must be smaller"),
    ({"max_length": 0}, r"max_length must be in \[1, inf\)"),
    ({"truncation_mode": "middle"}, "truncation_mode must be one of"),
    ({"loss": "tdpo2", "precompute_ref_logps": True}, "precompute_ref_logps cannot serve loss='tdpo2'"),
    ({"loss_backend": "cuda"}, "loss_backend must be one of"),
    ({"remove_unused_columns": True}, "remove_unused_columns must be False"),
])
def test_config_rejects_bad_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides)


def test_trainer_argument_errors(tmp_path, tokenizer):
    model = lora_model()
    with pytest.raises(TypeError, match="args must be a TokenWeightedDPOConfig"):
        TokenWeightedDPOTrainer(model, object(), train_dataset=ROWS, processing_class=tokenizer)
    with pytest.raises(TypeError, match="processing_class must be the tokenizer"):
        TokenWeightedDPOTrainer(model, config(tmp_path), train_dataset=ROWS)
    plain = tiny_gpt2()
    with pytest.raises(ValueError, match="ref_model must be a separate model"):
        TokenWeightedDPOTrainer(plain, config(tmp_path), train_dataset=ROWS, processing_class=tokenizer,
                                ref_model=plain)
    bad = [dict(ROWS[0]), {"prompt": "Hi", "chosen": "", "rejected": " no"}]
    with pytest.raises(ValueError, match=r"row 1 \(0-based\)"):
        TokenWeightedDPOTrainer(model, config(tmp_path), train_dataset=bad, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\).*rejected|rejected.*row 0 \(0-based\)"):
        TokenWeightedDPOTrainer(model, config(tmp_path), train_dataset=[{"prompt": "a", "chosen": " b"}],
                                processing_class=tokenizer)
    weights = with_weights(ROWS, tokenizer)
    weights[2]["chosen_weights"] = weights[2]["chosen_weights"][:-1]
    with pytest.raises(ValueError, match=r"row 2 \(0-based\)"):
        TokenWeightedDPOTrainer(model, config(tmp_path, loss="tis_dpo"), train_dataset=weights,
                                processing_class=tokenizer)


def test_full_finetune_uses_a_frozen_copy(tmp_path, tokenizer):
    model = tiny_gpt2()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = train(tmp_path, tokenizer, model=model, max_steps=2)
    ref = dict(trainer.ref_model.named_parameters())
    assert all(not p.requires_grad for p in ref.values())
    for name, value in before.items():
        torch.testing.assert_close(ref[name], value, rtol=0, atol=0)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_sft_loss_is_the_mean_nll_of_the_chosen_responses(tmp_path, tokenizer):
    trainer = TokenWeightedDPOTrainer(lora_model(), config(tmp_path, loss="sft"), train_dataset=ROWS,
                                      processing_class=tokenizer)
    assert trainer.ref_model is None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    out = trainer.preference_loss(trainer.model, batch)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"][:4]).logits[:, :-1].double()
    labels = batch["labels"][:4, 1:]
    valid = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = -(logp * valid).sum() / valid.sum()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uses no reference model"):
        config(tmp_path, loss="sft", precompute_ref_logps=True)


def test_reverse_swaps_chosen_and_rejected_with_their_weights(tokenizer):
    from tidpo.cli.train import RunArguments, load_train_eval_rows
    from tidpo.data import swap_chosen_rejected

    row = with_weights(ROWS[:1], tokenizer)[0]
    swapped = swap_chosen_rejected(row)
    assert swapped["chosen"] == row["rejected"] and swapped["rejected"] == row["chosen"]
    assert swapped["chosen_weights"] == row["rejected_weights"] and swapped["prompt"] == row["prompt"]
    assert swap_chosen_rejected(swapped) == row
    train, held = load_train_eval_rows(RunArguments(data="embedded", eval_size=4, reverse=True))
    plain, plain_held = load_train_eval_rows(RunArguments(data="embedded", eval_size=4))
    assert [r["chosen"] for r in train] == [r["rejected"] for r in plain]
    assert [r["rejected"] for r in held] == [r["chosen"] for r in plain_held]
