"""Grow a live run in process: a model built from new args, its weights and optimizer state made
from the old run's global tensors (checkpoint/memory.py), the step count and LR schedule kept.

`make_tensor(target_key, target_shape, sources)` produces each global tensor of the grown run
(model keys, and optimizer state as `optimizer.state.<kind>.<model key>`) from `sources`, the old
run's global tensors by key; e.g. `operators.depth.grow_layers` for depth, a width method's grow
for width. Used by `Pretrainer.grow_model` (progressive training, LVPS stages, benchmarks).

Global tensors are gathered in this process, so the old run must be one rank (the grown run may
have any layout).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from megatron_sparkling.live import state as memory
from megatron_sparkling.training import checkpointing
from megatron_sparkling.mcore import model as model_lib

MakeTensor = Callable[[str, tuple, Mapping[str, torch.Tensor]], torch.Tensor]


def _metadata(args) -> dict:
    """sharded_state_dict metadata that puts optimizer state in model space."""
    metadata = checkpointing.sharded_state_dict_metadata(args)
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    return metadata


def _model_state(args, model) -> dict:
    metadata = _metadata(args)
    chunks = model_lib.unwrap(model)
    if len(chunks) != 1:
        raise NotImplementedError("in-process growth handles one model chunk (no virtual "
                                  "pipeline stages)")
    return chunks[0].sharded_state_dict(metadata=metadata)


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


def _step_of(osd):
    steps = []
    for inner in _inner_states(osd):
        if "common_step" in inner.get("state", {}):
            steps.append(inner["state"]["common_step"])
        steps += [g["step"] for g in inner["param_groups"] if "step" in g]
    return max(steps, key=float) if steps else None


def _set_step(osd, step) -> None:
    """Every parameter of the grown optimizer continues at the old global step (new ones too:
    megatron-core keeps one step per optimizer)."""
    for inner in _inner_states(osd):
        if any("step" in g for g in inner["param_groups"]):
            for g in inner["param_groups"]:
                g["step"] = step
        else:
            inner.setdefault("state", {})["common_step"] = (
                step.clone() if torch.is_tensor(step) else torch.tensor(float(step)))


def global_state(args, model, optimizer) -> tuple[dict, object]:
    """(global tensors of the model and of its optimizer state by key, optimizer step)."""
    if torch.distributed.get_world_size() != 1:
        raise NotImplementedError("in-process growth gathers global tensors in one process; "
                                  "run it at 1 rank, or grow a checkpoint offline")
    model_sd = _model_state(args, model)
    tensors = memory.gather_global(model_sd)[0]
    osd = optimizer.sharded_state_dict(model_sd, metadata=_metadata(args))
    tensors.update(memory.gather_global(osd)[0])
    return tensors, _step_of(osd)


def build_grown(args, sources: Mapping[str, torch.Tensor], step, make_tensor: MakeTensor):
    """(model, optimizer) of `args`, every tensor made by `make_tensor` from `sources`."""
    from megatron_sparkling.compat.optimizer import (
        initialize_empty_state,
        patched_fully_reshardable_load,
    )

    reset_moe_loss_tracker()
    model = model_lib.build_model(args)
    optimizer = model_lib.build_optimizer(args, model)
    model_sd = _model_state(args, model)
    shapes = memory.global_shapes(_model_state(args, model))
    state = memory.fill_from_global(model_sd, lambda k: make_tensor(k, shapes[k], sources))
    model_lib.unwrap(model)[0].load_state_dict(state, strict=True)

    initialize_empty_state(optimizer)
    model_sd = _model_state(args, model)
    osd = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_metadata(args))
    shapes = memory.global_shapes(
        optimizer.sharded_state_dict(_model_state(args, model), is_loading=True,
                                     metadata=_metadata(args)))
    ostate = memory.fill_from_global(osd, lambda k: make_tensor(k, shapes[k], sources))
    if step is not None:
        _set_step(ostate, step)
    with torch.no_grad(), patched_fully_reshardable_load(optimizer):
        optimizer.load_state_dict(ostate)
    return model, optimizer


def reset_moe_loss_tracker() -> None:
    """megatron-core sizes its per-layer MoE aux-loss tracker once, by the depth it first saw;
    a model of another depth needs it rebuilt."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()


def carry_scheduler(args, optimizer, old_scheduler):
    """A scheduler for the grown optimizer at the old one's position: same LR and weight decay."""
    scheduler = model_lib.build_scheduler(args, optimizer)
    scheduler.num_steps = old_scheduler.num_steps
    scheduler.step(increment=0)
    return scheduler
