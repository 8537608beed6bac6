"""Run Megatron-LM's own pretrain_gpt.py (patched with patches/), also on a machine with no GPU.

    torchrun --nproc_per_node N -m megatron_sparkling.megatron_lm PATH/pretrain_gpt.py <flags>

With a GPU the script runs as is (runpy, as `python PATH/pretrain_gpt.py` would). Without one,
megatron-core's and megatron.training's CUDA assumptions are bridged (compat/cpu.py,
compat/megatron_lm.py) before the script imports Megatron-LM, the flags a CPU run needs are
added where the user did not give them (one line says which), and a configuration that cannot
run on CPU is refused in one line.
"""
from __future__ import annotations

import os
import runpy
import sys

from megatron_sparkling.compat import cpu
from megatron_sparkling.compat import megatron_lm as cpu_megatron_lm

USAGE = ("usage: torchrun --nproc_per_node N -m megatron_sparkling.megatron_lm "
         "PATH/pretrain_gpt.py <Megatron-LM flags>")


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"megatron_sparkling.megatron_lm: {message}", flush=True)


def main(argv: list) -> None:
    if not argv:
        sys.exit(USAGE)
    if not argv[0].endswith(".py") or not os.path.isfile(argv[0]):
        sys.exit(f"megatron_sparkling.megatron_lm: {argv[0]} is not a Python file; {USAGE}")
    script, flags = os.path.abspath(argv[0]), argv[1:]
    # The script's own directory first, as `python script.py` would have it: Megatron-LM's
    # `megatron` package (and gpt_builders, model_provider) come from its tree.
    sys.path.insert(0, os.path.dirname(script))
    if cpu.needed():
        flags, added = cpu_megatron_lm.with_cpu_flags(flags)
        refused = cpu_megatron_lm.refusal(flags)
        if refused:
            sys.exit(f"megatron_sparkling.megatron_lm: {refused}")
        try:
            cpu_megatron_lm.apply()
        except ImportError as e:
            sys.exit(f"megatron_sparkling.megatron_lm: cannot import Megatron-LM next to {script} "
                     f"({e}); give the pretrain_gpt.py of a Megatron-LM checkout at core_v0.16.1")
        _say("no GPU: megatron-core and megatron.training bridged to CPU; added "
             + (" ".join(added) if added else "no flags (all given)"))
    sys.argv = [script, *flags]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
