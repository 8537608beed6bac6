"""The mid-stage baselines: new units "zero" (outgoing weights zero) or "random" (init scale).

`zero` (the literature's zero baseline): a new unit's OUTGOING weights (the columns of the
linears that read it, and a new expert's fc2) are zero, its INCOMING weights (the rows that
produce it: fc1/QKV rows, the embedding's and proj/fc2's new residual coordinates, a new
expert's fc1 and router row) are drawn as megatron-core initialises a fresh unit, so the unit
computes something and its outgoing weights get gradient. What holds, per axis:
- FFN, shared/dense FFN, heads, query groups: the function is preserved exactly (the new units'
  outputs are multiplied by zero columns);
- hidden: NOT preserved: every RMSNorm divides by the RMS over n' coordinates, and the new ones
  carry the freshly drawn embedding columns and proj/fc2 rows (even all-zero new coordinates
  would scale each norm's output by sqrt(n'/n));
- experts: NOT preserved: the new router rows change the top-k and the softmax.
`random`: every fresh element N(0, init_std^2), gains 1: nothing preserved (the disruption).
Optimizer, both: S' = [S, 0].
"""
from __future__ import annotations

import math

from megatron_sparkling.core.layout import Axis, Kind, Role
from megatron_sparkling.core.plan import UnitMap
from megatron_sparkling.methods.base import register
from megatron_sparkling.methods.elementwise import (
    WIDTH_PLAN_AXES,
    ElementwiseGrowth,
    generator_for,
    leading_unit_dims,
)
from megatron_sparkling.operators import width


def writes_residual(lay) -> bool:
    """A linear whose output rows are the residual stream (linear_proj, every fc2): megatron-core
    initialises it with output_layer_init_method, and it is a new expert's outgoing side."""
    return lay.kind is Kind.LINEAR_WEIGHT and any(
        d.role is Role.OUT and d.axis is Axis.HIDDEN for d in lay.dims)


def megatron_init_std(lay, init_std: float, num_layers: int) -> float:
    """The std megatron-core 0.16.1 draws this matrix with (TransformerConfig): init_method
    N(0, sigma^2) for QKV, fc1, router, shared-expert gate, output layer, embeddings;
    output_layer_init_method N(0, sigma^2 / (2 L)) for linear_proj and fc2."""
    return init_std / math.sqrt(2.0 * num_layers) if writes_residual(lay) else init_std


def incoming_mask(lay, maps):
    """Bool (grown shape): fresh elements that are a new unit's INCOMING weights: a fresh
    coordinate on an output or unit dimension, none on an input dimension, and not a new
    expert's fc2 (its outgoing side)."""
    fresh_out = width.axis_mask([m if d.role is not Role.IN else _none(m)
                                 for d, m in zip(lay.dims, maps)], fresh=True)
    if fresh_out is None:
        return None
    fresh_in = width.axis_mask([m if d.role is Role.IN else _none(m)
                                for d, m in zip(lay.dims, maps)], fresh=True)
    mask = fresh_out if fresh_in is None else fresh_out & ~fresh_in
    if writes_residual(lay):
        experts = width.axis_mask([m if d.axis is Axis.EXPERT else _none(m)
                                   for d, m in zip(lay.dims, maps)], fresh=True)
        if experts is not None:
            mask = mask & ~experts
    return mask


def _none(m):
    """A map of the same grown size with no fresh element (masks out this dimension)."""
    return UnitMap.identity(m.new)


@register
class ZeroGrowth(ElementwiseGrowth):
    name = "zero"
    preserves_function = False   # preserved on FFN/head axes, not on the hidden or expert axis
    fresh_axes = WIDTH_PLAN_AXES + (Axis.EXPERT,)
    fresh_weights = "zeros"      # outgoing weights; finish_weight draws the incoming ones
    fresh_gains = "identity"     # megatron-core's RMSNorm/LayerNorm init
    fresh_biases = "zeros"

    def __init__(self, init_std: float = 0.02):
        super().__init__()
        self.init_std = float(init_std)   # Megatron's --init-method-std default

    def finish_weight(self, key, grown, lay, maps, plan):
        spec = plan.spec
        if lay.feeds_output and spec.source.tied_embeddings and lay.kind is Kind.NORM_WEIGHT:
            # Tied: the new embedding columns are drawn (they are the new residual coordinates'
            # incoming weights), so the final norm's new gains are the outgoing side: zero.
            fresh = width.axis_mask(maps, fresh=True)
            if fresh is not None:
                grown.masked_fill_(fresh, -1.0 if spec.source.zero_centered_gamma else 0.0)
            return grown
        if not self._is_matrix(lay):
            return grown
        mask = incoming_mask(lay, maps)
        if mask is not None:
            width.fill_fresh(grown, mask, "normal", grown, maps,
                             std=megatron_init_std(lay, self.init_std, spec.target.num_layers),
                             unit_dims=leading_unit_dims(lay),
                             generator=generator_for(spec.seed, key, "zero-incoming"))
        return grown


@register
class RandomGrowth(ElementwiseGrowth):
    name = "random"
    preserves_function = False
    fresh_axes = WIDTH_PLAN_AXES + (Axis.EXPERT,)
    fresh_weights = "normal"
    fresh_gains = "identity"
    fresh_biases = "zeros"

    def __init__(self, init_std: float = 0.02):
        super().__init__()
        self.fresh_std = float(init_std)   # Megatron's --init-method-std default
