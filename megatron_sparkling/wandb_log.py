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

import os
from typing import Optional

import torch

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
                          or None, dir=save_dir, config=config, reinit=True)
    return _RUN


def finish() -> None:
    """Close a run opened here (not Megatron-LM's)."""
    global _RUN
    if _RUN is not None:
        _RUN.finish()
        _RUN = None


def growth_event(iteration: int, grower, source: str, elements_before: int,
                 elements_after: int, path: str, rewarmup=None) -> dict:
    """The growth event as flat figures (sizes of every grown axis, before and after)."""
    from megatron_sparkling.spec import WIDTH_FIELDS

    spec = grower.spec
    event = {"iteration": int(iteration), "method": grower.method.name, "seed": spec.seed,
             "source": source, "path": path, "elements_before": int(elements_before),
             "elements_after": int(elements_after),
             "new_elements": int(elements_after - elements_before)}
    for name in WIDTH_FIELDS:
        before, after = getattr(spec.source, name), getattr(spec.target, name)
        if before is not None:
            event[f"{name}_before"], event[f"{name}_after"] = before, after
    if rewarmup is not None:
        s = rewarmup.state
        event.update(rewarmup_iters=s.warmup_iters, rewarmup_peak_ratio=s.peak_ratio,
                     rewarmup_scope=s.scope)
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
    numbers = {k: v for k, v in figures.items() if isinstance(v, (int, float))}
    target.log(numbers, step=event["iteration"])
    if hasattr(target, "summary"):
        target.summary.update(figures)
    return figures


def live_diagnostics(args, growth, model, batches: int = 2) -> Optional[dict]:
    """Loss and logit change of the growth just loaded (1 rank): the narrow model is rebuilt from
    the checkpoint beside the grown one and both run on the first validation batches."""
    from megatron_sparkling.checkpoint import memory
    from megatron_sparkling.diagnostics import compare, diagnostic_batches
    from megatron_sparkling.training import model as model_lib
    from megatron_sparkling.training.growth import reset_moe_loss_tracker

    narrow_args = growth.spec.source.apply_to_args(args)
    narrow = model_lib.build_model(narrow_args, wrap_with_ddp=False)
    memory.load_model_global_tensors(
        narrow, {k: growth.src.read_model(k) for k in growth.src.model_tensors})
    batch_list, _ = diagnostic_batches(args, batches)
    report = compare(narrow, model_lib.unwrap(model), batch_list)
    del narrow
    reset_moe_loss_tracker()
    for chunk in model:
        chunk.train()
    return diagnostics_summary(report)
