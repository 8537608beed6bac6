"""Staged training's learning-rate schedule transform after growth (Shen et al. 2022).

The grown run restarts the base schedule: at iteration t after growth it takes the base LR of
iteration S + t (S: `restart_iteration`, the base schedule's position the grown model continues
from; by default the growth iteration), and during the first W = `restart_warmup_iters`
iterations it re-warms linearly from 0 to the base LR at S + W, as the paper's
`get_restart_linear_schedule_with_warmup` (allenai/staged-training) does:

    lr(t) = t / W * base(S + W)     for 0 <= t < W
    lr(t) = base(S + t)             after

It applies to every parameter (it replaces the base schedule). Options of the `staged` method,
stored in the growth record; installed by a relaunch from a staged checkpoint (growth on load or
`expand`), carried in the scheduler's state dict (`sparkling_lr_restart`) so a resumed run
continues it exactly.
"""
from __future__ import annotations

from typing import Optional

from megatron_sparkling.core.record import growth_record
from megatron_sparkling.live.rewarmup import (
    _BASE_FIELDS,
    _lr_formula,
    carry_in_scheduler,
    set_group_lr,
)
from megatron_sparkling.log import print_rank_0

STATE_KEY = "sparkling_lr_restart"
METHODS = ("staged",)


class LRRestart:
    """The transform, in scheduler steps (megatron-core counts samples)."""

    def __init__(self, base: dict, growth_step: int, restart_step: int, warmup_steps: int):
        self.base = dict(base)
        self.growth_step, self.restart_step = int(growth_step), int(restart_step)
        self.warmup_steps = int(warmup_steps)
        self._formula = _lr_formula(self.base)

    def lr(self, group: dict, num_steps: int) -> float:
        t = num_steps - self.growth_step
        if t < self.warmup_steps:
            self._formula.num_steps = self.restart_step + self.warmup_steps
            return max(t, 0) / self.warmup_steps * self._formula.get_lr(group)
        self._formula.num_steps = self.restart_step + t
        return self._formula.get_lr(group)

    def adjust_lr(self, scheduler) -> None:
        """Called by the scheduler after each step (and at install): every group's LR."""
        for group in scheduler.optimizer.param_groups:
            set_group_lr(group, self.lr(group, scheduler.num_steps))

    def state_dict(self) -> dict:
        return {"base": dict(self.base), "growth_step": self.growth_step,
                "restart_step": self.restart_step, "warmup_steps": self.warmup_steps,
                "version": 1}

    def load_state_dict(self, d: dict) -> None:
        self.__init__(d["base"], d["growth_step"], d["restart_step"], d["warmup_steps"])

    @classmethod
    def from_state_dict(cls, d: dict) -> "LRRestart":
        return cls(d["base"], d["growth_step"], d["restart_step"], d["warmup_steps"])


def restart_options(record: Optional[dict]) -> Optional[tuple[int, int]]:
    """(restart_iteration or -1, restart_warmup_iters) when the record's method asks for the
    transform, else None."""
    if not record or record.get("method") not in METHODS:
        return None
    options = record.get("options") or {}
    warmup = int(options.get("restart_warmup_iters", 0))
    restart = int(options.get("restart_iteration", -1))
    if warmup <= 0 and restart < 0:
        return None
    return restart, warmup


def _attach(scheduler, restart: LRRestart) -> LRRestart:
    carry_in_scheduler(scheduler, "lr_restart", restart, STATE_KEY)
    restart.adjust_lr(scheduler)
    return restart


def install_lr_restart(scheduler, record: dict, samples_per_iteration: int
                       ) -> Optional[LRRestart]:
    """Start the transform for a growth that happened now (the scheduler's current step), if
    the record's method options ask for it; None otherwise."""
    options = restart_options(record)
    if options is None or scheduler is None:
        return None
    restart_iteration, warmup_iters = options
    growth_step = int(scheduler.num_steps)
    restart_step = growth_step if restart_iteration < 0 else (
        restart_iteration * samples_per_iteration)
    base = {k: getattr(scheduler, k) for k in _BASE_FIELDS}
    restart = _attach(scheduler, LRRestart(base, growth_step, restart_step,
                                           warmup_iters * samples_per_iteration))
    print_rank_0(f"> staged LR restart: the base schedule continues from iteration "
                 f"{restart_step // samples_per_iteration} (growth at iteration "
                 f"{growth_step // samples_per_iteration}), re-warming from 0 over "
                 f"{warmup_iters} iterations")
    return restart


def lr_restart_after_load(scheduler, common: dict, args) -> Optional[LRRestart]:
    """After a checkpoint load: continue a saved transform (the scheduler state was loaded
    with it), or start the one a freshly grown staged checkpoint asks for, or do nothing."""
    if scheduler is None or getattr(scheduler, "lr_restart", None) is not None:
        return getattr(scheduler, "lr_restart", None)
    stored = common.get("opt_param_scheduler") or {}
    saved = stored.get(STATE_KEY) if stored.get("num_steps") == scheduler.num_steps else None
    if saved is not None:
        return _attach(scheduler, LRRestart.from_state_dict(saved))
    return install_lr_restart(scheduler, growth_record(common), args.global_batch_size)
