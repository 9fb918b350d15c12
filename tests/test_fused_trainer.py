"""The trainer with ``fused_lm_head`` (the default) against the materialised logits (``fused_lm_head=False``).

Same model, data, seed and steps, fp32, dropout off: the logged losses, gradient norms and rewards of 3 training
steps agree within 1e-5 for every loss, with every kind of reference (the adapter-disabled policy, a separate
model, a frozen copy, precomputed log-probs) and with tied embeddings trained in full. What cannot be fused is
refused with a message that says how to go on.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tidpo.apps.assets import gpt2_tokenizer, tiny_gpt2
from tidpo.trainer import TokenWeightedDPOConfig, TokenWeightedDPOTrainer
from tidpo.trainer.batch import TrainingBatch
from tidpo.trainer.fused_head import FusedHeadOutput, add_fused_lm_head
from tidpo.trainer.models import apply_lora

ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a large city in Spain, I think."},
    {"prompt": "Two plus two equals", "chosen": " four, of course.", "rejected": " five."},
    {"prompt": "Water freezes at", "chosen": " zero degrees Celsius.", "rejected": " fifty degrees."},
    {"prompt": "The opposite of hot is", "chosen": " cold.", "rejected": " loud and bright."},
]
LOGGED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "kl/chosen",
          "triplet/loss", "sft/nll")


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def _weights(rows, tokenizer):
    """Deterministic token weights (one per response token but the final EOS) for the TIS-DPO rows."""
    out = []
    for i, row in enumerate(rows):
        extra = {}
        for side in ("chosen", "rejected"):
            n = len(tokenizer(row[side], add_special_tokens=False).input_ids)
            extra[f"{side}_weights"] = [0.5 + ((i + j) % 3) * 0.4 for j in range(n)]
        out.append({**row, **extra})
    return out


def _run(tmp_path, tokenizer, fused: bool, *, loss="dpo", reference="adapter", full=False, **overrides):
    """Train 3 steps; the logged values and the trained weights."""
    torch.manual_seed(0)
    model = tiny_gpt2()
    ref_model = None
    if reference == "separate":
        ref_model = copy.deepcopy(model)
    if not full:
        model = apply_lora(model, r=4, alpha=8)
    rows = _weights(ROWS, tokenizer) if loss == "tis_dpo" else ROWS
    args = TokenWeightedDPOConfig(
        output_dir=str(tmp_path / f"out-{fused}"), use_cpu=True, per_device_train_batch_size=2, max_steps=3,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, seed=0, loss=loss, fused_lm_head=fused, max_length=32,
        precompute_ref_logps=reference == "precompute", **overrides)
    trainer = TokenWeightedDPOTrainer(model, args, train_dataset=rows, processing_class=tokenizer,
                                      ref_model=ref_model)
    trainer.train()
    logs = [{k: v for k, v in h.items() if k in LOGGED} for h in trainer.state.log_history if "loss" in h]
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logs, trained


def _assert_same_run(a, b):
    (logs_a, weights_a), (logs_b, weights_b) = a, b
    assert len(logs_a) == len(logs_b) == 3
    for step_a, step_b in zip(logs_a, logs_b, strict=True):
        assert step_a.keys() == step_b.keys()
        for key in step_a:
            assert abs(step_a[key] - step_b[key]) <= 1e-5 * (1 + abs(step_b[key])), (key, step_a[key], step_b[key])
    # Adam turns gradient differences at the rounding level into update differences of order lr in weights whose
    # gradient is ~0, so the weights are compared loosely; the logged grad_norm is compared at 1e-5 above.
    for name in weights_b:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("loss, overrides", [
    ("dpo", {}), ("ipo", {}), ("tdpo2", {}), ("tis_dpo", {}), ("tis_dpo", {"token_level": True}), ("sft", {}),
    ("ti_dpo", {"gamma": 0.5, "anchor_max_new_tokens": 4}),
], ids=["dpo", "ipo", "tdpo2", "tis_dpo", "tis_dpo_token_level", "sft", "ti_dpo"])
def test_every_loss_trains_the_same_with_the_fused_head(tmp_path, tokenizer, loss, overrides):
    _assert_same_run(_run(tmp_path, tokenizer, True, loss=loss, **overrides),
                     _run(tmp_path, tokenizer, False, loss=loss, **overrides))


@pytest.mark.parametrize("reference", ["separate", "precompute"])
def test_every_kind_of_reference_gives_the_same_run(tmp_path, tokenizer, reference):
    _assert_same_run(_run(tmp_path, tokenizer, True, reference=reference),
                     _run(tmp_path, tokenizer, False, reference=reference))


def test_full_fine_tuning_with_tied_embeddings(tmp_path, tokenizer):
    """GPT-2 ties its head to the token embeddings: the head trains, through the tile recompute, and the
    frozen-copy reference is fused too."""
    _assert_same_run(_run(tmp_path, tokenizer, True, full=True, loss="tdpo2"),
                     _run(tmp_path, tokenizer, False, full=True, loss="tdpo2"))


def test_the_policy_forward_never_materialises_logits(tmp_path, tokenizer):
    model = apply_lora(tiny_gpt2(), r=4, alpha=8)
    args = TokenWeightedDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], loss="tdpo2",
                                  max_length=32)
    trainer = TokenWeightedDPOTrainer(model, args, train_dataset=ROWS, processing_class=tokenizer)
    head_calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    out = trainer.preference_loss(trainer.model, batch)
    out.loss.backward()
    handle.remove()
    assert head_calls == []  # neither the policy nor the reference ran the nn.Linear head
    assert isinstance(model(input_ids=batch["input_ids"], tidpo_fused_lm_head=True), FusedHeadOutput)
    assert model(input_ids=batch["input_ids"]).logits.shape[-1] == len(tokenizer)  # the plain forward is intact
    assert isinstance(TrainingBatch(trainer, trainer.model, batch).labels, torch.Tensor)


@pytest.mark.filterwarnings("ignore::UserWarning:peft")
def test_a_lora_adapter_on_the_head_is_refused_with_a_way_out(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn", "lm_head"],
                                                            fan_in_fan_out=True))
    args = TokenWeightedDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], max_length=32)
    with pytest.raises(ValueError, match=r"fused_lm_head=False"):
        TokenWeightedDPOTrainer(model, args, train_dataset=ROWS, processing_class=tokenizer)
    args = TokenWeightedDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], max_length=32,
                                  fused_lm_head=False)
    TokenWeightedDPOTrainer(model, args, train_dataset=ROWS, processing_class=tokenizer)


def test_patching_twice_is_harmless(tokenizer):
    model = tiny_gpt2()
    add_fused_lm_head(model)
    forward = model.forward
    add_fused_lm_head(model)
    assert model.forward is forward
