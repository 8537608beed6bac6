"""SPARKLING's asymmetric learning-rate re-warmup after growth, around megatron-core's scheduler.

After growth at scheduler step t_e (megatron-core's OptimizerParamScheduler counts samples), OLD
elements keep the base schedule, untouched. NEW elements (element-wise, inside mixed tensors too,
from the growth record) follow, per parameter group, eta_new (`NewElementSchedule`): a linear
ramp from the base LR eta_e to R * eta_e over W iterations, then the base decay style.
Scope "all" (the paper's weaker ablation) gives every element eta_new: the group LR itself is set.
Scope "new" keeps the group LR on the base schedule and scales what each step changes in new
elements by eta_new / eta (element_lr.py): exact for AdamW, update and weight-decay term alike.
Bias correction "per-element" (any scope) gives new elements Adam's bias correction counted from
growth (adam_bias.py) instead of the optimizer's global step ("global", the paper's).
Persistence: `RewarmupState`. Entry points: `install_rewarmup` (a fresh growth),
`rewarmup_after_load` (after a checkpoint load), `add_rewarmup_args` (flags), `lr_figures` (logs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sparkling.checkpoint.paths import checkpoint_dir_to_load
from megatron_sparkling.core import record as record_lib
from megatron_sparkling.core.record import BIAS_CORRECTIONS, growth_record, rewarmup_settings
from megatron_sparkling.live import adam_bias, element_lr
from megatron_sparkling.log import print_rank_0
from megatron_sparkling.methods.base import copied_new_state

STATE_KEY = "sparkling_rewarmup"     # re-warmup state inside opt_param_scheduler
SCOPES = ("new", "all", "none")
NEW_LR = "learning rate (new elements)"
OLD_LR = "learning rate (old elements)"


DEFAULT_ITERS = 250        # paper: tau_w = 250
DEFAULT_PEAK_RATIO = 1.3   # paper: rho = 1.3 (1.25-1.3 best)


class RewarmupError(ValueError):
    """A re-warmup that cannot be installed as asked; the message says what to change."""


def add_rewarmup_args(parser):
    """Megatron-LM-style flags (usable as, or chained into, an extra_args_provider)."""
    g = parser.add_argument_group("megatron_sparkling learning-rate re-warmup after growth")
    g.add_argument("--sparkling-rewarmup-iters", type=int, default=None,
                   help="Iterations over which new elements' LR ramps from the LR at growth to "
                        "peak-ratio times it (0: jump to the peak). Default: what `expand` was "
                        f"given, else {DEFAULT_ITERS}.")
    g.add_argument("--sparkling-rewarmup-peak-ratio", type=float, default=None,
                   help="Peak of new elements' LR as a multiple of the LR at growth. Default: "
                        f"what `expand` was given, else {DEFAULT_PEAK_RATIO}.")
    g.add_argument("--sparkling-rewarmup-scope", default="new", choices=SCOPES,
                   help="new: only new elements re-warm (SPARKLING); all: every parameter "
                        "(ablation); none: no re-warmup.")
    g.add_argument("--sparkling-new-state-bias-correction", default=None,
                   choices=BIAS_CORRECTIONS,
                   help="Adam's bias correction of new elements (their moments start at zero): "
                        "global: the optimizer's step count (the paper's; late in training the "
                        "first update is about (1-beta1)/sqrt(1-beta2) lr per element, 3.16 lr "
                        "at 0.9/0.999); per-element: counted from growth, as a fresh Adam's "
                        "(first update lr g/(|g|+eps)). Default: what `expand` was given, else "
                        "global.")
    return parser


@dataclass(frozen=True)
class RewarmupConfig:
    warmup_iters: int = 250
    peak_ratio: float = 1.3
    scope: str = "new"
    samples_per_iteration: int = 1   # the scheduler counts samples: iterations x global batch
    bias_correction: str = "global"

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise RewarmupError(f"--sparkling-rewarmup-scope {self.scope!r}: choose one of {SCOPES}")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise RewarmupError(f"--sparkling-new-state-bias-correction {self.bias_correction!r}: "
                                f"choose one of {BIAS_CORRECTIONS}")
        if self.warmup_iters < 0:
            raise RewarmupError(f"--sparkling-rewarmup-iters {self.warmup_iters}: must be >= 0")
        if not self.peak_ratio > 0:
            raise RewarmupError(f"--sparkling-rewarmup-peak-ratio {self.peak_ratio}: must be > 0 "
                                "(1.3 in the paper; 1.25-1.3 work best)")

    @classmethod
    def from_args(cls, args, stored: Optional[dict] = None) -> "RewarmupConfig":
        """Flags first, then the settings `expand` stored in the checkpoint, then defaults."""
        stored = stored or {}

        def pick(flag, key, default):
            value = getattr(args, flag, None)
            if value is None:
                value = stored.get(key)
            return default if value is None else value
        return cls(warmup_iters=int(pick("sparkling_rewarmup_iters", "iters", DEFAULT_ITERS)),
                   peak_ratio=float(pick("sparkling_rewarmup_peak_ratio", "peak_ratio",
                                         DEFAULT_PEAK_RATIO)),
                   scope=getattr(args, "sparkling_rewarmup_scope", None) or "new",
                   samples_per_iteration=args.global_batch_size,
                   bias_correction=pick("sparkling_new_state_bias_correction",
                                        "bias_correction", "global"))


# ---------------------------------------------------------------------------- LR formulas
_BASE_FIELDS = ("init_lr", "max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps",
                "lr_decay_style", "wsd_decay_steps", "lr_wsd_decay_style")


class _NoParamGroups:
    """Lets an OptimizerParamScheduler be built only to evaluate its LR formula."""
    param_groups: list = []


def _lr_formula(base: dict, **changes):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    p = dict(base, **changes)
    return OptimizerParamScheduler(
        _NoParamGroups(), init_lr=p["init_lr"], max_lr=p["max_lr"], min_lr=p["min_lr"],
        lr_warmup_steps=p["lr_warmup_steps"], lr_decay_steps=p["lr_decay_steps"],
        lr_decay_style=p["lr_decay_style"], start_wd=0.0, end_wd=0.0, wd_incr_steps=1,
        wd_incr_style="constant", wsd_decay_steps=p["wsd_decay_steps"],
        lr_wsd_decay_style=p["lr_wsd_decay_style"])


class NewElementSchedule:
    """eta_new(group, t) for a growth at `growth_step`, from a frozen copy of the base schedule.

    Per parameter group (decoupled-LR groups keep their own max/min):

        eta_new(t) = eta_e + (R - 1) * eta_e * (t - t_e) / W      for t_e <= t < t_e + W
        eta_new(t) = the base decay style, from R * eta_e at t_e + W
                     down to min-lr at the base's end

    with eta_e the base schedule's LR at t_e, R = --sparkling-rewarmup-peak-ratio (1.3) and W =
    --sparkling-rewarmup-iters (250) iterations. The decay part is megatron-core's own formula
    (cosine, linear, WSD, inverse-square-root, constant) evaluated with the ramp's end as its
    warmup end."""

    def __init__(self, base: dict, growth_step: int, warmup_steps: int, peak_ratio: float):
        self.base = dict(base)
        self.growth_step, self.warmup_steps, self.peak_ratio = growth_step, warmup_steps, peak_ratio
        self._base = _lr_formula(base)
        ramp_end = growth_step + warmup_steps
        # megatron-core's decay formula, with the ramp's end as the end of its warmup
        self._decay = (_lr_formula(base, init_lr=0.0, lr_warmup_steps=ramp_end)
                       if ramp_end < base["lr_decay_steps"] else None)

    def _group_bounds(self, group: dict) -> tuple[float, float]:
        return group.get("max_lr", self.base["max_lr"]), group.get("min_lr", self.base["min_lr"])

    def lr_at_growth(self, group: dict) -> float:
        """eta_e: the base schedule's LR of this group at the growth step."""
        self._base.num_steps = self.growth_step
        return self._base.get_lr(group)

    def lr(self, group: dict, num_steps: int) -> float:
        eta_e = self.lr_at_growth(group)
        peak = self.peak_ratio * eta_e
        _, min_lr = self._group_bounds(group)
        progress = num_steps - self.growth_step
        if progress < self.warmup_steps:
            return eta_e + (peak - eta_e) * max(progress, 0) / self.warmup_steps
        if self._decay is None:   # the ramp ends at or after the end of the base decay
            return peak if self.base["lr_decay_style"] == "constant" else min_lr
        self._decay.num_steps = num_steps
        return self._decay.get_lr({"max_lr": peak, "min_lr": min_lr})


