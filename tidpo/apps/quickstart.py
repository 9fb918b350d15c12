"""``tidpo quickstart``: a one-second tour of the drop-in losses on a tiny causal LM, eight pairs, TIS-DPO.

Everything is built in code, nothing is downloaded:

1. a byte-level tokenizer (256 byte ids + one EOS id, so V = 257, an odd vocabulary on purpose);
2. a 2-layer GPT-2 built from a config, the policy; a frozen copy is the reference;
3. eight question / good answer / bad answer triples;
4. TIS-DPO token weights, prompt-based variant (TIS-DPO(P), docs/methods.md §2.5): the reference scores
   every response token under a positive and a negative instruction prefix,
   ``r_t = log pi(y_t | pos + x, y<t) - log pi(y_t | neg + x, y<t)``, and the official recipe's
   rank transform maps them to [0.7, 1.3] per response (chosen uses +r, rejected -r); the EOS
   token gets weight 0, as in the official alignment rules (§2.4 step 4).
   With a randomly initialised model these scores carry no meaning; the pipeline is what is shown;
5. a few full-batch AdamW steps on :func:`tidpo.tis_dpo_loss` (or another loss), printing loss,
   implicit rewards, margin and preference accuracy.

The logits passed to the loss are the strided view ``model_logits[:, :-1]``: no copy is made.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch

import tidpo
from tidpo._validation import IGNORE_INDEX, check_int, check_positive
from tidpo.weights import tis_dpo_weights

EOS_ID = 256
VOCAB_SIZE = 257

PAIRS = [
    ("What is the capital of France?", "Paris.", "London."),
    ("How many legs does a spider have?", "Eight.", "Six."),
    ("What colour is the sky on a clear day?", "Blue.", "Green."),
    ("Which planet is closest to the sun?", "Mercury.", "Jupiter."),
    ("What is 2 + 2?", "Four.", "Five."),
    ("What do bees make?", "Honey.", "Milk."),
    ("At what Celsius temperature does water freeze?", "Zero degrees.", "Fifty degrees."),
    ("What is the opposite of hot?", "Cold.", "Loud."),
]
POSITIVE_PREFIX = "You answer correctly. "
NEGATIVE_PREFIX = "You answer wrongly. "
QUICKSTART_LOSSES = ("tis_dpo", "dpo", "ipo", "tdpo1", "tdpo2")


def encode(text: str) -> list[int]:
    """Byte-level tokenisation: one id per UTF-8 byte."""
    return list(text.encode("utf-8"))


def build_model(seed: int) -> torch.nn.Module:
    """A 2-layer GPT-2 (d=64) from a config, dropout off so steps are deterministic."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS_ID,
                        eos_token_id=EOS_ID)
    return GPT2LMHeadModel(config)


