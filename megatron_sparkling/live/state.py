"""Global tensors in and out of a live megatron-core model and its optimizer: the one implementation.

A sharded state dict (`model.sharded_state_dict()`, `optimizer.sharded_state_dict(...)`) maps each
local tensor to a slice of a global tensor named by its checkpoint key. `gather_global` reads the
global tensors of a model held whole by this process (1 rank); `fill_live` cuts every rank's
shards of a live model and its optimizer state (model space) out of global tensors produced one
at a time (any TP/EP/PP layout); `load_live` loads a state dict the way every load here must.
Growth on load, in-process growth and the pre-training loop's checkpoint load all go through it.
"""
from __future__ import annotations

import random
from typing import Callable, Optional

import numpy as np
import torch

from megatron_sparkling.compat.optimizer import (
    initialize_empty_state,
    patched_fully_reshardable_load,
    steps_out_of_buckets,
)
from megatron_sparkling.mcore.model import unwrap

CHECKPOINT_VERSION = 3.0
# The data position a resumed run continues from (Megatron-LM's args counters).
POSITION_COUNTERS = ("consumed_train_samples", "skipped_train_samples", "consumed_valid_samples")
TensorOf = Callable[[str, tuple], torch.Tensor]    # (checkpoint key, global shape) -> tensor


class GlobalShapeError(ValueError):
    """A global tensor whose shape is not the live model's."""


# ---------------------------------------------------------------------------- state dicts
def sharded_state_dict_metadata(args) -> dict:
    """What Megatron-LM passes to sharded_state_dict() (and stores as content metadata)."""
    from megatron.core import parallel_state as mpu

    metadata = {}
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = (
            "fully_reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable")
        if args.dist_ckpt_optim_fully_reshardable:
            metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    metadata["singleton_local_shards"] = False
    metadata["chained_optim_avoid_prefix"] = True
    metadata["dp_cp_group"] = mpu.get_data_parallel_group(with_context_parallel=True)
    return metadata


def model_space_metadata(args) -> dict:
    """sharded_state_dict metadata that puts distributed-optimizer state in model space
    (one global tensor per parameter and kind, whatever the layout)."""
    metadata = sharded_state_dict_metadata(args)
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    return metadata


def rng_state_object(args):
    """This rank's RNG state as Megatron-LM stores it."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = [{
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }]
    pp_rank, pp = mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()
    tp_rank, tp = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    dp_rank = mpu.get_data_parallel_rank(with_context_parallel=True)
    if mpu.get_expert_model_parallel_world_size() > 1:
        dp = mpu.get_data_parallel_world_size(with_context_parallel=True)
        return ShardedObject("rng_state", state, (pp, tp, dp), (pp_rank, tp_rank, dp_rank),
                             replica_id=0)
    return ShardedObject("rng_state", state, (pp, tp), (pp_rank, tp_rank), replica_id=dp_rank)


def restore_rng(rng_state) -> None:
    from megatron.core import tensor_parallel

    state = rng_state[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def build_state_dict(args, model, optimizer, scheduler, metadata: dict, iteration=None,
                     with_optimizer=True, with_rng=True, is_loading=False) -> dict:
    """The (sharded) state dict Megatron-LM's generate_state_dict builds."""
    chunks = unwrap(model)
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION}
    if iteration is not None:
        state["iteration"] = iteration
    for i, chunk in enumerate(chunks):
        state[_model_key(i, len(chunks))] = chunk.sharded_state_dict(metadata=metadata)
    if with_optimizer and optimizer is not None:
        with steps_out_of_buckets(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                              metadata=metadata)
        if scheduler is not None:
            state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = rng_state_object(args)
    return state


def _model_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


# ---------------------------------------------------------------------------- global tensors
def _preprocess(sharded_state_dict):
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    return load_preprocess(sharded_state_dict)


def gather_global(sharded_state_dict) -> tuple[dict, dict]:
    """(tensors, objects): global tensors by key, ShardedObject data by unique key.

    Every shard must be held by this process (a 1-rank model)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    sharded, _, _ = _preprocess(sharded_state_dict)
    tensors, objects = {}, {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            if item.key not in tensors:
                tensors[item.key] = torch.empty(item.global_shape, dtype=item.dtype)
            tensors[item.key][item.global_slice()] = item.data.detach().to("cpu")
        elif isinstance(item, ShardedObject):
            objects[item.unique_key] = item.data
    return tensors, objects


def fit_shape(tensor: torch.Tensor, shape: tuple) -> torch.Tensor:
    """`tensor` cut or zero-padded to `shape`, as dist_checkpointing loads a ShardedTensor that
    allows a shape mismatch (the padded vocabulary: its padding depends on the TP size). Rows a
    larger padding adds are zero, exactly what Megatron's own loader gives them."""
    if tuple(tensor.shape) == tuple(shape) or tensor.dim() != len(shape):
        return tensor
    out = tensor.new_zeros(shape)
    common = tuple(slice(0, min(a, b)) for a, b in zip(tensor.shape, shape))
    out[common] = tensor[common]
    return out


