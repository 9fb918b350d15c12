"""Training semantics a TRL user relies on, each checked against a value computed independently.

- dropout is off in the policy (nn.Dropout modules and config-driven attention dropout), LoRA's own kept;
- every kind of reference runs in the policy's mixed-precision context (bf16: rewards exactly 0 at init);
- ``loss="sft"`` is the token mean over the global batch (gradient accumulation, a float64 gradient);
- metrics are exact per-pair / per-token means whatever the evaluation batch size, under the call's prefix;
- conflicting reference sources are refused, the collator's ignore_index is used, a quantised or dispatched
  policy is not deep-copied, TI-DPO anchors stop at any of the model's end-of-turn ids;
- a loss added to the registry alone trains.

The right values come from float64 forwards of each pair on its own (plain ``torch.log_softmax``), never from
the trainer or tidpo's ops.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tidpo import dpo_loss
from tidpo._model_state import ConfigDropout, disable_dropout
from tidpo.apps.assets import gpt2_tokenizer, tiny_gpt2
from tidpo.data import PreferenceCollator
from tidpo.trainer import LOSS_REGISTRY, LossSpec, TokenWeightedDPOConfig, TokenWeightedDPOTrainer
from tidpo.trainer.anchors import end_of_turn_ids
from tidpo.trainer.batch import TrainingBatch
from tidpo.trainer.models import apply_lora

ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a large city in Spain, I think."},
    {"prompt": "Two plus two equals", "chosen": " four, of course.", "rejected": " five."},
    {"prompt": "Water freezes at", "chosen": " zero degrees Celsius.", "rejected": " fifty degrees."},
    {"prompt": "The opposite of hot is", "chosen": " cold.", "rejected": " loud and bright."},
    {"prompt": "A week has", "chosen": " seven days.", "rejected": " nine or ten days, roughly."},
]
LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=2,
                  per_device_eval_batch_size=2, max_steps=3, learning_rate=0.0, lr_scheduler_type="constant",
                  logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0, loss="dpo")
    kwargs.update(overrides)
    return TokenWeightedDPOConfig(**kwargs)


def lora(model, dropout: float = 0.0):
    return apply_lora(model, r=4, alpha=8, dropout=dropout)


def train_logs(trainer) -> list[dict]:
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def tiny_llama(attention_dropout: float, vocab_size: int = 50257, seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        attention_dropout=attention_dropout, pad_token_id=vocab_size - 1,
                                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1))


# ------------------------------------------------------------------------------------------------------
# independent float64 values: one pair at a time, plain torch


def response_values(model, item: dict, side: str, ref=None) -> dict:
    """Float64, one sequence alone: summed log-prob of the response, per-token KL(ref || model)."""
    prompt, response = item["prompt_input_ids"], item[f"{side}_input_ids"]
    ids = torch.tensor([prompt + response])
    start = len(prompt) - 1  # logits at position t predict token t + 1
    targets = ids[0, len(prompt):]

    def logprobs(m):
        with torch.no_grad():
            m64 = copy.deepcopy(m).double().eval()
            return torch.log_softmax(m64(ids).logits[0, start:start + len(response)], dim=-1)

    lp = logprobs(model)
    token_logp = lp.gather(-1, targets[:, None])[:, 0]
    out = {"logp": float(token_logp.sum()), "tokens": len(response), "token_logp": token_logp}
    if ref is not None:
        lq = logprobs(ref)
        out["token_ref_logp"] = lq.gather(-1, targets[:, None])[:, 0]
        out["ref_logp"] = float(out["token_ref_logp"].sum())
        out["kl_sum"] = float((lq.exp() * (lq - lp)).sum())  # sum over tokens of KL(ref || policy)
    return out


def expected_metrics(policy, ref, items, loss: str, beta: float, rows=None) -> dict:
    """Per-pair means of the pair metrics, per-token means of the token metrics, and the mean loss."""
    chosen = [response_values(policy, it, "chosen", ref) for it in items]
    rejected = [response_values(policy, it, "rejected", ref) for it in items]
    n = len(items)
    # DPO's implicit reward beta * sum_t (log pi - log ref); TDPO adds the sequential KL(ref || pi) to it;
    # TIS-DPO weights each token (the row's weights, then 0 for the EOS).
    def reward(values, weights=None):
        w = torch.ones_like(values["token_logp"]) if weights is None else torch.tensor([*weights, 0.0],
                                                                                       dtype=torch.float64)
        kl = values["kl_sum"] if loss == "tdpo2" else 0.0
        return beta * (float((w * (values["token_logp"] - values["token_ref_logp"])).sum()) + kl)

    weights = [(r["chosen_weights"], r["rejected_weights"]) for r in rows] if loss == "tis_dpo" else [(None, None)] * n
    r_w = [reward(c, w[0]) for c, w in zip(chosen, weights, strict=True)]
    r_l = [reward(r, w[1]) for r, w in zip(rejected, weights, strict=True)]
    margins = [a - b for a, b in zip(r_w, r_l, strict=True)]
    out = {"rewards/chosen": sum(r_w) / n, "rewards/rejected": sum(r_l) / n, "rewards/margins": sum(margins) / n,
           "rewards/accuracies": sum(m > 0 for m in margins) / n,
           "logps/chosen": sum(c["logp"] for c in chosen) / n, "logps/rejected": sum(r["logp"] for r in rejected) / n}
    if loss == "dpo":
        out["loss"] = sum(math.log1p(math.exp(-m)) for m in margins) / n  # -log sigmoid(beta h), m = beta h
    if loss == "tdpo2":
        out["kl/chosen"] = sum(c["kl_sum"] for c in chosen) / sum(c["tokens"] for c in chosen)
        out["kl/rejected"] = sum(r["kl_sum"] for r in rejected) / sum(r["tokens"] for r in rejected)
    if loss == "tis_dpo":
        # one weight per response token but the EOS, which gets 0 (the documented alignment)
        out["weights/chosen_mean"] = (sum(sum(r["chosen_weights"]) for r in rows)
                                      / sum(c["tokens"] for c in chosen))
    return out


def weighted_rows(tokenizer, rows=ROWS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in rows:
        n_c = len(tokenizer(row["chosen"], add_special_tokens=False).input_ids)
        n_r = len(tokenizer(row["rejected"], add_special_tokens=False).input_ids)
        out.append({**row, "chosen_weights": (0.5 + torch.rand(n_c, generator=g)).tolist(),
                    "rejected_weights": (0.5 + torch.rand(n_r, generator=g)).tolist()})
    return out


# ------------------------------------------------------------------------------------------------------
# 1. dropout


def test_disable_dropout_covers_modules_and_config_attention_dropout():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ids = torch.randint(0, 100, (2, 9))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.5))
    for model in (tiny_gpt2(vocab_size=100, dropout=0.3), tiny_llama(0.5, vocab_size=100), qwen):
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits), "the model must apply dropout to begin with"
        assert disable_dropout(model) == []
        train_a, train_b = model(ids).logits, model(ids).logits
        with torch.no_grad():
            model.eval()
            evaluated = model(ids).logits
        torch.testing.assert_close(train_a, evaluated, rtol=0, atol=0)
        torch.testing.assert_close(train_b, evaluated, rtol=0, atol=0)
        # The config keeps the user's values (they end up in every saved config.json).
        assert any(v > 0 for k, v in model.config.to_dict().items() if ("dropout" in k or k.endswith("pdrop"))
                   and isinstance(v, float))


class _ConfigReadDropout(torch.nn.Module):
    """A model that reads its dropout from the config at every forward, as Falcon and GPT-Neo do in places."""

    def __init__(self):
        from transformers import PretrainedConfig

        super().__init__()
        self.config = PretrainedConfig(attention_dropout=0.5)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.linear(x), p=self.config.attention_dropout, training=self.training)


def test_config_dropout_is_zeroed_while_training_and_restored():
    model, x = _ConfigReadDropout().train(), torch.randn(4, 8)
    disable_dropout(model)
    assert not torch.equal(model(x), model(x)), "a dropout read from the config at forward time is still on"
    switch = ConfigDropout(model)
    with switch.zeroed():
        assert torch.equal(model(x), model(x)) and model.config.attention_dropout == 0
        with switch.original():
            assert model.config.attention_dropout == 0.5  # what a checkpoint saved meanwhile gets
        assert model.config.attention_dropout == 0
    assert model.config.attention_dropout == 0.5


def test_saved_models_keep_their_dropout(tmp_path, tokenizer):
    import json

    model = tiny_gpt2(dropout=0.1)
    args = config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    logs = train_logs(TokenWeightedDPOTrainer(model, args, train_dataset=ROWS[:4], processing_class=tokenizer))
    assert all(h["loss"] == pytest.approx(LOG2, abs=1e-7) for h in logs)  # dropout was off while training
    saved = json.loads((tmp_path / "out" / "checkpoint-1" / "config.json").read_text())
    assert saved["attn_pdrop"] == saved["resid_pdrop"] == saved["embd_pdrop"] == 0.1
    assert model.config.attn_pdrop == 0.1


def test_disable_dropout_keeps_the_lora_dropout_the_user_chose():
    model = lora(tiny_gpt2(vocab_size=100, dropout=0.2), dropout=0.25)
    kept = disable_dropout(model)
    assert kept and {p for _, p in kept} == {0.25} and all("lora_dropout" in name for name, _ in kept)
    base = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" not in n]
    assert base and all(m.p == 0 for m in base)


@pytest.mark.parametrize("disable", [True, False])
def test_policy_equal_to_reference_gives_log2_with_dropout_off(tmp_path, tokenizer, disable):
    """GPT-2 with dropout 0.1 + LoRA (B = 0: policy = reference), learning rate 0, three DPO steps."""
    torch.manual_seed(0)
    model = lora(tiny_gpt2(dropout=0.1))
    trainer = TokenWeightedDPOTrainer(model, config(tmp_path, disable_dropout=disable), train_dataset=ROWS[:4],
                                      processing_class=tokenizer)
    logs = train_logs(trainer)
    assert len(logs) == 3
    exact = all(h["loss"] == pytest.approx(LOG2, abs=1e-7) and h["rewards/margins"] == 0.0
                and h["rewards/accuracies"] == 0.0 for h in logs)
    # With dropout left on (the old behaviour) the policy's forward is noisy and the check fails.
    assert exact is disable


def test_config_attention_dropout_of_a_llama_is_switched_off(tmp_path, tokenizer):
    """Llama applies attention dropout from its config, without nn.Dropout modules: full fine-tune, lr 0."""
    model = tiny_llama(attention_dropout=0.5)
    trainer = TokenWeightedDPOTrainer(model, config(tmp_path, max_steps=2), train_dataset=ROWS[:4],
                                      processing_class=tokenizer)
    logs = train_logs(trainer)
    assert [h["loss"] for h in logs] == pytest.approx([LOG2, LOG2], abs=1e-7)
    assert all(h["rewards/margins"] == 0.0 for h in logs)


# ------------------------------------------------------------------------------------------------------
# 2. the reference runs in the policy's precision context


@pytest.mark.parametrize("reference", ["adapter", "ref_model", "frozen_copy", "precomputed"])
def test_bf16_reference_equals_policy_at_init(tmp_path, tokenizer, reference):
    torch.manual_seed(0)
    base = tiny_gpt2(seed=0)
    model = base if reference == "frozen_copy" else lora(base)
    ref_model = tiny_gpt2(seed=0) if reference == "ref_model" else None
    args = config(tmp_path, bf16=True, max_steps=2, precompute_ref_logps=reference == "precomputed")
    trainer = TokenWeightedDPOTrainer(model, args, train_dataset=ROWS[:4], eval_dataset=ROWS[:4],
                                      processing_class=tokenizer, ref_model=ref_model)
    before = trainer.evaluate()
    assert before["eval_rewards/margins"] == 0.0 and before["eval_rewards/chosen"] == 0.0
    for h in train_logs(trainer):
        assert h["rewards/margins"] == 0.0 and h["rewards/chosen"] == 0.0 and h["rewards/rejected"] == 0.0


# ------------------------------------------------------------------------------------------------------
# 3. SFT: the token mean over the global batch


def sft_gradient64(model, items) -> dict[str, torch.Tensor]:
    """Float64 gradient of sum over the chosen responses' tokens of -log p, divided by their total count."""
    m64 = copy.deepcopy(model).double().train()
    total, count = 0.0, 0
    for item in items:
        prompt, response = item["prompt_input_ids"], item["chosen_input_ids"]
        ids = torch.tensor([prompt + response])
        logits = m64(ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(response)]
        total = total - torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).sum()
        count += len(response)
    (total / count).backward()
    return {name: p.grad for name, p in m64.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch,accumulation", [(2, 1), (1, 2)])
def test_sft_is_the_token_mean_of_the_global_batch(tmp_path, tokenizer, batch, accumulation):
    rows = ROWS[:2]  # chosen responses of 3 and 6 tokens: a mean of per-micro-batch means would differ
    model = tiny_gpt2(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = 0.1
    args = config(tmp_path, loss="sft", beta=0.1, max_steps=1, learning_rate=lr, optim="sgd", max_grad_norm=0.0,
                  weight_decay=0.0, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    trainer = TokenWeightedDPOTrainer(model, args, train_dataset=rows, processing_class=tokenizer)
    expected = sft_gradient64(tiny_gpt2(seed=0), [trainer.train_dataset[i] for i in range(2)])
    trainer.train()
    for name, grad in expected.items():
        step = (before[name] - dict(model.named_parameters())[name].detach()).double() / lr
        torch.testing.assert_close(step, grad, rtol=1e-3, atol=2e-6, msg=name)


# ------------------------------------------------------------------------------------------------------
# 4. metrics: exact means, whatever the batching, under the prefix of the call


@pytest.mark.parametrize("loss", ["dpo", "tdpo2", "tis_dpo"])
def test_eval_metrics_are_exact_means_whatever_the_eval_batch(tmp_path, tokenizer, loss):
    rows = weighted_rows(tokenizer) if loss == "tis_dpo" else ROWS
    results = []
    for eval_batch in (2, 5):
        policy, ref = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
        trainer = TokenWeightedDPOTrainer(policy, config(tmp_path, loss=loss, per_device_eval_batch_size=eval_batch),
                                          eval_dataset=rows, processing_class=tokenizer, ref_model=ref)
        results.append(trainer.evaluate())
    items = [trainer.eval_dataset[i] for i in range(len(rows))]
    expected = expected_metrics(tiny_gpt2(seed=0), tiny_gpt2(seed=1), items, loss, beta=0.1, rows=rows)
    for key, value in expected.items():
        for got in results:
            assert got[f"eval_{key}"] == pytest.approx(value, rel=2e-5, abs=2e-6), key


def test_evaluate_and_predict_return_their_metrics_under_their_prefix(tmp_path, tokenizer):
    first, second = ROWS[:3], ROWS[3:]
    trainer = TokenWeightedDPOTrainer(tiny_gpt2(seed=0), config(tmp_path), eval_dataset=second,
                                      processing_class=tokenizer, ref_model=tiny_gpt2(seed=1))
    items_first = [trainer._prepare_dataset(first, tokenizer, trainer.args, "x")[i] for i in range(3)]
    items_second = [trainer.eval_dataset[i] for i in range(2)]
    want_first = expected_metrics(tiny_gpt2(seed=0), tiny_gpt2(seed=1), items_first, "dpo", 0.1)
    want_second = expected_metrics(tiny_gpt2(seed=0), tiny_gpt2(seed=1), items_second, "dpo", 0.1)

    test = trainer.evaluate(first, metric_key_prefix="test")
    predicted = trainer.predict(first)
    again = trainer.evaluate()
    for key in ("logps/chosen", "rewards/margins", "rewards/accuracies", "loss"):
        assert test[f"test_{key}"] == pytest.approx(want_first[key], rel=2e-5, abs=2e-6), key
        assert predicted.metrics[f"test_{key}"] == pytest.approx(want_first[key], rel=2e-5, abs=2e-6), key
        # Nothing of the two earlier calls leaks into the next evaluation.
        assert again[f"eval_{key}"] == pytest.approx(want_second[key], rel=2e-5, abs=2e-6), key
    assert not any(k.startswith("eval_") for k in test) and not any(k.startswith("eval_") for k in predicted.metrics)
    assert predicted.predictions.shape == (3, 2)
    logged = [h for h in trainer.state.log_history if "test_rewards/margins" in h]
    assert len(logged) == 1 and not any(k.startswith("rewards/") for k in logged[0])


def test_train_metrics_are_means_over_the_pairs_of_the_global_batch(tmp_path, tokenizer):
    """Batch 1 x accumulation 4 logs what batch 4 x 1 logs: sums and counts, not a mean of micro-batch means."""
    logs = []
    for batch, accumulation in ((4, 1), (1, 4), (3, 1)):
        trainer = TokenWeightedDPOTrainer(tiny_gpt2(seed=0), config(tmp_path, loss="tdpo2", max_steps=1,
                                                                    per_device_train_batch_size=batch,
                                                                    gradient_accumulation_steps=accumulation,
                                                                    train_sampling_strategy="sequential"),
                                          train_dataset=ROWS[:4] if batch != 3 else ROWS[:3],
                                          processing_class=tokenizer, ref_model=tiny_gpt2(seed=1))
        logs.append(train_logs(trainer)[0])
    items = [trainer.train_dataset[i] for i in range(3)]
    for key in ("rewards/margins", "logps/rejected", "kl/chosen", "kl/rejected"):
        assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-5, abs=1e-6), key
    want = expected_metrics(tiny_gpt2(seed=0), tiny_gpt2(seed=1), items, "tdpo2", 0.1)
    for key in ("rewards/margins", "logps/chosen", "kl/chosen", "kl/rejected"):
        assert logs[2][key] == pytest.approx(want[key], rel=2e-5, abs=2e-6), key


# ------------------------------------------------------------------------------------------------------
# 6. anchors stop at any end-of-turn id of the model


def test_anchors_stop_at_the_models_other_end_of_turn_id(tmp_path, tokenizer):
    end_of_turn = 13  # "." : the model's second end-of-turn id, besides the tokenizer's EOS
    model = tiny_gpt2(seed=0)
    with torch.no_grad():  # make every next token "end_of_turn": a huge embedding, copied into the final bias
        wte = model.transformer.wte.weight
        wte[end_of_turn] = wte[end_of_turn] / wte[end_of_turn].norm() * 50
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[end_of_turn])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    assert set(end_of_turn_ids(model, tokenizer)) == {tokenizer.eos_token_id, end_of_turn}
    args = config(tmp_path, loss="ti_dpo", anchor_max_new_tokens=8, ti_importance="uniform")
    trainer = TokenWeightedDPOTrainer(model, args, train_dataset=ROWS[:2], processing_class=tokenizer,
                                      ref_model=tiny_gpt2(seed=1))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    anchor = TrainingBatch(trainer, model, inputs).anchor
    responses = [row[row != trainer.ignore_index].tolist() for row in anchor.labels]
    # The labels are shifted by one: each anchor response is exactly the one end-of-turn token.
    assert responses == [[end_of_turn], [end_of_turn]]


# ------------------------------------------------------------------------------------------------------
# 7. conflicting sources, the collator's ignore_index


def test_precomputed_reference_conflicts_are_refused(tmp_path, tokenizer):
    pre = TokenWeightedDPOTrainer(lora(tiny_gpt2()), config(tmp_path, precompute_ref_logps=True),
                                  train_dataset=ROWS, processing_class=tokenizer)
    data = pre.train_dataset
    with pytest.raises(ValueError, match=r"train_dataset carries precomputed reference log-probs .* and ref_model "
                                         r"is given"):
        TokenWeightedDPOTrainer(lora(tiny_gpt2()), config(tmp_path), train_dataset=data, processing_class=tokenizer,
                                ref_model=tiny_gpt2())
    with pytest.raises(ValueError, match="already carries precomputed reference log-probs"):
        TokenWeightedDPOTrainer(lora(tiny_gpt2()), config(tmp_path, precompute_ref_logps=True), train_dataset=data,
                                processing_class=tokenizer)
    with pytest.raises(ValueError, match="loss='tdpo2' needs the reference's full distribution"):
        TokenWeightedDPOTrainer(lora(tiny_gpt2()), config(tmp_path, loss="tdpo2"), train_dataset=data,
                                processing_class=tokenizer)


def test_the_collators_ignore_index_is_used(tmp_path, tokenizer):
    states = []
    for collator in (None, PreferenceCollator(tokenizer.pad_token_id, ignore_index=-1)):
        torch.manual_seed(0)
        model = lora(tiny_gpt2())
        trainer = TokenWeightedDPOTrainer(model, config(tmp_path, learning_rate=5e-3, max_steps=2,
                                                        train_sampling_strategy="sequential"),
                                          train_dataset=ROWS[:4], processing_class=tokenizer, data_collator=collator)
        logs = train_logs(trainer)
        states.append(({k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k},
                       [h["loss"] for h in logs]))
    assert trainer.ignore_index == -1
    assert states[0][1] == pytest.approx(states[1][1], rel=1e-6)
    for name, value in states[0][0].items():
        torch.testing.assert_close(states[1][0][name], value, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------------
# 8. no deep copy of a quantised or dispatched policy


@pytest.mark.parametrize("attribute,value", [("hf_device_map", {"transformer": 0, "lm_head": "cpu"}),
                                             ("hf_quantizer", object()), ("is_loaded_in_4bit", True)])
def test_a_quantised_or_dispatched_policy_is_not_copied(tmp_path, tokenizer, attribute, value):
    model = tiny_gpt2()
    setattr(model, attribute, value)
    with pytest.raises(ValueError, match=r"pass the reference explicitly \(ref_model=.*PEFT adapter"):
        TokenWeightedDPOTrainer(model, config(tmp_path), train_dataset=ROWS, processing_class=tokenizer)


def test_a_dispatched_ref_model_stays_where_it_is(tmp_path, tokenizer):
    ref = tiny_gpt2(seed=1)
    ref.hf_device_map = {"transformer": "cpu", "lm_head": "disk"}

    def refuse_move(*args, **kwargs):
        raise AssertionError("a dispatched reference must not be moved")

    ref.to = refuse_move
    trainer = TokenWeightedDPOTrainer(lora(tiny_gpt2()), config(tmp_path), train_dataset=ROWS,
                                      processing_class=tokenizer, ref_model=ref)
    assert trainer.ref_model is ref


# ------------------------------------------------------------------------------------------------------
# the registry is the one place


def test_a_loss_added_to_the_registry_alone_trains(tmp_path, tokenizer, monkeypatch):
    def half_beta_dpo(batch: TrainingBatch):
        return dpo_loss(batch.policy_logits, batch.labels, ref_logps=batch.ref_logps, beta=batch.args.beta / 2,
                        **batch.op_kwargs)

    monkeypatch.setitem(LOSS_REGISTRY, "half_beta_dpo", LossSpec("half_beta_dpo", "DPO at beta / 2", half_beta_dpo,
                                                                 fields=("beta",)))
    with pytest.raises(ValueError, match="label_smoothing=0.1 is not read by loss='half_beta_dpo'"):
        config(tmp_path, loss="half_beta_dpo", label_smoothing=0.1)
    runs = []
    for loss, beta in (("half_beta_dpo", 0.4), ("dpo", 0.2)):
        torch.manual_seed(0)
        model = lora(tiny_gpt2())
        trainer = TokenWeightedDPOTrainer(model, config(tmp_path, loss=loss, beta=beta, learning_rate=5e-3,
                                                        train_sampling_strategy="sequential"),
                                          train_dataset=ROWS[:4], processing_class=tokenizer)
        runs.append([h["loss"] for h in train_logs(trainer)])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_cli_help_lists_every_registered_loss():
    import contextlib
    import io

    from tidpo.cli.train import parse_train_args

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_train_args(["--help"])
    text = "".join(out.getvalue().split())  # argparse re-wraps the help (also after hyphens)
    for name, spec in LOSS_REGISTRY.items():
        assert f"{name}:{''.join(spec.summary.split())}" in text


def test_reference_logps_and_loss_without_dropout_match_functional_dpo(tmp_path, tokenizer):
    """The trainer's DPO loss on a batch equals a float64 per-pair computation (independent reference)."""
    policy, ref = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    trainer = TokenWeightedDPOTrainer(policy, config(tmp_path), eval_dataset=ROWS, processing_class=tokenizer,
                                      ref_model=ref)
    items = [trainer.eval_dataset[i] for i in range(len(ROWS))]
    inputs = trainer.data_collator(items)
    with torch.no_grad():
        out = trainer.preference_loss(policy, inputs)
    want = expected_metrics(tiny_gpt2(seed=0), tiny_gpt2(seed=1), items, "dpo", 0.1)
    assert float(out.loss) == pytest.approx(want["loss"], rel=2e-5)


# ------------------------------------------------------------------------------------------------------
# every loss is the exact mean over the items of the global batch; what the logs and evaluations report


def dpo_gradient64(policy, ref, items, beta: float) -> dict[str, torch.Tensor]:
    """Float64 gradient of the mean over the pairs of -log sigmoid(beta h), one pair and one sequence at a time."""
    m64, r64 = copy.deepcopy(policy).double().train(), copy.deepcopy(ref).double().eval()

    def logp(model, item, side):
        prompt, response = item["prompt_input_ids"], item[f"{side}_input_ids"]
        ids = torch.tensor([prompt + response])
        logits = model(ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(response)]
        return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).sum()

    total = 0.0
    for item in items:
        with torch.no_grad():
            ref_margin = logp(r64, item, "chosen") - logp(r64, item, "rejected")
        h = logp(m64, item, "chosen") - logp(m64, item, "rejected") - ref_margin
        total = total - torch.nn.functional.logsigmoid(beta * h)
    (total / len(items)).backward()
    return {name: p.grad for name, p in m64.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch,accumulation", [(5, 1), (4, 2), (2, 3)])
def test_dpo_is_the_pair_mean_of_the_global_batch_with_uneven_micro_batches(tmp_path, tokenizer, batch,
                                                                            accumulation):
    """5 pairs as 4 + 1 or 2 + 2 + 1: every pair weighs 1/5, as in one batch of 5 (not 1/2 for the lone pair)."""
    model, lr = tiny_gpt2(seed=0), 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = config(tmp_path, max_steps=1, learning_rate=lr, optim="sgd", max_grad_norm=0.0, weight_decay=0.0,
                  per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    trainer = TokenWeightedDPOTrainer(model, args, train_dataset=ROWS, processing_class=tokenizer,
                                      ref_model=tiny_gpt2(seed=1))
    expected = dpo_gradient64(tiny_gpt2(seed=0), tiny_gpt2(seed=1), [trainer.train_dataset[i] for i in range(5)], 0.1)
    logs = train_logs(trainer)
    for name, grad in expected.items():
        step = (before[name] - dict(model.named_parameters())[name].detach()).double() / lr
        torch.testing.assert_close(step, grad, rtol=1e-3, atol=2e-6, msg=name)
    items = [trainer.train_dataset[i] for i in range(5)]
    want = expected_metrics(tiny_gpt2(seed=0), tiny_gpt2(seed=1), items, "dpo", 0.1)
    assert logs[0]["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_a_dict_of_eval_datasets_is_evaluated_by_name_during_training(tmp_path, tokenizer):
    trainer = TokenWeightedDPOTrainer(tiny_gpt2(seed=0), config(tmp_path, max_steps=1, eval_strategy="steps",
                                                                eval_steps=1),
                                      train_dataset=ROWS, eval_dataset={"a": ROWS[:2], "b": ROWS[2:]},
                                      processing_class=tokenizer, ref_model=tiny_gpt2(seed=1))
    trainer.train()
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"eval_a_rewards/margins", "eval_b_rewards/margins", "eval_a_loss", "eval_b_loss"} <= logged
    assert trainer.evaluate("a")["eval_logps/chosen"] == pytest.approx(
        expected_metrics(tiny_gpt2(seed=0), tiny_gpt2(seed=1), [trainer.eval_dataset["a"][i] for i in range(2)],
                         "dpo", 0.1)["logps/chosen"], rel=2e-5)


def test_evaluate_and_predict_refuse_precomputed_reference_beside_ref_model(tmp_path, tokenizer):
    pre = TokenWeightedDPOTrainer(lora(tiny_gpt2()), config(tmp_path, precompute_ref_logps=True),
                                  train_dataset=ROWS, processing_class=tokenizer).train_dataset
    trainer = TokenWeightedDPOTrainer(lora(tiny_gpt2()), config(tmp_path), train_dataset=ROWS,
                                      processing_class=tokenizer, ref_model=tiny_gpt2(seed=1))
    for call in (trainer.evaluate, trainer.predict):
        with pytest.raises(ValueError, match="carries precomputed reference log-probs .* and ref_model is given"):
            call(pre)
    rows = [{**ROWS[0], "chosen_ref_logps": [0.0], "rejected_ref_logps": [0.0]}]
    with pytest.raises(ValueError, match=r"row 0 \(0-based\) carries 'chosen_ref_logps'"):
        trainer.evaluate(rows)


def test_the_final_summary_has_no_partial_window_of_train_metrics(tmp_path, tokenizer):
    trainer = TokenWeightedDPOTrainer(tiny_gpt2(seed=0), config(tmp_path, max_steps=5, logging_steps=3,
                                                                learning_rate=5e-3),
                                      train_dataset=ROWS, processing_class=tokenizer, ref_model=tiny_gpt2(seed=1))
    result = trainer.train()
    assert "train_loss" in result.metrics and not any(k.startswith("rewards/") for k in result.metrics)
    periodic = [h for h in trainer.state.log_history if "loss" in h]
    assert len(periodic) == 1 and "rewards/margins" in periodic[0]


def test_sft_metrics_do_not_depend_on_the_eval_batch(tmp_path, tokenizer):
    results = []
    for eval_batch in (1, 2, 4):
        trainer = TokenWeightedDPOTrainer(tiny_gpt2(seed=0), config(tmp_path, loss="sft",
                                                                    per_device_eval_batch_size=eval_batch),
                                          eval_dataset=ROWS, processing_class=tokenizer)
        results.append(trainer.evaluate())
    items = [trainer.eval_dataset[i] for i in range(len(ROWS))]
    chosen = [response_values(tiny_gpt2(seed=0), it, "chosen") for it in items]
    tokens = sum(c["tokens"] for c in chosen)
    for got in results:
        assert got["eval_sft/tokens"] == pytest.approx(tokens / len(ROWS))  # response tokens per pair
        assert got["eval_sft/nll"] == pytest.approx(-sum(c["logp"] for c in chosen) / tokens, rel=2e-5)
        assert got["eval_loss"] == pytest.approx(got["eval_sft/nll"], rel=1e-6)


def test_embedded_pairs_follow_the_tokenizer(tmp_path):
    """Chat messages for a tokenizer with a chat template, plain text for one without (the tiny GPT-2)."""
    from tidpo.cli.train import RunArguments, build_trainer

    trainer = build_trainer(RunArguments(model="tiny-gpt2", data="embedded", eval_size=2, max_train_pairs=4),
                            config(tmp_path))
    assert len(trainer.train_dataset) == 4 and len(trainer.eval_dataset) == 2
