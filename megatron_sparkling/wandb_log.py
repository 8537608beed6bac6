"""Weights & Biases logging of a growth (optional: `pip install megatron-sparkling[wandb]`).

Enabled by Megatron-LM's own flag `--wandb-project` (with `--wandb-exp-name`, `--wandb-save-dir`);
`WANDB_MODE=offline` writes the run under the save dir with no network. wandb is imported only
when enabled; missing, it is a one-line error. Inside Megatron-LM the run Megatron opened
(`get_wandb_writer()`, last rank) is used; otherwise one is opened here on the last rank.

What is logged, under `sparkling/`: the growth event (iteration, method, seed, sizes before and
after, number of new elements, re-warmup settings, where it happened: `expand` or the load hook)
and, where cheap, the growth diagnostics summary (diagnostics package: loss before/after and its
change, max and mean |logit difference| on a few validation batches).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from megatron_sparkling.checkpoint.base import expected_shape
from megatron_sparkling.checkpoint.source import open_checkpoint
from megatron_sparkling.core.record import growth_record, rewarmup_settings
from megatron_sparkling.core.sizes import WIDTH_FIELDS
from megatron_sparkling.diagnostics import compare, diagnostic_batches, verify_checkpoints
from megatron_sparkling.live import state
from megatron_sparkling.mcore import model as model_lib

PREFIX = "sparkling/"


class WandbError(RuntimeError):
    """wandb asked for but not usable; the message says what to install or set."""


def enabled(args) -> bool:
    return bool(getattr(args, "wandb_project", None))


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise WandbError("--wandb-project needs wandb: pip install 'megatron-sparkling[wandb]' "
                         "(or drop --wandb-project)") from None
    return wandb


def check_available(args) -> None:
    """Fail early, one line, when --wandb-project is given without wandb installed."""
    if enabled(args):
        _import_wandb()


def _is_logging_rank() -> bool:
    if not torch.distributed.is_initialized():
        return True
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _megatron_lm_writer():
    try:
        from megatron.training.global_vars import get_wandb_writer
    except ImportError:
        return None
    return get_wandb_writer()


_RUN = None


def run(args):
    """The wandb run to log into (Megatron-LM's, or one opened here); None off the last rank."""
    global _RUN
    if not enabled(args) or not _is_logging_rank():
        return None
    writer = _megatron_lm_writer()
    if writer is not None:
        return writer
    wandb = _import_wandb()
    if _RUN is None or wandb.run is None:
        save_dir = getattr(args, "wandb_save_dir", "") or os.path.join(
            getattr(args, "save", None) or ".", "wandb")
        os.makedirs(save_dir, exist_ok=True)
        config = {k: v for k, v in vars(args).items()
                  if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
        _RUN = wandb.init(project=args.wandb_project, name=getattr(args, "wandb_exp_name", "")
                          or None, dir=save_dir, config=config, reinit=True,
                          settings=wandb.Settings(console="off"))  # the run's log stays ours
    return _RUN


def finish() -> None:
    """Close a run opened here (not Megatron-LM's)."""
    global _RUN
    if _RUN is not None:
        _RUN.finish()
        _RUN = None


def growth_event(iteration: int, record: dict, source: str, elements_before: int,
                 elements_after: int, path: str, rewarmup=None) -> dict:
    """The growth event as flat figures; `record` is Grower.record() (method, seed, source and
    target shapes), `path` says where the growth ran ("expand" or "load hook")."""
    event = {"iteration": int(iteration), "method": record.get("method"),
             "seed": record.get("seed"), "source": source, "path": path,
             "elements_before": int(elements_before), "elements_after": int(elements_after),
             "new_elements": int(elements_after - elements_before)}
    for name in WIDTH_FIELDS:
        before, after = record["source"].get(name), record["target"].get(name)
        if before is not None:
            event[f"{name}_before"], event[f"{name}_after"] = before, after
    if rewarmup is not None:
        event.update({f"rewarmup_{k}": v for k, v in rewarmup.items() if v is not None})
    return event


def diagnostics_summary(report) -> dict:
    """The few figures of a diagnostics.GrowthReport worth a dashboard."""
    loss = report.loss
    out = {"loss_before": loss["before"], "loss_after": loss["after"],
           "loss_change": loss["delta"]}
    for key in ("max_abs_diff", "mean_abs_diff"):
        if key in report.logits:
            out[f"logit_{key}"] = report.logits[key]
    return out


def log_growth(args, event: dict, summary: Optional[dict] = None) -> Optional[dict]:
    """Log the event (and the diagnostics summary) at the event's iteration; returns what was
    logged (None off the logging rank)."""
    target = run(args)
    if target is None:
        return None
    figures = {PREFIX + "growth/" + k: v for k, v in event.items()}
    if summary:
        figures.update({PREFIX + "diagnostics/" + k: v for k, v in summary.items()})
    numbers = {k: v for k, v in figures.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    target.log(numbers, step=event["iteration"])
    if hasattr(target, "summary"):
        target.summary.update(figures)
    return figures


def log_record(args, record: dict) -> None:
    """One training or validation record of the pre-training loop (its figures, at its
    iteration), when --wandb-project is given."""
    target = run(args)
    if target is None:
        return
    numbers = {k: v for k, v in record.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
    target.log(numbers, step=int(record["iteration"]))


def live_diagnostics(args, growth, model, batches: int = 2) -> Optional[dict]:
    """Loss and logit change of the growth just loaded (1 rank): the narrow model is rebuilt from
    the checkpoint beside the grown one and both run on the first validation batches."""
    narrow_args = growth.spec.source.apply_to_args(args)
    narrow = model_lib.build_model(narrow_args, wrap_with_ddp=False)
    state.load_model_global_tensors(
        narrow, {k: growth.src.read_model(k) for k in growth.src.model_tensors})
    batch_list, _ = diagnostic_batches(args, batches)
    report = compare(narrow, model_lib.unwrap(model), batch_list)
    del narrow
    state.reset_moe_loss_tracker()
    for chunk in model:
        chunk.train()
    return diagnostics_summary(report)


def new_element_count(growth) -> tuple[int, int]:
    """(elements before, elements after) of a pending growth's stored model tensors."""
    before = after = 0
    for key, spec in growth.src.model_tensors.items():
        shape = expected_shape(key, growth.spec.target)
        before += math.prod(spec.shape)
        after += math.prod(shape) if shape is not None else math.prod(spec.shape)
    return before, after


def log_hook_growth(args, growth, iteration: int, rewarmup, model) -> None:
    """A growth on load (live/load_hook.py listener): the growth event and, at 1 rank, the
    diagnostics summary, when --wandb-project is given."""
    if not enabled(args):
        return
    before, after = new_element_count(growth)
    settings = None if rewarmup is None else {
        "iters": rewarmup.state.warmup_iters, "peak_ratio": rewarmup.state.peak_ratio,
        "scope": rewarmup.state.scope, "bias_correction": rewarmup.state.bias_correction}
    event = growth_event(iteration, growth.grower.record(), growth.src.path, before, after,
                         path="load hook", rewarmup=settings)
    summary = None
    if torch.distributed.get_world_size() == 1:
        summary = live_diagnostics(args, growth, model)
    log_growth(args, event, summary)


def log_expand(ns, result) -> Optional[dict]:
    """After `megatron-sparkling expand --wandb-project P`: the growth event from the written
    checkpoint's record and, at 1 process, the diagnostics summary (verify on 2 batches)."""
    if not enabled(ns) or not result.grown:
        return None
    grown = open_checkpoint(result.path, verify=False)
    source = open_checkpoint(ns.load, ns.iteration, verify=False)
    count = lambda ckpt: sum(math.prod(s.shape) for s in ckpt.model_tensors.values())  # noqa
    event = growth_event(result.iteration, growth_record(grown.common), source.path,
                         count(source), count(grown), "expand", rewarmup_settings(grown.common))
    summary = None
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        report = verify_checkpoints(ns.load, ns.save, ns.iteration, result.iteration,
                                    batches=2, twins=False)
        summary = diagnostics_summary(report)
    try:
        return log_growth(ns, event, summary)
    finally:
        finish()
