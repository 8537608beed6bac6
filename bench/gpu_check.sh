#!/usr/bin/env bash
# A prepared GPU check for one GPU (sized to finish in under 8 minutes): Transformer Engine
# layers (the TE spec: layer norms fused into linear_qkv/linear_fc1, `_extra_state`), bf16 with
# fp32 main params (distributed optimizer), grouped-GEMM experts, NCCL. For each client --
# examples/pretrain_moe.py always, Megatron-LM's own pretrain_gpt.py (a patched copy of
# $MEGATRON_LM_DIR) when that is set -- it trains a narrow MoE, then grows it 2x in hidden and
# expert FFN size twice: `megatron-sparkling expand` + a wide relaunch, and growth on load. It
# prints each wide run's next-iteration loss beside the narrow run's and the relative difference
# (function-preserving growth: equal up to bf16 rounding), writes $OUT/results.txt, and exits 1
# when a difference exceeds TOL. On a GPU it also runs, through examples/pretrain_moe.py, bf16
# without the distributed optimizer (megatron-core's Float16 optimizer: fp32_param main params,
# fused Adam's int step) and, on compute capability >= 8.9, fp8 with grouped GEMM and 8 -> 16
# experts grown by `zero` (new experts' TE extra state; a finite next loss is what is asked).
#
#   bash bench/gpu_check.sh             # a machine with a GPU (TOL default 2e-2: bf16)
#   bash bench/gpu_check.sh --dry-run   # no GPU: the same steps on CPU with the GPU-only flags
#                                       # left out (fp32, local layers, gloo), tiny sizes, TOL 1e-6
# Env: OUT (default runs/gpu_check), PYTHON (default python), MEGATRON_LM_DIR, TOL.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/gpu_check}
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$DRY_RUN" = 0 ] && [ "$GPUS" = 0 ]; then
    echo "bench/gpu_check.sh: no GPU here; run it on a GPU machine, or with --dry-run" >&2; exit 2
fi

if [ "$DRY_RUN" = 1 ]; then   # CPU: fp32, local layers, gloo; tiny sizes
    MODE="dry run on CPU (fp32, local layers, gloo; the GPU-only flags left out)"
    TOL=${TOL:-1e-6}; N=20
    SIZES=(--num-layers 2 --num-attention-heads 4 --kv-channels 16 --num-experts 4
           --seq-length 64 --max-position-embeddings 64 --micro-batch-size 4 --global-batch-size 8)
    NARROW=(--hidden-size 64 --moe-ffn-hidden-size 64); WIDE_H=128; WIDE_F=128
    GPU_FLAGS=()
else
    DEVICE=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")
    MODE="GPU: $DEVICE, bf16 (fp32 main params), TE layers, grouped GEMM, NCCL"
    TOL=${TOL:-2e-2}; N=40
    SIZES=(--num-layers 4 --num-attention-heads 8 --kv-channels 32 --num-experts 8
           --seq-length 512 --max-position-embeddings 512 --micro-batch-size 8
           --global-batch-size 32)
    NARROW=(--hidden-size 256 --moe-ffn-hidden-size 256); WIDE_H=512; WIDE_F=512
    GPU_FLAGS=(--transformer-impl transformer_engine --bf16 --moe-grouped-gemm
               --distributed-backend nccl)
fi
TOTAL=$((N + 2))
WIDE=(--hidden-size "$WIDE_H" --moe-ffn-hidden-size "$WIDE_F")
COMMON=("${SIZES[@]}" --moe-router-topk 2 --moe-aux-loss-coeff 0.01 --swiglu
        --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
        --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0
        --train-iters "$TOTAL" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 5
        --lr-decay-style cosine --log-interval 1 --eval-interval 1000 --eval-iters 1
        --mock-data --tokenizer-type NullTokenizer --vocab-size 512 --seed 1234
        --use-distributed-optimizer "${GPU_FLAGS[@]}")
REWARMUP=(--sparkling-rewarmup-iters 10 --sparkling-rewarmup-peak-ratio 1.3)
rm -rf "$OUT"; mkdir -p "$OUT"
echo "bench/gpu_check.sh: $MODE; narrow $N iterations, grown at $N, next iteration $((N + 1))"

port() {
    "$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

run_client() {  # run_client NAME: one run of the client with the rest of the flags -> $OUT/NAME.log
    local name=$1; shift
    local start=$SECONDS
    local metrics=()   # pretrain_moe's losses at full precision (Megatron-LM prints 7 digits)
    case $CLIENT in pretrain_moe*) metrics=(--log-metrics-path "$OUT/$CLIENT.$name.jsonl") ;; esac
    if ! "${LAUNCH[@]}" "$@" "${metrics[@]}" > "$OUT/$CLIENT.$name.log" 2>&1; then
        echo "bench/gpu_check.sh: $CLIENT $name failed; see $OUT/$CLIENT.$name.log" >&2
        tail -20 "$OUT/$CLIENT.$name.log" >&2; exit 1
    fi
    echo "  $CLIENT $name: $((SECONDS - start)) s"
}

