"""Grow a narrow checkpoint while loading it: no conversion step between two stages.

A run started with the WIDER sizes and `--load` pointing at a NARROW checkpoint: the loader sees
that the checkpoint's stored args give other sizes than the run's, reads the checkpoint one
global tensor at a time (checkpoint/reader.py), grows each with the growth method
(`--sparkling-method`, `--sparkling-seed`; the same streaming as `megatron-sparkling expand`,
checkpoint/growing.py), cuts every rank's shards of the live model and optimizer out of the grown
tensors (checkpoint/memory.py: any TP/EP/PP layout), restores iteration, data position and
scheduler as a normal load does, and installs the asymmetric re-warmup of the new elements
(schedule.install_rewarmup; the growth record travels in the scheduler's state from then on).
The result equals `expand` followed by a normal load (same method and seed); the RNG state is not
carried over (as `expand` does by default: a grown model draws other dropout masks anyway).

Entry points:
- `install()`: what a Megatron-LM user calls before `pretrain(...)` (patches/ does it in
  pretrain_gpt.py): wraps `megatron.training.checkpointing.load_checkpoint` (and the name
  `megatron.training.training` imported from it) when Megatron-LM is importable, else this
  package's own loader (`megatron_sparkling.training.checkpointing.load_checkpoint`);
- `add_args(parser)`: the `--sparkling-*` flags, an `extra_args_provider` for Megatron-LM's
  `pretrain(..., extra_args_provider=...)` (re-warmup flags included, added once);
- `load_checkpoint(args, model, optimizer, scheduler, ...)`: this package's loader with growth,
  what the pre-training loop (training/loop.py) calls.
Normal loads go through unchanged, followed by `schedule.rewarmup_after_load` (a checkpoint grown
by `expand`, or one saved inside a re-warmup, re-warms its new elements).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sparkling.live import rewarmup as schedule
from megatron_sparkling.checkpoint.paths import CheckpointError
from megatron_sparkling.core.spec import WIDTH_FIELDS

GROWING = "_sparkling_growing"     # marks a loader already wrapped by `growing`
# The sizes whose change means "grow on load": spec.SIZES' width sizes (depth is refused here).
GROWN_SIZES = tuple(WIDTH_FIELDS)
# Sizes that follow the grown ones and must match the target (validate() checks them).
FOLLOWING_SIZES = ("kv_channels", "moe_router_topk")


# ---------------------------------------------------------------------------- flags
def add_args(parser):
    """Megatron-LM extra_args_provider: the `sparkling` group (growth on load) and the
    re-warmup flags (schedule.add_rewarmup_args), each added once."""
    if "--sparkling-method" not in parser._option_string_actions:
        g = parser.add_argument_group(title="sparkling",
                                      description="megatron_sparkling: grow a narrow --load "
                                                  "checkpoint to this run's sizes on load")
        g.add_argument("--sparkling-method", default="sparkling",
                       help="Growth method when --load holds a narrower model (registry name: "
                            "sparkling, copy, copy-opt, drop-opt, hypercloning, staged, msg, "
                            "zero, random). Default sparkling.")
        g.add_argument("--sparkling-seed", type=int, default=1234,
                       help="Seed of the growth plan (which source unit each new unit copies).")
        g.add_argument("--sparkling-method-option", action="append", default=[],
                       metavar="NAME=VALUE", help="An option of the growth method (repeatable), "
                       "e.g. new_units=random for sparkling.")
        g.add_argument("--sparkling-no-grow-on-load", action="store_true",
                       help="Refuse a --load checkpoint of other sizes instead of growing it.")
    if "--sparkling-rewarmup-iters" not in parser._option_string_actions:
        schedule.add_rewarmup_args(parser)
    return parser


def _method_options(items) -> dict:
    from megatron_sparkling.cli import _option_value

    options = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise CheckpointError(f"--sparkling-method-option {item!r}: write NAME=VALUE")
        options[name.replace("-", "_")] = _option_value(value)
    return options


# ---------------------------------------------------------------------------- detection
@dataclass
class PendingGrowth:
    """A checkpoint that must grow to be loaded into this run."""
    src: object                 # reader.SourceCheckpoint
    grower: object              # methods.base.Grower
    changed: dict               # size name -> (checkpoint's, run's)

    @property
    def spec(self):
        return self.grower.spec


def _checkpoint_iteration(args, load_dir: str) -> Optional[int]:
    from megatron_sparkling.checkpoint.paths import read_tracker

    if getattr(args, "ckpt_step", None) is not None:
        return args.ckpt_step
    iteration, _ = read_tracker(load_dir)
    return iteration if iteration >= 0 else None


def _shapes_change(src, source, target) -> bool:
    """Whether any stored model tensor has another shape at `target`'s sizes."""
    from megatron_sparkling.checkpoint.source import expected_shape

    return any(expected_shape(k, source) != expected_shape(k, target) for k in src.model_tensors)


