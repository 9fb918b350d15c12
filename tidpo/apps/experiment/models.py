"""The experiment's tiny model and the base-model pretraining (a plain causal-LM loop).

The model is a ``transformers.LlamaForCausalLM`` (RoPE: left-padded generation and scoring are exact, as
attention depends only on relative positions) built from a seeded initialisation, fp32, trained in full.
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tidpo._validation import IGNORE_INDEX
from tidpo.ops import token_logps

__all__ = ["IGNORE_INDEX", "build_model", "clone_model", "pretrain_base"]

#: Positions the model supports: prompt (tags + topic + context) + response + EOS, with room to spare.
MAX_POSITIONS = 64


def build_model(task, config, *, seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama for ``task``'s vocabulary (init seeded by ``seed``)."""
    tokenizer = task.tokenizer
    model_config = LlamaConfig(
        vocab_size=task.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False, attention_dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model.float()


def clone_model(model: LlamaForCausalLM, *, frozen: bool = False) -> LlamaForCausalLM:
    """An independent copy of ``model`` (same weights); ``frozen``: eval mode, no gradients."""
    copy = LlamaForCausalLM(model.config)
    copy.load_state_dict(model.state_dict())
    copy.generation_config = model.generation_config
    if frozen:
        copy.eval().requires_grad_(False)
    return copy


def _encode_corpus(task, rows) -> list[list[int]]:
    tokenizer = task.tokenizer
    prompts = tokenizer([row["prompt"] for row in rows], add_special_tokens=False)["input_ids"]
    responses = tokenizer([row["response"] for row in rows], add_special_tokens=False)["input_ids"]
    return [p + r + [tokenizer.eos_token_id] for p, r in zip(prompts, responses, strict=True)]


def pretrain_base(task, config, *, seed: int, progress=None) -> tuple[LlamaForCausalLM, dict]:
    """Pretrain the base LM on ``task.pretrain_rows(config.pretrain_rows, seed=seed)`` (half of them tagged).

    Plain next-token prediction over prompt + response + EOS (every token, so the model also learns
    what ``<good>`` / ``<bad>`` tags imply: the TIS-DPO(P) contrastive pair), AdamW at
    ``config.pretrain_lr`` with a cosine decay, ``config.pretrain_steps`` seeded random batches of
    ``config.pretrain_batch`` rows.

    Returns:
        ``(model, stats)`` with ``stats = {"seconds", "first_loss", "final_loss"}`` (mean token NLL of the
        first / last 10 % of the steps).
    """
    start = time.perf_counter()
    model = build_model(task, config, seed=seed)
    sequences = _encode_corpus(task, task.pretrain_rows(config.pretrain_rows, seed=seed))
    width = max(len(s) for s in sequences)
    pad = task.tokenizer.pad_token_id
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.pretrain_steps,
                                                           eta_min=config.pretrain_lr * 0.1)
    losses = []
    model.train()
    for step in range(config.pretrain_steps):
        batch = torch.randint(0, len(sequences), (config.pretrain_batch,), generator=generator)
        attention = mask[batch]
        logits = model(input_ids=ids[batch], attention_mask=attention, use_cache=False).logits[:, :-1]
        target = labels[batch][:, 1:]
        logps = token_logps(logits, target, IGNORE_INDEX)
        loss = -logps.sum() / (target != IGNORE_INDEX).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
        if progress is not None and (step + 1) % max(1, config.pretrain_steps // 4) == 0:
            progress(f"pretraining seed {seed}: step {step + 1}/{config.pretrain_steps}, loss {losses[-1]:.3f}")
    model.eval()
    tenth = max(1, len(losses) // 10)
    stats = {"seconds": time.perf_counter() - start, "first_loss": sum(losses[:tenth]) / tenth,
             "final_loss": sum(losses[-tenth:]) / tenth}
    return model, stats
