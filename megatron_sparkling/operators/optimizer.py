"""Optimizer state under width growth: Adam moments and Muon/SGD momentum.

Kinds: the moments of core/layout.py's STATE_KINDS table: "exp_avg" (Adam m), "exp_avg_sq"
(Adam v), "momentum" (Muon/SGD buffer). The fp32 main params ("param") are weights and follow
the method's weight rule, not these. The rules (`STATE_RULES`) are described on `grow_state`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_sparkling.operators import width
from megatron_sparkling.core.layout import STATE_KINDS, Axis, Role
from megatron_sparkling.core.plan import UnitMap

STATE_RULES = ("reset_new", "copy", "zero_all", "staged")
MOMENT_KINDS = tuple(k.name for k in STATE_KINDS if k.moment)


def grow_state(state: torch.Tensor, maps: Sequence[UnitMap], kind: str, rule: str,
               scale: width.Factor = None,
               structure: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The grown optimizer state of one tensor.

    Rules (`STATE_RULES`), applied to the state gathered along the tensor's element maps:
    - "reset_new": SPARKLING's asymmetric reset S' = [S, 0]: old elements keep their state
      exactly (not rescaled, even where alpha rescaled the weights), every new element starts
      at zero;
    - "copy": twins copy their source's state (Net2Net, copy-opt); fresh elements zero;
    - "zero_all": every element zero (drop-opt);
    - "staged": staged training's doubling: the state laid out as the weight ([[S, 0], [0, S]]
      where the weight is block-diagonal), then m * s and v * s^2 (momentum * s) with s the
      per-element gradient scale (`copy_gradient_scale`), so that Adam's first update after
      growth, (s m + (1 - b1) s g) / sqrt(s^2 v + (1 - b2) s^2 g^2), equals the small model's.
    Old elements sit where the element maps put them (old heads move inside the fused QKV
    layout): "old" means "same source element, copy 0", not "same index".

    `scale` (a number or a tensor broadcastable to the grown shape) and `structure` (bool,
    grown shape: False where the weight is a structural zero, e.g. off-diagonal blocks) are used
    by the "staged" rule only."""
    if kind not in MOMENT_KINDS:
        raise ValueError(f"optimizer rules apply to {MOMENT_KINDS}, not {kind!r} (fp32 main "
                         "params follow the weight rule)")
    if rule not in STATE_RULES:
        raise ValueError(f"unknown optimizer-state rule {rule!r}; one of {STATE_RULES}")
    if rule == "zero_all":
        return torch.zeros([m.new for m in maps], dtype=state.dtype)
    if rule == "reset_new":
        return width.keep_old(state, maps)
    grown = width.gather(state, maps)
    fresh = width.axis_mask(maps, fresh=True)
    if fresh is not None:
        grown.masked_fill_(fresh, 0.0)
    if rule == "staged":
        if structure is not None:
            grown.masked_fill_(~structure, 0.0)
        grown = scale_moment(grown, kind, scale)
    return grown


def scale_moment(state: torch.Tensor, kind: str, scale: width.Factor) -> torch.Tensor:
    """The moment of a gradient multiplied by `scale`: m * s, v * s^2, momentum * s."""
    if scale is None:
        return state
    return state * (scale * scale) if kind == "exp_avg_sq" else state * scale


def copy_gradient_scale(dims, maps: Sequence[UnitMap]) -> Optional[torch.Tensor]:
    """How a tensor's gradient scales, element by element, when the model grows by copies whose
    outputs are averaged (staged training, HyperCloning): a float tensor broadcastable to the
    grown shape (None: 1 everywhere).

    Why: such a growth keeps the function, and the loss is symmetric in the k copies of an
    activation that move together; so each copy's gradient is 1/k of the small model's. A
    weight's gradient is (gradient at its output) x (its input), and the inputs are exact
    copies: the element's gradient is scaled by 1 / (copies of its source) along every
    dimension that indexes the tensor's OUTPUT: output rows (Role.OUT: fc1, QKV, proj and fc2
    rows, embedding columns), norm gains (Role.GAIN), and whole experts (a copied expert's
    output is weighted p/k). Input columns (Role.IN) and vocabulary rows do not scale it: the
    output layer's and router's gradients are the small model's (for a router row, the expert
    dimension counts: its k copies share the softmax mass)."""
    scale = None
    for d, (dim, m) in enumerate(zip(dims, maps)):
        if not m.grown or not (dim.role in (Role.OUT, Role.GAIN) or dim.axis is Axis.EXPERT):
            continue
        counts = m.copies().clamp(min=1).to(torch.float32)[m.source.clamp(min=0)]
        shape = [1] * len(maps)
        shape[d] = m.new
        f = (1.0 / counts).view(shape)
        scale = f if scale is None else scale * f
    return scale