def pending_growth(args, load_dir: Optional[str]) -> Optional[PendingGrowth]:
    """The growth loading `load_dir` into this run needs, or None (same sizes, nothing to load).

    Bad input (a narrower run, a depth change, sizes no method can reach, growth turned off)
    raises CheckpointError with one line."""
    import os

    from megatron_sparkling.checkpoint.grown import make_grower
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.core.spec import GrowthSpec, GrowthSpecError, ModelShape, ParallelLayout
    from megatron_sparkling.checkpoint.paths import TRACKER

    if not load_dir or not os.path.isfile(os.path.join(load_dir, TRACKER)) and (
            getattr(args, "ckpt_step", None) is None):
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
    target = source.replace(**{f: getattr(run, f) for f in tuple(changed) + FOLLOWING_SIZES})
    spec = GrowthSpec(source, target, getattr(args, "sparkling_method", None) or "sparkling",
                      getattr(args, "sparkling_seed", 1234),
                      _method_options(getattr(args, "sparkling_method_option", None)))
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


# ---------------------------------------------------------------------------- growth
def _print_rank_0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


def new_element_count(growth: PendingGrowth) -> tuple[int, int]:
    """(elements before, elements after) of the model's stored tensors."""
    import math

    from megatron_sparkling.checkpoint.source import expected_shape

    before = after = 0
    for key, spec in growth.src.model_tensors.items():
        shape = expected_shape(key, growth.spec.target)
        before += math.prod(spec.shape)
        after += math.prod(shape) if shape is not None else math.prod(spec.shape)
    return before, after


def grow_into(args, model, optimizer, scheduler, growth: PendingGrowth,
              strict: bool = True) -> tuple[int, float]:
    """Load the grown checkpoint into the live (wide) model, optimizer and scheduler; returns
    (iteration, num_floating_point_operations_so_far) as a load does."""
    from megatron.core import parallel_state as mpu

    from megatron_sparkling.live import state as memory
    from megatron_sparkling.checkpoint.grown import GrownTensors
    from megatron_sparkling.compat.optimizer import (
        initialize_empty_state,
        patched_fully_reshardable_load,
    )
    from megatron_sparkling.training import checkpointing
    from megatron_sparkling.training import growth as live_growth
    from megatron_sparkling.mcore.model import unwrap

    src, grower = growth.src, growth.grower
    common = src.common
    load_optim = (optimizer is not None and not src.release and not args.finetune
                  and not args.no_load_optim and src.optimizer is not None)
    _print_rank_0(f"> SPARKLING: growing {src.path} (iteration {src.iteration}, {src.format}) in "
                  f"memory to this run's sizes: "
                  + ", ".join(f"{f} {a} -> {b}" for f, (a, b) in growth.changed.items())
                  + f"; method {grower.method.name}, seed {grower.spec.seed}"
                  + ("" if load_optim else "; optimizer state not loaded"))
    metadata = live_growth._metadata(args)   # optimizer state asked for in model space
    metadata["dp_cp_group"] = mpu.get_data_parallel_group(with_context_parallel=True)
    if load_optim:
        initialize_empty_state(optimizer)
    sharded = checkpointing.build_state_dict(
        args, model, optimizer if load_optim else None, None, metadata,
        with_optimizer=load_optim, with_rng=False, is_loading=True)
    tensors = GrownTensors(src, grower, src.optimizer if load_optim else None)
    try:
        state = memory.fill_from_global(sharded, tensors.whole)
    except ValueError as e:   # a global shape of the live model the growth does not give
        raise CheckpointError(f"the grown checkpoint does not fit this run's model ({e}); keep "
                              "every flag but the grown sizes as in the checkpoint") from None
    chunks = unwrap(model)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"], strict=strict)
    if load_optim:
        live_growth._set_step(state["optimizer"], float(src.optimizer.step or 0))
        with torch.no_grad(), patched_fully_reshardable_load(optimizer):
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "opt_param_scheduler" in common:
            scheduler.load_state_dict(common["opt_param_scheduler"])
    elif optimizer is not None and (args.fp16 or args.bf16):
        optimizer.reload_model_params()
    del state, sharded
    ckpt_args = src.args
    if args.finetune or src.release:
        iteration = 0
    else:
        iteration = common.get("iteration", src.iteration)
        for counter in ("consumed_train_samples", "skipped_train_samples",
                        "consumed_valid_samples"):
            setattr(args, counter, getattr(ckpt_args, counter, 0))
    flops = float(common.get("num_floating_point_operations_so_far", 0.0) or 0.0)
    rewarmup = None
    if load_optim and scheduler is not None:
        rewarmup = schedule.install_rewarmup(
            model, optimizer, scheduler, grower.record(), schedule.RewarmupConfig.from_args(args))
    torch.distributed.barrier()
    _log_growth(args, growth, iteration, rewarmup, model)
    return iteration, flops


