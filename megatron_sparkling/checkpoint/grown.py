"""The grown model's global tensors, read from a source checkpoint and grown one at a time.

Shared by the two ways a checkpoint grows: `megatron-sparkling expand` (checkpoint/convert.py
streams them into a new torch_dist checkpoint) and the load hook (hook.py fills a live model and
optimizer with them, no files written). Both therefore grow every tensor identically: stacked
keys (`decoder.layers.<name>`, shape (L, ...)) layer by layer under their per-layer keys, model
weights as kind "param", optimizer state in model space by kind.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.checkpoint.paths import CheckpointError


def make_grower(spec, model_keys, method_instance=None, parallel=None):
    """A Grower for `spec`, refusing (CheckpointError, one line) an unknown method or option and
    any model key the layout table does not know, before a tensor is read."""
    from megatron_sparkling.methods.base import Grower
    from megatron_sparkling.core.spec import GrowthSpecError

    try:
        grower = Grower(spec, method_instance, parallel)
    except GrowthSpecError:
        raise
    except ValueError as e:  # unknown method or option
        raise CheckpointError(str(e)) from None
    if getattr(grower.method, "needs_runtime_mask", False):
        raise CheckpointError(
            f"--method {grower.method.name} preserves the function only through a mask ramped at "
            "run time, which a relaunched run does not install; grow the checkpoint with "
            "sparkling, copy, hypercloning or staged (function-preserving), or use "
            f"{grower.method.name} in process (Pretrainer.grow_model + masked_growth.MaskRamp)")
    for key in model_keys:
        if not layout_lib.is_extra_state(key):
            try:
                grower.layout(key)
            except layout_lib.UnknownTensorError as e:
                raise CheckpointError(f"{e}; it cannot be grown") from None
    return grower


class GrownTensors:
    """`read(key, layer)`: one grown global tensor (or one layer of a stacked one) of the source
    checkpoint `src`; `key` is a model key or `optimizer.state.<kind>.<model key>`. With no
    grower the tensors are returned as stored (a plain format conversion)."""

    def __init__(self, src, grower=None, optimizer=None):
        self.src = src
        self.grower = grower
        self.optimizer = optimizer   # the source's model-space optimizer state (or None)

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        prefix, model_key = layout_lib.split_state_key(key)
        if not prefix:
            kind, tensor = "param", self.src.read_model(key, layer)
        else:
            kind = layout_lib.state_kind(key)
            if self.optimizer is not None and kind in self.optimizer.kinds:
                tensor = self.optimizer.read(model_key, kind, layer)
            elif kind == "param":  # no distributed optimizer, fp32 params: the weights
                tensor = self.src.read_model(model_key, layer).float()
            else:
                raise CheckpointError(f"the checkpoint has no {kind} state for {model_key}")
        if self.grower is not None:
            grow_key = key if layer is None else layout_lib.layer_key(key, layer)
            tensor = self.grower.grow(grow_key, tensor, kind)
        return tensor

    def layer_count(self, key: str) -> int:
        return self.src.model_tensors[layout_lib.split_state_key(key)[1]].shape[0]

    def whole(self, key: str) -> torch.Tensor:
        """The whole grown global tensor; stacked keys grown layer by layer (as `expand`
        streams them) unless the layer count itself grows."""
        grows_depth = self.grower is not None and (
            layout_lib.Axis.LAYER in self.grower.spec.grown_axes())
        if layout_lib.is_stacked(key) and not grows_depth:
            return torch.stack([self.read(key, i) for i in range(self.layer_count(key))])
        return self.read(key)
