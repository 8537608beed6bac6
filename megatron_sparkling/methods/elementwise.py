"""The per-tensor recipe every width method shares; each method sets its rules.

For one stored tensor (weights, fp32 main params, or one optimizer moment):
1. copy every element from its source along all dimensions (`operators.width.gather`);
2. weights: fill fresh elements (no twin) by the method's rule for that kind of tensor, rescale
   fan-in dimensions by the method's factor, fold the output layer's fan-in factor into the final
   norm when embeddings are tied, then method extras (`finish_weight`: staged's block zeros,
   HyperCloning's cancelling noise);
3. optimizer moments: the method's state rule (`operators.optimizer`).
"""
from __future__ import annotations

import zlib
from typing import Callable, Optional

import torch

from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.core.layout import Axis, Kind, Role
from megatron_sparkling.methods.base import GrowthMethod
from megatron_sparkling.operators import norms, optimizer, width
from megatron_sparkling.core.plan import GrowthPlan, UnitMap
from megatron_sparkling.core.sizes import SIZES, WIDTH_FIELDS
from megatron_sparkling.core.spec import GrowthSpec, GrowthSpecError

# Width axes of a GrowthPlan (everything a width method may append units to): the plan axes of
# spec.SIZES' width rows (whole experts are not among them).
WIDTH_PLAN_AXES = tuple(s.axis for s in SIZES if s.grows == "width")

# (key, kind, layout, grown tensor, layer dim, fresh layer indices) -> None, fills in place
FreshLayerRule = Callable[[str, str, layout_lib.TensorLayout, torch.Tensor, int, torch.Tensor],
                          None]


def generator_for(seed: int, key: str, salt: str = "") -> torch.Generator:
    """A generator seeded by the growth seed and the MODEL key (optimizer prefix removed), so a
    weight and its fp32 main param (grown in separate calls, maybe in separate processes) draw
    the same values."""
    model_key = layout_lib.split_state_key(key)[1]
    return torch.Generator().manual_seed(
        (int(seed) * 1_000_003 + zlib.crc32(f"{model_key}|{salt}".encode())) % (2 ** 63))


def leading_unit_dims(lay: layout_lib.TensorLayout) -> int:
    """How many leading dimensions index whole units (layers, experts): statistics of fresh
    values are taken per such slice."""
    n = 0
    for d in lay.dims:
        if d.role is Role.UNIT and d.axis in (Axis.LAYER, Axis.EXPERT):
            n += 1
        else:
            break
    return n


