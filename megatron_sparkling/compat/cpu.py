"""Run megatron-core 0.16.1 on a machine with no GPU (CPU tensors, gloo).

megatron-core assumes CUDA in many places. This module bridges each of them WITHOUT editing
megatron-core's installed files, and only when `needed()` (no usable GPU, or
MEGATRON_SPARKLING_FORCE_CPU=1; elsewhere `apply()` is a no-op). Every bridge is listed in
`APPLIED` so a run can print what it changed; what is bridged, and why: the comment above
`apply()`.

GPU-only features stay GPU-only (see README): Transformer Engine layers and fused kernels, apex,
grouped GEMM, fp16/bf16/fp8 mixed precision numerics, NCCL, CUDA graphs.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

APPLIED: list[str] = []
_DONE = False
_MODE = None


def needed() -> bool:
    """True where megatron-core must be bridged to run: no usable GPU, or forced by env."""
    if os.environ.get("MEGATRON_SPARKLING_FORCE_CPU") == "1":
        return True
    return not torch.cuda.is_available()


def have_gpu() -> bool:
    """A GPU megatron-core can use as is (no bridges)."""
    return torch.cuda.is_available() and not needed()


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def _set(obj, name, value):
    setattr(obj, name, value)
    APPLIED.append(f"{getattr(obj, '__name__', type(obj).__name__)}.{name}")


class _InertEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _InertStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, event=None):
        return event or _InertEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


_STREAM = _InertStream()


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Maps every request for a CUDA tensor to the CPU (see item 6 of the list above `apply()`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and any(_is_cuda(a) for a in args[1:]):
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


# What is bridged, and why:
# 1. `torch.cuda.current_device()` answers "cpu": rope, router and experts build tensors with
#    `device=torch.cuda.current_device()`.
# 2. CUDA RNG: `torch.cuda.manual_seed/get_rng_state/set_rng_state` and tensor_parallel.random's
#    `_get_cuda_rng_state/_set_cuda_rng_state` act on the CPU generator. Megatron's RNG tracker
#    (`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()`) then keeps separate,
#    correctly seeded CPU streams for the data-, tensor- and expert-parallel regions, and the RNG
#    state saved in a checkpoint restores exactly.
# 3. `moe_utils.te_general_gemm` is referenced even without Transformer Engine (NameError in
#    0.16.1): defined as None.
# 4. CUDA streams and events (MoE alltoall dispatcher, DDP set-up, shared experts): inert stand-ins,
#    since CPU work is synchronous anyway.
# 5. The alltoall dispatcher passes split sizes to `all_to_all_single`; megatron moves only CUDA
#    tensors to host lists, so CPU tensors are converted here.
# 6. Hard-coded `device='cuda'` tensors and `param.type() == 'torch.cuda.FloatTensor'` checks in the
#    optimizer, grad scaler, grad clipping and checkpoint exchange code: a process-wide
#    `TorchFunctionMode` maps cuda devices to cpu, makes `Tensor.cuda()` the identity and reports
#    CPU float tensors with their CUDA type names.
# 7. `torch.cuda.synchronize/empty_cache/memory_*`: no-ops or zeros.
# 8. The RNG tracker warns "CPU RNG state changed within GPU RNG context" whenever a forked
#    region draws random numbers; with item 2 the "GPU" stream IS the CPU generator, so the
#    warning is expected and filtered out (the states are still kept apart by the tracker).
def apply() -> list[str]:
    """Install the bridges once per process; returns what was applied (empty on a GPU)."""
    global _DONE, _MODE
    if _DONE or not needed():
        return APPLIED
    _DONE = True
    cuda = torch.cuda

    _set(cuda, "current_device", lambda: "cpu")
    _set(cuda, "synchronize", lambda *a, **k: None)
    _set(cuda, "empty_cache", lambda *a, **k: None)
    _set(cuda, "memory_allocated", lambda *a, **k: 0)
    _set(cuda, "max_memory_allocated", lambda *a, **k: 0)
    _set(cuda, "memory_reserved", lambda *a, **k: 0)
    _set(cuda, "max_memory_reserved", lambda *a, **k: 0)
    _set(cuda, "reset_peak_memory_stats", lambda *a, **k: None)

    # RNG (item 2).
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    _set(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _set(cuda, "manual_seed_all", lambda seed: None)
    _set(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _set(cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    import megatron.core.tensor_parallel.random as tp_random

    _set(tp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _set(tp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))

    # Transformer Engine reference (item 3).
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        _set(moe_utils, "te_general_gemm", None)

    # Streams and events (item 4).
    _set(cuda, "Stream", _InertStream)
    _set(cuda, "Event", _InertEvent)
    _set(cuda, "current_stream", lambda *a, **k: _STREAM)
    _set(cuda, "default_stream", lambda *a, **k: _STREAM)
    _set(cuda, "stream", lambda s=None: contextlib.nullcontext())

    # alltoall split sizes (item 5).
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    to_host = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

    _set(moe_utils, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        _set(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)

    # Expected tracker warning (item 8).
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())
    APPLIED.append("logging filter: tracker's CPU-RNG-changed warning")

    # device='cuda' literals (item 6).
    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # stays active for the life of the process
    APPLIED.append("TorchFunctionMode: device='cuda' -> cpu, Tensor.cuda() -> identity")
    return APPLIED
