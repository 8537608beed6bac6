"""The interface every growth method implements, and the streaming `Grower` that applies one.

A growth method decides (1) the plan: which source unit each grown unit copies, or none
(`make_plan`), and (2) the values: how each stored tensor of the source model becomes the grown
tensor, for the weights (fp32 main params included) and for each optimizer state
(`grow_tensor`). Methods are pure tensor code: no files, no torch.distributed, one tensor at a
time, so a converter can stream a checkpoint of any size and an in-memory hook can grow a live
model the same way.

State kinds passed as `kind`:
    "param"       model weights and the optimizer's fp32 main params (the same values)
    "exp_avg"     Adam first moment            "exp_avg_sq"  Adam second moment
    "momentum"    Muon / SGD momentum buffer
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_sparkling import layout as layout_lib
from megatron_sparkling.plan import GrowthPlan
from megatron_sparkling.spec import GrowthSpec

STATE_KINDS = ("param", "exp_avg", "exp_avg_sq", "momentum")


class GrowthMethod:
    """Base class: subclasses set `name`, `preserves_function` and implement the two hooks."""

    name: str = ""
    preserves_function: bool = False   # declared: logits equal before/after at integer factors

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
    return REGISTRY[name](**options)


class Grower:
    """One growth: a method, its plan, and the tensor-by-tensor transform."""

    def __init__(self, spec: GrowthSpec, method: Optional[GrowthMethod] = None):
        self.spec = spec
        self.method = method or get_method(spec.method, **spec.options)
        self.plan = self.method.make_plan(spec)

    def layout(self, key: str) -> layout_lib.TensorLayout:
        return layout_lib.resolve(layout_lib.split_state_key(key)[1], self.spec.source.swiglu)

    def grow(self, key: str, tensor: torch.Tensor, kind: str = "param") -> torch.Tensor:
        """The grown version of one stored tensor (model key, optionally optimizer-prefixed)."""
        if kind not in STATE_KINDS:
            raise ValueError(f"unknown state kind {kind!r}; one of {STATE_KINDS}")
        return self.method.grow_tensor(key, tensor, kind, self.layout(key), self.plan)

    def new_mask(self, key: str) -> Optional[torch.Tensor]:
        """True where an element of the grown tensor is new (None if none is)."""
        return self.plan.new_mask(self.layout(key))

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
