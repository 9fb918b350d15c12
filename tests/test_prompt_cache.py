"""TI-DPO's anchors read the prompt's keys and values from the loss's forwards (tidpo.trainer.prompt_cache).

The right values come from full forwards run without any cache: one right-padded forward for the scoring,
``generate`` with its own prefill for the sampling, the trainer's separate path for a whole step.
"""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
)

from tests.test_ti_attribution import ROWS, make_trainer, one_step
from tests.test_training_semantics import tiny_llama
from tidpo.apps.assets import gpt2_tokenizer, tiny_gpt2
from tidpo.trainer import TokenWeightedDPOConfig, TokenWeightedDPOTrainer
from tidpo.trainer.anchors import sample_anchors
from tidpo.trainer.batch import TrainingBatch
from tidpo.trainer.fused_head import transformers_model
from tidpo.trainer.models import apply_lora
from tidpo.trainer.prompt_cache import (
    cache_keyword,
    continuation_inputs,
    left_padding_mask,
    prefix_cache,
    returned_cache,
)

IGNORE = -100
LENGTHS = [9, 5, 7]  # real tokens per row (right padding to 9)
STARTS = [4, 1, 6]  # cached prefix per row


def models():
    return {"gpt2": lambda: tiny_gpt2(seed=3), "llama": lambda: tiny_llama(0.0, vocab_size=64, seed=3)}


