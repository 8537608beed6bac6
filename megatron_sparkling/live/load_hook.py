"""Grow a narrow checkpoint while loading it: no conversion step between two stages.

A run started with the WIDER sizes and `--load` pointing at a NARROW checkpoint: the loader sees
that the checkpoint's stored args give other sizes than the run's, reads the checkpoint one
global tensor at a time (checkpoint/source.py), grows each with the growth method
(`--sparkling-method`, `--sparkling-seed`; the same stream as `megatron-sparkling expand`,
checkpoint/grown.py), cuts every rank's shards of the live model and optimizer out of the grown
tensors (live/state.py's `fill_live`: any TP/EP/PP layout), restores iteration, data position and
scheduler as a normal load does, and installs the asymmetric re-warmup of the new elements
(`rewarmup.install_rewarmup`; the growth record travels in the scheduler's state from then on).
Entry points: see the comment above `growing`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sparkling.checkpoint.base import expected_shape
from megatron_sparkling.checkpoint.grown import GrownTensors, make_grower
from megatron_sparkling.checkpoint.paths import (
    CheckpointError,
    checkpoint_dir_to_load,
    checkpoint_to_load,
)
from megatron_sparkling.checkpoint.source import open_checkpoint
from megatron_sparkling.compat.optimizer import (initialize_empty_state,
                                                 patched_fully_reshardable_load)
from megatron_sparkling.core.sizes import WIDTH_FIELDS
from megatron_sparkling.core.spec import GrowthSpec, GrowthSpecError, ModelShape, ParallelLayout
from megatron_sparkling.live import lr_restart, mask_ramp, rewarmup
from megatron_sparkling.live.state import GlobalShapeError, fill_live, resume_position
from megatron_sparkling.log import print_rank_0
from megatron_sparkling.methods import REGISTRY
from megatron_sparkling.methods.base import parse_method_options

GROWING = "_sparkling_growing"     # marks a loader already wrapped by `growing`
# The sizes whose change means "grow on load": spec.SIZES' width sizes (depth is refused here).
GROWN_SIZES = tuple(WIDTH_FIELDS)
# Sizes that follow the grown ones and must match the target (validate() checks them).
FOLLOWING_SIZES = ("kv_channels", "moe_router_topk")


# ---------------------------------------------------------------------------- flags
def add_args(parser):
    """Megatron-LM extra_args_provider: the `sparkling` group (growth on load) and the
    re-warmup flags (rewarmup.add_rewarmup_args), each added once."""
    if "--sparkling-method" not in parser._option_string_actions:
        g = parser.add_argument_group(title="sparkling",
                                      description="megatron_sparkling: grow a narrow --load "
                                                  "checkpoint to this run's sizes on load")
        g.add_argument("--sparkling-method", default="sparkling",
                       help="Growth method when --load holds a narrower model: "
                            f"{', '.join(REGISTRY)}. Default sparkling.")
        g.add_argument("--sparkling-seed", type=int, default=1234,
                       help="Seed of the growth plan (which source unit each new unit copies).")
        g.add_argument("--sparkling-method-option", action="append", default=[],
                       metavar="NAME=VALUE", help="An option of the growth method (repeatable), "
                       "e.g. new_units=random for sparkling.")
        g.add_argument("--sparkling-no-grow-on-load", action="store_true",
                       help="Refuse a --load checkpoint of other sizes instead of growing it.")
    if "--sparkling-rewarmup-iters" not in parser._option_string_actions:
        rewarmup.add_rewarmup_args(parser)
    return parser


# ---------------------------------------------------------------------------- detection
@dataclass
class PendingGrowth:
    """A checkpoint that must grow to be loaded into this run (grower None: one of this run's
    sizes that must load in model space, see `pending_regroup`)."""
    src: object                 # checkpoint.base.SourceCheckpoint
    grower: object              # methods.base.Grower, or None
    changed: dict               # size name -> (checkpoint's, run's)

    @property
    def spec(self):
        return self.grower.spec


def _shapes_change(src, source, target) -> bool:
    """Whether any stored model tensor has another shape at `target`'s sizes."""
    return any(expected_shape(k, source) != expected_shape(k, target) for k in src.model_tensors)


