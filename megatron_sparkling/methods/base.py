"""The interface every growth method implements, and the streaming `Grower` that applies one.

A growth method decides (1) the plan: which source unit each grown unit copies, or none
(`make_plan`), and (2) the values: how each stored tensor of the source model becomes the grown
tensor, for the weights (fp32 main params included) and for each optimizer state
(`grow_tensor`). Methods are pure tensor code: no files, no torch.distributed, one tensor at a
time, so a converter can stream a checkpoint of any size and an in-memory hook can grow a live
model the same way. `Grower.grow_objects` grows modules' `_extra_state` ShardedObjects
(Transformer Engine's FP8 metadata; None with the local spec).
"""
from __future__ import annotations

import copy
import inspect
from typing import Optional

import torch

from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.core.layout import Axis
from megatron_sparkling.core.plan import GrowthPlan, UnitMap
from megatron_sparkling.core.spec import GrowthSpec, ParallelLayout, validate

# State kinds passed as `kind` (inferred from an optimizer key's prefix when not given) are the
# names in core/layout.py's STATE_KINDS table:
#     "param"       model weights and the optimizer's fp32 main params (the same values)
#     "exp_avg"     Adam first moment            "exp_avg_sq"  Adam second moment
#     "momentum"    Muon / SGD momentum buffer
STATE_KINDS = layout_lib.KIND_NAMES


class GrowthMethod:
    """Base class: subclasses set `name`, `preserves_function` and implement the two hooks."""

    name: str = ""
    preserves_function: bool = False   # declared: logits equal before/after at integer factors

    def validate(self, spec: GrowthSpec) -> None:
        """Refuse (GrowthSpecError, one line) a growth this method cannot do."""

    def make_plan(self, spec: GrowthSpec) -> GrowthPlan:
        return GrowthPlan.twins(spec)

    def grow_tensor(self, key: str, tensor: torch.Tensor, kind: str,
                    layout: layout_lib.TensorLayout, plan: GrowthPlan) -> torch.Tensor:
        raise NotImplementedError


REGISTRY: dict[str, type] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str, **options) -> GrowthMethod:
    if name not in REGISTRY:
        raise ValueError(f"unknown growth method {name!r}; choose one of {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"growth method {name!r} has no option {', '.join(unknown)}; its "
                         f"options: {', '.join(accepted) or 'none'}")
    return cls(**options)


def copied_new_state(method: str, depth_new_state: str = "reset") -> Optional[str]:
    """Why new elements of this growth start from copied optimizer moments (None: from zero),
    which per-element bias correction (counted from a fresh Adam) cannot apply to."""
    if getattr(REGISTRY.get(method), "state_rule", "reset_new") in ("copy", "staged"):
        return f"--method {method} copies optimizer state into new elements"
    if depth_new_state == "copy":
        return "--depth-new-state copy gives new layers their source layer's state"
    return None


def parse_method_options(items, flag: str = "--method-option") -> dict:
    """{name: value} of NAME=VALUE items (numbers and true/false cast); ValueError naming
    `flag` for an item without '='."""
    options = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} {item!r}: write NAME=VALUE")
        options[name.replace("-", "_")] = _option_value(value)
    return options


def _option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


class Grower:
    """One growth: a method, its plan, and the tensor-by-tensor transform."""

    def __init__(self, spec: GrowthSpec, method: Optional[GrowthMethod] = None,
                 parallel: Optional[ParallelLayout] = None):
        """Validates the growth once, before any tensor is touched: the spec (and the target
        parallel layout, if given), then the method's own constraints."""
        validate(spec, parallel)
        self.spec = spec
        self.method = method or get_method(spec.method, **spec.options)
        self.method.validate(spec)
        self.plan = self.method.make_plan(spec)

    def layout(self, key: str) -> layout_lib.TensorLayout:
        return layout_lib.resolve(layout_lib.split_state_key(key)[1], self.spec.source.swiglu)

    def grow(self, key: str, tensor: torch.Tensor, kind: Optional[str] = None) -> torch.Tensor:
        """The grown version of one stored tensor (model key, optionally optimizer-prefixed);
        `kind` defaults to the one the key's optimizer prefix names ("param" for model keys)."""
        inferred = layout_lib.state_kind(key)
        kind = kind or inferred
        if kind not in STATE_KINDS:
            raise ValueError(f"unknown state kind {kind!r}; one of {STATE_KINDS}")
        if layout_lib.split_state_key(key)[0] and kind != inferred:
            raise ValueError(f"{key}: the key holds {inferred!r} state, not {kind!r}")
        return self.method.grow_tensor(key, tensor, kind, self.layout(key), self.plan)

    def grow_objects(self, key: str, objects: dict) -> dict:
        """The grown model's ShardedObjects of one `_extra_state` key (one object per layer
        and expert: Transformer Engine's FP8 metadata; None with the local spec).

        `objects` maps unique keys (`<key>/shard_<offset>_<shape>`, as `ShardedObject.unique_key`
        and `live.state.gather_global` give them) to their data, for every shard of `key`. Returns
        the grown model's unique keys and data: each object dimension (layer, expert) follows
        its plan unit map; a new unit's object is a deep copy of its source's (TE: the twin's
        FP8 metadata); a unit with no source (fresh: zero, random) copies unit 0 of that axis,
        since TE's grouped-linear load merges every gemm's FP8 state and refuses a None beside
        gemm 0's (its scales then adapt from a real history, as a copied unit's do)."""
        axes = layout_lib.object_axes(key, self.spec.source.swiglu)
        by_offset, shape = {}, None
        for unique, data in objects.items():
            okey, offset, shape = layout_lib.split_object_key(unique)
            if okey != key or len(offset) != len(axes):
                raise ValueError(f"{unique!r} is not a shard of {key!r} with axes {axes}")
            by_offset[offset] = data
        maps = [self.plan.units.get(a) if a is not Axis.ONE else None for a in axes]
        maps = [m if m is not None and m.old == n else UnitMap.identity(n)
                for m, n in zip(maps, shape)]
        new_shape = tuple(m.new for m in maps)
        out = {}
        for index in torch.cartesian_prod(*[torch.arange(m.new) for m in maps]).view(
                -1, len(maps)).tolist():
            source = tuple(max(int(m.source[i]), 0) for m, i in zip(maps, index))
            data = copy.deepcopy(by_offset.get(source))
            out[layout_lib.object_unique_key(key, tuple(index), new_shape)] = data
        return out

    def record(self) -> dict:
        """The growth record stored with a grown checkpoint (plain tensors and numbers)."""
        import dataclasses

        return {
            "method": self.method.name,
            "seed": self.spec.seed,
            "options": dict(self.spec.options),
            "source": dataclasses.asdict(self.spec.source),
            "target": dataclasses.asdict(self.spec.target),
            "depth": dataclasses.asdict(self.spec.depth),
            "plan": self.plan.state_dict(),
        }
