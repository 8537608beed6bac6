#!/usr/bin/env bash
# Two-stage run with an offline growth step: narrow stage -> `megatron-sparkling expand` -> wide
# stage with the LR re-warmup of the new elements. `NPROC=2 examples/two_stage_expand.sh` runs
# each stage on two processes.
source "$(dirname "$0")/two_stage_common.sh"

stage1
"$PYTHON" -m megatron_sparkling.cli expand --no-progress --load "$OUT/stage1" --save "$OUT/grown" \
    --hidden-size 128 --moe-ffn-hidden-size 256 --method sparkling --seed 1 \
    --rewarmup-iters 10 --rewarmup-peak-ratio 1.3
pretrain "$OUT/stage2.jsonl" "${WIDE[@]}" --load "$OUT/grown" --no-load-rng "${REWARMUP[@]}" \
    --save "$OUT/stage2" --save-interval "$TOTAL_ITERS"
report