# ---------------------------------------------------------------------------- state
@dataclass
class RewarmupState:
    """Everything a resumed run needs to continue the re-warmup exactly (plain types and tensors,
    as the checkpoint's common state allows).

    The scheduler becomes a `RewarmupScheduler` whose state_dict (Megatron-LM stores it as
    `opt_param_scheduler` in the checkpoint's common state) carries this state under
    `sparkling_rewarmup`: t_e, W, R, scope, the base schedule's parameters, the growth record
    (the mask source), the bias correction and Adam's step count at growth. A run resumed inside
    the ramp continues it exactly. Without growth nothing is installed: the scheduler stays
    megatron-core's and the optimizer has no hooks."""
    growth_step: int          # t_e, in scheduler steps (samples)
    warmup_steps: int         # W, in scheduler steps
    warmup_iters: int         # W, in iterations
    samples_per_iteration: int
    peak_ratio: float         # R
    scope: str
    base: dict                # the base schedule's LR parameters at growth
    record: dict              # the growth record: the mask source
    bias_correction: str = "global"
    growth_adam_step: int = 0  # Adam's step count at growth: new elements count from there

    def state_dict(self) -> dict:
        return dataclasses.asdict(self) | {"version": 1}

    @classmethod
    def from_state_dict(cls, d: dict) -> "RewarmupState":
        # states saved before the bias correction existed lack its fields: their defaults
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _same_growth(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("method", "seed", "source", "target"))


