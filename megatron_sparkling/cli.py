"""`megatron-sparkling` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import contextlib
import sys


def _pretrain(argv):
    from megatron_sparkling.training.loop import pretrain

    pretrain(argv)
    return 0


def _verify(argv):
    parser = argparse.ArgumentParser(
        prog="megatron-sparkling verify",
        description="Compare a model before and after growth on the same batches: loss and "
                    "logit change, residual-stream and norm RMS per layer, r = RMS(y)/RMS(x) of "
                    "every linear, and (when the after-checkpoint carries a growth record) the "
                    "cosine of each new unit's weights and gradient with its twin's. Each model "
                    "is built from its checkpoint's stored args at 1 rank in this process.")
    parser.add_argument("--before", required=True, metavar="DIR",
                        help="checkpoint root of the model before growth (torch_dist)")
    parser.add_argument("--after", required=True, metavar="DIR",
                        help="checkpoint root of the grown model (torch_dist)")
    parser.add_argument("--iteration", type=int, default=None,
                        help="iteration to read in both roots (default: each root's "
                             "latest_checkpointed_iteration.txt)")
    parser.add_argument("--before-iteration", type=int, default=None,
                        help="iteration of --before (overrides --iteration)")
    parser.add_argument("--after-iteration", type=int, default=None,
                        help="iteration of --after (overrides --iteration)")
    parser.add_argument("--data-path", nargs="+", default=None,
                        help="tokenized corpus prefix(es) (default: the before-run's --data-path)")
    parser.add_argument("--batches", type=int, default=2,
                        help="validation micro-batches to run both models on (default 2)")
    parser.add_argument("--no-twins", action="store_true",
                        help="skip the twin-symmetry section (a backward pass of the grown model)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    ns = parser.parse_args(argv)

    from megatron_sparkling.diagnostics.checkpoints import VerifyError, verify_checkpoints
    from megatron_sparkling.training.arguments import ArgumentError
    from megatron_sparkling.training.checkpointing import CheckpointError

    def pick(specific):
        return ns.iteration if specific is None else specific

    try:
        # stdout carries the report alone (--json is parsed by tools); progress goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            report = verify_checkpoints(ns.before, ns.after, pick(ns.before_iteration),
                                        pick(ns.after_iteration), ns.data_path, ns.batches,
                                        twins=not ns.no_twins)
    except (VerifyError, ArgumentError, CheckpointError, FileNotFoundError) as e:
        print(f"megatron-sparkling verify: {e}", file=sys.stderr)
        return 2
    print(report.to_json() if ns.json else report.to_text(), flush=True)
    return 0


COMMANDS = {
    "pretrain": (_pretrain, "pre-train with Megatron-LM's flags (same as examples/pretrain_moe.py)"),
    "verify": (_verify, "compare a checkpoint before and after growth (RMS per layer, r of every "
                        "linear, loss and logit change, twin symmetry)"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="megatron-sparkling", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(COMMANDS.items())))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    ns = parser.parse_args(argv[:1])
    return COMMANDS[ns.command][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
