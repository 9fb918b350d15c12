"""TI-DPO in training: gradient attribution, mixing, anchors and the trainer's `ti_dpo` loss (docs/methods.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from tidpo.apps.assets import gpt2_tokenizer, tiny_gpt2
from tidpo.data import PreferenceCollator, tokenize_preference_rows
from tidpo.trainer import TokenWeightedDPOConfig, TokenWeightedDPOTrainer
from tidpo.trainer.anchors import chosen_prefix_context, sample_anchors
from tidpo.trainer.config import TI_OFFICIAL_PRESET
from tidpo.weights.attribution import ti_dpo_token_weights, token_importance, weight_entropy

ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a large city in Spain, I think."},
    {"prompt": "Two plus two equals", "chosen": " four, of course.", "rejected": " five."},
]


def padded_batch():
    tok = gpt2_tokenizer()
    texts = ["The capital of France is Paris.", "Two plus two", "Water freezes at zero degrees Celsius, always."]
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def reference_importance(model, ids):
    """float64, one unpadded sequence at a time: || d max(logits[last]) / d e_i ||_1."""
    model = model.double().eval()
    embeds = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits[0, -1]
    (grad,) = torch.autograd.grad(logits.max(), embeds)
    return grad[0].abs().sum(-1)


def test_attribution_equals_float64_autograd_reference():
    ids, mask = padded_batch()
    model = tiny_gpt2(seed=3)
    got = token_importance(model, ids, mask)
    reference = tiny_gpt2(seed=3)
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        truth = reference_importance(reference, ids[r, :n])
        torch.testing.assert_close(got[r, :n].double(), truth, rtol=2e-4, atol=1e-6)
        assert torch.all(got[r, n:] == 0)


@pytest.mark.parametrize("training", [True, False])
def test_attribution_leaves_grads_and_mode_untouched(training):
    ids, mask = padded_batch()
    model = tiny_gpt2(seed=1).train(training)
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i))
    token_importance(model, ids, mask)
    assert model.training is training and all(m.training is training for m in model.modules())
    for i, p in enumerate(params):
        assert torch.equal(p.grad, torch.full_like(p, float(i)))


def test_mixed_weights_properties():
    ids, mask = padded_batch()
    labels = ids.clone()
    labels[:, :2] = -100
    labels[mask == 0] = -100
    model = tiny_gpt2(seed=2)
    response = labels != -100
    for scope in ("response", "sequence"):
        w = ti_dpo_token_weights(model, ids, mask, labels, lam=0.7, sigma_div=4.0, scope=scope)
        assert torch.all(w[~response] == 0) and torch.all(w[response] > 0)
    w = ti_dpo_token_weights(model, ids, mask, labels, scope="response")
    torch.testing.assert_close(w.sum(-1), response.sum(-1).float(), rtol=1e-5, atol=1e-5)  # mean 1
    # lambda = 1: proportional to the raw importance over the response.
    raw = token_importance(model, ids, mask)
    w1 = ti_dpo_token_weights(model, ids, mask, labels, lam=1.0)
    for r in range(ids.shape[0]):
        sel = response[r]
        torch.testing.assert_close(w1[r, sel], raw[r, sel] / raw[r, sel].sum() * sel.sum(), rtol=1e-5, atol=1e-6)
    # lambda = 0: the Gaussian prior alone, peaked in the middle of the response.
    w0 = ti_dpo_token_weights(model, ids, mask, labels, lam=0.0)
    row = w0[2, response[2]]
    assert int(row.argmax()) in ((row.numel() - 1) // 2, row.numel() // 2)
    # Entropy of p = w / sum(w): uniform weights give log n per row, the maximum.
    uniform = torch.where(response, 1.0, 0.0)
    expected = response.sum(-1).double().log().mean()
    assert float(weight_entropy(uniform, response)) == pytest.approx(float(expected), rel=1e-5)
    assert float(weight_entropy(w1, response)) <= float(expected) + 1e-6
    with pytest.raises(ValueError, match="scope must be one of"):
        ti_dpo_token_weights(model, ids, mask, labels, scope="prompt")


class _NeverCalled(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the uniform / random ablations must not run the model")


def test_uniform_and_random_importance_ablations():
    ids, mask = padded_batch()
    labels = ids.clone()
    labels[:, :2] = -100
    labels[mask == 0] = -100
    response = labels != -100
    uniform = ti_dpo_token_weights(_NeverCalled(), ids, mask, labels, importance="uniform")
    assert torch.equal(uniform, response.float())
    draws = [ti_dpo_token_weights(_NeverCalled(), ids, mask, labels, importance="random",
                                  generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])  # reproducible from the generator
    w = draws[0]
    assert torch.all(w[~response] == 0) and torch.all(w[response] >= 0)
    torch.testing.assert_close(w.sum(-1), response.sum(-1).float(), rtol=1e-5, atol=1e-5)  # mean 1
    assert float(w[response].std()) > 0.05  # not constant
    with pytest.raises(ValueError, match="importance must be one of"):
        ti_dpo_token_weights(_NeverCalled(), ids, mask, labels, importance="softmax")


def left_padded_prompts():
    tok = gpt2_tokenizer()
    tok.padding_side = "left"
    enc = tok(["Hello there, how", "A"], padding=True, return_tensors="pt")
    return tok, enc.input_ids, enc.attention_mask


def test_anchors_are_sampled_from_the_prompt_and_masked_after_eos():
    tok, ids, mask = left_padded_prompts()
    model = tiny_gpt2(seed=0)
    torch.manual_seed(0)
    out = sample_anchors(model, ids, mask, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         max_new_tokens=6)
    for r in range(ids.shape[0]):
        prompt = ids[r][mask[r].bool()]
        p = len(prompt)
        # The collator's layout: the prompt starts at column 0, right padding after the anchor.
        assert torch.equal(out["input_ids"][r, :p], prompt)
        assert torch.all(out["labels"][r, :p] == -100)
        n = int(out["attention_mask"][r].sum())
        assert torch.all(out["attention_mask"][r, :n] == 1) and torch.all(out["attention_mask"][r, n:] == 0)
        gen, lab = out["input_ids"][r, p:n], out["labels"][r, p:n]
        assert len(gen) >= 1 and torch.equal(lab, gen) and torch.all(out["labels"][r, n:] == -100)
        eos = (gen == tok.eos_token_id).nonzero()
        # The anchor ends at its first EOS (kept) or after max_new_tokens.
        assert (len(eos) == 1 and int(eos[0]) == len(gen) - 1) or (len(eos) == 0 and len(gen) == 6)
    with pytest.raises(ValueError, match="prefix_lengths must be"):
        sample_anchors(model, ids, mask, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       max_new_tokens=2, prefix_lengths=torch.zeros(3, dtype=torch.long))


def test_anchor_batch_scores_like_each_anchor_alone():
    """Rows of different prompt lengths score exactly as unpadded (absolute positions: GPT-2)."""
    tok, ids, mask = left_padded_prompts()
    model = tiny_gpt2(seed=0).eval()
    torch.manual_seed(1)
    out = sample_anchors(model, ids, mask, pad_token_id=tok.pad_token_id, eos_token_id=None, max_new_tokens=5)
    with torch.no_grad():
        batch = model(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits
        for r in range(ids.shape[0]):
            n = int(out["attention_mask"][r].sum())
            alone = model(input_ids=out["input_ids"][r:r + 1, :n]).logits[0]
            torch.testing.assert_close(batch[r, :n], alone, rtol=1e-5, atol=1e-5)


def collated_pairs(fraction_rows=ROWS):
    tok = gpt2_tokenizer()
    items = tokenize_preference_rows(fraction_rows, tok, progress=False)
    return tok, items, PreferenceCollator(tok.pad_token_id)([items[i] for i in range(len(items))])


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_chosen_prefix_context_is_prompt_plus_chosen_prefix(fraction):
    tok, items, batch = collated_pairs()
    context, context_mask, prefix = chosen_prefix_context(
        batch["input_ids"], batch["attention_mask"], batch["labels"], num_pairs=len(items), fraction=fraction,
        pad_token_id=tok.pad_token_id)
    assert context.shape[0] == len(items) and prefix.dtype == torch.long
    for r, item in enumerate(items):
        chosen = item["chosen_input_ids"]
        k = math.floor(fraction * (len(chosen) - 1))
        expected = item["prompt_input_ids"] + chosen[:k]
        assert int(prefix[r]) == k
        # Left padding: the context is the last len(expected) columns.
        assert context[r, -len(expected):].tolist() == expected
        assert int(context_mask[r].sum()) == len(expected) and torch.all(context_mask[r, -len(expected):] == 1)
        assert torch.all(context[r, :context.shape[1] - len(expected)] == tok.pad_token_id)
    if fraction == 0.0:
        # Without a prefix the context is exactly the collator's left-padded prompt.
        assert torch.equal(context, batch["prompt_input_ids"])
    with pytest.raises(ValueError, match="fraction must be in"):
        chosen_prefix_context(batch["input_ids"], batch["attention_mask"], batch["labels"], num_pairs=2,
                              fraction=1.0, pad_token_id=0)
    with pytest.raises(ValueError, match="num_pairs must be in"):
        chosen_prefix_context(batch["input_ids"], batch["attention_mask"], batch["labels"], num_pairs=3,
                              fraction=0.5, pad_token_id=0)


def test_anchor_from_chosen_continues_the_chosen_prefix():
    tok, items, batch = collated_pairs()
    context, context_mask, prefix = chosen_prefix_context(
        batch["input_ids"], batch["attention_mask"], batch["labels"], num_pairs=len(items), fraction=0.6,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = sample_anchors(tiny_gpt2(seed=0), context, context_mask, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, max_new_tokens=4, prefix_lengths=prefix)
    for r, item in enumerate(items):
        k, p = int(prefix[r]), len(item["prompt_input_ids"])
        assert k >= 1  # both chosen responses are long enough for a prefix at f = 0.6
        assert out["input_ids"][r, :p].tolist() == item["prompt_input_ids"]
        anchor = out["labels"][r][out["labels"][r] != -100]
        # The anchor response = the chosen prefix, then 1..4 sampled tokens; the prompt is not in it.
        assert anchor[:k].tolist() == item["chosen_input_ids"][:k] and 1 <= len(anchor) - k <= 4
        assert torch.all(out["labels"][r, :p] == -100)


def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=2, max_steps=3,
                  learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                  loss="ti_dpo", anchor_max_new_tokens=6)
    kwargs.update(overrides)
    return TokenWeightedDPOConfig(**kwargs)


def test_ti_dpo_training_steps_log_triplet_and_weights(tmp_path):
    from tidpo.trainer.models import apply_lora

    torch.manual_seed(0)
    model = apply_lora(tiny_gpt2(), r=4, alpha=8)
    trainer = TokenWeightedDPOTrainer(model, config(tmp_path), train_dataset=ROWS, processing_class=gpt2_tokenizer())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(math.isfinite(h["loss"]) for h in logged)
    for key in ("triplet/loss", "weights/entropy", "kl/chosen", "ti/attribution_seconds", "ti/step_seconds"):
        assert key in logged[0] and math.isfinite(logged[0][key])
    assert all(0 < h["ti/attribution_share"] < 1 for h in logged)
    assert all(h["ti/attribution_seconds"] < h["ti/step_seconds"] for h in logged)
    assert model.training  # the attribution and the sampling restored train mode


@pytest.mark.parametrize("importance", ["uniform", "random"])
def test_ti_dpo_ablation_training_steps(tmp_path, importance):
    torch.manual_seed(0)
    model = tiny_gpt2()
    trainer = TokenWeightedDPOTrainer(model, config(tmp_path, max_steps=2, ti_importance=importance, gamma=0.0),
                                      train_dataset=ROWS, processing_class=gpt2_tokenizer(), ref_model=tiny_gpt2())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) for h in logged)
    assert all(math.isfinite(h["weights/entropy"]) for h in logged)


def test_ti_dpo_training_with_anchors_continued_from_chosen(tmp_path):
    from tidpo.trainer.models import apply_lora

    torch.manual_seed(0)
    model = apply_lora(tiny_gpt2(), r=4, alpha=8)
    args = config(tmp_path, max_steps=2, anchor_source="chosen", anchor_chosen_fraction=0.5)
    trainer = TokenWeightedDPOTrainer(model, args, train_dataset=ROWS, processing_class=gpt2_tokenizer())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) and math.isfinite(h["triplet/loss"]) for h in logged)


def test_ti_preset_and_validation(tmp_path):
    c = config(tmp_path, ti_preset="official")
    assert {k: getattr(c, k) for k in TI_OFFICIAL_PRESET} == TI_OFFICIAL_PRESET
    d = config(tmp_path)
    assert (d.beta, d.gamma, d.ti_lambda, d.prior_sigma_div, d.importance_scope) == (0.1, 0.1, 0.7, 4.0, "response")
    with pytest.raises(ValueError, match="ti_preset='official' is not read by loss='dpo'"):
        config(tmp_path, loss="dpo", anchor_max_new_tokens=64, ti_preset="official")
    with pytest.raises(ValueError, match="ti_lambda must be in"):
        config(tmp_path, ti_lambda=1.5)
    with pytest.raises(ValueError, match="precompute_ref_logps cannot serve loss='ti_dpo'"):
        config(tmp_path, precompute_ref_logps=True)
    with pytest.raises(ValueError, match="ti_importance must be one of"):
        config(tmp_path, ti_importance="softmax")
    with pytest.raises(ValueError, match="anchor_source must be one of"):
        config(tmp_path, anchor_source="rejected")
    with pytest.raises(ValueError, match="anchor_chosen_fraction must be in"):
        config(tmp_path, anchor_source="chosen", anchor_chosen_fraction=1.0)
    assert config(tmp_path, ti_preset="official").anchor_source == "prompt"
    with pytest.raises(ValueError, match="ti_preset='official' sets anchor_source='prompt', but "
                                         "anchor_source='chosen'"):
        config(tmp_path, anchor_source="chosen", ti_preset="official")
    assert config(tmp_path, beta=0.2, ti_preset="official").beta == 0.2  # the preset's own value is no conflict
    with pytest.warns(UserWarning, match="anchor_top_k=5 is not used by loss='ti_dpo' in this setting: it is read "
                                         "only with gamma > 0"):
        config(tmp_path, gamma=0.0, anchor_top_k=5)
