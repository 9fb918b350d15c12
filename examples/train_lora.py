"""Copy-and-edit example: LoRA preference training with tidpo's trainer in ~40 lines.

    python examples/train_lora.py --model PATH/TO/HF_MODEL --data pairs.jsonl --loss tis_dpo \
        --output-dir out/ [--weights weights.jsonl]

``pairs.jsonl``: one JSON object per line with ``prompt``, ``chosen``, ``rejected`` (plain strings, or
lists of ``{"role", "content"}`` messages for chat models). For ``--loss tis_dpo`` each row needs
``chosen_weights`` / ``rejected_weights`` (one value per response token but the final EOS), in the
same file or in ``--weights``. Without arguments it trains on the embedded default (SmolLM2-135M-
Instruct and pairs from the chatterbot corpus). Everything ``tidpo train`` offers is in
``tidpo.cli.train``; this file shows the few calls it is made of.
"""

import argparse

from tidpo.apps.models import load_model_and_tokenizer
from tidpo.data import load_preference_rows
from tidpo.trainer import TokenWeightedDPOConfig, TokenWeightedDPOTrainer, apply_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="local HF model folder, or 'embedded'")
    parser.add_argument("--data", default=None, help="JSON/JSONL/Parquet pairs (default: the embedded pairs)")
    parser.add_argument("--weights", default=None, help="per-token weights file for --loss tis_dpo")
    parser.add_argument("--loss", default="dpo", help="dpo | ipo | hinge | tdpo1 | tdpo2 | tis_dpo")
    parser.add_argument("--output-dir", default="lora-out")
    parser.add_argument("--max-steps", type=int, default=20)
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.data is None:
        from tidpo.apps.embedded import chatterbot_pairs

        train_rows, eval_rows = chatterbot_pairs(num_heldout=16)
    else:
        rows = load_preference_rows(args.data, weights=args.weights)
        n_eval = min(16, len(rows) // 5)  # hold out up to 16 pairs for evaluation
        train_rows, eval_rows = rows[n_eval:], rows[:n_eval] or None

    # 1. LoRA adapters (PEFT's LoraConfig + get_peft_model): the policy trains them; with adapters disabled the
    #    same model is the reference.
    model = apply_lora(model, r=16, alpha=32, target_modules=("all-linear",))
    # 2. TrainingArguments + the method's fields.
    config = TokenWeightedDPOConfig(output_dir=args.output_dir, loss=args.loss, beta=0.1, max_length=256,
                                    per_device_train_batch_size=2, learning_rate=5e-5, max_steps=args.max_steps,
                                    logging_steps=5, save_strategy="no", report_to=[])
    # 3. The trainer tokenises the rows (chat template for conversational rows) and computes the loss.
    trainer = TokenWeightedDPOTrainer(model, config, train_dataset=train_rows, eval_dataset=eval_rows,
                                      processing_class=tokenizer)
    trainer.train()
    # 4. PEFT's own format: load later with PeftModel.from_pretrained(base_model, OUTPUT_DIR).
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    if eval_rows is not None:  # a file of fewer than 5 rows leaves none to hold out
        print(trainer.evaluate())


if __name__ == "__main__":
    main()
