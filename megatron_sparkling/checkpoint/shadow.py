"""Any rank of a Megatron run, rebuilt on the meta device: where its tensors live in a checkpoint.

Some checkpoint contents are meaningless without the exact model that wrote them: the default
distributed-optimizer format (`dp_reshardable`) stores flat per-bucket tensors whose layout is
the DDP bucketing of each model-parallel rank, and Megatron-LM's legacy `torch` format stores
each rank's LOCAL state dict. Instead of re-deriving Megatron's rules, this module asks
megatron-core itself: for a given args namespace and global rank it builds the real GPTModel,
DistributedDataParallel and optimizer on the meta device (no memory for weights) under a fake
process group (torch's "fake" backend: every collective is a no-op), and records a `RankLayout`.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import copy
import dataclasses
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_sparkling.checkpoint.paths import CheckpointError
from megatron_sparkling.compat import cpu as cpu_compat
from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.mcore import model as model_lib


@dataclass(frozen=True)
class Piece:
    """Part of a global checkpoint tensor held by one local tensor."""
    key: str
    global_slice: tuple        # ints (prepended axes) and slices, as ShardedTensor.global_slice()
    size: tuple                # view of the local tensor's flat data: size, stride, offset
    stride: tuple
    offset: int
    main: bool                 # the main replica (replica_id all zero)

    def view_of(self, flat: torch.Tensor) -> torch.Tensor:
        """This piece of a contiguous flat local tensor (which may itself be a view)."""
        flat = flat.contiguous()
        return torch.as_strided(flat, self.size, self.stride, flat.storage_offset() + self.offset)


@dataclass
class LocalTensor:
    name: str                  # local state-dict name (a parameter or persistent buffer)
    shape: tuple
    dtype: torch.dtype
    pieces: list = field(default_factory=list)
    is_param: bool = True


@dataclass
class BufferLayout:
    """One DDP param-and-grad buffer of an optimizer (one dtype)."""
    dtype_key: str                      # `(param_dtype, grad_dtype)` as megatron prints it
    buckets: list                       # (numel_padded, numel_unpadded) per bucket
    params: dict                        # local name -> (bucket index, start, end) in the bucket


@dataclass
class OptimizerLayout:
    prefix: str                         # "" or "chained_<i>." (bucket-space checkpoint keys)
    dp_group_idx: int
    distributed: bool
    is_expert: bool
    buffers: list                       # BufferLayout per gbuf_idx (distributed optimizer)
    groups: list                        # param-group options (no params), optimizer order
    group_params: list                  # local names per group, optimizer order


@dataclass
class RankLayout:
    """What one rebuilt rank records:

    - for every local parameter (and persistent buffer): its local name, and the pieces of
      global checkpoint tensors it holds (from the model's own `sharded_state_dict()`, factories
      such as SwiGLU's [W_i; V_i] fc1 applied by megatron-core), as views into the flat local
      tensor;
    - for every (chained) optimizer: its checkpoint-key prefix, `dp_group_idx`, the DDP buffers
      and buckets with each parameter's range in them, and its param groups in optimizer order.
    """
    rank: int
    tensors: dict                       # local name -> LocalTensor
    optimizers: list                    # OptimizerLayout
    global_shapes: dict                 # checkpoint key -> global shape (this rank's model keys)
    objects: list                       # ShardedObject unique keys of the model (extra state)
    coordinates: dict = field(default_factory=dict)   # tp, pp, ep, dp, edp ranks


# ---------------------------------------------------------------------------- rank choice
def _generators(args):
    from megatron.core.parallel_state import RankGenerator

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = getattr(args, "context_parallel_size", 1) or 1
    ep = getattr(args, "expert_model_parallel_size", 1) or 1
    etp = getattr(args, "expert_tensor_parallel_size", None) or tp
    order = "tp-cp-ep-pp-dp" if getattr(args, "use_tp_pp_dp_mapping", False) else "tp-cp-ep-dp-pp"
    world = args.world_size
    dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp * cp), pp=pp, cp=cp, order=order)
    expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order=order)
    return dense, expert, order


def representative_ranks(args) -> list[int]:
    """One global rank per distinct model-parallel coordinate, dense and expert (data-parallel
    rank 0): together they hold every distinct shard of the model and optimizer state."""
    dense, expert, _ = _generators(args)
    dp_token = "dp-cp" if (getattr(args, "context_parallel_size", 1) or 1) > 1 else "dp"
    ranks = {g[0] for g in dense.get_ranks(dp_token)} | {g[0] for g in expert.get_ranks("dp")}
    return sorted(ranks)


def expert_dp_first_ranks(args) -> list[int]:
    """The global ranks of expert-data-parallel rank 0, one per (TP, PP, EP) coordinate: the
    ranks that write Megatron-LM's legacy per-rank checkpoint files."""
    _, expert, _ = _generators(args)
    return sorted(g[0] for g in expert.get_ranks("dp"))


def stage_ranks(args) -> list[int]:
    """One global rank per pipeline stage (the first of the first pipeline group)."""
    dense, _, _ = _generators(args)
    return list(dense.get_ranks("pp")[0])


# ---------------------------------------------------------------------------- worker side
class _MetaTypeMode(torch.overrides.TorchFunctionMode):
    """Meta tensors answer `.type()` with the CUDA type name megatron's optimizer checks for."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str):
            return out.replace("cuda.meta.", "cuda.").replace("torch.meta.", "torch.cuda.")
        return out


_WORKER_READY = False


def _prepare_worker() -> None:
    global _WORKER_READY
    if _WORKER_READY:
        return
    os.environ["MEGATRON_SPARKLING_FORCE_CPU"] = "1"
    cpu_compat.apply()
    torch.cuda.current_device = lambda: "meta"  # DDP buffers and main params: no memory
    _MetaTypeMode().__enter__()
    _WORKER_READY = True


def _ddp_compatible_args(args):
    """Megatron-LM's DDP flags spelled with its `ddp_` prefix, under DDP-config names."""
    args = copy.copy(args)
    for name in ("pad_buckets_for_high_nccl_busbw", "reduce_scatter_with_fp32_accumulation"):
        if hasattr(args, "ddp_" + name):
            setattr(args, name, getattr(args, "ddp_" + name))
    return args


def _check_buildable(args) -> None:
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        raise CheckpointError("virtual pipeline stages (--num-layers-per-virtual-pipeline-stage) "
                              "are not supported by the converter; re-save without them or with "
                              "--dist-ckpt-optim-fully-reshardable")
    if (getattr(args, "transformer_impl", "local") == "transformer_engine"
            and not cpu_compat.have_transformer_engine()):
        raise CheckpointError(
            "the source was trained with Transformer Engine and this machine has none; mapping "
            "its per-rank state needs the same model: run the converter where Transformer "
            "Engine is installed, or re-save the checkpoint with "
            "--dist-ckpt-optim-fully-reshardable")


def _record_tensors(chunk) -> tuple[dict, dict, list]:
    """Local tensors of one bare GPTModel with their pieces of global checkpoint tensors."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
        is_main_replica,
    )

    named = {id(p): (n, True) for n, p in chunk.named_parameters()}
    named.update({id(b): (n, False) for n, b in chunk.named_buffers()})
    tensors, shapes, objects = {}, {}, []

    def add(owner, sh: ShardedTensor):
        name, is_param = named[id(owner)]
        entry = tensors.setdefault(name, LocalTensor(name, tuple(owner.shape), owner.dtype,
                                                     is_param=is_param))
        data = sh.data
        entry.pieces.append(Piece(sh.key, sh.global_slice(), tuple(data.shape),
                                  tuple(data.stride()),
                                  data.storage_offset() - owner.storage_offset(),
                                  is_main_replica(sh.replica_id)))
        shapes[sh.key] = tuple(sh.global_shape)

    for item in nested_values(chunk.sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            for sh in nested_values(built if isinstance(built, (dict, list)) else [built]):
                add(item.data, sh)
        elif isinstance(item, ShardedTensor):
            if id(item.data) in named:
                add(item.data, item)
            else:
                shapes[item.key] = tuple(item.global_shape)
        elif isinstance(item, ShardedObject):
            objects.append(item.unique_key)
    return tensors, shapes, objects


def _record_optimizers(optimizer, model_chunk) -> list[OptimizerLayout]:
    from megatron.core.optimizer import DistributedOptimizer

    names = {id(p): n for n, p in model_chunk.named_parameters()}
    chained = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    out = []
    for i, opt in enumerate(chained):
        prefix = f"chained_{i}." if len(chained) > 1 else ""
        groups, group_params = [], []
        distributed = isinstance(opt, DistributedOptimizer)
        if distributed:
            # the inner optimizer holds shard main params; model params per group come from
            # the DO's own bookkeeping
            for g_index, group in enumerate(opt.optimizer.param_groups):
                groups.append({k: v for k, v in group.items() if k != "params"})
            group_params = [[] for _ in groups]
            for p, (g_index, order) in sorted(opt.model_param_group_index_map.items(),
                                              key=lambda kv: kv[1]):
                group_params[g_index].append(names[id(p)])
        else:
            model_of = {}
            for model_group, main_group in zip(getattr(opt, "float16_groups", []),
                                               getattr(opt, "fp32_from_float16_groups", [])):
                for model_p, main_p in zip(model_group, main_group):
                    model_of[id(main_p)] = model_p
            for group in opt.optimizer.param_groups:
                groups.append({k: v for k, v in group.items() if k != "params"})
                group_params.append([names[id(model_of.get(id(p), p))] for p in group["params"]])
        buffers = []
        if distributed:
            for gbuf_idx, buffer in enumerate(opt.buffers):
                (dtype_key,) = opt.gbuf_ranges[gbuf_idx].keys()
                params = {}
                for p, (start, end, bucket_id) in buffer.param_index_map.items():
                    offset = buffer.buckets[bucket_id].offset
                    params[names[id(p)]] = (bucket_id, start - offset, end - offset)
                buckets = [(b.grad_data.numel(), b.numel_unpadded) for b in buffer.buckets]
                buffers.append(BufferLayout(str(dtype_key), buckets, params))
        is_expert = bool(groups) and all(g.get("is_expert_parallel", False) for g in groups)
        out.append(OptimizerLayout(prefix, int(getattr(opt, "data_parallel_group_idx", 0) or 0),
                                   distributed, is_expert, buffers, groups, group_params))
    return out


def _build_rank(args, rank: int, with_optimizer: bool) -> RankLayout:
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from torch.testing._internal.distributed.fake_pg import FakeStore

    _, _, order = _generators(args)
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank,
                                         world_size=args.world_size)
    try:
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            context_parallel_size=getattr(args, "context_parallel_size", 1) or 1,
            expert_model_parallel_size=getattr(args, "expert_model_parallel_size", 1) or 1,
            expert_tensor_parallel_size=getattr(args, "expert_tensor_parallel_size", None),
            order=order, create_gloo_process_groups=False)
        model_parallel_cuda_manual_seed(getattr(args, "seed", 1234))
        model = model_lib.build_model(_ddp_compatible_args(args), wrap_with_ddp=with_optimizer,
                                      meta_device=True)
        chunk = model_lib.unwrap(model)[0]
        tensors, shapes, objects = _record_tensors(chunk)
        optimizers = []
        if with_optimizer:
            optimizer = model_lib.build_optimizer(args, model, use_gloo_process_groups=False)
            optimizers = _record_optimizers(optimizer, chunk)
        coordinates = {
            "tp": mpu.get_tensor_model_parallel_rank(),
            "pp": mpu.get_pipeline_model_parallel_rank(),
            "ep": mpu.get_expert_model_parallel_rank(),
            "dp": mpu.get_data_parallel_rank(with_context_parallel=True),
            "edp": mpu.get_expert_data_parallel_rank(),
        }
        return RankLayout(rank, tensors, optimizers, shapes, objects, coordinates)
    finally:
        mpu.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _worker(args, ranks, with_optimizer):
    _prepare_worker()
    return [_build_rank(args, r, with_optimizer) for r in ranks]


# ---------------------------------------------------------------------------- caller side
# The builds run in a spawned worker process so that the fake process group, megatron-core's
# global parallel state and the meta-device patches never touch the caller (which may itself be
# a torchrun rank or a test that trains a model).
_POOL: Optional[concurrent.futures.ProcessPoolExecutor] = None


def _pool() -> concurrent.futures.ProcessPoolExecutor:
    """One long-lived spawned worker: megatron-core is imported there once per process."""
    global _POOL
    if _POOL is None:
        env_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE")
        saved = {k: os.environ.pop(k) for k in env_keys if k in os.environ}
        try:
            _POOL = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent, initargs=(os.getpid(),))
            _POOL.submit(_prepare_worker).result()  # start it now, with this environment
        finally:
            os.environ.update(saved)
        atexit.register(_POOL.shutdown)
    return _POOL


def _exit_with_parent(parent: int) -> None:
    """The worker's initializer: end it once `parent` is gone. A killed converter must not leave
    its worker behind, and the worker never reads EOF (it holds both ends of its task queue)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def build_layouts(args, ranks, with_optimizer: bool = True, exact: bool = True) -> list:
    """RankLayouts of the given global ranks of the run described by `args` (in a worker).

    `exact=False` allows megatron-core's local layer spec in place of a Transformer Engine
    spec where TE is missing (same shapes and param groups; not the same bucket layout; keys
    as the local spec names them: `spelled_like` gives them a checkpoint's names).
    Under torch.distributed, rank 0 builds and every rank receives the result (collective)."""
    args = copy.copy(args)
    args.world_size = int(args.world_size)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [None]
        if torch.distributed.get_rank() == 0:
            try:
                box[0] = _build_here(args, ranks, with_optimizer, exact)
            except CheckpointError as e:
                box[0] = e
        torch.distributed.broadcast_object_list(box, src=0)
        if isinstance(box[0], CheckpointError):
            raise box[0]
        return box[0]
    return _build_here(args, ranks, with_optimizer, exact)


def spelled_like(layouts: list, keys) -> list:
    """`layouts` with every checkpoint key named as `keys` (a checkpoint's model keys) name the
    same tensor (core/layout.py SPEC_SPELLINGS): a model rebuilt with the local spec in place of
    Transformer Engine's asks for a TE MoE layer's pre-MLP norm by the local name."""
    keys = set(keys)
    for lay in layouts:
        lay.global_shapes = {layout_lib.spelled_like(k, keys): shape
                             for k, shape in lay.global_shapes.items()}
        for tensor in lay.tensors.values():
            tensor.pieces = [dataclasses.replace(p, key=layout_lib.spelled_like(p.key, keys))
                             for p in tensor.pieces]
    return layouts


def _build_here(args, ranks, with_optimizer: bool, exact: bool) -> list:
    global _POOL
    if exact:
        _check_buildable(args)
    elif (getattr(args, "transformer_impl", "local") == "transformer_engine"
          and not cpu_compat.have_transformer_engine()):
        args.transformer_impl = "local"
    try:
        return _pool().submit(_worker, args, list(ranks), with_optimizer).result()
    except CheckpointError:
        raise
    except concurrent.futures.process.BrokenProcessPool:
        _POOL = None
        raise CheckpointError("rebuilding the model on the meta device crashed; re-save the "
                              "checkpoint with --dist-ckpt-optim-fully-reshardable") from None
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"the stored args do not build a megatron-core model "
                              f"({type(e).__name__}: {first}); fix the checkpoint's args") from None


def run_args(args, *, tensor: Optional[int] = None, pipeline: Optional[int] = None,
             expert: Optional[int] = None, expert_tensor: Optional[int] = None):
    """A copy of `args` at another parallel layout, with the smallest world that fits it."""
    import math

    out = copy.copy(args)
    if tensor is not None:
        out.tensor_model_parallel_size = tensor
    if pipeline is not None:
        out.pipeline_model_parallel_size = pipeline
    if expert is not None:
        out.expert_model_parallel_size = expert
    if expert_tensor is not None:
        out.expert_tensor_parallel_size = expert_tensor
    tp, pp = out.tensor_model_parallel_size, out.pipeline_model_parallel_size
    cp = getattr(out, "context_parallel_size", 1) or 1
    ep = getattr(out, "expert_model_parallel_size", 1) or 1
    etp = getattr(out, "expert_tensor_parallel_size", None) or tp
    out.world_size = math.lcm(tp * pp * cp, etp * ep * pp)
    out.data_parallel_size = out.world_size // (tp * pp * cp)
    if tp == 1:
        out.sequence_parallel = False  # megatron-core refuses it without TP
    elif getattr(out, "num_experts", None):
        out.sequence_parallel = True   # and requires it for MoE with TP
    return out
