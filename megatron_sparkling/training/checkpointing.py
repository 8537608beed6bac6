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
from typing import Optional

import torch

from megatron_sparkling.checkpoint.paths import (
    TRACKER,
    CheckpointError,
    checkpoint_to_load,
    iteration_dir,
    tracker_path,
)
from megatron_sparkling.checkpoint.dcp import DcpCheckpoint
from megatron_sparkling.compat.optimizer import initialize_empty_state
from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.live.state import (
    build_state_dict,
    load_live,
    restore_rng,
    resume_position,
    sharded_state_dict_metadata,
)


def _serializable(metadata: dict) -> dict:
    return {k: v for k, v in metadata.items() if k != "dp_cp_group"}


def _comparable_common_state(common: dict) -> dict:
    """The common state as compared across ranks at save: per-process args left out."""
    out = dict(common)
    if "args" in out:
        out["args"] = {k: v for k, v in vars(out["args"]).items()
                       if k not in ("rank", "local_rank")}
    return out


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


def _ask_by_stored_names(sharded, ckpt_dir: str) -> None:
    """Ask for each tensor by the name the checkpoint stores it under: a Transformer Engine
    MoE checkpoint loaded by the local spec (a CPU run) names the pre-MLP norm
    `pre_mlp_layernorm.`, the local spec `mlp.linear_fc1.layer_norm_` (and the reverse)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    stored = DcpCheckpoint(ckpt_dir).tensors
    for item in nested_values(sharded):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            item.key = layout_lib.spelled_like(item.key, stored)


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

    load_dir = load_dir or args.load
    iteration, release = checkpoint_to_load(load_dir, args.ckpt_step)
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

    if load_optim:
        initialize_empty_state(optimizer)
    sharded = build_state_dict(args, model, optimizer if load_optim else None,
                               scheduler if load_optim else None, metadata,
                               with_optimizer=load_optim, with_rng=load_rng, is_loading=True)
    _ask_by_stored_names(sharded, ckpt_dir)
    sharded["args"] = None
    sharded["iteration"] = None
    sharded["num_floating_point_operations_so_far"] = None
    state = dist_checkpointing.load(sharded, ckpt_dir, get_default_load_sharded_strategy(ckpt_dir),
                                    strict=args.dist_ckpt_strictness)
    # the common state holds the optimizer's non-tensor part even when it is not loaded
    load_live(args, model, optimizer if load_optim else None, state, strict=strict)
    if load_optim and scheduler is not None:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng:
        restore_rng(state["rng_state"])
    iteration, flops = resume_position(args, common, iteration, release)
    torch.distributed.barrier()
    return iteration, flops
