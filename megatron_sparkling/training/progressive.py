"""Zero/one-layer progressive training (Bu et al.): train a 0- or 1-layer model for most of the
run, then grow in process to the full depth (--num-layers) and keep training.

Flags: `add_flags`. The paper grows inside the stable phase of a WSD schedule (e.g.
--lr-decay-style WSD --lr-warmup-fraction 0.02 --lr-wsd-decay-iters 0.1 x --train-iters):
growth keeps the learning rate and weight decay of the schedule (the same optimizer step and
scheduler position). A resumed run whose checkpoint is past the growth point starts at full
depth. `planned_compute` gives the compute beside the fixed-depth run's, for benchmarks.
"""
from __future__ import annotations

import copy

from megatron_sparkling.checkpoint.paths import checkpoint_to_load
from megatron_sparkling.core.spec import DepthOptions, GrowthSpec, ModelShape, validate
from megatron_sparkling.log import print_rank_0
from megatron_sparkling.operators.depth import FreshInit, LayerGrowth
from megatron_sparkling.training import flops
from megatron_sparkling.training.arguments import ArgumentError


def add_flags(parser):
    """--sparkling-progressive-start-layers 0|1|...   the depth trained first (off when unset)
    --sparkling-progressive-grow-at 0.8            growth point, a fraction of --train-iters
    --sparkling-progressive-new-layers copy|random new layers copy the trained layers ("copy
                                                   all": stack placement) or are fresh
    --sparkling-progressive-new-state reset|copy   new layers' optimizer state
    """
    g = parser.add_argument_group("megatron_sparkling progressive depth")
    g.add_argument("--sparkling-progressive-start-layers", type=int, default=None,
                   help="Train this many layers (0 or 1 in the paper) first, then grow to "
                        "--num-layers in process. Off when unset.")
    g.add_argument("--sparkling-progressive-grow-at", type=float, default=0.8,
                   help="Growth point as a fraction of --train-iters (default 0.8: inside the "
                        "stable phase of a WSD schedule).")
    g.add_argument("--sparkling-progressive-new-layers", choices=["copy", "random"], default=None,
                   help="New layers copy the trained layers (default; 'copy all') or are drawn "
                        "fresh as megatron-core initialises them (the default from 0 layers).")
    g.add_argument("--sparkling-progressive-new-state", choices=["reset", "copy"],
                   default="reset", help="Optimizer state of new layers: zero, or the twin's.")
    return parser


def grow_iteration(args) -> int:
    return int(round(args.sparkling_progressive_grow_at * args.train_iters))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ArgumentError(message)


def _note(message: str) -> None:
    print_rank_0(f" > note: {message}")


def _small_args(args, start: int):
    small = copy.copy(args)
    small.num_layers = start
    if isinstance(args.moe_layer_freq, list):
        small.moe_layer_freq = list(args.moe_layer_freq[:start])
    return small


def _growth_spec(small, full, new_layers: str, new_state: str):
    method = "stack" if new_layers == "copy" else "random"
    return GrowthSpec(ModelShape.from_args(small), ModelShape.from_args(full), seed=full.seed,
                      depth=DepthOptions(method=method, new_state=new_state))