def pending_growth(args, load_dir: Optional[str]) -> Optional[PendingGrowth]:
    """The growth loading `load_dir` into this run needs, or None (same sizes, nothing to load).

    Bad input (a narrower run, a depth change, sizes no method can reach, growth turned off)
    raises CheckpointError with one line."""
    if not load_dir or checkpoint_to_load(load_dir, getattr(args, "ckpt_step", None))[0] < 0:
        return None
    src = open_checkpoint(load_dir, getattr(args, "ckpt_step", None), verify=False)
    stored = src.common.get("args")
    if stored is None:
        return None
    source, run = ModelShape.from_args(stored), ModelShape.from_args(args)
    changed = {f: (getattr(source, f), getattr(run, f)) for f in GROWN_SIZES
               if getattr(source, f) != getattr(run, f)
               and _shapes_change(src, source, source.replace(**{f: getattr(run, f)}))}
    if source.num_layers != run.num_layers:
        changed["num_layers"] = (source.num_layers, run.num_layers)
    if not changed:   # same sizes, or only sizes no stored tensor has (e.g. a dense FFN size
        return None   # in an all-MoE model): a normal load
    src.check_manifest()   # growing reads it all: a damaged file is refused first
    where = f"--load {load_dir} (iteration {src.iteration})"
    sizes = ", ".join(f"{f} {a} -> {b}" for f, (a, b) in changed.items())
    if getattr(args, "sparkling_no_grow_on_load", False):
        raise CheckpointError(f"{where} has other sizes than this run ({sizes}) and "
                              "--sparkling-no-grow-on-load is set; relaunch with the "
                              "checkpoint's sizes or drop the flag")
    if "num_layers" in changed:
        raise CheckpointError(f"{where} has {source.num_layers} layers but this run "
                              f"{run.num_layers}; growth on load widens only: relaunch with "
                              f"--num-layers {source.num_layers}, or grow depth with "
                              "megatron-sparkling expand first")
    if (getattr(stored, "use_precision_aware_optimizer", False) and not args.no_load_optim
            and not args.finetune):
        raise CheckpointError(f"{where} was saved with --use-precision-aware-optimizer: its "
                              "optimizer holds main-param remainders, not fp32 main params, and "
                              "cannot grow; relaunch with --no-load-optim (weights only) or "
                              "re-save it without that flag")
    target = source.replace(**{f: getattr(run, f) for f in tuple(changed) + FOLLOWING_SIZES})
    try:
        options = parse_method_options(getattr(args, "sparkling_method_option", None),
                                       "--sparkling-method-option")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    spec = GrowthSpec(source, target, getattr(args, "sparkling_method", None) or "sparkling",
                      getattr(args, "sparkling_seed", 1234), options)
    parallel = ParallelLayout(
        tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size,
        expert=getattr(args, "expert_model_parallel_size", 1) or 1,
        expert_tensor=getattr(args, "expert_tensor_parallel_size", None))
    src.check_args_match_tensors()
    try:
        grower = make_grower(spec, src.model_tensors, parallel=parallel)
    except GrowthSpecError as e:
        raise CheckpointError(f"cannot grow {where} into this run ({sizes}): {e}") from None
    return PendingGrowth(src, grower, changed)


def _optimizer_parts(optimizer) -> int:
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def _stored_optimizer_parts(osd) -> Optional[int]:
    """How many optimizers the checkpoint's optimizer state is for: megatron-core stores a
    ChainedOptimizer of several ({0: dense, 1: expert} at EP > 1) under integer keys."""
    if not isinstance(osd, dict) or not osd:
        return None
    return len(osd) if all(isinstance(k, int) for k in osd) else 1


