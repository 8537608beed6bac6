"""The mid-stage baselines: new units zero (`zero`) or random at init scale (`random`).

Neither rescales anything: they show the disruption SPARKLING avoids. On the hidden axis the
norms now divide by a larger RMS-count (zero) or see init-scale coordinates among trained ones
(random), so every layer's input scale shifts and the loss jumps. New experts are fresh too
(router rows and weights zero / random). Optimizer: S' = [S, 0].
"""
from __future__ import annotations

from megatron_sparkling.core.layout import Axis
from megatron_sparkling.methods.base import register
from megatron_sparkling.methods.elementwise import WIDTH_PLAN_AXES, ElementwiseGrowth


@register
class ZeroGrowth(ElementwiseGrowth):
    name = "zero"
    preserves_function = False   # preserved on FFN/head axes, not on the hidden axis
    fresh_axes = WIDTH_PLAN_AXES + (Axis.EXPERT,)
    fresh_weights = "zeros"
    fresh_gains = "zeros"
    fresh_biases = "zeros"


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