GROWTH=(--hidden-size "$WIDE_H" --moe-ffn-hidden-size "$WIDE_F")   # what expand grows
METHOD=sparkling
check_client() {  # narrow -> expand -> wide relaunch; narrow -> growth on load
    local dir=$OUT/$CLIENT
    run_client narrow "${COMMON[@]}" "${NARROW[@]}" --save "$dir/narrow" --save-interval "$N"
    local start=$SECONDS
    "$PYTHON" -m megatron_sparkling.cli expand --load "$dir/narrow" --iteration "$N" \
        --save "$dir/expanded" "${GROWTH[@]}" \
        --method "$METHOD" --seed 1 > "$OUT/$CLIENT.expand.log" 2>&1 \
        || { echo "bench/gpu_check.sh: expand failed; see $OUT/$CLIENT.expand.log" >&2; exit 1; }
    echo "  $CLIENT expand: $((SECONDS - start)) s"
    run_client expand_relaunch "${COMMON[@]}" "${WIDE[@]}" --load "$dir/expanded" --no-load-rng \
        "${REWARMUP[@]}"
    run_client growth_on_load "${COMMON[@]}" "${WIDE[@]}" --load "$dir/narrow" --ckpt-step "$N" \
        --no-load-rng --sparkling-method "$METHOD" "${REWARMUP[@]}"
}

CLIENTS=(pretrain_moe)
CLIENT=pretrain_moe
LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node 1 --master_port "$(port)"
        examples/pretrain_moe.py)
check_client

if [ "$DRY_RUN" = 0 ]; then
    # megatron-core's Float16 optimizer (bf16 without the distributed optimizer): expand writes
    # its main params as optimizer.state.fp32_param.*, and fused Adam's int group step
    CLIENT=pretrain_moe.float16_optimizer
    CLIENTS+=("$CLIENT")
    WITH=("${COMMON[@]}")
    COMMON=(); for f in "${WITH[@]}"; do [ "$f" = --use-distributed-optimizer ] || COMMON+=("$f"); done
    check_client
    COMMON=("${WITH[@]}")
    # fp8 with grouped GEMM and new experts (zero method: routing changes, so only a finite loss
    # is asked): new experts' _extra_state (fp8 scale/amax history) copied, grouped-linear merge
    if "$PYTHON" -c "import sys, torch; sys.exit(torch.cuda.get_device_capability() < (8, 9))"; then
        CLIENT=pretrain_moe.fp8_new_experts
        CLIENTS+=("$CLIENT")
        COMMON=("${WITH[@]}" --fp8-format hybrid)
        GROWTH=(--num-experts 16); WIDE=(--num-experts 16); METHOD=zero
        check_client
    else
        echo "  fp8: skipped (compute capability below 8.9)"
    fi
    COMMON=("${WITH[@]}")
    GROWTH=(--hidden-size "$WIDE_H" --moe-ffn-hidden-size "$WIDE_F")
    WIDE=(--hidden-size "$WIDE_H" --moe-ffn-hidden-size "$WIDE_F"); METHOD=sparkling
    LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node 1 --master_port "$(port)"
            examples/pretrain_moe.py)
fi

if [ -n "${MEGATRON_LM_DIR:-}" ]; then
    TREE=$OUT/Megatron-LM   # a patched copy; $MEGATRON_LM_DIR itself is never modified
    mkdir -p "$TREE"
    (cd "$MEGATRON_LM_DIR" && tar --exclude=.git --exclude=docs --exclude=images -cf - .) \
        | (cd "$TREE" && tar -xf -)
    for patch in patches/*.patch; do git -C "$TREE" apply "$REPO/$patch" 2>/dev/null \
        || (cd "$TREE" && patch -p1 -s < "$REPO/$patch"); done
    CLIENTS+=(megatron_lm)
    CLIENT=megatron_lm
    if [ "$DRY_RUN" = 1 ]; then   # CPU: the launcher bridges Megatron-LM (README)
        LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node 1 --master_port "$(port)"
                -m megatron_sparkling.megatron_lm "$TREE/pretrain_gpt.py")
    else                          # GPU: the patched script as is
        LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node 1 --master_port "$(port)"
                "$TREE/pretrain_gpt.py")
    fi
    check_client
else
    echo "  Megatron-LM's pretrain_gpt.py: skipped (MEGATRON_LM_DIR is not set)"
fi

"$PYTHON" - "$OUT" "$((N + 1))" "$TOL" "$MODE" "${CLIENTS[@]}" <<'PY' | tee "$OUT/results.txt"
import os, sys
from megatron_sparkling.planning.loss_log import megatron_lm_run_losses, read_loss_curve
out, it, tol, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
clients = sys.argv[5:]
print(f"next-iteration loss (iteration {it}); {mode}; tolerance {tol:g} relative")
print(f"{'client':13} {'wide run':16} {'narrow':>12} {'wide':>12} {'rel. diff':>10}")
bad = 0
for client in clients:
    def next_loss(run):
        if os.path.exists(f"{out}/{client}.{run}.jsonl"):
            its, losses, _ = read_loss_curve(f"{out}/{client}.{run}.jsonl")
            return dict(zip(its, losses)).get(it)
        return megatron_lm_run_losses(open(f"{out}/{client}.{run}.log").read()).get(it)
    loss = {run: next_loss(run) for run in ("narrow", "expand_relaunch", "growth_on_load")}
    for run in ("expand_relaunch", "growth_on_load"):
        a, b = loss["narrow"], loss[run]
        rel = abs(b - a) / abs(a) if a is not None and b is not None else float("inf")
        if client.endswith(".fp8_new_experts"):   # the function changes: a finite loss passes
            rel = 0.0 if b is not None and b == b and abs(b) != float("inf") else float("inf")
        bad += rel > tol
        print(f"{client:13} {run:16} {a if a is not None else float('nan'):12.6f} "
              f"{b if b is not None else float('nan'):12.6f} {rel:10.2e}"
              + ("" if rel <= tol else "  OVER TOLERANCE"))
sys.exit(1 if bad else 0)
PY