def right_padded(vocab: int, pad: int = 0):
    torch.manual_seed(1)
    ids = torch.randint(1, vocab - 1, (len(LENGTHS), max(LENGTHS)))
    mask = torch.arange(ids.shape[1])[None, :] < torch.tensor(LENGTHS)[:, None]
    return torch.where(mask, ids, pad), mask.long()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_continuation_after_a_prefix_cache_is_the_full_forward_with_its_gradient(kind):
    """Float64: logits and parameter gradients of the cached continuation equal the full forward's."""
    model = models()[kind]().double().eval()
    ids, mask = right_padded(model.config.vocab_size)
    start = torch.tensor(STARTS)
    full = model(input_ids=ids, attention_mask=mask).logits
    rest = continuation_inputs(ids, mask, ids, start, pad_token_id=0, ignore_index=IGNORE)
    cache = prefix_cache(returned_cache(model(input_ids=ids, attention_mask=mask, use_cache=True)), start,
                         graph_from=0)
    assert cache.get_seq_length() == max(STARTS)
    attention = torch.cat([left_padding_mask(start, mask.dtype), rest["attention_mask"]], dim=1)
    assert rest["input_ids"].shape[1] == max(length - first for length, first in zip(LENGTHS, STARTS, strict=True))
    cached = model(input_ids=rest["input_ids"], attention_mask=attention, position_ids=rest["position_ids"],
                   use_cache=True, **{cache_keyword(model): cache}).logits
    weights = torch.randn_like(full)
    full_sum = cached_sum = 0.0
    for row, (length, first) in enumerate(zip(LENGTHS, STARTS, strict=True)):
        width = length - first
        assert rest["attention_mask"][row].sum() == width
        torch.testing.assert_close(cached[row, :width], full[row, first:length], rtol=1e-10, atol=1e-10)
        full_sum = full_sum + (full[row, first:length] * weights[row, first:length]).sum()
        cached_sum = cached_sum + (cached[row, :width] * weights[row, first:length]).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    for expected, got in zip(torch.autograd.grad(full_sum, params), torch.autograd.grad(cached_sum, params),
                             strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sampling_from_a_prefix_cache_draws_what_generate_draws_after_its_own_prefill(kind):
    model = models()[kind]().eval()
    ids, mask = right_padded(model.config.vocab_size)
    # The contexts: each row's first LENGTHS - 2 tokens, left-padded as the collator's prompts are.
    length = torch.tensor(LENGTHS) - 2
    width = int(length.max())
    source = torch.arange(width)[None, :] - (width - length)[:, None]
    context_mask = (source >= 0).long()
    context = torch.where(source >= 0, ids.gather(1, source.clamp(min=0)), 0)
    settings = dict(pad_token_id=0, eos_token_id=[model.config.vocab_size - 2], max_new_tokens=6)
    torch.manual_seed(7)
    expected = sample_anchors(model, context, context_mask, **settings)
    with torch.no_grad():
        forward = returned_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
    torch.manual_seed(7)
    got = sample_anchors(model, context, context_mask, cache=prefix_cache(forward, length - 1),
                         **settings)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    with pytest.raises(ValueError, match=r"cache must hold the contexts' first P - 1 = 6 columns, it holds 7"):
        sample_anchors(model, context, context_mask, cache=prefix_cache(forward, length), **settings)


def test_each_layer_is_cut_on_its_own_device():
    """A model split over devices (device_map) keeps each layer's cache where the layer runs ("meta" stands in
    for a second device)."""
    cache = DynamicCache()
    states = torch.randn(2, 1, 5, 4)
    cache.update(states, states, 0)
    cache.update(states.to("meta"), states.to("meta"), 1)
    cut = prefix_cache(cache, torch.tensor([3, 2]))
    assert [layer.keys.device.type for layer in cut.layers] == ["cpu", "meta"]
    torch.testing.assert_close(cut.layers[0].keys[0], states[0, :, :3])
    torch.testing.assert_close(cut.layers[0].keys[1, :, 1:], states[1, :, :2])
    assert (cut.layers[0].keys[1, :, 0] == 0).all()


def test_only_a_plain_cache_is_cut():
    assert prefix_cache(None, torch.tensor([2])) is None
    config = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    sliding = DynamicCache(config=config)
    states = torch.randn(1, 1, 6, 8)
    for layer in range(2):
        sliding.update(states, states, layer)
    assert prefix_cache(sliding, torch.tensor([2])) is None
    plain = DynamicCache()
    for layer in range(2):
        plain.update(states, states, layer)
    assert prefix_cache(plain, torch.tensor([2])).get_seq_length() == 2


# ------------------------------------------------------------------------------------------------ the trainer

def anchor_tokens(batch) -> list[list[int]]:
    labels = batch.anchor.labels
    return [row[row != IGNORE].tolist() for row in labels]


@pytest.mark.parametrize("source, fused, last_layers", [
    ("prompt", True, None), ("prompt", False, None), ("chosen", True, None), ("prompt", True, 1)])
def test_a_step_with_the_prompt_cache_equals_the_step_without(tmp_path, source, fused, last_layers):
    """Same anchors (same seed), loss and LoRA gradients as the path that prefills and scores everything (float64:
    the two compute one function, summed in another order); with LoRA on the last layer only, the cache's lower
    layers are detached."""
    settings = dict(gamma=1.0, anchor_max_new_tokens=6, anchor_source=source, fused_lm_head=fused,
                    dtype=torch.float64)
    results = []
    for shared in (True, False):
        torch.manual_seed(0)
        results.append(one_step(tmp_path, shared, "top_logit", last_layers, **settings))
    (cached, cached_loss, cached_grads), (full, full_loss, full_grads) = results
    assert cached.reuses_prompt_cache and not full.reuses_prompt_cache
    assert cached.anchor.logits.shape[1] < full.anchor.logits.shape[1]  # the prompt was not run again
    assert anchor_tokens(cached) == anchor_tokens(full)
    assert cached.anchor.logits.dtype == torch.float64
    torch.testing.assert_close(cached_loss, full_loss, rtol=1e-10, atol=1e-12)
    for name, grad in full_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-9, atol=1e-12 * (1 + float(grad.abs().max())))


def step_loss(trainer, model, pairs: int):
    """The batch and the loss of one training micro-step on the first ``pairs`` rows (logs at INFO level)."""
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(pairs)]))
    model.train()
    with trainer._config_dropout.zeroed():  # as in train()
        batch = TrainingBatch(trainer, model, inputs)
        return batch, trainer.loss_spec.compute(batch).loss


def tiny_llava():
    """A CLIP vision tower (3 layers) before a Llama language model (4 layers), LoRA on the LM's last layer."""
    torch.manual_seed(0)
    vocab = gpt2_tokenizer().vocab_size + 1
    text = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, pad_token_id=vocab - 2, eos_token_id=vocab - 2)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                              image_size=8, patch_size=4)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision,
                                                      image_token_index=vocab - 1))
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = vocab - 2
    model = get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model.*layers\.3\..*(q|k|v)_proj"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model


