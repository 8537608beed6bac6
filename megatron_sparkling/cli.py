"""`megatron-sparkling` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import sys


def _pretrain(argv):
    from megatron_sparkling.training.loop import pretrain

    pretrain(argv)
    return 0


COMMANDS = {
    "pretrain": (_pretrain, "pre-train with Megatron-LM's flags (same as examples/pretrain_moe.py)"),
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
