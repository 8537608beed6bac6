"""torchrun entry for tests: train, then save the SAME state in every checkpoint format, then
keep training (its losses are the reference a converted checkpoint must resume to).

    torchrun --nproc_per_node N tests/save_formats.py <pretrain flags> --formats-out DIR
        --save-at K

writes DIR/dp_reshardable, DIR/fully_reshardable (torch_dist) and DIR/legacy (Megatron-LM's
per-rank torch format) at iteration K, then trains to --train-iters (--log-metrics-path logs).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from legacy_format import save_legacy  # noqa: E402


def _flags(parser):
    g = parser.add_argument_group("save_formats")
    g.add_argument("--formats-out", required=True)
    g.add_argument("--save-at", type=int, required=True)
    return parser


def main():
    from megatron_sparkling.training.initialize import shutdown
    from megatron_sparkling.training.loop import Pretrainer

    trainer = Pretrainer.from_argv(sys.argv[1:], _flags)
    args = trainer.args
    try:
        trainer.train(until_iteration=args.save_at)
        for fmt in ("dp_reshardable", "fully_reshardable"):
            args.dist_ckpt_optim_fully_reshardable = fmt == "fully_reshardable"
            trainer.save(os.path.join(args.formats_out, fmt))
        save_legacy(trainer, os.path.join(args.formats_out, "legacy"))
        trainer.train()
    finally:
        shutdown()


if __name__ == "__main__":
    main()