def pending_regroup(args, optimizer, load_dir: Optional[str]) -> Optional[PendingGrowth]:
    """A checkpoint of this run's sizes whose optimizer state megatron-core cannot load here:
    written for another number of optimizers (megatron-core builds a separate expert optimizer
    only at EP > 1, so a checkpoint saved or converted at EP = 1 does not load at EP = 2, nor
    the reverse). Such a load goes through model space (`load_in_model_space`), where the
    param groups are this run's own; None when a normal load works."""
    if (optimizer is None or not load_dir or args.finetune or args.no_load_optim
            or checkpoint_to_load(load_dir, getattr(args, "ckpt_step", None))[0] < 0):
        return None
    src = open_checkpoint(load_dir, getattr(args, "ckpt_step", None), verify=False)
    stored = _stored_optimizer_parts(src.common.get("optimizer"))
    if src.release or stored is None or stored == _optimizer_parts(optimizer):
        return None
    return PendingGrowth(src, None, {})


# ---------------------------------------------------------------------------- growth
def load_in_model_space(args, model, optimizer, scheduler, src, grower=None,
                        strict: bool = True) -> tuple[bool, int, float]:
    """Fill the live model and optimizer from `src`'s global tensors, grown by `grower` (or as
    stored), through live/state.py (any TP/EP/PP/DP; the param groups are the live
    optimizer's own, so the checkpoint's grouping does not matter), and restore the scheduler
    and the data position. Returns (optimizer loaded, iteration, flops so far)."""
    load_optim = (optimizer is not None and not src.release and not args.finetune
                  and not args.no_load_optim and src.optimizer is not None)
    tensors = GrownTensors(src, grower, src.optimizer if load_optim else None)
    try:
        fill_live(args, model, optimizer if load_optim else None,
                  lambda key, _: tensors.whole(key), strict=strict,
                  step=float(src.optimizer.step or 0) if load_optim else None,
                  object_of=tensors.object)
        tensors.finish()
    except GlobalShapeError as e:   # a global shape of the live model the checkpoint lacks
        raise CheckpointError(f"the checkpoint does not fit this run's model ({e}); keep "
                              "every flag but the grown sizes as in the checkpoint") from None
    if load_optim and scheduler is not None and "opt_param_scheduler" in src.common:
        scheduler.load_state_dict(src.common["opt_param_scheduler"])
    if not load_optim and optimizer is not None and (args.fp16 or args.bf16):
        optimizer.reload_model_params()
    iteration, flops = resume_position(args, src.common, src.iteration, src.release)
    return load_optim, iteration, flops


def regroup_into(args, model, optimizer, scheduler, pending: PendingGrowth,
                 strict: bool = True) -> tuple[int, float]:
    """A normal load of a checkpoint whose optimizer grouping is not this run's (see
    `pending_regroup`), then what follows every load (`after_load`)."""
    src = pending.src
    print_rank_0(f"> SPARKLING: {src.path} (iteration {src.iteration}) holds optimizer state "
                 f"for {_stored_optimizer_parts(src.common.get('optimizer'))} optimizer(s), this "
                 f"run has {_optimizer_parts(optimizer)} (expert-parallel size "
                 f"{getattr(src.args, 'expert_model_parallel_size', 1)} -> "
                 f"{getattr(args, 'expert_model_parallel_size', 1)}); loading it in model space")
    _, iteration, flops = load_in_model_space(args, model, optimizer, scheduler, src,
                                              strict=strict)
    after_load(args, model, optimizer, scheduler)
    torch.distributed.barrier()
    return iteration, flops


def after_load(args, model, optimizer, scheduler) -> None:
    """After a normal load of --load: continue or start the re-warmup, MSG's mask ramp and
    staged's LR restart."""
    if optimizer is None or scheduler is None:
        return
    rewarmup.rewarmup_after_load(model, optimizer, scheduler, args)
    if not getattr(args, "load", None) or (getattr(scheduler, "mask_ramp", None) is not None
                                           and getattr(scheduler, "lr_restart", None) is not None):
        return
    from megatron.core import dist_checkpointing

    ckpt_dir = checkpoint_dir_to_load(args.load, getattr(args, "ckpt_step", None))
    if ckpt_dir is not None:
        common = dist_checkpointing.load_common_state_dict(ckpt_dir)
        mask_ramp.mask_ramp_after_load(model, scheduler, common, args)
        lr_restart.lr_restart_after_load(scheduler, common, args)


