"""TI-DPO's attribution targets (top_logit, sequence_logp, log_ratio) against float64 references computed one
unpadded sequence at a time, and the trainer's shared policy forward against the separate attribution pass."""

from __future__ import annotations

import logging

import pytest
import torch

from tidpo.apps.assets import gpt2_tokenizer, tiny_gpt2
from tidpo.trainer import TokenWeightedDPOConfig, TokenWeightedDPOTrainer
from tidpo.trainer.batch import TrainingBatch
from tidpo.trainer.models import apply_lora
from tidpo.weights.attribution import TARGETS, attribution_target, token_importance

ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a large city in Spain, I think."},
    {"prompt": "Two plus two equals", "chosen": " four, of course.", "rejected": " five."},
    {"prompt": "Water freezes at", "chosen": " zero degrees Celsius at sea level.", "rejected": " noon."},
]


def padded_batch():
    """Right-padded ids, mask and (unshifted) labels: a prompt of 2 tokens, the rest response."""
    tok = gpt2_tokenizer()
    enc = tok(["The capital of France is Paris.", "Two plus two", "Water freezes at zero degrees Celsius."],
              padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    labels[:, :2] = -100
    return enc.input_ids, enc.attention_mask, labels


def float64_importance(model, ref, ids, labels, target):
    """|| dL / dd_i ||_1 for one unpadded sequence, float64, the target written out from the logits, with ``d_i``
    one shift of token i's embedding shared by both models."""
    shift = torch.zeros(1, len(ids), model.config.n_embd, dtype=torch.float64, requires_grad=True)
    logits = model(inputs_embeds=model.get_input_embeddings()(ids[None]) + shift).logits[0]
    if target == "top_logit":
        value = logits[-1].max()
    else:
        positions = (labels[1:] != -100).nonzero().squeeze(1)  # logits[t] predicts token t + 1
        tokens = ids[1:][positions]

        def seq_logp(z):
            return torch.log_softmax(z[positions], -1).gather(-1, tokens[:, None]).sum()

        value = seq_logp(logits)
        if target == "log_ratio":
            value = value - seq_logp(ref(inputs_embeds=ref.get_input_embeddings()(ids[None]) + shift).logits[0])
    (grad,) = torch.autograd.grad(value, shift)
    return grad[0].abs().sum(-1)


@pytest.mark.parametrize("target", TARGETS)
def test_importance_of_every_target_equals_a_float64_reference(target):
    ids, mask, labels = padded_batch()
    model, ref = tiny_gpt2(seed=3), tiny_gpt2(seed=4)

    def reference(input_ids, attention_mask, shift):
        return ref(inputs_embeds=ref.get_input_embeddings()(input_ids) + shift, attention_mask=attention_mask).logits

    got = token_importance(model, ids, mask, target=target, labels=labels, reference=reference)
    model64, ref64 = tiny_gpt2(seed=3).double().eval(), tiny_gpt2(seed=4).double().eval()
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        truth = float64_importance(model64, ref64, ids[r, :n], labels[r, :n], target)
        assert truth.abs().max() > 0
        torch.testing.assert_close(got[r, :n].double(), truth, rtol=2e-4, atol=1e-6)
        assert torch.all(got[r, n:] == 0)


def test_targets_differ_and_need_what_they_read():
    ids, mask, labels = padded_batch()
    model = tiny_gpt2(seed=3)
    top = token_importance(model, ids, mask, target="top_logit")
    seq = token_importance(model, ids, mask, target="sequence_logp", labels=labels)
    assert not torch.allclose(top, seq)
    with pytest.raises(ValueError, match="target must be one of"):
        token_importance(model, ids, mask, target="top_prob")
    with pytest.raises(ValueError, match="needs the labels"):
        token_importance(model, ids, mask, target="sequence_logp")
    with pytest.raises(ValueError, match="needs reference"):
        token_importance(model, ids, mask, target="log_ratio", labels=labels)
    with pytest.raises(ValueError, match="needs ref_logits"):
        attribution_target("log_ratio", model(ids).logits, mask, labels)


# ------------------------------------------------------------------------------------------------ the trainer

def lora_policy(last_layers: int | None = None):
    """A LoRA policy whose adapters are not zero, so the policy differs from its adapter-disabled reference."""
    torch.manual_seed(0)
    model = apply_lora(tiny_gpt2(seed=5), r=4, alpha=8, last_layers=last_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model


def make_trainer(tmp_path, model, **overrides):
    args = dict(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=3, max_steps=1,
                learning_rate=1e-3, save_strategy="no", report_to=[], disable_tqdm=True, seed=0, loss="ti_dpo",
                gamma=0.0)
    args.update(overrides)
    return TokenWeightedDPOTrainer(model, TokenWeightedDPOConfig(**args), train_dataset=ROWS,
                                   processing_class=gpt2_tokenizer())


def one_step(tmp_path, shared: bool, target: str, last_layers: int | None = None, dtype=torch.float32,
             make_model=None, **overrides):
    """Weights, loss and LoRA gradients of one training micro-step on all pairs (of :func:`lora_policy`, or of
    ``make_model()``)."""
    model = (lora_policy(last_layers) if make_model is None else make_model()).to(dtype)
    trainer = make_trainer(tmp_path, model, ti_shared_forward=shared, ti_attribution_target=target, **overrides)
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))]))
    model.train()
    with trainer._config_dropout.zeroed():  # as in train(): GPT-2's config lists a (here unused) dropout
        batch = TrainingBatch(trainer, model, inputs)
        out = trainer.loss_spec.compute(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return batch, out.loss.detach(), grads


@pytest.mark.parametrize("target, fused, last_layers", [
    *[(target, True, None) for target in TARGETS], ("top_logit", False, None),
    *[(target, True, 1) for target in ("top_logit", "log_ratio")]])
def test_the_shared_forward_gives_the_separate_passes_weights_loss_and_gradients(tmp_path, target, fused,
                                                                                  last_layers):
    """All layers adapted, and only the last (the loss's backward stops at the gate below it)."""
    shared, shared_loss, shared_grads = one_step(tmp_path, True, target, last_layers, fused_lm_head=fused)
    separate, separate_loss, separate_grads = one_step(tmp_path, False, target, last_layers, fused_lm_head=fused)
    assert shared.shares_attribution_forward and not separate.shares_attribution_forward
    assert (shared.trainer.frozen_prefix_gate.layer is None) == (last_layers is None)
    weights = separate.online_weights
    assert weights.std() > 0.01  # the attribution moved the weights away from the flat prior
    torch.testing.assert_close(shared.online_weights, weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared_loss, separate_loss, rtol=1e-5, atol=1e-7)
    for name, grad in separate_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-7 * (1 + float(grad.abs().max())),
                                   msg=name)


