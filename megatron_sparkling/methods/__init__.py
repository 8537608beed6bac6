"""Growth methods, one small module each, all behind `base.GrowthMethod`, chosen by name."""
from megatron_sparkling.methods.base import REGISTRY, GrowthMethod, Grower, get_method, register

__all__ = ["REGISTRY", "GrowthMethod", "Grower", "get_method", "register"]
