"""SPARKLING (arXiv 2602.02472): RMS-scale-consistent width growth with an asymmetric reset.

The `sparkling` method and its two ablations with the same weights: copy-opt (optimizer state
copied to twins) and drop-opt (all state zero). The rules are listed on `Sparkling`.
"""
from __future__ import annotations

from megatron_sparkling.core.layout import Axis
from megatron_sparkling.methods.base import register
from megatron_sparkling.methods.elementwise import WIDTH_PLAN_AXES, ElementwiseGrowth
from megatron_sparkling.operators import width

NEW_UNITS = ("copy", "random", "empirical")


@register
class Sparkling(ElementwiseGrowth):
    """SPARKLING's rules:

    - fan-out rows: copied from twins (new_units="copy", the default), or fresh: N(0, sigma^2)
      with sigma the tensor's own std ("random"), or drawn from the tensor's own values
      ("empirical"); never rescaled;
    - fan-in columns: W' = alpha [W, W_new], alpha on OLD and NEW columns alike, so that every
      linear keeps RMS(y)/RMS(x) for iid weights at any factor: sqrt(n / sum_i k_i^2) with k_i
      the copies of old unit i in the plan (1/sqrt(1 + 3c) for 0 < c <= 1), fresh sqrt(n/n')
      (operators.width.sparkling_alpha). At integer factors copy-copy is exactly Net2Net's
      split: the function is preserved;
    - norm gains copied (fresh units: drawn from the gain's own values), never rescaled; with
      tied embeddings the output side's fan-in factor is folded into decoder.final_layernorm;
    - experts: a new expert copies a source expert and its router row in every mode (routing is
      exact at E' = kE with top-k x k: see methods/net2net.py);
    - optimizer: S' = [S, 0] (old state kept unscaled, new elements zero).
    """
    name = "sparkling"
    state_rule = "reset_new"

    def __init__(self, new_units: str = "copy"):
        super().__init__()
        if new_units not in NEW_UNITS:
            raise ValueError(f"{self.name}: new_units must be one of {', '.join(NEW_UNITS)} "
                             f"(got {new_units!r})")
        self.new_units = new_units
        self.preserves_function = new_units == "copy"
        if new_units != "copy":
            # Experts always copy (a fresh expert has no sensible random init mid-training).
            self.fresh_axes = tuple(a for a in WIDTH_PLAN_AXES if a is not Axis.EXPERT)
            self.fresh_weights = "normal" if new_units == "random" else "empirical"
            self.fresh_std = None     # the tensor's own std: RMS-consistent new units
            self.fresh_gains = "empirical"
            self.fresh_biases = "empirical"

    def fan_in_factor(self, umap, out_grown):
        return width.sparkling_alpha(umap, copy_copy=self.new_units == "copy")


@register
class CopyOpt(Sparkling):
    """SPARKLING's ablation: same weights, optimizer state copied to twins (symmetric)."""
    name = "copy-opt"
    state_rule = "copy"


@register
class DropOpt(Sparkling):
    """SPARKLING's ablation: same weights, every optimizer moment zeroed."""
    name = "drop-opt"
    state_rule = "zero_all"