def fill_from_global(sharded_state_dict, tensor_of: TensorOf,
                     object_of: Optional[Callable[[str, object], object]] = None):
    """A state dict to `load_state_dict` with, each shard cut from `tensor_of(key, global shape)`.

    `tensor_of` is called once per key (cached while its shards are cut), so a caller can grow
    or read one global tensor at a time; a tensor whose ShardedTensor allows a shape mismatch
    (embedding, output layer: the padded vocabulary) is fitted as Megatron's loader fits it
    (`fit_shape`). `object_of(unique_key, data)` supplies ShardedObjects (`data`: the value in
    the sharded state dict, kept by default). ShardedTensorFactories (e.g.
    SwiGLU fc1 stored as [gate; up]) are built and merged exactly as dist_checkpointing does.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factory_merges,
    )

    sharded, nonpersistent, factories = _preprocess(sharded_state_dict)
    cache: dict[str, torch.Tensor] = {}

    def fetch(item):
        if isinstance(item, ShardedTensor):
            if item.key not in cache:
                cache.clear()  # keep one global tensor alive at a time
                cache[item.key] = tensor_of(item.key, tuple(item.global_shape))
            full = cache[item.key]
            if item.allow_shape_mismatch:
                full = fit_shape(full, tuple(item.global_shape))
            if tuple(full.shape) != tuple(item.global_shape):
                raise GlobalShapeError(f"{item.key}: global shape {tuple(full.shape)} does not "
                                       f"match the model's {tuple(item.global_shape)}")
            target = item.data if item.data is not None else torch.empty(
                item.local_shape, dtype=item.dtype)
            with torch.no_grad():
                target.copy_(full[item.global_slice()].to(target.dtype))
            return target
        if isinstance(item, ShardedObject):
            return object_of(item.unique_key, item.data) if object_of is not None else item.data
        return item

    dict_list_map_inplace(fetch, sharded)
    cache.clear()
    # Lists merge element-wise: an optimizer's param groups keep their hyper-parameters and get
    # their non-persistent `params` back.
    merge(sharded, nonpersistent)
    return apply_factory_merges(sharded, factories)


def model_global_tensors(model_chunks) -> dict:
    """Global tensors of a 1-rank model (DDP wrappers removed), by checkpoint key."""
    tensors = {}
    for chunk in unwrap(model_chunks):
        tensors.update(gather_global(chunk.sharded_state_dict())[0])
    return tensors


def load_model_global_tensors(model_chunks, tensors: dict, strict: bool = True) -> None:
    """Load global tensors (by checkpoint key) into a model of any parallel layout."""
    for chunk in unwrap(model_chunks):
        missing = [k for k in _sharded_keys(chunk.sharded_state_dict()) if k not in tensors]
        if missing and strict:
            raise KeyError(f"global tensors lack {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        state = fill_from_global(chunk.sharded_state_dict(), lambda k, _: tensors[k])
        chunk.load_state_dict(state, strict=strict)


def _sharded_keys(sharded_state_dict) -> set:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {item.key for item in nested_values(sharded_state_dict)
            if isinstance(item, (ShardedTensor, ShardedTensorFactory))}


# ---------------------------------------------------------------------------- optimizer step
def _inner_states(osd):
    """Every per-optimizer state dict ({'state': ..., 'param_groups': ...}) of a (chained)
    optimizer's state dict."""
    if isinstance(osd, dict) and "param_groups" in osd:
        yield osd
    elif isinstance(osd, dict):
        for v in osd.values():
            yield from _inner_states(v)
    elif isinstance(osd, (list, tuple)):
        for v in osd:
            yield from _inner_states(v)


def step_of(osd):
    """The optimizer's global step in its state dict (None if it has none)."""
    steps = []
    for inner in _inner_states(osd):
        if "common_step" in inner.get("state", {}):
            steps.append(inner["state"]["common_step"])
        steps += [g["step"] for g in inner["param_groups"] if "step" in g]
    return max(steps, key=float) if steps else None


