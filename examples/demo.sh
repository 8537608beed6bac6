#!/usr/bin/env bash
# Demo: train a small MoE GPT on the tokenized standard-library corpus and save a torch_dist
# checkpoint (runs/demo/checkpoints). CPU (gloo) here; the same flags run on GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
NPROC=${NPROC:-1}
rm -rf "$OUT"
mkdir -p "$OUT"
torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29533}" examples/pretrain_moe.py \
    --num-layers 4 --hidden-size 128 --num-attention-heads 8 \
    --group-query-attention --num-query-groups 4 \
    --num-experts 8 --moe-ffn-hidden-size 256 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 \
    --moe-shared-expert-intermediate-size 256 --moe-token-dispatcher-type alltoall \
    --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear \
    --untie-embeddings-and-output-weights \
    --seq-length 128 --max-position-embeddings 128 --micro-batch-size 8 --global-batch-size 16 \
    --train-iters 300 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 30 --lr-decay-style cosine \
    --weight-decay 0.1 --clip-grad 1.0 --hidden-dropout 0 --attention-dropout 0 \
    --use-distributed-optimizer \
    --data-path data/stdlib_text_document --tokenizer-type ByteLevelTokenizer \
    --log-interval 50 --eval-interval 100 --eval-iters 10 \
    --save "$OUT/checkpoints" --save-interval 300 \
    --log-metrics-path "$OUT/metrics.jsonl" "$@" 2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/train.log"
echo "checkpoint: $OUT/checkpoints/iter_0000300 ($(du -sh "$OUT/checkpoints" | cut -f1)); metrics: $OUT/metrics.jsonl"