def plan_of(record: dict):
    """(GrowthPlan, swiglu) of a growth record, as the element masks need them."""
    try:
        plan = record_lib.plan_of(record)
    except record_lib.RecordError as e:
        raise RewarmupError(str(e)) from None
    return plan, plan.spec.source.swiglu


class Rewarmup:
    """An installed re-warmup: its state, the new-element LR, and (scope new) the step hooks."""

    def __init__(self, state: RewarmupState, scheduler):
        self.state = state
        self.scheduler = scheduler
        self.schedule = NewElementSchedule(state.base, state.growth_step, state.warmup_steps,
                                           state.peak_ratio)
        self.hooks = None                        # element_lr.ScaledMaskedSteps (scope "new")
        self.new_elements = self.elements = 0    # on this rank's main-param shards

    def lr_new(self, group: dict) -> float:
        """Effective LR of this group's new elements at the scheduler's current step."""
        if self.state.scope == "none":
            return float(group["lr"])
        return self.schedule.lr(group, self.scheduler.num_steps)

    def ratio(self, group: dict) -> float:
        """New elements' LR over the group's (1 but with scope "new": "all" sets the group's)."""
        lr = float(group["lr"])
        return self.lr_new(group) / lr if lr > 0 and self.state.scope == "new" else 1.0

    def new_step(self, step: int) -> int:
        """Bias-correction step of new elements when Adam's is `step` (per-element: counted
        from growth)."""
        since = step - self.state.growth_adam_step
        return since if 0 < since < step else step

    def remove(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None


def set_group_lr(group: dict, lr: float) -> None:
    """Set a param group's LR as megatron-core's scheduler does: in place where the group holds
    a tensor (newer megatron-core), else as a number."""
    if isinstance(group.get("lr"), torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _optimizer_param_scheduler_class():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler


def _make_rewarmup_scheduler_class():
    base = _optimizer_param_scheduler_class()

    class RewarmupScheduler(base):
        """megatron-core's OptimizerParamScheduler with a re-warmup of grown elements: the base
        schedule is unchanged; the state dict carries the re-warmup (`sparkling_rewarmup`)."""

        rewarmup: Rewarmup

        def step(self, increment: int) -> None:
            super().step(increment)
            rewarmup = getattr(self, "rewarmup", None)
            if rewarmup is not None and rewarmup.state.scope == "all":
                for group in self.optimizer.param_groups:
                    set_group_lr(group, rewarmup.lr_new(group))
            for _, carried in self._carried():   # a schedule transform (lr_restart.py)
                if hasattr(carried, "adjust_lr"):
                    carried.adjust_lr(self)

        def _carried(self):
            for key, attribute in getattr(self, "sparkling_carried", {}).items():
                carried = getattr(self, attribute, None)
                if carried is not None:
                    yield key, carried

        def state_dict(self) -> dict:
            state = super().state_dict()
            if getattr(self, "rewarmup", None) is not None:
                state[STATE_KEY] = self.rewarmup.state.state_dict()
            for key, carried in self._carried():
                state[key] = carried.state_dict()
            return state

        def load_state_dict(self, state_dict: dict) -> None:
            for key, carried in self._carried():
                if state_dict.get(key) is not None:
                    carried.load_state_dict(state_dict[key])
            if getattr(self, "rewarmup", None) is None:
                super().load_state_dict(state_dict)
                return
            saved = state_dict.get(STATE_KEY)
            if saved is not None and not _same_growth(saved["record"], self.rewarmup.state.record):
                raise RewarmupError("this scheduler re-warms another growth than the checkpoint's;"
                                    " load the checkpoint into a fresh run (rewarmup_after_load)")
            if saved is not None:
                restored = RewarmupState.from_state_dict(saved)
                self.rewarmup.state = restored
                self.rewarmup.schedule = NewElementSchedule(
                    restored.base, restored.growth_step, restored.warmup_steps,
                    restored.peak_ratio)
            super().load_state_dict(state_dict)

    RewarmupScheduler.__qualname__ = "RewarmupScheduler"
    return RewarmupScheduler


def carry_in_scheduler(scheduler, attribute: str, carried, state_key: str) -> None:
    """Set `scheduler.<attribute> = carried` and make the scheduler's state dict (stored in the
    checkpoint as opt_param_scheduler) carry `carried.state_dict()` under `state_key`, as it
    carries the re-warmup (MSG's mask ramp uses it). The class is upgraded in place, so every
    holder of the scheduler keeps a valid reference."""
    if not isinstance(scheduler, _optimizer_param_scheduler_class()):
        raise RewarmupError(f"megatron_sparkling needs megatron-core's OptimizerParamScheduler, "
                            f"not {type(scheduler).__name__}")
    scheduler.__class__ = rewarmup_scheduler_class()
    setattr(scheduler, attribute, carried)
    scheduler.__dict__.setdefault("sparkling_carried", {})[state_key] = attribute


_SCHEDULER_CLASS = None


def rewarmup_scheduler_class():
    """The RewarmupScheduler class, built on first use: importing megatron-core takes seconds
    and must follow the CPU bridge (compat/cpu.py), so this module does not import it at load."""
    global _SCHEDULER_CLASS
    if _SCHEDULER_CLASS is None:
        _SCHEDULER_CLASS = _make_rewarmup_scheduler_class()
    return _SCHEDULER_CLASS


def __getattr__(name):  # `schedule.RewarmupScheduler`, resolved lazily (PEP 562)
    if name == "RewarmupScheduler":
        return rewarmup_scheduler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _activate(model, optimizer, scheduler, state: RewarmupState) -> Rewarmup:
    base_cls = _optimizer_param_scheduler_class()
    if not isinstance(scheduler, base_cls):
        raise RewarmupError(f"the re-warmup needs megatron-core's OptimizerParamScheduler, not "
                            f"{type(scheduler).__name__}")
    existing = getattr(scheduler, "rewarmup", None)
    if existing is not None:
        existing.remove()
    probe = NewElementSchedule(state.base, state.growth_step, state.warmup_steps, state.peak_ratio)
    for group in optimizer.param_groups if state.scope != "none" else []:
        if probe.lr_at_growth(group) <= 0:
            raise RewarmupError(
                f"the learning rate at growth (scheduler step {state.growth_step}) is 0, so new "
                "elements would never train; load the checkpoint's optimizer and scheduler state "
                "(no --finetune / --no-load-optim), or pass --sparkling-rewarmup-scope none")
    rewarmup = Rewarmup(state, scheduler)
    per_element = state.bias_correction == "per-element"
    if state.scope == "new" or per_element:
        plan, swiglu = plan_of(state.record)
        opt_masks = element_lr.optimizer_masks(
            optimizer, element_lr.model_param_masks(model, plan, swiglu))
        rewarmup.new_elements, rewarmup.elements = element_lr.count_masked(opt_masks)
        try:
            rewarmup.hooks = element_lr.ScaledMaskedSteps(
                opt_masks, rewarmup.ratio, rewarmup.new_step if per_element else None)
        except adam_bias.AdamBiasError as e:
            raise RewarmupError(str(e)) from None
    # In place, so that every holder of the scheduler (Megatron-LM's training loop, a load hook's
    # caller) keeps a valid reference; the subclass only adds behaviour, no fields of its own.
    scheduler.__class__ = rewarmup_scheduler_class()
    scheduler.rewarmup = rewarmup
    scheduler.step(0)  # scope "all": the group LRs become the re-warmed ones now
    return rewarmup


def _refuse_copied_state(record: dict) -> None:
    copied = copied_new_state(record.get("method", "sparkling"),
                              record.get("depth", {}).get("new_state", "reset"))
    if copied:
        raise RewarmupError(f"--sparkling-new-state-bias-correction per-element is for new "
                            f"elements that start with zero Adam moments, but {copied}; use "
                            f"global (the default) with it")


def install_rewarmup(model, optimizer, scheduler, record: dict,
                     config: RewarmupConfig) -> Optional[Rewarmup]:
    """Start the re-warmup of a growth that happened now (t_e = the scheduler's current step).

    `model`: the model chunks (DDP-wrapped or not); `optimizer`: megatron-core's optimizer
    (FP32, Float16, Distributed, Chained); `scheduler`: its OptimizerParamScheduler, upgraded in
    place to a RewarmupScheduler; `record`: Grower.record() of the growth. Returns None for scope
    "none" with global bias correction. Call after the optimizer and scheduler state are
    loaded."""
    if config.scope == "none" and config.bias_correction == "global":
        return None
    if config.bias_correction == "per-element":
        _refuse_copied_state(record)
    try:
        adam_step = (element_lr.adam_step_count(optimizer)
                     if config.bias_correction == "per-element" else 0)
    except adam_bias.AdamBiasError as e:
        raise RewarmupError(str(e)) from None
    base = {k: getattr(scheduler, k) for k in _BASE_FIELDS}
    state = RewarmupState(
        growth_step=int(scheduler.num_steps),
        warmup_steps=int(config.warmup_iters * config.samples_per_iteration),
        warmup_iters=int(config.warmup_iters),
        samples_per_iteration=int(config.samples_per_iteration),
        peak_ratio=float(config.peak_ratio),
        scope=config.scope, base=base, record=record, bias_correction=config.bias_correction,
        growth_adam_step=adam_step)
    rewarmup = _activate(model, optimizer, scheduler, state)
    _announce(rewarmup, "growth at")
    return rewarmup


def restore_rewarmup(model, optimizer, scheduler, saved: dict) -> Rewarmup:
    """Continue a re-warmup saved in a checkpoint's opt_param_scheduler[STATE_KEY]."""
    rewarmup = _activate(model, optimizer, scheduler, RewarmupState.from_state_dict(saved))
    _announce(rewarmup, "resumed; growth at")
    return rewarmup


def _announce(rewarmup: Rewarmup, what: str) -> None:
    s = rewarmup.state
    where = (f"scheduler step {s.growth_step} (iteration "
             f"{s.growth_step // max(s.samples_per_iteration, 1)})")
    group = _canonical_group(rewarmup.scheduler.optimizer.param_groups)
    eta_e = rewarmup.schedule.lr_at_growth(group) if group is not None else float("nan")
    scope = ("all parameters" if s.scope == "all" else
             f"{rewarmup.new_elements} new of {rewarmup.elements} elements on rank 0")
    lrs = ("LR unchanged (--sparkling-rewarmup-scope none)" if s.scope == "none" else
           f"LR {eta_e:.4E} -> {s.peak_ratio * eta_e:.4E} over {s.warmup_iters} iterations, then "
           f"{s.base['lr_decay_style']} decay to {s.base['min_lr']:.4E}")
    bias = ("" if s.bias_correction == "global" else
            f"; new elements' Adam bias correction counted from step {s.growth_adam_step}")
    print_rank_0(f"> SPARKLING re-warmup ({what} {where}): {scope}; {lrs}{bias}")


def rewarmup_after_load(model, optimizer, scheduler, args) -> Optional[Rewarmup]:
    """After a checkpoint load: continue the saved re-warmup, or start one for a freshly grown
    checkpoint (growth record under `sparkling` in its common state), or do nothing."""
    existing = getattr(scheduler, "rewarmup", None)
    if existing is not None:         # installed while loading (an in-memory growth hook)
        return existing
    if not getattr(args, "load", None) or optimizer is None:
        return None
    from megatron.core import dist_checkpointing

    ckpt_dir = checkpoint_dir_to_load(args.load, getattr(args, "ckpt_step", None))
    if ckpt_dir is None:
        return None
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    record = growth_record(common)
    stored = common.get("opt_param_scheduler") or {}
    # the saved re-warmup counts only if the scheduler state was loaded too (not with --finetune,
    # --no-load-optim, a release checkpoint, ...): then the step counts agree
    saved = stored.get(STATE_KEY) if stored.get("num_steps") == scheduler.num_steps else None
    config = RewarmupConfig.from_args(args, rewarmup_settings(common))
    if config.scope == "none" and config.bias_correction == "global":
        if saved is not None or record is not None:
            print_rank_0("> SPARKLING re-warmup off (--sparkling-rewarmup-scope none)")
        return None
    if saved is not None and (record is None or _same_growth(saved["record"], record)):
        return restore_rewarmup(model, optimizer, scheduler, saved)
    if record is not None:
        return install_rewarmup(model, optimizer, scheduler, record, config)
    return None


# ---------------------------------------------------------------------------- logging
def _canonical_group(param_groups) -> Optional[dict]:
    """The group Megatron-LM logs the LR of: the first default-config group."""
    for group in param_groups:
        if group.get("default_config", False):
            return group
    return param_groups[0] if param_groups else None


def lr_figures(scheduler) -> dict:
    """The effective LR of new and of old elements ({} without a re-warmup)."""
    rewarmup = getattr(scheduler, "rewarmup", None)
    group = _canonical_group(scheduler.optimizer.param_groups) if rewarmup is not None else None
    if group is None or rewarmup.state.scope == "none":
        return {}
    return {NEW_LR: rewarmup.lr_new(group), OLD_LR: float(group["lr"])}
