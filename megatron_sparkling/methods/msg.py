"""MSG, masked structural growth: new units enter through a mask ramping 0 -> 1.

Weights: every new unit of a width axis is fresh, N(0, init_std^2) (random weights break the
symmetry), new norm gains 1, new biases 0; nothing old is rescaled. Experts are copies (with
their router rows), as in every copying method: no mask is needed there (see methods/net2net.py
for when routing is exact). Optimizer: S' = [S, 0].

The function is preserved by the runtime mask, not by the weights: megatron_sparkling.
live.mask_ramp.MaskRamp multiplies new FFN units and new heads (fc2 / linear_proj inputs) and new
hidden coordinates (embedding, linear_proj and fc2 outputs) by m, computes hidden norms over old
units plus m-weighted new ones, and ramps m from 0 at the growth iteration to 1 after
`ramp_steps` iterations. Without the ramp installed the grown model is NOT the small model's
function: a run loading an msg checkpoint (expand's, or growth on load) installs it from the growth
record and carries it in the scheduler's checkpoint state (mask_ramp.mask_ramp_after_load).
"""
from __future__ import annotations

from megatron_sparkling.methods.base import register
from megatron_sparkling.methods.elementwise import WIDTH_PLAN_AXES, ElementwiseGrowth


@register
class MaskedStructuralGrowth(ElementwiseGrowth):
    name = "msg"
    preserves_function = True   # with live.mask_ramp.MaskRamp installed at mask 0
    needs_runtime_mask = True    # a relaunch installs the ramp (live/mask_ramp.py)
    fresh_axes = WIDTH_PLAN_AXES
    fresh_weights = "normal"
    fresh_gains = "identity"
    fresh_biases = "zeros"

    def __init__(self, ramp_steps: int = 100, init_std: float = 0.02):
        super().__init__()
        if int(ramp_steps) < 1:
            raise ValueError(f"msg: ramp_steps must be at least 1 (got {ramp_steps})")
        self.ramp_steps = int(ramp_steps)
        self.fresh_std = float(init_std)