class ElementwiseGrowth(GrowthMethod):
    """Rules a method sets (class attributes or in __init__):

    fresh_axes     plan axes whose new units are fresh (no twin); the rest copy balanced twins
    fresh_weights  "zeros" | "normal" | "empirical": fresh elements of weight matrices
    fresh_std      std for "normal" (None: the tensor's own std per layer/expert slice)
    fresh_gains    "identity" | "zeros" | "empirical": fresh norm-gain entries
    fresh_biases   "zeros" | "empirical": fresh bias (and buffer) entries
    state_rule     operators.optimizer rule for exp_avg / exp_avg_sq / momentum
    """

    fresh_axes: tuple = ()
    fresh_weights = "zeros"
    fresh_std: Optional[float] = None
    fresh_gains = "identity"
    fresh_biases = "zeros"
    state_rule = "reset_new"
    # Depth hooks (set by a depth method composing with this one): the layer unit map to use
    # instead of the plan's, and the rule that fills layers with no source (-1 in that map).
    # A stacked tensor's layer dimension is copied along plan.units[Axis.LAYER] like any axis
    # (identity unless depth grows); a layer with no source (depth growth's fresh layers) is
    # filled by fresh_layer_rule (see operators/depth.py); without one it is refused.
    layer_map: Optional[UnitMap] = None
    fresh_layer_rule: Optional[FreshLayerRule] = None

    # ------------------------------------------------------------------ plan
    def validate(self, spec: GrowthSpec) -> None:
        """Method-specific refusals (before any work); spec.validate() did the shape checks."""

    def make_plan(self, spec: GrowthSpec) -> GrowthPlan:
        return self.check_layers(GrowthPlan.twins(spec, fresh_axes=self.fresh_axes))

    def check_layers(self, plan: GrowthPlan) -> GrowthPlan:
        """Put in the depth hook's layer map, if any; refuse, before any tensor, layers with no
        source unless a rule fills them."""
        if self.layer_map is not None:
            plan.units[Axis.LAYER] = self.layer_map
        layers = plan.units.get(Axis.LAYER)
        if layers is not None and bool((layers.source < 0).any()) and (
                self.fresh_layer_rule is None):
            fresh = (layers.source < 0).nonzero().flatten().tolist()
            raise GrowthSpecError(
                f"number of layers: {self.name} copies layers but layers {fresh} have no "
                "source; grow depth with a depth method (operators/depth.py)")
        return plan

    # ------------------------------------------------------------------ rules
    def fan_in_factor(self, umap: UnitMap, out_grown: bool) -> width.Factor:
        """Factor on a grown fan-in dimension (scalar, per-element vector, or None);
        `out_grown`: the same tensor's output dimension grows too."""
        return None

    def finish_weight(self, key: str, grown: torch.Tensor, lay: layout_lib.TensorLayout,
                      maps: list, plan: GrowthPlan) -> torch.Tensor:
        """Method extras on a grown weight (after fills and fan-in factors)."""
        return grown

    def state_structure(self, lay: layout_lib.TensorLayout, maps: list) -> Optional[torch.Tensor]:
        """Bool mask of elements that are not structural zeros (None: all)."""
        return None

    def state_scale(self, lay: layout_lib.TensorLayout, maps: list) -> width.Factor:
        """Factor on the grown moments (the "staged" rule: the gradient's scale)."""
        return None

    # ------------------------------------------------------------------ the recipe
    def grow_tensor(self, key: str, tensor: torch.Tensor, kind: str,
                    lay: layout_lib.TensorLayout, plan: GrowthPlan) -> torch.Tensor:
        maps = plan.tensor_maps(lay)
        if tuple(tensor.shape) != tuple(m.old for m in maps):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} is not the source model's "
                             f"{tuple(m.old for m in maps)} for {lay.dims}")
        work = tensor.float() if tensor.is_floating_point() else tensor
        if kind == "param":
            grown = self._grow_weight(key, work, lay, maps, plan)
        else:
            grown = optimizer.grow_state(work, maps, kind, self.state_rule,
                                         scale=self.state_scale(lay, maps),
                                         structure=self.state_structure(lay, maps))
        self._fill_fresh_layers(key, kind, lay, grown, maps)
        return grown.to(tensor.dtype)

    def _grow_weight(self, key, work, lay, maps, plan) -> torch.Tensor:
        spec = plan.spec
        gen = generator_for(spec.seed, key)
        units = leading_unit_dims(lay)
        zero_centered = spec.source.zero_centered_gamma
        if lay.kind is Kind.NORM_WEIGHT:
            grown = norms.grow_gain(work, maps, self.fresh_gains, units, zero_centered, gen)
        elif lay.kind is Kind.NORM_BIAS:
            grown = norms.grow_gain(work, maps, "zeros" if self.fresh_biases == "zeros"
                                    else "empirical", units, False, gen)
        else:
            grown = width.gather(work, maps)
            fresh = width.axis_mask(maps, fresh=True)
            if fresh is not None:
                rule = self.fresh_weights if self._is_matrix(lay) else self.fresh_biases
                width.fill_fresh(grown, fresh, rule, work, maps, std=self.fresh_std,
                                 unit_dims=units, generator=gen)
        out_grown = any(m.grown for d, m in zip(lay.dims, maps) if d.role is Role.OUT)
        for d, (dim, m) in enumerate(zip(lay.dims, maps)):
            if dim.role is Role.IN and m.grown:
                grown = width.scale_along(grown, d, self.fan_in_factor(m, out_grown))
        if lay.feeds_output and spec.source.tied_embeddings:
            # Tied: the output side's fan-in factor cannot go on the shared embedding; it is a
            # factor on the logits, i.e. on the final norm's output.
            factor = self.fan_in_factor(plan.element_map(layout_lib.H_IN), False)
            if factor is not None:
                grown = norms.fold_scale(grown, factor, zero_centered,
                                         is_bias=lay.kind is Kind.NORM_BIAS)
        return self.finish_weight(key, grown, lay, maps, plan)

    @staticmethod
    def _is_matrix(lay: layout_lib.TensorLayout) -> bool:
        return lay.kind in (Kind.LINEAR_WEIGHT, Kind.EMBEDDING) or (
            lay.kind is Kind.ROUTER and any(d.role is Role.IN for d in lay.dims))

    def _fill_fresh_layers(self, key, kind, lay, grown, maps) -> None:
        if not lay.stacked:
            return
        layer_map = maps[0]
        fresh = (layer_map.source < 0).nonzero().flatten()
        if fresh.numel():
            self.fresh_layer_rule(key, kind, lay, grown, 0, fresh)


def integer_factor_or_refuse(spec: GrowthSpec, method: str) -> dict:
    """{axis: k} for every grown width axis; refuses (one line) an axis whose factor is not an
    integer, naming the valid sizes."""
    factors = {}
    for name, label in WIDTH_FIELDS.items():
        a, b = getattr(spec.source, name), getattr(spec.target, name)
        if a is None or a == b:
            continue
        if b % a:
            raise GrowthSpecError(
                f"{label}: {method} needs an integer growth factor ({a} -> {b} is "
                f"{b / a:g}x); choose {', '.join(str(a * k) for k in (2, 3, 4))}")
        factors[name] = b // a
    return factors
