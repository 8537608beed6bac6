"""Run Megatron-LM's `megatron.training` (core_v0.16.1) on a machine with no GPU.

On top of compat/cpu.py's megatron-core bridges, `apply()` bridges what megatron.training
assumes (the comment above it says what and why), without editing Megatron-LM's files and only
when compat.cpu.needed(). `CPU_FLAGS` is the table of flags a CPU run needs; `with_cpu_flags`
adds those the user did not give, and `refusal` names a configuration that cannot run on CPU.
Everything here is imported and applied by megatron_sparkling.megatron_lm, the launcher.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import torch

from megatron_sparkling.compat import cpu

# Flags a CPU run of pretrain_gpt.py needs: (flag, value or None for a bare flag, why).
# A flag counts as given when the user wrote it (with any value).
CPU_FLAGS = (
    ("--no-gradient-accumulation-fusion", None, "fused_weight_gradient_mlp_cuda is CUDA only"),
    ("--no-rope-fusion", None, "apply_rope_fusion needs Transformer Engine"),
    ("--no-persist-layer-norm", None, "the persistent layer norm is apex's CUDA kernel"),
    ("--distributed-backend", "gloo", "NCCL needs GPUs"),
    ("--transformer-impl", "local", "Transformer Engine layers need a GPU"),
)


# megatron-core's local (non-TE) expert path adds the expert bias in place on a view
# (mlp.py:247), which autograd forbids: MoE with biased linears cannot train without TE.
BIASED_MOE = ("megatron-core's local MoE expert path fails with biased linears (Megatron's "
              "default; mlp.py:247 'Output 0 of _ReduceFromModelParallelRegion is a view and is "
              "being modified inplace'): add --disable-bias-linear")


def _given(argv: list, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def with_cpu_flags(argv: list) -> tuple[list, list]:
    """`argv` plus the CPU_FLAGS it lacks, and the list of what was added."""
    added = []
    for flag, value, _ in CPU_FLAGS:
        if not _given(argv, flag):
            added += [flag] if value is None else [flag, value]
    return list(argv) + added, added


def _value(argv: list, flag: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


def refusal(argv: list) -> Optional[str]:
    """One line naming a flag combination that cannot run on CPU, or None."""
    experts = _value(argv, "--num-experts")
    if experts not in (None, "0") and not _given(argv, "--disable-bias-linear") \
            and _value(argv, "--transformer-impl") == "local":
        return BIASED_MOE
    return None


def _helpers_build_env() -> None:
    """Megatron's dataset helpers are built at start-up by `make`, which runs `python3 -m
    pybind11` and `python3-config`: make both name the running interpreter. Under pyenv a
    `.python-version` in the Megatron-LM tree (3.12 at core_v0.16.1) would otherwise pick
    another Python and name the module for it."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[:1] != [bindir]:
        os.environ["PATH"] = bindir + os.pathsep + path
    versions = os.sep + os.path.join(".pyenv", "versions") + os.sep
    if versions in sys.base_prefix + os.sep and "PYENV_VERSION" not in os.environ:
        os.environ["PYENV_VERSION"] = os.path.basename(sys.base_prefix.rstrip(os.sep))
        cpu.APPLIED.append("PYENV_VERSION=" + os.environ["PYENV_VERSION"])


# What is bridged, and why (each failed without it; see the design note megatron-lm-cpu.md):
# 1. `initialize_megatron` asserts CUDA unless `allow_no_cuda=True`: wrapped to pass it, in
#    megatron.training.initialize and under the name megatron.training.training imported.
# 2. With `torch.cuda.device_count() == 0` initialize.py silently skips
#    `mpu.initialize_model_parallel` and the RNG tracker's seeding (and fails much later):
#    device_count answers 1 and `torch.cuda.set_device` is a no-op.
# 3. `megatron.legacy.fused_kernels.load` runs nvcc (no CUDA_HOME): a no-op, the fused kernels
#    are off on CPU anyway.
# 4. The dataset helpers' build (`_helpers_build_env`).
def apply() -> list[str]:
    """Install megatron-core's and megatron.training's CPU bridges; returns what was applied
    (empty on a GPU). Call after Megatron-LM's tree is on sys.path, before its script runs."""
    if not cpu.needed():
        return []
    applied = cpu.apply()
    if getattr(apply, "done", False):
        return applied
    apply.done = True
    cpu._set(torch.cuda, "device_count", lambda: 1)
    cpu._set(torch.cuda, "set_device", lambda *a, **k: None)

    from megatron.legacy import fused_kernels
    from megatron.training import initialize, training

    cpu._set(fused_kernels, "load", lambda *a, **k: None)
    initialize_megatron = initialize.initialize_megatron

    @functools.wraps(initialize_megatron)
    def initialize_without_cuda(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    cpu._set(initialize, "initialize_megatron", initialize_without_cuda)
    cpu._set(training, "initialize_megatron", initialize_without_cuda)
    _helpers_build_env()
    return applied
