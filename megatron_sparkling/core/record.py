"""The `sparkling` entry of a grown checkpoint's common state, read in one place.

The converter (`megatron-sparkling expand`) writes
    common["sparkling"] = {"source": {path, format, iteration, optimizer_format},
                           "converted_at": ..., "growth": Grower.record(),
                           "rewarmup": {"iters": W, "peak_ratio": R, "bias_correction": B,
                                        "start_iteration": t_e}}
("growth" and "rewarmup" only when something grew). Older writers and in-memory callers may
store Grower.record() itself; both are read here. `plan_of` turns a record back into its plan.
"""
from __future__ import annotations

from typing import Optional

from megatron_sparkling.core.plan import GrowthPlan
from megatron_sparkling.core.spec import DepthOptions, GrowthSpec, ModelShape

RECORD_KEY = "sparkling"
REWARMUP_SETTINGS = ("iters", "peak_ratio", "bias_correction")   # what `expand` may store
BIAS_CORRECTIONS = ("global", "per-element")   # new elements' Adam bias correction


def growth_record(common: dict) -> Optional[dict]:
    """Grower.record() of the growth that made this checkpoint, or None."""
    entry = (common or {}).get(RECORD_KEY)
    if not entry:
        return None
    if "plan" in entry:  # the record itself
        return entry
    return entry.get("growth")


def rewarmup_settings(common: dict) -> dict:
    """The re-warmup the converter was asked for (REWARMUP_SETTINGS' keys; empty if none)."""
    entry = (common or {}).get(RECORD_KEY) or {}
    settings = entry.get("rewarmup") or {}
    return {k: v for k, v in settings.items() if k in REWARMUP_SETTINGS and v is not None}


class RecordError(ValueError):
    """A growth record that is not a Grower.record()."""


def plan_of(record: dict) -> GrowthPlan:
    """The GrowthPlan (and through `.spec` the GrowthSpec, depth included) of a growth record."""
    try:
        spec = GrowthSpec(ModelShape(**record["source"]), ModelShape(**record["target"]),
                          record.get("method", "sparkling"), record.get("seed", 0),
                          dict(record.get("options", {})), DepthOptions(**record.get("depth", {})))
        return GrowthPlan.from_state_dict(spec, record["plan"])
    except (KeyError, TypeError) as e:
        raise RecordError(f"malformed growth record ({e!r}): expected Grower.record()'s keys "
                          "method, seed, options, source, target, depth, plan; re-run the "
                          "conversion with this megatron_sparkling") from None
