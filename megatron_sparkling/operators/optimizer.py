"""Optimizer state under width growth: Adam moments and Muon/SGD momentum.

Kinds: the moments of core/layout.py's STATE_KINDS table: "exp_avg" (Adam m), "exp_avg_sq"
(Adam v), "momentum" (Muon/SGD buffer). The fp32 main params ("param") are weights and follow
the method's weight rule, not these. The rules (`STATE_RULES`) are described on `grow_state`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_sparkling.operators import width
from megatron_sparkling.core.layout import STATE_KINDS
from megatron_sparkling.core.plan import UnitMap

STATE_RULES = ("reset_new", "copy", "zero_all", "staged")
MOMENT_KINDS = tuple(k.name for k in STATE_KINDS if k.moment)


def grow_state(state: torch.Tensor, maps: Sequence[UnitMap], kind: str, rule: str,
               factor: int = 1, structure: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The grown optimizer state of one tensor.

    Rules (`STATE_RULES`), applied to the state gathered along the tensor's element maps:
    - "reset_new": SPARKLING's asymmetric reset S' = [S, 0]: old elements keep their state
      exactly (not rescaled, even where alpha rescaled the weights), every new element starts
      at zero;
    - "copy": twins copy their source's state (Net2Net, copy-opt); fresh elements zero;
    - "zero_all": every element zero (drop-opt);
    - "staged": staged training's doubling: the state laid out as the weight ([[S, 0], [0, S]]
      where the weight is block-diagonal), then m / k and v / k^2 (momentum / k), so that
      Adam's update m / sqrt(v) equals the small model's for each copy.
    Old elements sit where the element maps put them (old heads move inside the fused QKV
    layout): "old" means "same source element, copy 0", not "same index".

    `factor` (k) and `structure` (bool, grown shape: False where the weight is a structural
    zero, e.g. off-diagonal blocks) are used by the "staged" rule only."""
    if kind not in MOMENT_KINDS:
        raise ValueError(f"optimizer rules apply to {MOMENT_KINDS}, not {kind!r} (fp32 main "
                         "params follow the weight rule)")
    if rule not in STATE_RULES:
        raise ValueError(f"unknown optimizer-state rule {rule!r}; one of {STATE_RULES}")
    grown = width.gather(state, maps)
    if rule == "zero_all":
        return grown.zero_()
    if rule == "reset_new":
        new = width.axis_mask(maps, fresh=False)
        if new is not None:
            grown.masked_fill_(new, 0.0)
        return grown
    fresh = width.axis_mask(maps, fresh=True)
    if fresh is not None:
        grown.masked_fill_(fresh, 0.0)
    if rule == "staged":
        if structure is not None:
            grown.masked_fill_(~structure, 0.0)
        grown = staged_scale(grown, kind, factor)
    return grown


def staged_scale(state: torch.Tensor, kind: str, factor: int) -> torch.Tensor:
    """m / k, v / k^2, momentum / k (staged training's doubling at k = 2: m/2, v/4)."""
    if factor == 1:
        return state
    return state / (factor * factor) if kind == "exp_avg_sq" else state / factor