# Called after every growth on load as listener(args, growth, iteration, rewarmup, model);
# megatron_sparkling.install() and the pre-training loop add the wandb logger (wandb_log.py).
GROWTH_LISTENERS: list = []


def on_growth(listener) -> None:
    if listener not in GROWTH_LISTENERS:
        GROWTH_LISTENERS.append(listener)


def grow_into(args, model, optimizer, scheduler, growth: PendingGrowth,
              strict: bool = True) -> tuple[int, float]:
    """Load the grown checkpoint into the live (wide) model, optimizer and scheduler; returns
    (iteration, num_floating_point_operations_so_far) as a load does. The result equals `expand`
    followed by a normal load (same method and seed); the RNG state is not carried over (as
    `expand` does by default: a grown model draws other dropout masks anyway)."""
    src, grower = growth.src, growth.grower
    load_optim = (optimizer is not None and not src.release and not args.finetune
                  and not args.no_load_optim and src.optimizer is not None)
    if mask_ramp.needs_mask_ramp(grower.record()) and not (load_optim and scheduler is not None):
        raise CheckpointError(f"--sparkling-method {grower.method.name} keeps the function only "
                              "through a mask ramped with the scheduler, which needs the "
                              "checkpoint's optimizer and scheduler state: drop --finetune / "
                              "--no-load-optim, or grow with sparkling or copy")
    print_rank_0(f"> SPARKLING: growing {src.path} (iteration {src.iteration}, {src.format}) in "
                 f"memory to this run's sizes: "
                 + ", ".join(f"{f} {a} -> {b}" for f, (a, b) in growth.changed.items())
                 + f"; method {grower.method.name}, seed {grower.spec.seed}"
                 + ("" if load_optim else "; optimizer state not loaded"))
    load_optim, iteration, flops = load_in_model_space(args, model, optimizer, scheduler, src,
                                                       grower, strict=strict)
    installed = None
    if load_optim and scheduler is not None:
        installed = rewarmup.install_rewarmup(model, optimizer, scheduler, grower.record(),
                                              rewarmup.RewarmupConfig.from_args(args))
        if mask_ramp.needs_mask_ramp(grower.record()):
            mask_ramp.install_mask_ramp(model, scheduler, grower.record(),
                                        args.global_batch_size)
        lr_restart.install_lr_restart(scheduler, grower.record(), args.global_batch_size)
    torch.distributed.barrier()
    for listener in GROWTH_LISTENERS:
        listener(args, growth, iteration, installed, model)
    return iteration, flops


# ---------------------------------------------------------------------------- loaders
# Entry points:
# - `megatron_sparkling.install()`: what a Megatron-LM user calls before `pretrain(...)`
#   (patches/ does it in pretrain_gpt.py): wraps `megatron.training.checkpointing.load_checkpoint`
#   (and the name `megatron.training.training` imported from it) when Megatron-LM is importable
#   (`install_megatron_lm`), else this package's own loader
#   (`megatron_sparkling.training.checkpointing.load_checkpoint`, through `growing`);
# - `add_args(parser)`: the `--sparkling-*` flags, an `extra_args_provider` for Megatron-LM's
#   `pretrain(..., extra_args_provider=...)` (re-warmup flags included, added once);
# - this package's `load_checkpoint(args, model, optimizer, scheduler, ...)` wrapped by
#   `growing`: what the pre-training loop (training/loop.py) calls.
def growing(load_checkpoint):
    """Wrap this package's loader `load_checkpoint(args, model, optimizer, scheduler,
    load_dir=None, strict=True)` with growth on load and the re-warmup after a normal load.

    Normal loads go through unchanged, followed by `rewarmup.rewarmup_after_load` (a checkpoint
    grown by `expand`, or one saved inside a re-warmup, re-warms its new elements)."""
    if getattr(load_checkpoint, GROWING, False):
        return load_checkpoint

    @functools.wraps(load_checkpoint)
    def load(args, model, optimizer, scheduler, load_dir=None, strict=True, **kwargs):
        growth = pending_growth(args, load_dir or args.load)
        if growth is not None:
            return grow_into(args, model, optimizer, scheduler, growth, strict=strict)
        regroup = pending_regroup(args, optimizer, load_dir or args.load)
        if regroup is not None and load_dir in (None, args.load):
            return regroup_into(args, model, optimizer, scheduler, regroup, strict=strict)
        out = load_checkpoint(args, model, optimizer, scheduler, load_dir=load_dir,
                              strict=strict, **kwargs)
        if load_dir in (None, args.load):
            after_load(args, model, optimizer, scheduler)
        return out

    setattr(load, GROWING, True)
    return load


