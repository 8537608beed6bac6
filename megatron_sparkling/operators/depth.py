"""Depth growth: which source layer every layer of the deeper model copies, and what new layers hold.

Layer maps are `UnitMap`s over the layer axis (`GrowthPlan.units[Axis.LAYER]`); the first target
layer taking a source layer is the old one, later copies are new:
- stack: the block of k = L' - L layers just below `insert_at` is repeated at `insert_at`
  (cyclically when k exceeds it). Default on top: L -> 2L appends a copy of the whole stack
  (staged training's "append"); L -> L+1 duplicates the top layer.
- alternate: layer i -> f*i .. f*i + f-1 at an integer factor f (staged training's doubling).
- interpolate (Apollo): target layer i takes source layer int(i / (L'/L)), any factor
  (3 -> 12: 0,0,0,0,1,1,1,1,2,2,2,2; the same as alternate at integer factors).
- identity (twins with zero residual-writing projections: `writes_residual`) and random (fresh
  layers, `fresh_layer_tensor`): placed like stack (or `DepthOptions.placement`).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.core.layout import Axis, Kind, Role
from megatron_sparkling.core.plan import UnitMap, plan_layer_map
from megatron_sparkling.core.spec import (
    DepthOptions,
    GrowthSpec,
    GrowthSpecError,
    ModelShape,
    validate,
)


# ---------------------------------------------------------------------------- new layers
def writes_residual(lay: layout_lib.TensorLayout) -> bool:
    """A layer's linear weight or bias whose output is the hidden (residual) axis: attention
    linear_proj, dense / expert / shared-expert fc2.

    The identity depth method zeroes these in new layers (copies of their twins), so every new
    layer is an exact identity. Why output projections and not staged training's norm gains:
    with zero RMSNorm gains a new layer's sublayers see an all-zero input, so its router scores
    every expert alike (top-k by ties) and its QKV, fc1 and router get no gradient until the
    gains move. With zero output projections (and their biases) the copied input side keeps
    working (real routing, real features) and the layer still adds nothing to the residual
    stream; the zero projections get gradient from the first step."""
    if lay.kind not in (Kind.LINEAR_WEIGHT, Kind.LINEAR_BIAS) or not (
            lay.stacked or lay.layer is not None):
        return False
    out = lay.dims[-1] if lay.kind is Kind.LINEAR_BIAS else lay.dims[-2]  # rows of y = W x
    return out.axis is Axis.HIDDEN and out.role is Role.OUT


def key_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded by the MODEL key, so a model weight and its fp32 main param (optimizer
    prefix) get the same fresh values."""
    model_key = layout_lib.split_state_key(key)[1]
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(model_key.encode()))


def fresh_layer_tensor(key: str, lay: layout_lib.TensorLayout, shape, init_std: float,
                       generator: torch.Generator, *, num_layers: int,
                       zero_centered_gamma: bool = False) -> torch.Tensor:
    """A fresh layer tensor as megatron-core initialises it: norm gains one (zero with
    zero-centred gamma), biases and buffers zero, router and input-side weights N(0, init_std^2),
    residual-writing projections N(0, (init_std / sqrt(2 num_layers))^2) (megatron-core's scaled
    output init; num_layers = the grown model's depth)."""
    if lay.kind is Kind.NORM_WEIGHT:
        return (torch.zeros if zero_centered_gamma else torch.ones)(shape)
    if lay.kind in (Kind.NORM_BIAS, Kind.BUFFER, Kind.LINEAR_BIAS):
        return torch.zeros(shape)
    if lay.kind in (Kind.LINEAR_WEIGHT, Kind.ROUTER):
        std = init_std / math.sqrt(2.0 * num_layers) if writes_residual(lay) else init_std
        return torch.randn(shape, generator=generator) * std
    raise ValueError(f"{key}: {lay.kind.value} is not a transformer-layer tensor; fresh layers "
                     "hold only layer tensors")


