#!/usr/bin/env bash
# The same two-stage run with growth on load: the wide stage starts with --load at the NARROW
# checkpoint and grows it in memory (megatron_sparkling.live.load_hook); no conversion step, same state.
source "$(dirname "$0")/two_stage_common.sh"

stage1
pretrain "$OUT/stage2.jsonl" "${WIDE[@]}" --load "$OUT/stage1" --no-load-rng \
    --sparkling-method sparkling --sparkling-seed 1 "${REWARMUP[@]}" \
    --save "$OUT/stage2" --save-interval "$TOTAL_ITERS"
report