def _log_growth(args, growth: PendingGrowth, iteration: int, rewarmup, model) -> None:
    from megatron_sparkling import wandb_log

    if not wandb_log.enabled(args):
        return
    before, after = new_element_count(growth)
    settings = None if rewarmup is None else {
        "iters": rewarmup.state.warmup_iters, "peak_ratio": rewarmup.state.peak_ratio,
        "scope": rewarmup.state.scope}
    event = wandb_log.growth_event(iteration, growth.grower.record(), growth.src.path, before,
                                   after, path="load hook", rewarmup=settings)
    summary = None
    if torch.distributed.get_world_size() == 1:
        summary = wandb_log.live_diagnostics(args, growth, model)
    wandb_log.log_growth(args, event, summary)


# ---------------------------------------------------------------------------- loaders
def growing(load_checkpoint):
    """Wrap this package's loader `load_checkpoint(args, model, optimizer, scheduler,
    load_dir=None, strict=True)` with growth on load and the re-warmup after a normal load."""
    if getattr(load_checkpoint, GROWING, False):
        return load_checkpoint

    @functools.wraps(load_checkpoint)
    def load(args, model, optimizer, scheduler, load_dir=None, strict=True, **kwargs):
        growth = pending_growth(args, load_dir or args.load)
        if growth is not None:
            return grow_into(args, model, optimizer, scheduler, growth, strict=strict)
        out = load_checkpoint(args, model, optimizer, scheduler, load_dir=load_dir,
                              strict=strict, **kwargs)
        if optimizer is not None and scheduler is not None and load_dir in (None, args.load):
            schedule.rewarmup_after_load(model, optimizer, scheduler, args)
        return out

    setattr(load, GROWING, True)
    return load


def load_checkpoint(args, model, optimizer, scheduler, load_dir=None, strict=True):
    """This package's checkpoint loader with growth on load (training/loop.py calls it)."""
    from megatron_sparkling.training import checkpointing

    loader = checkpointing.load_checkpoint   # looked up now: install() may have wrapped it
    return growing(loader)(args, model, optimizer, scheduler, load_dir=load_dir, strict=strict)


def growing_megatron_lm(load_checkpoint):
    """Wrap Megatron-LM's `megatron.training.checkpointing.load_checkpoint(ddp_model,
    optimizer, opt_param_scheduler, load_arg='load', strict=True, ...)` the same way."""
    if getattr(load_checkpoint, GROWING, False):
        return load_checkpoint

    @functools.wraps(load_checkpoint)
    def load(ddp_model, optimizer, opt_param_scheduler, load_arg="load", strict=True, **kwargs):
        from megatron.training import get_args

        args = get_args()
        growth = None
        if not kwargs.get("skip_load_to_model_and_opt", False):
            growth = pending_growth(args, getattr(args, load_arg, None))
        if growth is not None:
            out = grow_into(args, ddp_model, optimizer, opt_param_scheduler, growth, strict=strict)
            try:
                from megatron.core.num_microbatches_calculator import update_num_microbatches

                update_num_microbatches(consumed_samples=args.consumed_train_samples,
                                        verbose=True)
            except (ImportError, AssertionError):
                pass
            return out
        out = load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg=load_arg,
                              strict=strict, **kwargs)
        if optimizer is not None and opt_param_scheduler is not None and load_arg == "load":
            schedule.rewarmup_after_load(ddp_model, optimizer, opt_param_scheduler, args)
        return out

    setattr(load, GROWING, True)
    return load


def install() -> str:
    """Put growth on load into the loader in use; returns which one was wrapped. Idempotent.

    Megatron-LM (`megatron.training` importable): its `checkpointing.load_checkpoint`, and the
    name `training.py` imported from it. Otherwise this package's own loader."""
    try:
        from megatron.training import checkpointing as mlm_checkpointing
    except ImportError:
        mlm_checkpointing = None
    if mlm_checkpointing is not None:
        wrapped = growing_megatron_lm(mlm_checkpointing.load_checkpoint)
        mlm_checkpointing.load_checkpoint = wrapped
        try:
            from megatron.training import training as mlm_training
        except ImportError:
            mlm_training = None
        if mlm_training is not None and hasattr(mlm_training, "load_checkpoint"):
            mlm_training.load_checkpoint = wrapped
        return "megatron.training.checkpointing.load_checkpoint"
    from megatron_sparkling.training import checkpointing

    checkpointing.load_checkpoint = growing(checkpointing.load_checkpoint)
    return "megatron_sparkling.training.checkpointing.load_checkpoint"
