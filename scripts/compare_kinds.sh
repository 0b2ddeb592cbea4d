#!/usr/bin/env bash
# Train every model kind at the same size and token budget, evaluate each on held-out books, and
# build the comparison table (benchmarks/results/quality.json + the README's Performance section).
#
#   scripts/compare_kinds.sh DATA_DIR [OUT_DIR] [STEPS]
#
# DATA_DIR holds gutenberg/train.txt and gutenberg/val.txt; OUT_DIR defaults to runs/compare;
# STEPS (default 300) x 8 examples x 256 tokens is the budget of every kind. All kinds use the
# bundled model's tokenizer (8,192 tokens), hidden 256, 4 layers; memory kinds have segments of
# 64 tokens, Context-KV chunks of 64. Context kinds first train their context block (Phase 1),
# then Phase 2 trains the rest with the block frozen. Every kind is evaluated with the same
# sliding window (256 tokens, stride 128). A finished kind is skipped on a rerun.
set -euo pipefail
DATA=${1:?give the data folder (with gutenberg/train.txt and gutenberg/val.txt)}
OUT=${2:-runs/compare}
STEPS=${3:-300}
THREADS=${THREADS:-2}
TOK=newllm/checkpoints/default/tokenizer.json
TRAIN=$DATA/gutenberg/train.txt
VAL=$DATA/gutenberg/val.txt
COMMON=(--data "$TRAIN" --val-data "$VAL" --tokenizer "$TOK" --steps "$STEPS" --batch-size 8
        --segments 4 --lr 2e-3 --warmup-steps 30 --gate-lr 0.02 --threads "$THREADS"
        --eval-every 0 --save-every 100 --log-every 25)
mkdir -p "$OUT"
for kind in pythia infini multi_memory hierarchical context_pythia context_kv; do
    preset=small-${kind//_/-}
    run=$OUT/$kind
    if [[ -f $run/eval.json ]]; then echo "$kind: done already"; continue; fi
    case $kind in
        pythia) python -m training train --preset "$preset" --seq-len 256 --out "$run" "${COMMON[@]}" ;;
        context_pythia|context_kv)
            python -m training phase1 --preset "$preset" \
                --data "$TRAIN" --tokenizer "$TOK" --max-tokens 100000 --threads "$THREADS" \
                --out "$run-phase1"
            python -m training train --init "$run-phase1" --seq-len 256 --out "$run" "${COMMON[@]}" ;;
        *) python -m training train --preset "$preset" --model-options segment_len=64 \
               --out "$run" "${COMMON[@]}" ;;
    esac
    python -m training eval --checkpoint "$run" --data "$VAL" --memory --max-tokens 6144 \
        --window 256 --stride 128 --threads "$THREADS" --out "$run/eval.json"
done
python -m benchmarks.quality --eval "$OUT"/*/eval.json --metrics "$OUT"/*/metrics.jsonl