def set_step(osd, step) -> None:
    """Every parameter continues at `step` (new ones too: megatron-core keeps one step per
    optimizer). The distributed optimizer reads it from its param groups (fused Adam: an int;
    a fresh optimizer's groups have none yet, so it is set, not only replaced); the fp32/fp16
    optimizers from `state.common_step` (torch's Adam), and fused Adam there from the groups."""
    as_int = int(float(step)) if float(step).is_integer() else float(step)
    for inner in _inner_states(osd):
        per_parameter = "state" in inner
        if per_parameter:
            inner["state"]["common_step"] = (
                step.clone() if torch.is_tensor(step) else torch.tensor(float(step)))
        if not per_parameter or _fused_adam():
            for g in inner["param_groups"]:
                g["step"] = as_int


def _fused_adam() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return bool(distrib_optimizer.HAVE_APEX_OR_TE)


# ---------------------------------------------------------------------------- live model
def global_state(args, model, optimizer) -> tuple[dict, object]:
    """(global tensors of a 1-rank model and of its optimizer state (model space) by key,
    the optimizer's step)."""
    if torch.distributed.get_world_size() != 1:
        raise NotImplementedError("in-process growth gathers global tensors in one process; "
                                  "run it at 1 rank, or grow a checkpoint offline")
    state = build_state_dict(args, model, optimizer, None, model_space_metadata(args),
                             with_rng=False)
    return gather_global(state)[0], step_of(state["optimizer"])


def load_live(args, model, optimizer, state: dict, strict: bool = True, step=None) -> None:
    """Load a (filled) state dict into the live model and, when it holds one, the optimizer:
    the optimizer's fp32 main params are views of leaf model params (hence no_grad), and
    megatron-core 0.16.1's fully_reshardable load needs compat/optimizer.py's workaround."""
    chunks = unwrap(model)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[_model_key(i, len(chunks))], strict=strict)
    if optimizer is not None and "optimizer" in state:
        if step is not None:
            set_step(state["optimizer"], step)
        with torch.no_grad(), patched_fully_reshardable_load(optimizer):
            optimizer.load_state_dict(state["optimizer"])
    elif optimizer is not None and (args.fp16 or args.bf16):
        optimizer.reload_model_params()


def fill_live(args, model, optimizer, tensor_of: TensorOf, step=None, strict: bool = True,
              object_of=None) -> None:
    """Every tensor of the live model, and of its optimizer's state when `optimizer` is given,
    cut from `tensor_of(key, global shape)` (model keys, and `optimizer.state.<kind>.<model
    key>` in model space); the optimizer continues at `step`; ShardedObjects (`_extra_state`)
    from `object_of` as fill_from_global takes it (default: the live model's own). Raises
    GlobalShapeError when a produced tensor does not fit the model."""
    if optimizer is not None:
        initialize_empty_state(optimizer)
    sharded = build_state_dict(args, model, optimizer, None, model_space_metadata(args),
                               with_optimizer=optimizer is not None, with_rng=False,
                               is_loading=True)
    state = fill_from_global(sharded, tensor_of, object_of)
    del sharded
    load_live(args, model, optimizer, state, strict=strict, step=step)


def resume_position(args, common: dict, iteration: int, release: bool) -> tuple[int, float]:
    """(iteration, floating-point operations so far) a load resumes at, as Megatron-LM's
    load_checkpoint: iteration 0 for --finetune or a release checkpoint; otherwise args' data
    counters continue from the checkpoint's args."""
    flops = float(common.get("num_floating_point_operations_so_far", 0.0) or 0.0)
    if args.finetune or release:
        return 0, flops
    carry_position(args, common.get("args"))
    return common.get("iteration", iteration), flops


def carry_position(args, from_args) -> None:
    """args continues at `from_args`' data position."""
    for counter in POSITION_COUNTERS:
        setattr(args, counter, getattr(from_args, counter, 0))


def reset_moe_loss_tracker() -> None:
    """megatron-core sizes its per-layer MoE aux-loss tracker once, by the depth it first saw;
    a model of another depth needs it rebuilt (0.17+: a tracker object, 0.16: a dict)."""
    try:
        from megatron.core.transformer.moe.moe_logging import (
            MoEMetricsTracker,
            set_moe_metrics_tracker,
        )
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
        return
    set_moe_metrics_tracker(MoEMetricsTracker())
