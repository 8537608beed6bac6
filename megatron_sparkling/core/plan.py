"""Where every unit of the grown model comes from: per-axis unit maps and their element maps.

A `UnitMap` describes one axis growing from `old` to `new` units: for every unit of the grown
axis, which source unit it copies (`source`, -1 for a fresh unit with no twin) and whether it is
new (`is_new`). Old units keep their place, except inside packed layouts: a grown model's heads
are ordered group by group, so old heads sit at the start of each group.

A `GrowthPlan` holds the unit maps of a growth (hidden, FFNs, experts, heads, query groups,
layers) and turns them into ELEMENT maps for any tensor dimension through the layout table:
GLU halves ([gate; up]) map each half with the FFN map, fused QKV rows map q rows with the head
map and k/v rows with the group map, attention-output columns map with the head map. Everything a
growth method does, and the growth record that travels with a checkpoint (which elements are
new, who is whose twin), derives from these maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from megatron_sparkling.core.layout import Axis, Dim, Packing, TensorLayout
from megatron_sparkling.core.sizes import SIZES

if TYPE_CHECKING:  # annotations only: spec.py builds on this module
    from megatron_sparkling.core.spec import DepthOptions, GrowthSpec, ModelShape


@dataclass(frozen=True)
class UnitMap:
    old: int
    new: int
    source: torch.Tensor   # (new,) long: the source unit each grown unit copies, -1 if fresh
    is_new: torch.Tensor   # (new,) bool

    @classmethod
    def identity(cls, n: int) -> "UnitMap":
        return cls(n, n, torch.arange(n), torch.zeros(n, dtype=torch.bool))

    @classmethod
    def append(cls, old: int, new: int, twins: Optional[torch.Tensor] = None) -> "UnitMap":
        """Old units first, then `new - old` units copying `twins` (or fresh, -1)."""
        extra = new - old
        if twins is None:
            twins = torch.full((extra,), -1, dtype=torch.long)
        assert twins.numel() == extra
        source = torch.cat([torch.arange(old), twins.long()])
        return cls(old, new, source, torch.arange(new) >= old)

    @property
    def grown(self) -> bool:
        return self.new != self.old

    def copies(self) -> torch.Tensor:
        """(old,) how many grown units carry each source unit (itself included)."""
        valid = self.source[self.source >= 0]
        return torch.bincount(valid, minlength=self.old)

    def state_dict(self) -> dict:
        return {"old": self.old, "new": self.new, "source": self.source.clone(),
                "is_new": self.is_new.clone()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "UnitMap":
        return cls(int(d["old"]), int(d["new"]), d["source"].long(), d["is_new"].bool())


def balanced_twins(old: int, extra: int, generator: torch.Generator) -> torch.Tensor:
    """Twins for `extra` new units: a random order of the old units without replacement, cycled,
    so copy counts differ by at most one (equal at integer growth factors)."""
    rounds = [torch.randperm(old, generator=generator) for _ in range((extra + old - 1) // old)]
    return torch.cat(rounds)[:extra] if rounds else torch.empty(0, dtype=torch.long)


def head_map(src: ModelShape, tgt: ModelShape, group_map: UnitMap, slot_map: UnitMap) -> UnitMap:
    """Heads of the grown model, group-major: head (g, s) copies head
    (group_map.source[g], slot_map.source[s]); it is new if its group or its slot is new."""
    qpg_src = src.num_attention_heads // src.num_query_groups
    qpg_tgt = tgt.num_attention_heads // tgt.num_query_groups
    assert group_map.new * qpg_tgt == tgt.num_attention_heads and slot_map.new == qpg_tgt
    g_src = group_map.source.repeat_interleave(qpg_tgt)
    s_src = slot_map.source.repeat(group_map.new)
    fresh = (g_src < 0) | (s_src < 0)
    source = torch.where(fresh, torch.full_like(g_src, -1), g_src * qpg_src + s_src)
    is_new = group_map.is_new.repeat_interleave(qpg_tgt) | slot_map.is_new.repeat(group_map.new)
    return UnitMap(src.num_attention_heads, tgt.num_attention_heads, source, is_new)


class GrowthPlan:
    """Unit maps for every axis of a growth, and their element maps for any tensor dimension."""

    # The axes mapped by plain unit maps, in the order twins() draws them (spec.SIZES' draw).
    AXES = tuple(s.axis for s in sorted((s for s in SIZES if s.draw is not None),
                                        key=lambda s: s.draw))

    def __init__(self, spec: GrowthSpec, units: dict, group_map: UnitMap, slot_map: UnitMap):
        """`units`: Axis -> UnitMap for the plain axes; `group_map` over query groups and
        `slot_map` over the q heads inside one group (heads per group)."""
        self.spec = spec
        self.units = dict(units)
        self.group_map = group_map
        self.slot_map = slot_map
        self.head_map = head_map(spec.source, spec.target, group_map, slot_map)

    @classmethod
    def twins(cls, spec: GrowthSpec, generator: Optional[torch.Generator] = None,
              fresh_axes=()) -> "GrowthPlan":
        """The default plan: every grown width axis appends units that copy balanced random
        twins (fresh, -1, for axes listed in `fresh_axes`); the layer axis follows the spec's
        depth options (operators/depth.py: stack on top by default)."""
        g = generator or torch.Generator().manual_seed(spec.seed)
        src, tgt = spec.source, spec.target
        units = {}
        for axis in cls.AXES:
            a, b = src.axis_size(axis), tgt.axis_size(axis)
            if a is None or b is None or a == b:
                units[axis] = UnitMap.identity(a or 0)
            elif axis is Axis.LAYER:
                units[axis] = plan_layer_map(spec, fresh=axis in fresh_axes)
            else:
                twins = None if axis in fresh_axes else balanced_twins(a, b - a, g)
                units[axis] = UnitMap.append(a, b, twins)

        def heads_like(a, b, axis):
            if a == b:
                return UnitMap.identity(a)
            return UnitMap.append(a, b, None if axis in fresh_axes else balanced_twins(a, b - a, g))

        qpg_a = src.num_attention_heads // src.num_query_groups
        qpg_b = tgt.num_attention_heads // tgt.num_query_groups
        group_map = heads_like(src.num_query_groups, tgt.num_query_groups, Axis.QKV)
        slot_map = heads_like(qpg_a, qpg_b, Axis.HEADS)
        return cls(spec, units, group_map, slot_map)

    # ------------------------------------------------------------------ element maps
    def element_map(self, dim: Dim) -> UnitMap:
        """The unit map of one tensor dimension, at element granularity."""
        src, tgt = self.spec.source, self.spec.target
        hn = src.kv_channels
        if dim.packing is Packing.GLU:
            u = self.units[dim.axis]
            return _concat([u, _shift(u, u.old)])
        if dim.axis is Axis.QKV:
            return self._qkv_rows(hn)
        if dim.axis is Axis.HEADS:
            return _expand(self.head_map, hn)
        if dim.axis in self.units:
            return self.units[dim.axis]
        size = src.axis_size(dim.axis)
        assert size == tgt.axis_size(dim.axis), dim
        return UnitMap.identity(size)

    def _qkv_rows(self, hn: int) -> UnitMap:
        src, tgt = self.spec.source, self.spec.target
        qpg_s = src.num_attention_heads // src.num_query_groups
        qpg_t = tgt.num_attention_heads // tgt.num_query_groups
        rows_s = (qpg_s + 2) * hn  # rows of one source group
        sources, new = [], []
        for g in range(tgt.num_query_groups):
            gsrc, gnew = int(self.group_map.source[g]), bool(self.group_map.is_new[g])
            for s in range(qpg_t):
                ssrc = int(self.slot_map.source[s])
                fresh = gsrc < 0 or ssrc < 0
                base = gsrc * rows_s + ssrc * hn
                sources.append(torch.full((hn,), -1) if fresh else torch.arange(base, base + hn))
                new.append(torch.full((hn,), gnew or bool(self.slot_map.is_new[s])))
            for kv in (qpg_s, qpg_s + 1):  # k then v of the source group
                base = gsrc * rows_s + kv * hn
                sources.append(torch.full((hn,), -1) if gsrc < 0 else torch.arange(base, base + hn))
                new.append(torch.full((hn,), gnew))
        old = src.axis_size(Axis.QKV)
        return UnitMap(old, tgt.axis_size(Axis.QKV), torch.cat(sources).long(), torch.cat(new))

    def tensor_maps(self, layout: TensorLayout) -> list:
        """One element UnitMap per dimension of a stored tensor (stacked layer axis included)."""
        return [self.element_map(d) for d in layout.dims]

    def new_mask(self, layout: TensorLayout) -> Optional[torch.Tensor]:
        """Bool tensor of the grown tensor's shape: True where an element is new (any of its
        coordinates is a new unit); None when nothing in the tensor is new."""
        maps = self.tensor_maps(layout)
        if not any(m.is_new.any() for m in maps):
            return None
        mask = None
        for i, m in enumerate(maps):
            shape = [1] * len(maps)
            shape[i] = m.new
            v = m.is_new.view(shape)
            mask = v if mask is None else (mask | v)
        return mask.expand([m.new for m in maps]).clone()

    # ------------------------------------------------------------------ record
    def state_dict(self) -> dict:
        return {
            "units": {a.value: m.state_dict() for a, m in self.units.items()},
            "groups": self.group_map.state_dict(),
            "slots": self.slot_map.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, spec: GrowthSpec, d: dict) -> "GrowthPlan":
        units = {Axis(a): UnitMap.from_state_dict(m) for a, m in d["units"].items()}
        return cls(spec, units, UnitMap.from_state_dict(d["groups"]),
                   UnitMap.from_state_dict(d["slots"]))


def _shift(u: UnitMap, offset: int) -> UnitMap:
    return UnitMap(u.old, u.new, torch.where(u.source >= 0, u.source + offset, u.source),
                   u.is_new)


def _concat(maps) -> UnitMap:
    return UnitMap(sum(m.old for m in maps), sum(m.new for m in maps),
                   torch.cat([m.source for m in maps]), torch.cat([m.is_new for m in maps]))


def _expand(u: UnitMap, width: int) -> UnitMap:
    """Each unit spans `width` consecutive elements."""
    offs = torch.arange(width)
    source = torch.where((u.source >= 0).repeat_interleave(width),
                         (u.source.clamp(min=0) * width).repeat_interleave(width) + offs.repeat(u.new),
                         torch.full((u.new * width,), -1))
    return UnitMap(u.old * width, u.new * width, source, u.is_new.repeat_interleave(width))


# ---------------------------------------------------------------------------- layer maps
# Depth growth's layer maps (see operators/depth.py for what new layers hold).
DEPTH_PLACEMENTS = ("stack", "alternate", "interpolate")

def _map_from_sources(source: list, old: int) -> UnitMap:
    """Old = the first target layer taking each source layer; fresh (-1) layers are new."""
    seen, is_new = set(), []
    for s in source:
        is_new.append(s < 0 or s in seen)
        if s >= 0:
            seen.add(s)
    return UnitMap(old, len(source), torch.tensor(source, dtype=torch.long),
                   torch.tensor(is_new, dtype=torch.bool))


def stack_map(old: int, new: int, insert_at: Optional[int] = None) -> UnitMap:
    """Repeat the k = new - old layers just below `insert_at` (default: on top) at `insert_at`."""
    p = old if insert_at is None else insert_at
    k = new - old
    block = [(p - k + j) % old for j in range(k)] if old else [-1] * k
    source = list(range(p)) + block + list(range(p, old))
    is_new = [False] * p + [True] * k + [False] * (old - p)
    return UnitMap(old, new, torch.tensor(source, dtype=torch.long),
                   torch.tensor(is_new, dtype=torch.bool))


def alternate_map(old: int, new: int) -> UnitMap:
    """Layer i -> f*i .. f*i + f-1 (f = new / old, an integer)."""
    f = new // old
    return _map_from_sources([i // f for i in range(new)], old)


def interpolate_map(old: int, new: int) -> UnitMap:
    """Apollo: target layer i takes source layer int(i / (new / old)) (exact integer floor)."""
    return _map_from_sources([i * old // new for i in range(new)], old)


def layer_map(placement: str, old: int, new: int, insert_at: Optional[int] = None,
              fresh: bool = False) -> UnitMap:
    """The layer UnitMap of a placement; `fresh` makes every new layer fresh (source -1)."""
    if old == 0:
        return stack_map(0, new)     # nothing to place around: every layer is fresh
    if placement == "stack":
        m = stack_map(old, new, insert_at)
    elif placement == "alternate":
        m = alternate_map(old, new)
    elif placement == "interpolate":
        m = interpolate_map(old, new)
    else:
        raise ValueError(f"unknown layer placement {placement!r}; one of {DEPTH_PLACEMENTS}")
    if fresh:
        m = UnitMap(m.old, m.new, torch.where(m.is_new, torch.full_like(m.source, -1), m.source),
                    m.is_new)
    return m


def placement_of(options: DepthOptions) -> str:
    if options.method in DEPTH_PLACEMENTS:
        return options.method
    return options.placement or "stack"


def plan_layer_map(spec: GrowthSpec, fresh: bool = False) -> UnitMap:
    """The layer map of a growth spec (what `GrowthPlan.twins` puts on Axis.LAYER)."""
    opts = spec.depth
    old, new = spec.source.num_layers, spec.target.num_layers
    if old == new:
        return UnitMap.identity(old)
    return layer_map(placement_of(opts), old, new, opts.insert_at,
                     fresh=fresh or opts.method == "random" or old == 0)


def grown_moe_pattern(source: ModelShape, lmap: UnitMap) -> list:
    """The --moe-layer-freq list the grown model needs so every copy keeps its twin's type
    (fresh layers take the type of the layer below them, or MoE at the bottom)."""
    out = []
    for i, s in enumerate(lmap.source.tolist()):
        if s >= 0:
            out.append(int(source.is_moe_layer(s)))
        else:
            out.append(out[-1] if out else int(bool(source.num_experts)))
    return out