def test_a_vision_tower_does_not_shift_the_layers_that_keep_their_graph(tmp_path):
    """The decoder layers found (vision tower included) are not the cache's: every cache layer keeps its graph."""
    settings = dict(gamma=1.0, anchor_max_new_tokens=4, dtype=torch.float64, make_model=tiny_llava)
    (cached, cached_loss, cached_grads), (full, full_loss, full_grads) = (
        one_step(tmp_path, shared, "top_logit", **settings) for shared in (True, False))
    assert cached.reuses_prompt_cache and cached.trainer.frozen_prefix_gate.layer_count == 7
    torch.testing.assert_close(cached_loss, full_loss, rtol=1e-10, atol=1e-12)
    for name, grad in full_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-9, atol=1e-12 * (1 + float(grad.abs().max())))


def test_a_generation_config_with_its_own_cache_samples_with_a_prefill_and_says_so(tmp_path, caplog):
    model = apply_lora(tiny_gpt2(seed=5), r=4, alpha=8)
    model.generation_config.cache_implementation = "static"  # generate() refuses a given cache next to it
    trainer = make_trainer(tmp_path, model, gamma=1.0, anchor_max_new_tokens=4)
    with caplog.at_level(logging.INFO, logger="tidpo.trainer.trainer"):
        batch, loss = step_loss(trainer, model, 2)
    assert batch.reuses_prompt_cache and torch.isfinite(loss)
    assert "TI-DPO anchors: sampled with a prefill (the policy's generation_config sets " \
           "cache_implementation='static'" in caplog.text


def test_a_separate_reference_model_lends_its_own_cache(tmp_path):
    results = []
    for shared in (True, False):
        torch.manual_seed(0)
        model = apply_lora(tiny_gpt2(seed=5), r=4, alpha=8).double()
        trainer = TokenWeightedDPOTrainer(model, TokenWeightedDPOConfig(
            output_dir=str(tmp_path), use_cpu=True, report_to=[], loss="ti_dpo", gamma=1.0, anchor_max_new_tokens=6,
            per_device_train_batch_size=3, ti_shared_forward=shared), train_dataset=ROWS,
            processing_class=gpt2_tokenizer(), ref_model=tiny_gpt2(seed=6).double())
        batch, loss = step_loss(trainer, model, 3)
        assert batch.reuses_prompt_cache is shared
        anchor = batch.anchor
        results.append((anchor_tokens(batch), anchor.ref_logps[anchor.labels != IGNORE], loss.detach()))
    (tokens, ref_logps, loss), (full_tokens, full_ref_logps, full_loss) = results
    assert tokens == full_tokens
    torch.testing.assert_close(ref_logps, full_ref_logps, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, full_loss, rtol=1e-10, atol=1e-12)


def test_a_sliding_window_cache_is_not_cut_and_said(tmp_path, caplog):
    torch.manual_seed(0)
    vocab = gpt2_tokenizer().vocab_size + 1
    model = MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             sliding_window=4, pad_token_id=vocab - 2, eos_token_id=vocab - 2))
    trainer = make_trainer(tmp_path, model, gamma=1.0, anchor_max_new_tokens=4)
    with caplog.at_level(logging.INFO, logger="tidpo.trainer.trainer"):
        batch, loss = step_loss(trainer, model, 2)
    assert batch.reuses_prompt_cache
    assert "the model's key/value cache is not a plain one: sliding-window" in caplog.text
    assert torch.isfinite(loss)


def test_without_a_cache_from_the_forward_the_prompt_is_run_anew_and_said(tmp_path, caplog):
    """Gradient checkpointing: transformers turns the training forward's cache off."""
    model = apply_lora(tiny_gpt2(seed=5), r=4, alpha=8)
    trainer = make_trainer(tmp_path, model, gamma=1.0, anchor_max_new_tokens=4, gradient_checkpointing=True,
                           gradient_checkpointing_kwargs={"use_reentrant": False})
    transformers_model(model).gradient_checkpointing_enable({"use_reentrant": False})
    with caplog.at_level(logging.INFO, logger="tidpo.trainer.trainer"):
        batch, loss = step_loss(trainer, model, 2)
    assert batch.reuses_prompt_cache
    assert "TI-DPO anchors: the prompt is run anew (the pair forwards returned no key/value cache" in caplog.text
    assert torch.isfinite(loss)