def test_active_dropout_keeps_the_separate_pass_and_says_why(tmp_path, caplog):
    model = apply_lora(tiny_gpt2(seed=5), r=4, alpha=8, dropout=0.1)  # adapter dropout survives disable_dropout
    trainer = make_trainer(tmp_path, model)
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]]))
    model.train()
    with caplog.at_level(logging.INFO, logger="tidpo.trainer.trainer"):
        batch = TrainingBatch(trainer, model, inputs)
        assert not batch.shares_attribution_forward
    assert "TI-DPO: a separate attribution pass (dropout is active in train mode" in caplog.text
    with torch.no_grad():  # evaluation never shares either: no graph to differentiate
        assert not TrainingBatch(trainer, model.eval(), inputs).shares_attribution_forward


@pytest.mark.parametrize("target", ["log_ratio", "sequence_logp"])
def test_a_separate_reference_model_shares_the_forward_and_matches_the_separate_pass(tmp_path, target):
    """log_ratio with a separate reference: the reference reads its own embeddings plus the shared shift."""
    results = []
    for shared in (True, False):
        torch.manual_seed(0)
        model = tiny_gpt2(seed=5)
        trainer = TokenWeightedDPOTrainer(model, TokenWeightedDPOConfig(
            output_dir=str(tmp_path), use_cpu=True, report_to=[], loss="ti_dpo", gamma=0.0,
            per_device_train_batch_size=3, ti_attribution_target=target, ti_shared_forward=shared),
            train_dataset=ROWS,
            processing_class=gpt2_tokenizer(), ref_model=tiny_gpt2(seed=6))
        inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(3)]))
        model.train()
        with trainer._config_dropout.zeroed():
            batch = TrainingBatch(trainer, model, inputs)
            loss = trainer.loss_spec.compute(batch).loss
        loss.backward()
        assert batch.shares_attribution_forward is shared
        results.append((batch.online_weights, loss.detach(), model.transformer.wte.weight.grad.clone()))
    (w1, l1, g1), (w2, l2, g2) = results
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)  # the trained embedding still gets the loss's gradient


def test_log_ratio_needs_a_reference_of_the_policys_width(tmp_path):
    with pytest.raises(ValueError, match="ti_attribution_target='log_ratio' shifts each token's embedding by the "
                                         "same vector"):
        TokenWeightedDPOTrainer(tiny_gpt2(seed=5), TokenWeightedDPOConfig(
            output_dir=str(tmp_path), use_cpu=True, report_to=[], loss="ti_dpo", gamma=0.0,
            ti_attribution_target="log_ratio"), train_dataset=ROWS, processing_class=gpt2_tokenizer(),
            ref_model=tiny_gpt2(seed=6, n_embd=64))
    with pytest.warns(UserWarning, match="ti_attribution_target='sequence_logp' is not used by loss='ti_dpo' in "
                                         "this setting"):
        TokenWeightedDPOConfig(output_dir=str(tmp_path), loss="ti_dpo", ti_importance="uniform",
                               ti_attribution_target="sequence_logp")
