"""Data-calibrated RMS-scale consistency: SPARKLING's signal preservation, measured on a batch.

SPARKLING keeps r = RMS(y)/RMS(x) of every linear through growth with analytic fan-in factors
(methods/sparkling.py). Those factors assume the old and new terms of a linear's output are
uncorrelated, which holds for random weights but not for trained ones: trained rows align with
their inputs, so random new units contribute less than their share and r falls (10-20% at 1.5x
with random new units on a trained model). Calibration measures instead of assuming, in one
forward pass over a calibration batch, layer by layer in forward order (so every correction sees
inputs already corrected upstream):
- fan-out: fresh rows (new units with no twin) are scaled by beta so their outputs have the mean
  square of the old rows' outputs (copied rows are left alone: they already match);
- fan-in: a linear whose input grew is scaled as a whole (old and new columns alike, as SPARKLING
  does) so its r equals the narrow model's r at the same place.
With tied embeddings the output layer's factor goes into decoder.final_layernorm (the output layer
has no weight of its own). Optimizer moments are not rescaled (SPARKLING keeps old state as is).

`calibrate` works on live 1-rank models and returns the corrections per checkpoint key, so the
same scaling can be applied to the optimizer's fp32 main params (`apply_corrections`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sparkling.core.layout import Axis
from megatron_sparkling.core.plan import GrowthPlan


@dataclass(frozen=True)
class Correction:
    """Scale one slice of a stored tensor: `prefix` indexes its leading dims (layer, expert);
    rows of `row_mask` (along the slice's dim `row_dim`) get `beta`, then everything `factor`."""
    key: str
    prefix: tuple
    factor: float = 1.0
    row_dim: Optional[int] = None
    row_mask: Optional[torch.Tensor] = None
    beta: float = 1.0


def _bare(model):
    from megatron_sparkling.diagnostics.sites import bare_model, require_whole_model

    gpt = bare_model(model)
    require_whole_model(gpt)
    return gpt


def _forward(gpt, batches) -> None:
    was_training = gpt.training
    gpt.eval()
    try:
        with torch.no_grad():
            for b in batches:
                gpt(b["tokens"], b["position_ids"], b.get("attention_mask"))
    finally:
        gpt.train(was_training)


def _weight_of(gpt, module, site):
    if site.name == "output_layer" and getattr(gpt, "share_embeddings_and_output_weights", False):
        return gpt.shared_embedding_or_output_weight()
    return getattr(module, "weight", None)


def _one_batch(batches) -> list:
    """The calibration batches as one micro-batch: every module sees all tokens in one pass."""
    return [{k: torch.cat([b[k] for b in batches]) for k in batches[0]}]


def reference_ratios(model, batches) -> dict:
    """r = RMS(W x)/RMS(x) of every linear site of a (narrow) model over the batches' tokens
    (the router's y is its gating logits, the output layer's the logits)."""
    from megatron_sparkling.diagnostics.sites import linear_sites

    gpt = _bare(model)
    sums, handles = {}, []
    for module, site in linear_sites(gpt).items():
        weight = _weight_of(gpt, module, site)
        if weight is None:
            continue

        def hook(mod, args, site=site, weight=weight):
            if not args or not args[0].numel():
                return
            x = args[0].float()
            with torch.no_grad():
                y = torch.nn.functional.linear(x, weight.float())
            s = sums.setdefault(site, [0.0, 0, 0.0, 0])
            s[0] += float(x.pow(2).sum()); s[1] += x.numel()
            s[2] += float(y.pow(2).sum()); s[3] += y.numel()
        handles.append(module.register_forward_pre_hook(hook))
    try:
        _forward(gpt, _one_batch(batches))
    finally:
        for h in handles:
            h.remove()
    return {site: math.sqrt(s[2] / s[3]) / math.sqrt(s[0] / s[1]) for site, s in sums.items()
            if s[0] > 0}


def _source_site(site, plan: GrowthPlan):
    """The narrow model's site a grown site is measured against (new experts and layers take
    their twin's)."""
    from megatron_sparkling.diagnostics.sites import Site

    layer, expert = site.layer, site.expert
    if expert is not None and plan.units[Axis.EXPERT].grown:
        expert = int(plan.units[Axis.EXPERT].source[expert])
    if layer is not None and plan.units[Axis.LAYER].grown:
        layer = int(plan.units[Axis.LAYER].source[layer])
    return Site(site.name, layer, expert)


def calibrate(grown_model, plan: GrowthPlan, reference: dict, batches,
              every_linear: bool = True) -> list[Correction]:
    """Scale the grown model's linears in place so every r matches `reference` (from
    reference_ratios on the narrow model) on `batches`; returns the corrections applied.

    `every_linear`: also rescale linears whose own shape did not grow but whose input changed
    direction downstream of grown ones (e.g. the router after new attention heads); without it
    only grown linears are touched."""
    from megatron_sparkling.diagnostics.sites import linear_sites, param_refs

    gpt = _bare(grown_model)
    refs = param_refs(gpt)
    corrections: list[Correction] = []
    done = set()
    tied_output = getattr(gpt, "share_embeddings_and_output_weights", False)
    final_norm = getattr(gpt.decoder, "final_layernorm", None)

    def plan_for(module, site):
        weight = _weight_of(gpt, module, site)
        ref = refs.get(id(weight)) if weight is not None else None
        if ref is None:
            return None
        out_map = plan.element_map(ref.layout.dims[-2])
        in_map = plan.element_map(ref.layout.dims[-1])
        fresh_rows = out_map.source < 0
        return weight, ref, fresh_rows, in_map.new != in_map.old

    handles = []
    for module, site in linear_sites(gpt, refs).items():
        target = plan_for(module, site)
        if target is None:
            continue
        weight, ref, fresh_rows, input_grown = target
        rescale = input_grown or every_linear
        if not fresh_rows.any() and not rescale:
            continue

        # A pre-hook: the correction is computed from this module's input (already corrected
        # upstream) and written into its weight before the module runs, so the router's
        # routing and everything downstream see the corrected model.
        def hook(mod, args, kwargs, site=site, weight=weight, ref=ref, fresh_rows=fresh_rows,
                 rescale=rescale):
            if (site, id(weight)) in done or not args or not args[0].numel():
                return None  # e.g. an expert no calibration token reached
            x = args[0].float()
            with torch.no_grad():
                y = torch.nn.functional.linear(x, weight.float())
            beta = 1.0
            if fresh_rows.any() and not fresh_rows.all():
                old_ms = y[..., ~fresh_rows].pow(2).mean()
                new_ms = y[..., fresh_rows].pow(2).mean()
                if new_ms > 0:
                    beta = float(torch.sqrt(old_ms / new_ms))
                    y[..., fresh_rows] *= beta
            factor = 1.0
            ratio = reference.get(_source_site(site, plan))
            if rescale and ratio is not None:
                rms_y = float(y.pow(2).mean().sqrt())
                if rms_y > 0:
                    factor = ratio * float(x.pow(2).mean().sqrt()) / rms_y
            done.add((site, id(weight)))
            n_prefix = len(ref.layout.dims) - weight.dim()
            with torch.no_grad():
                if site.name == "output_layer" and tied_output:
                    # The output layer shares the embedding: its factor is the final norm's.
                    final_norm.weight.mul_(factor)
                    corrections.append(Correction(refs[id(final_norm.weight)].key, (), factor))
                    return (args[0] * factor,) + tuple(args[1:]), kwargs
                if beta != 1.0:
                    weight[fresh_rows] *= beta
                weight.mul_(factor)
            corrections.append(Correction(
                ref.key, tuple(ref.offset[:n_prefix]), factor,
                row_dim=0 if beta != 1.0 else None,
                row_mask=fresh_rows.clone() if beta != 1.0 else None, beta=beta))
            return None
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _forward(gpt, _one_batch(batches))
    finally:
        for h in handles:
            h.remove()
    return corrections


def apply_corrections(key: str, tensor: torch.Tensor, corrections: list[Correction]) -> torch.Tensor:
    """The same scaling on a stored tensor (e.g. the optimizer's fp32 main params)."""
    out = tensor
    for c in corrections:
        if c.key != key:
            continue
        if out is tensor:
            out = tensor.clone()
        view = out[c.prefix] if c.prefix else out
        if c.row_mask is not None:
            rows = view.index_select(c.row_dim, c.row_mask.nonzero().flatten())
            view.index_copy_(c.row_dim, c.row_mask.nonzero().flatten(), rows * c.beta)
        view.mul_(c.factor)
    return out