def growing_megatron_lm(load_checkpoint):
    """Wrap Megatron-LM's `megatron.training.checkpointing.load_checkpoint(ddp_model,
    optimizer, opt_param_scheduler, load_arg='load', strict=True, ...)` the same way."""
    if getattr(load_checkpoint, GROWING, False):
        return load_checkpoint

    @functools.wraps(load_checkpoint)
    def load(ddp_model, optimizer, opt_param_scheduler, load_arg="load", strict=True, **kwargs):
        from megatron.training import get_args

        args = get_args()
        growth = regroup = None
        if not kwargs.get("skip_load_to_model_and_opt", False):
            growth = pending_growth(args, getattr(args, load_arg, None))
            if growth is None and load_arg == "load":
                regroup = pending_regroup(args, optimizer, args.load)
        if growth is not None or regroup is not None:
            into = grow_into if growth is not None else regroup_into
            out = into(args, ddp_model, optimizer, opt_param_scheduler, growth or regroup,
                       strict=strict)
            try:
                from megatron.core.num_microbatches_calculator import update_num_microbatches

                update_num_microbatches(consumed_samples=args.consumed_train_samples,
                                        verbose=True)
            except (ImportError, AssertionError):
                pass
            return out
        # With torch's Adam (no apex/TE) megatron-core's own load needs what growth on load
        # gets from live/state.py: optimizer state to load into, the fully_reshardable fix,
        # no_grad (main params are views of leaf params). Only where optimizer state is loaded:
        # the dummy step that creates the state would otherwise stay.
        iteration, release = checkpoint_to_load(getattr(args, load_arg, None),
                                                getattr(args, "ckpt_step", None))
        loads_optimizer = (iteration >= 0 and not release and not args.finetune
                           and not args.no_load_optim
                           and not kwargs.get("skip_load_to_model_and_opt", False))
        if loads_optimizer:
            initialize_empty_state(optimizer)
        loaded = optimizer if loads_optimizer else None
        with torch.no_grad(), patched_fully_reshardable_load(loaded):
            out = load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg=load_arg,
                                  strict=strict, **kwargs)
        if load_arg == "load":
            after_load(args, ddp_model, optimizer, opt_param_scheduler)
        return out

    setattr(load, GROWING, True)
    return load


def install_megatron_lm() -> Optional[str]:
    """Put growth on load into Megatron-LM's `checkpointing.load_checkpoint` and the name
    `training.py` imported from it; returns what was wrapped, None without Megatron-LM.
    Idempotent (megatron_sparkling.install() falls back to this package's own loader)."""
    try:
        from megatron.training import checkpointing as mlm_checkpointing
    except ImportError:
        return None
    wrapped = growing_megatron_lm(mlm_checkpointing.load_checkpoint)
    mlm_checkpointing.load_checkpoint = wrapped
    try:
        from megatron.training import training as mlm_training
    except ImportError:
        mlm_training = None
    if mlm_training is not None and hasattr(mlm_training, "load_checkpoint"):
        mlm_training.load_checkpoint = wrapped
    return "megatron.training.checkpointing.load_checkpoint"
