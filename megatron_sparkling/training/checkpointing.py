"""Save and load training checkpoints in Megatron-LM's torch_dist layout.

    <save>/latest_checkpointed_iteration.txt     the iteration, written last
    <save>/iter_0000100/                          megatron-core dist_checkpointing (torch_dist)
        common.pt, metadata.json, .metadata, __*_*.distcp

The state dict is the one Megatron-LM's save_checkpoint builds: `args`, `checkpoint_version` 3.0,
`iteration`, `model` (the unwrapped model's sharded state dict), `optimizer` (megatron-core's
sharded optimizer state; distributed optimizer as `dp_reshardable`, or `fully_reshardable` with
--dist-ckpt-optim-fully-reshardable), `opt_param_scheduler`, `rng_state` (a ShardedObject per
PP x TP rank, per DP rank too with EP > 1) and `num_floating_point_operations_so_far`; the
content metadata Megatron-LM stores beside it says how the optimizer state is sharded.
"""
from __future__ import annotations

import copy
import os
import random
from typing import Optional

import numpy as np
import torch

from megatron_sparkling.checkpoint.paths import (  # noqa: F401  (part of this loader's API)
    TRACKER,
    CheckpointError,
    iteration_dir,
    read_tracker,
    tracker_path,
)

CHECKPOINT_VERSION = 3.0


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


def _serializable(metadata: dict) -> dict:
    return {k: v for k, v in metadata.items() if k != "dp_cp_group"}


def _comparable_common_state(common: dict) -> dict:
    """The common state as compared across ranks at save: per-process args left out."""
    out = dict(common)
    if "args" in out:
        out["args"] = {k: v for k, v in vars(out["args"]).items()
                       if k not in ("rank", "local_rank")}
    return out


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


def _restore_rng(rng_state) -> None:
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
    from megatron_sparkling.mcore.model import unwrap

    chunks = unwrap(model)
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION}
    if iteration is not None:
        state["iteration"] = iteration
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        state[key] = chunk.sharded_state_dict(metadata=metadata)
    if with_optimizer and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                          metadata=metadata)
        if scheduler is not None:
            state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = rng_state_object(args)
    return state