class ProgressiveDepth:
    """The hook: configure() shrinks the model to the start depth, before_step() grows it."""

    def __init__(self, args):
        self.start = args.sparkling_progressive_start_layers
        self.target = args.num_layers
        self.grow_at = grow_iteration(args)
        self.new_layers = args.sparkling_progressive_new_layers or (
            "random" if self.start == 0 else "copy")
        self.new_state = args.sparkling_progressive_new_state
        self.grown = False
        self.full_args = None
        self._check(args)

    def _check(self, args):
        flag = "--sparkling-progressive-start-layers"
        _require(0 <= self.start < self.target,
                 f"{flag} {self.start} must be at least 0 and below --num-layers {self.target}")
        _require(0 < self.grow_at < args.train_iters,
                 f"--sparkling-progressive-grow-at {args.sparkling_progressive_grow_at} puts growth "
                 f"at iteration {self.grow_at}, outside 1 .. {args.train_iters - 1}; choose a "
                 "fraction in (0, 1)")
        _require(self.start > 0 or self.new_layers == "random",
                 f"{flag} 0 leaves no layer to copy; use --sparkling-progressive-new-layers random")
        _require(args.world_size == 1,
                 "progressive depth grows in process on one rank for now (global tensors are "
                 "gathered in one process); launch 1 process, or grow a checkpoint offline")
        warmup = (args.lr_warmup_fraction * args.lr_decay_iters
                  if args.lr_warmup_fraction is not None else args.lr_warmup_iters)
        _require(self.grow_at > warmup,
                 f"growth at iteration {self.grow_at} falls inside the LR warm-up ({warmup:g} "
                 "iterations); grow later (--sparkling-progressive-grow-at)")
        if args.lr_decay_style != "WSD":
            _note("progressive depth is designed for a WSD schedule (--lr-decay-style WSD "
                  "--lr-wsd-decay-iters ~0.1 x --train-iters); growth keeps whatever LR the "
                  f"{args.lr_decay_style} schedule has at iteration {self.grow_at}")
        elif self.grow_at > args.train_iters - args.lr_wsd_decay_iters:
            _note(f"growth at iteration {self.grow_at} falls in the WSD decay phase (the last "
                  f"{args.lr_wsd_decay_iters} iterations); Bu et al. grow in the stable phase")
        try:
            validate(_growth_spec(_small_args(args, self.start), args, self.new_layers,
                                  self.new_state))
        except ValueError as e:
            raise ArgumentError(f"progressive depth: {e}") from None

    def configure(self, args):
        resumed, _ = checkpoint_to_load(args.load, args.ckpt_step)
        if args.ckpt_step is not None:
            resumed = args.ckpt_step
        self.full_args = copy.copy(args)
        if resumed > self.grow_at and not args.finetune:
            # growth runs before step grow_at + 1: a checkpoint after it holds full depth
            self.grown = True
            return
        args.num_layers = self.start
        if isinstance(args.moe_layer_freq, list):
            args.moe_layer_freq = list(args.moe_layer_freq[:self.start])

    def before_step(self, trainer):
        if self.grown or trainer.iteration < self.grow_at:
            return
        self.grow(trainer)

    def grow(self, trainer):
        """Grow `trainer` to the full depth now."""
        full = copy.copy(trainer.args)
        full.num_layers = self.target
        full.moe_layer_freq = self.full_args.moe_layer_freq
        spec = _growth_spec(trainer.args, full, self.new_layers, self.new_state)
        trainer.grow_model(full, LayerGrowth.from_spec(spec, FreshInit.from_args(full)))
        self.grown = True
        print_rank_0(f" > progressive depth: grew {spec.source.num_layers} -> {self.target} "
                     f"layers ({self.new_layers}) at iteration {trainer.iteration}")


def hook(args):
    if getattr(args, "sparkling_progressive_start_layers", None) is None:
        return None
    return ProgressiveDepth(args)


def planned_compute(args, start_layers: int, full_layers: int, grow_at: float) -> dict:
    """Training FLOPs of a progressive run (start_layers until grow_at x --train-iters, then
    full_layers) and of the fixed-depth run with the same flags: Bu et al.'s
    tau N_small + (T - tau) N_full, counted by training/flops.py. `args`: a run's parsed args
    (with padded_vocab_size, as a Pretrainer sets it)."""
    T = args.train_iters
    tau = int(round(grow_at * T))
    full = copy.copy(args)
    full.num_layers = full_layers
    if isinstance(args.moe_layer_freq, list) and len(args.moe_layer_freq) < full_layers:
        raise ValueError("args.moe_layer_freq must describe the full depth")
    per_small = flops.training_flops_per_iteration(_small_args(full, start_layers))
    per_full = flops.training_flops_per_iteration(full)
    progressive = tau * per_small + (T - tau) * per_full
    fixed = T * per_full
    return {"progressive": float(progressive), "fixed": float(fixed),
            "saving": 1.0 - progressive / fixed, "grow_iteration": tau}


def flops_to_reach(history, loss: float, key: str = "validation lm loss") -> float:
    """FLOPs a run's history needed to first reach `loss` (linear between logged points);
    inf if it never did."""
    points = [(r["flops"], r[key]) for r in history if key in r and "flops" in r]
    prev = None
    for flops_now, value in points:
        if value <= loss:
            if prev is None or prev[1] == value:
                return float(flops_now)
            f0, v0 = prev
            return float(f0 + (flops_now - f0) * (v0 - loss) / (v0 - value))
        prev = (flops_now, value)
    return float("inf")


def saving_at_equal_loss(history, baseline_history, key: str = "validation lm loss") -> dict:
    """Compute saved by a run against a baseline at the run's final loss: 1 - C_run / C_base,
    C_base = the baseline's FLOPs to first reach that loss (a benchmark compares a progressive
    run with the fixed-depth run this way). Negative when the baseline got there cheaper."""
    final = [r for r in history if key in r][-1]
    base = flops_to_reach(baseline_history, final[key], key)
    return {"loss": final[key], "flops": float(final["flops"]), "baseline_flops": base,
            "saving": 1.0 - final["flops"] / base if base != float("inf") else float("inf")}
