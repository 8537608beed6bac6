"""Norm gains under width growth: copy to twins, fresh values, folds, and the masked norm.

Rules (methods/ pick one):
- gains are copied to twins and never rescaled: a copied residual stream has the same RMS, so
  the norm's output is already right;
- fresh gain entries (units with no twin) are the identity gain, zero, or drawn from the gain's
  own values (`FRESH_GAIN_RULES`);
- a scalar or per-unit factor on the logits is folded into the final norm (`fold_scale`): the
  tied-embedding fan-in factor (SPARKLING, Net2Net, HyperCloning) and staged training's halving;
- MSG's masked norm (`masked_norm`) computes statistics over old units and mask-weighted new
  units, so that at mask 0 it is exactly the small model's norm.
"Zero-centred gamma" (Megatron's --apply-layernorm-1p) stores gain - 1: every rule here works on
the effective gain and converts back.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from megatron_sparkling.operators import width
from megatron_sparkling.core.plan import UnitMap

FRESH_GAIN_RULES = ("identity", "zeros", "empirical")


def identity_gain(zero_centered: bool = False) -> float:
    """The stored value of a gain of 1."""
    return 0.0 if zero_centered else 1.0


def grow_gain(gain: torch.Tensor, maps: Sequence[UnitMap], fresh: str = "identity",
              unit_dims: int = 0, zero_centered: bool = False,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A norm gain (or bias, with fresh="zeros") grown along its maps: twins copied, fresh
    entries by `fresh`, nothing rescaled."""
    if fresh not in FRESH_GAIN_RULES:
        raise ValueError(f"unknown fresh-gain rule {fresh!r}; one of {FRESH_GAIN_RULES}")
    grown = width.gather(gain, maps)
    mask = width.axis_mask(maps, fresh=True)
    if mask is not None:
        if fresh == "identity":
            width.fill_fresh(grown, mask, "constant", gain, maps,
                             value=identity_gain(zero_centered))
        elif fresh == "zeros":
            width.fill_fresh(grown, mask, "constant", gain, maps,
                             value=-1.0 if zero_centered else 0.0)
        else:
            width.fill_fresh(grown, mask, "empirical", gain, maps, unit_dims=unit_dims,
                             generator=generator)
    return grown


def fold_scale(stored: torch.Tensor, factor: Union[float, torch.Tensor],
               zero_centered: bool = False, is_bias: bool = False) -> torch.Tensor:
    """The final norm's stored gain (or bias) after multiplying its output by `factor` (a
    scalar or one factor per unit of the last dimension): the logits scale by the same factor
    when the norm feeds only the output layer."""
    if not torch.is_tensor(factor):
        factor = torch.tensor(float(factor))
    factor = factor.to(stored.dtype)
    if is_bias or not zero_centered:
        return stored * factor
    return (stored + 1.0) * factor - 1.0


def masked_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                eps: float, keep: torch.Tensor, rms: bool,
                zero_centered: bool = False) -> torch.Tensor:
    """RMSNorm (rms=True) or LayerNorm over the last dimension with per-unit weights `keep`
    (1 for old units, the mask value m for new ones) in the statistics, and the output's new
    units multiplied by m.

    At m = 0 the old units' output is exactly the small model's norm of the old units (new
    inputs are zero there anyway) and new outputs are 0; at m = 1 it is the plain norm."""
    keep = keep.to(x.dtype)
    count = keep.sum()
    gain = weight + 1.0 if zero_centered else weight
    if rms:
        ms = (x * x * keep).sum(-1, keepdim=True) / count
        y = x * torch.rsqrt(ms + eps) * gain
    else:
        mean = (x * keep).sum(-1, keepdim=True) / count
        centred = x - mean
        var = (centred * centred * keep).sum(-1, keepdim=True) / count
        y = centred * torch.rsqrt(var + eps) * gain
        if bias is not None:
            y = y + bias
    return y * keep