def save_checkpoint(args, iteration: int, model, optimizer, scheduler,
                    num_floating_point_operations_so_far: float = 0.0,
                    save_dir: Optional[str] = None) -> str:
    """Write iter_{iteration:07d}/ under save_dir (default --save), then the tracker file."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    save_dir = save_dir or args.save
    ckpt_dir = iteration_dir(save_dir, iteration)
    rank = torch.distributed.get_rank()
    metadata = sharded_state_dict_metadata(args)
    stored_args = copy.copy(args)
    stored_args.iteration = iteration
    state = build_state_dict(stored_args, model, optimizer, scheduler, metadata,
                             iteration=iteration, with_optimizer=not args.no_save_optim,
                             with_rng=not args.no_save_rng)
    state["num_floating_point_operations_so_far"] = num_floating_point_operations_so_far
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, ckpt_dir, get_default_save_sharded_strategy("torch_dist"),
                            validate_access_integrity=True,
                            preprocess_common_before_consistancy_check=_comparable_common_state,
                            content_metadata=_serializable(metadata))
    torch.distributed.barrier()
    if rank == 0:
        tmp = tracker_path(save_dir) + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, tracker_path(save_dir))
    torch.distributed.barrier()
    return ckpt_dir


def _iteration_to_load(args, load_dir: Optional[str]) -> tuple[int, bool]:
    iteration, release = read_tracker(load_dir) if load_dir else (-1, False)
    if args.ckpt_step is not None:
        iteration = args.ckpt_step
    return iteration, release


def checkpoint_dir_to_load(args, load_dir: Optional[str] = None) -> Optional[str]:
    """The iter_N/ (or release/) directory --load (and --ckpt-step) point at; None if none."""
    load_dir = load_dir or args.load
    iteration, release = _iteration_to_load(args, load_dir)
    return iteration_dir(load_dir, iteration, release) if iteration >= 0 else None


def load_checkpoint(args, model, optimizer, scheduler, load_dir: Optional[str] = None,
                    strict: bool = True) -> tuple[int, float]:
    """Load --load into model, optimizer, scheduler and RNG, as Megatron-LM's load_checkpoint.

    Returns (iteration, num_floating_point_operations_so_far); (0, 0) when there is nothing
    to load. Sets args.consumed_train_samples from the checkpoint's args.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.optimizer import DistributedOptimizer
    from megatron_sparkling.mcore.model import unwrap

    load_dir = load_dir or args.load
    iteration, release = _iteration_to_load(args, load_dir)
    if iteration < 0:
        if args.exit_on_missing_checkpoint:
            raise CheckpointError(f"no {TRACKER} in --load {load_dir}")
        return 0, 0.0
    ckpt_dir = iteration_dir(load_dir, iteration, release)
    if not dist_checkpointing.check_is_distributed_checkpoint(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} is not a torch_dist checkpoint (no metadata.json); "
                              "point --load at a directory written with --ckpt-format torch_dist")
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    ckpt_args = common.get("args")
    ckpt_tp_pp = (getattr(ckpt_args, "tensor_model_parallel_size", 1),
                  getattr(ckpt_args, "pipeline_model_parallel_size", 1))
    run_tp_pp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    load_rng = (ckpt_tp_pp == run_tp_pp and not release and not args.finetune
                and not args.no_load_rng and not getattr(ckpt_args, "no_save_rng", False))
    load_optim = (not release and not args.finetune and not args.no_load_optim
                  and not getattr(ckpt_args, "no_save_optim", False))
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    if load_optim and args.use_distributed_optimizer:
        sharding = metadata.get("distrib_optim_sharding_type", "dp_zero_gather_scatter")
        if (ckpt_tp_pp != run_tp_pp
                and sharding not in DistributedOptimizer.checkpoint_fully_reshardable_formats):
            raise CheckpointError(
                f"(TP, PP) changed from {ckpt_tp_pp} to {run_tp_pp} but the optimizer state is "
                f"stored as {sharding}; resume at the saved layout, pass --no-load-optim, or "
                "save with --dist-ckpt-optim-fully-reshardable")
    metadata["dp_cp_group"] = mpu.get_data_parallel_group(with_context_parallel=True)
    if not args.finetune and ckpt_args is not None:
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            if getattr(ckpt_args, name) != getattr(args, name):
                raise CheckpointError(
                    f"{name} is {getattr(ckpt_args, name)} in the checkpoint but "
                    f"{getattr(args, name)} in this run; relaunch with the checkpoint's value, "
                    "or grow the checkpoint first (megatron-sparkling expand)")

    from megatron_sparkling.compat.optimizer import (
        initialize_empty_state,
        patched_fully_reshardable_load,
    )

    if load_optim:
        initialize_empty_state(optimizer)
    sharded = build_state_dict(args, model, optimizer if load_optim else None,
                               scheduler if load_optim else None, metadata,
                               with_optimizer=load_optim, with_rng=load_rng, is_loading=True)
    sharded["args"] = None
    sharded["iteration"] = None
    sharded["num_floating_point_operations_so_far"] = None
    state = dist_checkpointing.load(sharded, ckpt_dir, get_default_load_sharded_strategy(ckpt_dir),
                                    strict=args.dist_ckpt_strictness)
    chunks = unwrap(model)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"], strict=strict)
    if load_optim:
        with torch.no_grad(), patched_fully_reshardable_load(optimizer):
            # fp32 main params of the distributed optimizer are views of leaf model params
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["opt_param_scheduler"])
    elif optimizer is not None and (args.fp16 or args.bf16):
        optimizer.reload_model_params()
    if load_rng:
        _restore_rng(state["rng_state"])
    if args.finetune or release:
        iteration = 0
    else:
        iteration = common.get("iteration", iteration)
        args.consumed_train_samples = getattr(ckpt_args, "consumed_train_samples", 0)
        args.skipped_train_samples = getattr(ckpt_args, "skipped_train_samples", 0)
        args.consumed_valid_samples = getattr(ckpt_args, "consumed_valid_samples", 0)
    torch.distributed.barrier()
    return iteration, float(common.get("num_floating_point_operations_so_far", 0.0) or 0.0)
