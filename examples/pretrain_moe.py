"""Pre-train a megatron-core GPT / MoE model with Megatron-LM's flags (torchrun-launchable).

    torchrun --nproc_per_node 2 examples/pretrain_moe.py --num-layers 2 --hidden-size 64 \
        --num-attention-heads 4 --num-experts 4 --moe-ffn-hidden-size 128 --swiglu ... \
        --data-path data/stdlib_text_document --save ckpt --tensor-model-parallel-size 2 \
        --sequence-parallel

Runs on GPUs (NCCL, Transformer Engine when installed) and on CPU (gloo). See README.md.
"""
import sys

from megatron_sparkling.training.loop import pretrain

if __name__ == "__main__":  # the checkpoint writer spawns processes that re-import __main__
    pretrain(sys.argv[1:])