def build_batch(prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (prompt and padding = -100).

    ``labels`` are *not* shifted: position t holds ``input_ids[t]`` on response tokens (and EOS);
    the loss uses ``logits[:, :-1]`` with ``labels[:, 1:]``.
    """
    seqs, label_rows = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p, r = encode(prompt + " "), encode(response) + [EOS_ID]
        seqs.append(p + r)
        label_rows.append([IGNORE_INDEX] * len(p) + r)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), EOS_ID)
    labels = torch.full((len(seqs), width), IGNORE_INDEX)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, label_rows, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        attention[i, : len(s)] = 1
    return input_ids, attention, labels


def _scored(labels: torch.Tensor) -> torch.Tensor:
    """Response tokens that get a TIS-DPO score: EOS is excluded and weighs 0 (official rule, §2.4)."""
    return (labels != IGNORE_INDEX) & (labels != EOS_ID)


def response_token_logps(model, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response-token log-probs, packed from index 0: ``([R, L], mask [R, L])``."""
    ids, attention, labels = build_batch(prompts, responses)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
        logps = tidpo.token_logps(logits[:, :-1], labels[:, 1:])
    mask = _scored(labels[:, 1:])
    lengths = mask.sum(-1)
    width = int(lengths.max())
    packed = torch.zeros(len(prompts), width)
    for i in range(len(prompts)):
        packed[i, : lengths[i]] = logps[i][mask[i]]
    return packed, torch.arange(width) < lengths.unsqueeze(-1)


def prompt_based_weights(reference, labels: torch.Tensor) -> torch.Tensor:
    """TIS-DPO(P) weights ``[2B, T-1]`` aligned with ``labels[:, 1:]`` (rank transform, [0.7, 1.3])."""
    prompts = [p for p, _, _ in PAIRS] * 2
    responses = [c for _, c, _ in PAIRS] + [r for _, _, r in PAIRS]
    pos, mask = response_token_logps(reference, [POSITIVE_PREFIX + p for p in prompts], responses)
    neg, _ = response_token_logps(reference, [NEGATIVE_PREFIX + p for p in prompts], responses)
    packed_weights = tis_dpo_weights(pos - neg, mask, method="rank_based")
    # Scatter the packed response-token weights back onto the label positions; EOS keeps weight 0.
    shifted_mask = _scored(labels[:, 1:])
    weights = torch.zeros(shifted_mask.shape)
    for i in range(weights.shape[0]):
        weights[i, shifted_mask[i]] = packed_weights[i, : int(shifted_mask[i].sum())]
    return weights


def log_weights(weights: torch.Tensor, labels: torch.Tensor, log: Callable[[str], None]) -> None:
    """Print the first pair's response tokens with their TIS-DPO weights."""
    half = weights.shape[0] // 2
    for name, row in (("chosen", 0), ("rejected", half)):
        valid = labels[row] != IGNORE_INDEX
        tokens = [("<eos>" if t == EOS_ID else chr(t)) for t in labels[row][valid].tolist()]
        pairs = " ".join(f"{tok}:{w:.2f}" for tok, w in zip(tokens, weights[row][valid].tolist(), strict=True))
        log(f"TIS-DPO(P) weights, pair 0 {name}: {pairs}")


def compute_loss(name: str, policy_logits, ref_logits, labels, weights, beta: float):
    """One call into tidpo per loss name (the pattern to copy into a training loop)."""
    if name == "tis_dpo":
        return tidpo.tis_dpo_loss(policy_logits, labels, weights, ref_logits=ref_logits, beta=beta)
    if name in ("dpo", "ipo"):
        loss_type = "sigmoid" if name == "dpo" else "ipo"
        return tidpo.dpo_loss(policy_logits, labels, ref_logits=ref_logits, beta=beta, loss_type=loss_type)
    return tidpo.tdpo_loss(policy_logits, ref_logits, labels, beta=beta, variant=int(name[-1]))


def run_quickstart(max_steps: int = 40, learning_rate: float = 2e-3, loss: str = "tis_dpo", beta: float = 0.1,
                   seed: int = 0, log: Callable[[str], None] = print, log_every: int = 5) -> list[dict[str, float]]:
    """Train the tiny policy for ``max_steps`` full-batch steps; return one metrics dict per step."""
    if loss not in QUICKSTART_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(QUICKSTART_LOSSES)}; got {loss!r}")
    steps, lr = check_int(max_steps, "max_steps", low=1), check_positive(learning_rate, "learning_rate")
    policy = build_model(seed)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    prompts = [p for p, _, _ in PAIRS] * 2
    responses = [c for _, c, _ in PAIRS] + [r for _, _, r in PAIRS]
    input_ids, attention, labels = build_batch(prompts, responses)
    weights = prompt_based_weights(reference, labels)
    with torch.no_grad():
        ref_logits = reference(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    if loss == "tis_dpo":
        log_weights(weights, labels[:, 1:], log)
    log(f"tidpo quickstart: loss={loss} beta={beta} pairs={len(PAIRS)} vocab={VOCAB_SIZE} "
        f"params={sum(p.numel() for p in policy.parameters()):,} steps={steps} lr={lr}")
    log(f"{'step':>5} {'loss':>8} {'r_chosen':>9} {'r_reject':>9} {'margin':>8} {'acc':>5}")
    history, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        policy_logits = policy(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
        out = compute_loss(loss, policy_logits, ref_logits, labels[:, 1:], weights, beta)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        row = {"step": step, "loss": float(out.loss.detach()), **{k: float(v) for k, v in out.metrics.items()}}
        history.append(row)
        if step == 1 or step % log_every == 0 or step == steps:
            log(f"{step:>5} {row['loss']:>8.4f} {row['rewards/chosen']:>9.4f} {row['rewards/rejected']:>9.4f} "
                f"{row['rewards/margins']:>8.4f} {row['rewards/accuracies']:>5.2f}")
    log(f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} in {time.perf_counter() - start:.1f}s; "
        f"preference accuracy {history[-1]['rewards/accuracies']:.2f}")
    return history
