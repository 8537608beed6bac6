"""Per-element learning rates inside megatron-core's optimizers: which elements are new, and a
step hook that gives them their own learning rate (`ScaledMaskedSteps`).

Masks. A growth record says which elements of every GLOBAL tensor are new (`GrowthPlan.new_mask`).
A live model holds local shards of those tensors (TP/EP/PP), and megatron-core's optimizers step
main params that are copies (Float16Optimizer) or flat slices (DistributedOptimizer) of them. The
masks follow the same path: `model_param_masks` cuts each parameter's local mask out of its global
mask with the model's own `sharded_state_dict()` (keys, offsets, ShardedTensorFactory for SwiGLU
fc1, global expert index at EP > 1); `optimizer_masks` maps them onto the main params each inner
torch optimizer steps (a DistributedOptimizer shard takes its range of the flattened parameter).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.core.layout import Axis
from megatron_sparkling.core.plan import GrowthPlan
from megatron_sparkling.live import adam_bias
from megatron_sparkling.live.state import fill_from_global
from megatron_sparkling.mcore.model import unwrap


class ElementMaskError(ValueError):
    """The growth record does not describe this model or optimizer; the message says what to do."""


# ---------------------------------------------------------------------------- global masks
def _added_layer(plan: GrowthPlan, lay) -> bool:
    """A per-layer key ("decoder.layers.{i}.") of a layer that growth added: all of it is new."""
    layers = plan.units.get(Axis.LAYER)
    return (lay.layer is not None and layers is not None and layers.grown
            and bool(layers.is_new[lay.layer]))


def has_new_elements(plan: GrowthPlan, key: str, swiglu: bool) -> bool:
    lay = layout_lib.resolve(key, swiglu)
    return _added_layer(plan, lay) or any(bool(m.is_new.any()) for m in plan.tensor_maps(lay))


def global_new_mask(plan: GrowthPlan, key: str, swiglu: bool) -> Optional[torch.Tensor]:
    """True where an element of the global tensor `key` is new; None if none is."""
    lay = layout_lib.resolve(key, swiglu)
    if _added_layer(plan, lay):
        return torch.ones([m.new for m in plan.tensor_maps(lay)], dtype=torch.bool)
    return plan.new_mask(lay)


# ---------------------------------------------------------------------------- model params
def _blank(item):
    """A copy of a sharded item whose data is a fresh bool tensor (the model's stay untouched)."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    blank = torch.zeros(item.data.shape, dtype=torch.bool)
    if isinstance(item, ShardedTensor):
        return dataclasses.replace(item, data=blank, dtype=torch.bool)
    return dataclasses.replace(item, data=blank)


def model_param_masks(model_chunks, plan: GrowthPlan, swiglu: bool) -> dict:
    """{id(param): (param, local bool mask)} for every local parameter with new elements."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for chunk in unwrap(model_chunks):
        params = dict(chunk.named_parameters())
        masked = {}
        for name, item in chunk.sharded_state_dict().items():
            if name in params and isinstance(item, (ShardedTensor, ShardedTensorFactory)):
                masked[name] = item
        # one global mask alive at a time: visit the parameters grouped by global key
        order = sorted(masked, key=lambda n: masked[n].key)
        news = {}

        def global_mask(key, _shape):
            if key not in news:
                news.clear()
                news[key] = global_new_mask(plan, key, swiglu)
            return news[key]

        shadow = {n: _blank(masked[n]) for n in order
                  if has_new_elements(plan, masked[n].key, swiglu)}
        try:
            local = fill_from_global(shadow, global_mask)
        except ValueError as e:
            raise ElementMaskError(
                f"the growth record does not match this model ({e}); relaunch with the grown "
                "model's sizes (the record's target shape)") from None
        for name, mask in local.items():
            mask = mask.bool()
            if mask.any():
                out[id(params[name])] = (params[name], mask)
    return out


# ---------------------------------------------------------------------------- optimizer params
def _inner_optimizers(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _main_param_pairs(opt):
    """(model param, main param the inner optimizer steps, flat range or None) of one optimizer."""
    from megatron.core.optimizer import (
        DistributedOptimizer,
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
    )

    if isinstance(opt, DistributedOptimizer):
        if opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            raise ElementMaskError("the re-warmup needs megatron-core's fp32 main params; drop "
                                   "--use-precision-aware-optimizer")
        for models, shards in ((opt.model_fp32_groups, opt.shard_fp32_groups),
                               (opt.model_float16_groups, opt.shard_fp32_from_float16_groups)):
            for model_group, shard_group in zip(models, shards):
                for model_param, shard in zip(model_group, shard_group):
                    yield model_param, shard, opt._get_model_param_range_map(model_param)["param"]
    elif isinstance(opt, Float16OptimizerWithFloat16Params):
        for models, mains in ((opt.float16_groups, opt.fp32_from_float16_groups),
                              (opt.fp32_from_fp32_groups, opt.fp32_from_fp32_groups)):
            for model_group, main_group in zip(models, mains):
                for model_param, main in zip(model_group, main_group):
                    yield model_param, main, None
    elif isinstance(opt, FP32Optimizer):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                yield p, p, None
    else:
        raise ElementMaskError(f"no element re-warmup for {type(opt).__name__}; use Adam or SGD "
                               "without CPU offloading, or --sparkling-rewarmup-scope all")


def optimizer_masks(optimizer, model_masks: dict) -> list:
    """[(inner torch optimizer, {id(main): (main, mask or None for all-new)})] for each part of a
    megatron-core optimizer (ChainedOptimizer parts included) that steps new elements."""
    out = []
    for opt in _inner_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or opt.optimizer is None:
            continue
        masks = {}
        for model_param, main, rng in _main_param_pairs(opt):
            entry = model_masks.get(id(model_param))
            if entry is None:
                continue
            mask = entry[1]
            if rng is not None:
                mask = mask.reshape(-1)[rng.start:rng.end].clone()
            mask = mask.reshape(main.shape)
            if not mask.any():
                continue
            masks[id(main)] = (main, None if mask.all() else mask.to(main.device))
        if masks:
            out.append((opt.optimizer, masks))
    return out


def adam_step_count(optimizer) -> int:
    """The step count of Adam's bias correction in a megatron-core optimizer (every parameter
    steps together; 0 before its first step)."""
    for opt in _inner_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or opt.optimizer is None:
            continue
        inner = opt.optimizer
        for group in inner.param_groups:
            form = adam_bias.adam_form(inner, group)
            for p in group["params"]:
                return adam_bias.step_count(inner, group, p, form)
    return 0


def count_masked(opt_masks: list) -> tuple[int, int]:
    """(new elements, all elements) of the main params these masks cover on this rank."""
    new = total = 0
    for inner, masks in opt_masks:
        for group in inner.param_groups:
            for p in group["params"]:
                total += p.numel()
                entry = masks.get(id(p))
                if entry is not None:
                    new += p.numel() if entry[1] is None else int(entry[1].sum())
    return new, total


# ---------------------------------------------------------------------------- the step hook
class ScaledMaskedSteps:
    """Scales what each step of the inner optimizers changes in masked elements by `ratio(group)`,
    and, with `new_step`, gives them Adam's bias correction counted from growth.

    It registers torch optimizer step hooks: before a step it keeps a copy of each masked
    parameter, after it replaces each masked element by `before + ratio * (after - before)`
    (torch.lerp), with `ratio(group)` per param group; cost measured by bench/rewarmup_cost.py.
    For AdamW, Adam with L2 decay, SGD with momentum, the change a step makes is
    `lr * f(state, grad, param)` with the optimizer state updated independently of lr, so this
    equals a step run with `ratio * lr` for those elements, update and weight-decay term alike.
    `new_step(t)`: the bias-correction step k <= t of masked elements when the optimizer's is t
    (None: the optimizer's own, t); where k < t, `after` is Adam's step at k (adam_bias.py),
    recomputed from the moments the step produced, before the ratio is applied.
    """

    def __init__(self, opt_masks: list, ratio: Callable[[dict], float],
                 new_step: Optional[Callable[[int], int]] = None):
        self.opt_masks = opt_masks
        self.ratio = ratio
        self.new_step = new_step
        self._before: dict[int, list] = {}
        self._handles = []
        for inner, masks in opt_masks:
            if new_step is not None:
                for group in inner.param_groups:   # refuse a non-Adam optimizer before any step
                    adam_bias.adam_form(inner, group)
            self._handles.append(inner.register_step_pre_hook(self._keep(masks)))
            self._handles.append(inner.register_step_post_hook(self._scale))

    def _keep(self, masks):
        @torch.no_grad()
        def hook(inner, args, kwargs):
            kept = []
            for group in inner.param_groups:
                r = self.ratio(group)
                if r == 1.0 and self.new_step is None:
                    continue
                for p in group["params"]:
                    entry = masks.get(id(p))
                    if entry is not None:   # a plain copy: boolean gathers cost ~5x more
                        kept.append((p, entry[1], r, p.detach().clone(), group))
            self._before[id(inner)] = kept
        return hook

    @torch.no_grad()
    def _scale(self, inner, args, kwargs):
        for p, mask, r, before, group in self._before.pop(id(inner), []):
            k = t = 0
            if self.new_step is not None:
                form = adam_bias.adam_form(inner, group)
                t = adam_bias.step_count(inner, group, p, form)
                k = self.new_step(t)
            if k < t:   # Adam's step again, bias-corrected from growth (elementwise: whole tensor)
                state = inner.state[p]
                after = adam_bias.adam_step(before, state["exp_avg"], state["exp_avg_sq"], group,
                                            k, form)
                if r != 1.0:
                    after = torch.lerp(before, after, r)
                if mask is None:
                    p.copy_(after)
                else:
                    torch.where(mask, after, p, out=p)
            elif r == 1.0:
                continue   # the optimizer's own step stands
            elif mask is None:
                torch.lerp(before, p, r, out=p)
            else:   # the masked elements lerped, the others as stepped (bit for bit)
                torch.where(mask, torch.lerp(before, p, r, out=before), p, out=p)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