@dataclass(frozen=True)
class FreshInit:
    """What `fresh_layer_tensor` needs, from the grown run's args (--init-method-std, ...)."""
    init_std: float
    num_layers: int
    seed: int = 1234
    zero_centered_gamma: bool = False

    @classmethod
    def from_args(cls, args, seed: Optional[int] = None) -> "FreshInit":
        return cls(float(args.init_method_std), int(args.num_layers),
                   int(args.seed if seed is None else seed),
                   bool(getattr(args, "layernorm_zero_centered_gamma", False)))

    def __call__(self, key: str, lay: layout_lib.TensorLayout, shape) -> torch.Tensor:
        return fresh_layer_tensor(key, lay, shape, self.init_std, key_generator(self.seed, key),
                                  num_layers=self.num_layers,
                                  zero_centered_gamma=self.zero_centered_gamma)


# ---------------------------------------------------------------------------- keys
def source_key(target_key: str, lmap: UnitMap) -> Optional[str]:
    """The source key a target tensor grows from: the same key for stacked and non-layer
    tensors, the twin's key for per-layer keys, None for a fresh per-layer tensor."""
    layer = layout_lib.layer_of_key(target_key)
    if layer is None:
        return target_key
    src = int(lmap.source[layer])
    return None if src < 0 else layout_lib.with_layer(target_key, src)


def target_keys(source_keys, lmap: UnitMap, source: ModelShape, target: ModelShape) -> dict:
    """{target key: source key it grows from, or None for a fresh per-layer tensor} for a
    converter that streams without building the target model. A fresh per-layer layer takes its
    key names from a source layer of the same type (dense or MoE); optimizer prefixes are kept.
    A zero-layer source has no layer keys to derive from: list the target model's keys."""
    out, by_layer = {}, {}
    for key in source_keys:
        layer = layout_lib.layer_of_key(key)
        if layer is None:
            out[key] = key
        else:
            by_layer.setdefault(layer, []).append(key)
    for i, s in enumerate(lmap.source.tolist()):
        if s >= 0:
            out.update({layout_lib.with_layer(k, i): k for k in by_layer.get(s, [])})
            continue
        like = [j for j in by_layer if source.is_moe_layer(j) == target.is_moe_layer(i)]
        if by_layer and not like:
            kind = "MoE" if target.is_moe_layer(i) else "dense"
            raise GrowthSpecError(f"fresh layer {i} is {kind} but the source has no {kind} layer "
                                  "to take tensor names from; build the target model to list "
                                  "its keys")
        if like:
            out.update({layout_lib.with_layer(k, i): None for k in by_layer[like[0]]})
    return out


def _new_rows(lay: layout_lib.TensorLayout, lmap: UnitMap):
    """(new, fresh) bool vectors over the layer axis of a stacked tensor, or scalars for one
    per-layer tensor; None for a tensor outside the layers."""
    if lay.stacked:
        return lmap.is_new, lmap.source < 0
    if lay.layer is not None:
        return (lmap.is_new[lay.layer:lay.layer + 1], lmap.source[lay.layer:lay.layer + 1] < 0)
    return None


def finish_new_layers(target_key: str, tensor: torch.Tensor, kind: str,
                      lmap: UnitMap, options: DepthOptions, fresh: FreshInit,
                      swiglu: bool = True) -> torch.Tensor:
    """Apply the depth method to the NEW layers of an already grown tensor (target shape, copied
    along the layer map by any width method): fresh layers drawn by `fresh` (state zero), identity
    layers' residual projections zeroed, new layers' optimizer state reset unless copied.
    Old layers are untouched. This is the hook width methods call after their copy.

    Stacked (homogeneous) tensors carry the layer as a leading axis: the map indexes it directly;
    per-layer keys (`decoder.layers.{i}.`, mixed dense/MoE stacks) are renamed (`source_key`).
    Optimizer state of new layers is reset to zero (default) or copied from the twin
    (`DepthOptions.new_state`); fresh layers' state is zero."""
    lay = layout_lib.resolve(layout_lib.split_state_key(target_key)[1], swiglu)
    rows = _new_rows(lay, lmap)
    if rows is None or not bool(rows[0].any()):
        return tensor
    new, is_fresh = rows
    out = tensor.clone()
    view = out if lay.stacked else out.unsqueeze(0)
    if kind == "param":
        if options.method == "identity" and writes_residual(lay):
            view[new & ~is_fresh] = 0
        if bool(is_fresh.any()):
            shape = (int(is_fresh.sum()),) + tuple(view.shape[1:])
            drawn = fresh(layout_lib.split_state_key(target_key)[1], lay,
                          shape if lay.stacked else tuple(view.shape[1:]))
            view[is_fresh] = drawn.view(shape).to(view.dtype)
    else:
        reset = is_fresh if options.new_state == "copy" else new
        view[reset] = 0
    return out


