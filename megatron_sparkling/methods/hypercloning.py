"""HyperCloning: every weight tiled, W' = W.repeat(k_out, k_in) / k_in.

Units are tiled (new unit j copies unit j mod n), so each grown tensor is its source repeated
along every grown dimension; fan-in dimensions are divided by their factor k_in; biases, norm
gains and embeddings are tiled unscaled; with tied embeddings the output's 1/k is folded into the
final norm. In Megatron's grouped QKV layout "tiling heads" means tiling the query-group and
in-group head maps (GrowthPlan does the element bookkeeping). Integer factors only.

Option noise_std (default 0): HyperCloning's symmetry breaking, +eta/-eta on the copies of each
fan-in column (noise summing to zero over the copies of a source column): the inputs of those
columns are exact copies, so the noise cancels in the forward pass. Optimizer moments are tiled
like the weights (unscaled).
"""
from __future__ import annotations

import torch

from megatron_sparkling.core.layout import Axis, Role
from megatron_sparkling.methods.base import register
from megatron_sparkling.methods.elementwise import (
    ElementwiseGrowth,
    generator_for,
    integer_factor_or_refuse,
)
from megatron_sparkling.operators import width
from megatron_sparkling.core.plan import GrowthPlan, UnitMap


def tiled(old: int, new: int) -> UnitMap:
    return UnitMap.append(old, new, torch.arange(new - old) % old) if new != old else (
        UnitMap.identity(old))


def tiled_plan(spec) -> GrowthPlan:
    src, tgt = spec.source, spec.target
    units = {}
    for axis in GrowthPlan.AXES:
        a, b = src.axis_size(axis), tgt.axis_size(axis)
        units[axis] = UnitMap.identity(a or 0) if a is None or b is None else tiled(a, b)
    groups = tiled(src.num_query_groups, tgt.num_query_groups)
    slots = tiled(src.num_attention_heads // src.num_query_groups,
                  tgt.num_attention_heads // tgt.num_query_groups)
    return GrowthPlan(spec, units, groups, slots)


@register
class HyperCloning(ElementwiseGrowth):
    name = "hypercloning"
    preserves_function = True
    state_rule = "copy"

    def __init__(self, noise_std: float = 0.0):
        super().__init__()
        self.noise_std = float(noise_std)

    def validate(self, spec):
        integer_factor_or_refuse(spec, self.name)

    def make_plan(self, spec):
        return self.check_layers(tiled_plan(spec))

    def fan_in_factor(self, umap, out_grown):
        return width.split_factors(umap)

    def finish_weight(self, key, grown, lay, maps, plan):
        if self.noise_std <= 0 or not self._is_matrix(lay):
            return grown
        gen = generator_for(plan.spec.seed, key, "hypercloning-noise")
        for d, (dim, m) in enumerate(zip(lay.dims, maps)):
            if dim.role is Role.IN and m.grown and dim.axis is not Axis.VOCAB:
                grown = grown + width.cancelling_noise(grown.shape, d, m, self.noise_std, gen)
        return grown
