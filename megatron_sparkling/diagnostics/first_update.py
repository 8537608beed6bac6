"""The first optimizer update after growth, compared with the small model's, element for element.

Pure tensor code on global (model-space) optimizer state after ONE step from the growth point:
Adam's direction m / sqrt(v) (the update without learning rate, weight decay and eps; both runs
share the step count, so the bias corrections cancel) of every element of the grown model is
compared with that of the element it was copied from in the small model.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.operators import width


def adam_directions(state: dict) -> dict:
    """{model key: m / sqrt(v)} from global optimizer state tensors keyed as checkpoints key them
    (`optimizer.state.exp_avg.<key>`, `...exp_avg_sq.<key>`); 0 where v is 0."""
    m, v = {}, {}
    for key, tensor in state.items():
        kind = layout_lib.state_kind(key)
        model_key = layout_lib.split_state_key(key)[1]
        if kind == "exp_avg":
            m[model_key] = tensor.float()
        elif kind == "exp_avg_sq":
            v[model_key] = tensor.float()
    return {k: torch.where(v[k] > 0, m[k] / v[k].clamp(min=1e-30).sqrt(), torch.zeros_like(m[k]))
            for k in m if k in v}


def first_update_gaps(grower, small: dict, grown: dict, elements: str = "old") -> dict:
    """{model key: max |d' - d| / max |d|} over the compared elements, d' the grown model's
    direction and d its source element's in the small model (None: no element compared).

    elements: "old" (the old elements: copy 0 of every source element) or "copies" (every
    element with a source); both skip the method's structural zeros (staged's off-diagonal
    blocks: they start from zero moments by design) and elements whose source has v = 0."""
    if elements not in ("old", "copies"):
        raise ValueError(f"elements must be 'old' or 'copies', not {elements!r}")
    gaps = {}
    for key, d_new in grown.items():
        if key not in small:
            continue
        lay = grower.layout(key)
        maps = grower.plan.tensor_maps(lay)
        expected = width.gather(small[key], maps)
        keep = expected != 0
        skip = width.axis_mask(maps, fresh=True) if elements == "copies" else (
            grower.plan.new_mask(lay))
        if skip is not None:
            keep &= ~skip
        structure: Optional[torch.Tensor] = getattr(grower.method, "state_structure",
                                                    lambda *_: None)(lay, maps)
        if structure is not None:
            keep &= structure
        if not keep.any():
            gaps[key] = None
            continue
        scale = float(expected[keep].abs().max())
        gaps[key] = float((d_new[keep] - expected[keep]).abs().max()) / scale
    return gaps
