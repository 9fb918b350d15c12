#!/usr/bin/env bash
# TIS-DPO end to end on the embedded default (SmolLM2-135M-Instruct, chatterbot pairs), on CPU:
#   contrastive pair (P, S or D) -> estimate-weights -> show-weights -> train --loss tis_dpo
#
#   bash examples/tis_dpo_pipeline.sh [P|S|D] [WORK_DIR]       (default: D, runs/tis-dpo-pipeline)
#
# Environment: PAIRS (training pairs, default 256), HELDOUT (held-out pairs, default 32), STEPS (optimiser steps per training run, default 40),
# PY (python, default: the one scripts/bootstrap.sh sets up). About 10 minutes on 2 cores for D.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${1:-D}
WORK=${2:-runs/tis-dpo-pipeline}
PAIRS=${PAIRS:-256}
HELDOUT=${HELDOUT:-32}
STEPS=${STEPS:-40}
PY=${PY:-$(bash scripts/bootstrap.sh)}
tidpo() { "$PY" -m tidpo.cli "$@"; }
# One set of limits for every run: the scored tokens are exactly the trained ones.
LIMITS=(--max-length 128 --max-prompt-length 64)
TRAIN=(--model embedded --data "$WORK/pairs.jsonl" --eval-data "$WORK/heldout.jsonl" --max-steps "$STEPS"
       --learning-rate 5e-4 --lr-scheduler-type constant --per-device-train-batch-size 4
       --per-device-eval-batch-size 8 --lora-r 16 --lora-alpha 32 --lora-last-layers 8 --logging-steps 10
       --save-strategy no "${LIMITS[@]}")
mkdir -p "$WORK"

tidpo export-pairs --out "$WORK/pairs.jsonl" --heldout-out "$WORK/heldout.jsonl" --max-train-pairs "$PAIRS" --eval-size "$HELDOUT"
case "$VARIANT" in
  P)  # one model, contrastive system prompts (the official harmless / harmful pair)
    POS=embedded NEG=embedded
    TEMPLATES=(--positive-template harmless --negative-template harmful) ;;
  S)  # SFT on the chosen responses vs SFT on the rejected responses
    tidpo train "${TRAIN[@]}" --loss sft --merge-adapter --output-dir "$WORK/sft-pos"
    tidpo train "${TRAIN[@]}" --loss sft --reverse --merge-adapter --output-dir "$WORK/sft-neg"
    POS=$WORK/sft-pos/merged NEG=$WORK/sft-neg/merged TEMPLATES=() ;;
  D)  # DPO on the pairs vs DPO on the reversed pairs, both from the same model, beta 0.1
    tidpo train "${TRAIN[@]}" --loss dpo --beta 0.1 --merge-adapter --output-dir "$WORK/dpo-pos"
    tidpo train "${TRAIN[@]}" --loss dpo --beta 0.1 --reverse --merge-adapter --output-dir "$WORK/dpo-neg"
    POS=$WORK/dpo-pos/merged NEG=$WORK/dpo-neg/merged TEMPLATES=() ;;
  *) echo "variant must be P, S or D, got $VARIANT" >&2; exit 2 ;;
esac
for split in pairs heldout; do  # held-out pairs need weights too: TIS-DPO is evaluated with them
  tidpo estimate-weights --positive "$POS" --negative "$NEG" ${TEMPLATES[@]+"${TEMPLATES[@]}"} \
      --data "$WORK/$split.jsonl" --out "$WORK/weights-$VARIANT-$split.jsonl" "${LIMITS[@]}" --batch-size 8
done
tidpo show-weights --weights "$WORK/weights-$VARIANT-pairs.jsonl" --out "$WORK/weights-$VARIANT-view" --rows 0 1 2
tidpo train "${TRAIN[@]}" --loss tis_dpo --weights "$WORK/weights-$VARIANT-pairs.jsonl" \
    --eval-weights "$WORK/weights-$VARIANT-heldout.jsonl" --output-dir "$WORK/tis-dpo-$VARIANT"