def grow_layers(target_key: str, target_shape, sources: Mapping[str, torch.Tensor], kind: str,
                lmap: UnitMap, options: DepthOptions, fresh: FreshInit,
                swiglu: bool = True) -> torch.Tensor:
    """One tensor of the deeper model (width unchanged): copied along the layer map from
    `sources` (global source tensors by key), then `finish_new_layers`."""
    lay = layout_lib.resolve(layout_lib.split_state_key(target_key)[1], swiglu)
    skey = source_key(target_key, lmap)
    target_shape = tuple(target_shape)
    if lay.stacked:
        out = torch.zeros(target_shape)
        copied = lmap.source >= 0
        if bool(copied.any()):
            src = sources[skey]
            if tuple(src.shape[1:]) != target_shape[1:]:
                raise ValueError(f"{target_key}: source shape {tuple(src.shape)} differs from the "
                                 f"target's {target_shape} beyond the layer axis; depth growth "
                                 "keeps the width (grow width with a width method)")
            out = out.to(src.dtype)
            out[copied] = src.index_select(0, lmap.source[copied])
    elif skey is None:
        out = torch.zeros(target_shape)
    else:
        out = sources[skey].clone()
        if tuple(out.shape) != target_shape:
            raise ValueError(f"{target_key}: source {skey} has shape {tuple(out.shape)}, the "
                             f"target {target_shape}; depth growth keeps the width")
    return finish_new_layers(target_key, out, kind, lmap, options, fresh, swiglu)


@dataclass(frozen=True)
class LayerGrowth:
    """`make_tensor(key, shape, sources)` for a depth-only growth (training/growth.py): every
    tensor and optimizer state of the deeper model from the shallower one's global tensors."""
    lmap: UnitMap
    options: DepthOptions
    fresh: FreshInit
    swiglu: bool = True

    @classmethod
    def from_spec(cls, spec: GrowthSpec, fresh: FreshInit) -> "LayerGrowth":
        validate(spec)
        if spec.grown_axes() != [Axis.LAYER]:
            raise GrowthSpecError("a depth-only growth keeps every width; grow "
                                  f"{[a.value for a in spec.grown_axes() if a is not Axis.LAYER]} "
                                  "with a width method")
        return cls(plan_layer_map(spec), spec.depth, fresh, spec.source.swiglu)

    def __call__(self, key: str, shape, sources: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return grow_layers(key, shape, sources, layout_lib.state_kind(key), self.lmap,
                           self.options, self.fresh, self.swiglu)


def fresh_layer_rule(spec: GrowthSpec, fresh: FreshInit):
    """The `ElementwiseGrowth.fresh_layer_rule` of a depth growth: a width method that grows a
    whole stacked tensor fills its source-less layers as `finish_new_layers` draws them. The
    layer map is the spec's, made at the first call (the growth is validated by then)."""
    lmaps: list = []

    def rule(key, kind, lay, grown, dim, layers):
        assert dim == 0, "the layer axis leads a stacked tensor"
        if not lmaps:
            lmaps.append(plan_layer_map(spec))
        finished = finish_new_layers(key, grown, kind, lmaps[0], spec.depth, fresh,
                                     spec.source.swiglu)
        grown[layers] = finished[layers]
    return rule
