"""The grown model's global tensors, read from a source checkpoint and grown one at a time.

The ONE read -> grow stream, shared by the two ways a checkpoint grows: `megatron-sparkling
expand` (checkpoint/expand.py writes what it yields into a new torch_dist checkpoint) and growth
on load (live/load_hook.py cuts a live model's shards out of it; no files written). Both grow
every tensor identically: stacked keys (`decoder.layers.<name>`, shape (L, ...)) layer by layer
under their per-layer keys, model weights as kind "param", optimizer state in model space by
kind; with depth growth every target layer comes from its source layer (`DepthStream`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sparkling.checkpoint.integrity import ValueChecks
from megatron_sparkling.checkpoint.paths import CheckpointError
from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.core.plan import UnitMap
from megatron_sparkling.core.spec import DepthOptions, GrowthSpecError
from megatron_sparkling.methods.base import Grower
from megatron_sparkling.operators import depth as depth_lib


def make_grower(spec, model_keys, method_instance=None, parallel=None) -> Grower:
    """A Grower for `spec` (which validates the growth), refusing (CheckpointError, one line) an
    unknown method or option and any model key the layout table does not know, before a tensor
    is read."""
    try:
        grower = Grower(spec, method_instance, parallel)
    except GrowthSpecError:
        raise
    except ValueError as e:  # unknown method or option
        raise CheckpointError(str(e)) from None
    for key in model_keys:
        if not layout_lib.is_extra_state(key):
            try:
                grower.layout(key)
            except layout_lib.UnknownTensorError as e:
                raise CheckpointError(f"{e}; it cannot be grown") from None
    return grower


@dataclass(frozen=True)
class DepthStream:
    """Where each layer of a deeper target comes from, and how new layers are finished."""
    layer_map: UnitMap
    options: DepthOptions
    fresh: depth_lib.FreshInit
    swiglu: bool
    sources: dict     # target model key -> source model key (None: a fresh per-layer tensor)
    shapes: dict      # target model key -> global shape (what a fresh layer is drawn at)


class GrownTensors:
    """`read(key, layer)`: one grown global tensor of the TARGET model (or one layer of a stacked
    one), made from the source checkpoint `src`; `key` is a model key or
    `optimizer.state.<kind>.<model key>`. With no grower the tensors are returned as stored (a
    plain format conversion). Every stored tensor passes integrity.ValueChecks as it is read
    (`checks=False` only measures what they cost: bench/convert.py)."""

    def __init__(self, src, grower: Optional[Grower] = None, optimizer=None,
                 depth: Optional[DepthStream] = None, checks: bool = True):
        self.src = src
        self.grower = grower
        self.optimizer = optimizer   # the source's model-space optimizer state (or None)
        self.depth = depth
        # the writer's stream reads each weight and then its main param (checkpoint/writer.py)
        paired = optimizer is not None and "param" in optimizer.kinds
        self.checks = ValueChecks(src, optimizer, paired) if checks else None
        if self.checks is not None:
            self.checks.step(optimizer)
        self._objects: dict[str, dict] = {}   # grown `_extra_state` objects, by key

    def stored(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """A source tensor (or one layer of it) as stored; optimizer state in model space. A key
        named as the other layer spec names it is read under the source's name."""
        prefix, model_key = layout_lib.split_state_key(key)
        model_key = layout_lib.spelled_like(model_key, self.src.model_tensors)
        if not prefix:
            return self._checked(model_key, None, layer, self.src.read_model(model_key, layer))
        kind = layout_lib.state_kind(key)
        if self.optimizer is not None and kind in self.optimizer.kinds:
            return self._checked(model_key, kind, layer,
                                 self.optimizer.read(model_key, kind, layer))
        if kind == "param":  # no distributed optimizer, fp32 params: the weights
            return self._checked(model_key, None, layer,
                                 self.src.read_model(model_key, layer)).float()
        raise CheckpointError(f"the checkpoint has no {kind} state for {model_key}")

    def finish(self) -> None:
        """After the last read: complete the checks (a weight whose main param was not read)."""
        if self.checks is not None:
            self.checks.finish()

    def _checked(self, key, kind, layer, tensor):
        return tensor if self.checks is None else self.checks.tensor(key, kind, layer, tensor)

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        prefix, model_key = layout_lib.split_state_key(key)
        kind = layout_lib.state_kind(key)
        grow_key = key if layer is None else layout_lib.layer_key(key, layer)
        source_key, source_layer = model_key, layer
        if self.depth is not None:
            source_key = self.depth.sources[model_key]
            if layer is not None:
                source_layer = int(self.depth.layer_map.source[layer])
                source_key = None if source_layer < 0 else source_key
        if source_key is None:  # a fresh layer: nothing to read, the depth method draws it
            shape = self.depth.shapes[model_key]
            tensor = torch.zeros(shape[1:] if layer is not None else shape, dtype=torch.float32)
        else:
            tensor = self.stored(prefix + source_key, source_layer)
            if self.grower is not None:
                tensor = self.grower.grow(grow_key, tensor, kind)
        if self.depth is not None:
            d = self.depth
            tensor = depth_lib.finish_new_layers(grow_key, tensor, kind, d.layer_map, d.options,
                                                 d.fresh, d.swiglu)
        return tensor

    def whole(self, key: str) -> torch.Tensor:
        """The whole grown global tensor; stacked keys grown layer by layer (as `expand`
        streams them) unless the layer count itself grows."""
        if layout_lib.is_stacked(key) and self.depth is None:
            model_key = layout_lib.split_state_key(key)[1]
            layers = self.src.model_tensors[layout_lib.spelled_like(
                model_key, self.src.model_tensors)].shape[0]
            return torch.stack([self.read(key, i) for i in range(layers)])
        return self.read(key)

    def object(self, unique_key: str, current=None):
        """The grown model's ShardedObject `unique_key`: an `_extra_state` object grown from the
        source's objects of its key (Grower.grow_objects: TE's FP8 metadata carried to new
        units); `current` (e.g. the live model's own) where the source holds none of that key."""
        key = unique_key.split("/shard_")[0]
        if not layout_lib.is_extra_state(key) or self.depth is not None:
            return current
        if key not in self._objects:
            shards = {u: self.src.read_object(u) for u in self.src.objects
                      if u.split("/shard_")[0] == key}
            self._objects[key] = (self.grower.grow_objects(key, shards)
                                  if shards and self.grower is not None else shards)
        return self._objects[key].get(unique_key, current)
