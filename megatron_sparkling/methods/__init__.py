"""Growth methods, one small module each, all behind `base.GrowthMethod`, chosen by name.

Width methods: sparkling (default), copy-opt and drop-opt (its ablations), copy (Net2Net),
hypercloning, staged, msg (with live.mask_ramp.MaskRamp at run time), zero, random.
"""
from megatron_sparkling.methods.base import REGISTRY, GrowthMethod, Grower, get_method, register
from megatron_sparkling.methods import (  # noqa: F401  (registers the methods)
    baselines,
    net2net,
    hypercloning,
    msg,
    sparkling,
    staged,
)

__all__ = ["REGISTRY", "GrowthMethod", "Grower", "get_method", "register"]
