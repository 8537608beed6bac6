"""Grow a live run in process: a model built from new args, its weights and optimizer state made
from the old run's global tensors (live/state.py), the step count and LR schedule kept.

`make_tensor(target_key, target_shape, sources)` produces each global tensor of the grown run
(model keys, and optimizer state as `optimizer.state.<kind>.<model key>`) from `sources`, the old
run's global tensors by key; e.g. `operators.depth.LayerGrowth` for depth, a width method's grow
for width. Used by `Pretrainer.grow_model` (progressive training, LVPS stages, benchmarks).
Global tensors are gathered in this process, so the old run must be one rank.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from megatron_sparkling.live.state import fill_live, global_state, reset_moe_loss_tracker
from megatron_sparkling.mcore import model as model_lib

__all__ = ["build_grown", "carry_scheduler", "global_state", "reset_moe_loss_tracker"]

MakeTensor = Callable[[str, tuple, Mapping[str, torch.Tensor]], torch.Tensor]


def build_grown(args, sources: Mapping[str, torch.Tensor], step, make_tensor: MakeTensor):
    """(model, optimizer) of `args`, every tensor made by `make_tensor` from `sources`."""
    reset_moe_loss_tracker()
    model = model_lib.build_model(args)
    optimizer = model_lib.build_optimizer(args, model)
    fill_live(args, model, optimizer, lambda key, shape: make_tensor(key, shape, sources),
              step=step)
    return model, optimizer


def carry_scheduler(args, optimizer, old_scheduler):
    """A scheduler for the grown optimizer at the old one's position: same LR and weight decay."""
    scheduler = model_lib.build_scheduler(args, optimizer)
    scheduler.num_steps = old_scheduler.num_steps
    scheduler.step(increment=0)
    return scheduler
