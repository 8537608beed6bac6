# Shared by two_stage_expand.sh and two_stage_hook.sh (sourced): a tiny MoE GPT trained narrow,
# then continued 2x wider in hidden size and expert FFN size. CPU (gloo) here; on GPUs the same
# flags run (add --bf16 and real sizes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/two_stage}
NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python}
STAGE1_ITERS=${STAGE1_ITERS:-60}
TOTAL_ITERS=${TOTAL_ITERS:-100}
DATA=${DATA:-data/stdlib_text_document}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$PYTHON" examples/prepare_corpus.py --output-prefix "$DATA" --max-tokens 2000000

# Everything but the sizes that grow; identical in both stages.
COMMON=(--num-layers 2 --num-attention-heads 4 --kv-channels 16
        --num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.01
        --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
        --untie-embeddings-and-output-weights
        --seq-length 64 --max-position-embeddings 64 --micro-batch-size 4 --global-batch-size 8
        --train-iters "$TOTAL_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10
        --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
        --hidden-dropout 0 --attention-dropout 0 --use-distributed-optimizer
        --data-path "$DATA" --tokenizer-type ByteLevelTokenizer --split 98,2,0
        --log-interval 10 --eval-interval 0 --eval-iters 4)
NARROW=(--hidden-size 64 --moe-ffn-hidden-size 128)
WIDE=(--hidden-size 128 --moe-ffn-hidden-size 256)
REWARMUP=(--sparkling-rewarmup-iters 10 --sparkling-rewarmup-peak-ratio 1.3)

pretrain() {  # pretrain <metrics file> <flags...>
    local metrics=$1; shift
    "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" \
        --master_port "${MASTER_PORT:-29541}" examples/pretrain_moe.py "${COMMON[@]}" "$@" \
        --log-metrics-path "$metrics" 2>&1 | grep -v "Warning\|warnings.warn\|return func"
}

stage1() {  # narrow: train to STAGE1_ITERS, save
    rm -rf "$OUT"; mkdir -p "$OUT"
    pretrain "$OUT/stage1.jsonl" "${NARROW[@]}" --exit-interval "$STAGE1_ITERS" \
        --save "$OUT/stage1" --save-interval "$STAGE1_ITERS"
}

report() {  # the losses around the growth
    "$PYTHON" - "$OUT/stage1.jsonl" "$OUT/stage2.jsonl" <<'PY'
import json, sys
def losses(path):
    return {r["iteration"]: r["lm loss"] for r in map(json.loads, open(path)) if "lm loss" in r}
one, two = losses(sys.argv[1]), losses(sys.argv[2])
def mean(d, its):
    return sum(d[i] for i in its) / len(its)
a, b = sorted(one)[-5:], sorted(two)[:5]
last, first = one[a[-1]], two[b[0]]
print(f"stage 1 (narrow): iteration {a[-1]} loss {last:.4f}; mean of iterations {a[0]}-{a[-1]} "
      f"{mean(one, a):.4f}")
print(f"stage 2 (wide):   iteration {b[0]} loss {first:.4f}; mean of iterations {b[0]}-{b[-1]} "
      f"{mean(two, b):.4f}; iteration {max(two)} loss {two[max(two)]:.4f} (mean of the last 5 "
      f"{mean(two, sorted(two)[-5:]):.4f})")
PY
}
