"""Global (unsharded) tensors in and out of a live megatron-core model, without files.

A sharded state dict (`model.sharded_state_dict()`, `optimizer.sharded_state_dict(...)`) maps
each local tensor to a slice of a global tensor named by its checkpoint key. These two functions
do what dist_checkpointing's save and load do with that mapping, in memory:
- `gather_global`: the global tensors of a model whose shards are all in this process (1 rank);
- `fill_from_global`: a loadable state dict for any TP/EP/PP layout, each local shard sliced out
  of a global tensor given by a callable (so tensors can be produced one at a time).
ShardedTensorFactories (e.g. SwiGLU fc1 stored as [gate; up]) are built and merged exactly as
dist_checkpointing does.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def _preprocess(sharded_state_dict):
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    return load_preprocess(sharded_state_dict)


def gather_global(sharded_state_dict) -> tuple[dict, dict]:
    """(tensors, objects): global tensors by key, ShardedObject data by unique key.

    Every shard must be held by this process (a 1-rank model)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    sharded, _, _ = _preprocess(sharded_state_dict)
    tensors, objects = {}, {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            if item.key not in tensors:
                tensors[item.key] = torch.empty(item.global_shape, dtype=item.dtype)
            tensors[item.key][item.global_slice()] = item.data.detach().to("cpu")
        elif isinstance(item, ShardedObject):
            objects[item.unique_key] = item.data
    return tensors, objects


def global_shapes(sharded_state_dict) -> dict:
    """{key: global shape} of every ShardedTensor (factories built), without touching data."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sharded, _, _ = _preprocess(sharded_state_dict)
    return {item.key: tuple(item.global_shape) for item in nested_values(sharded)
            if isinstance(item, ShardedTensor)}


def fill_from_global(sharded_state_dict, tensor_of: Callable[[str], torch.Tensor],
                     object_of: Optional[Callable[[str], object]] = None):
    """A state dict to `load_state_dict` with, each shard taken from `tensor_of(key)`.

    `tensor_of` is called once per key (cached while its shards are cut), so a caller can grow
    or read one global tensor at a time. `object_of(unique_key)` supplies ShardedObjects; by
    default they keep the values already in the sharded state dict.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factory_merges,
    )

    sharded, nonpersistent, factories = _preprocess(sharded_state_dict)
    cache: dict[str, torch.Tensor] = {}

    def fetch(item):
        if isinstance(item, ShardedTensor):
            if item.key not in cache:
                cache.clear()  # keep one global tensor alive at a time
                cache[item.key] = tensor_of(item.key)
            full = cache[item.key]
            if tuple(full.shape) != tuple(item.global_shape):
                raise ValueError(f"{item.key}: global shape {tuple(full.shape)} does not match "
                                 f"the model's {tuple(item.global_shape)}")
            target = item.data if item.data is not None else torch.empty(
                item.local_shape, dtype=item.dtype)
            with torch.no_grad():
                target.copy_(full[item.global_slice()].to(target.dtype))
            return target
        if isinstance(item, ShardedObject):
            return object_of(item.unique_key) if object_of is not None else item.data
        return item

    dict_list_map_inplace(fetch, sharded)
    cache.clear()
    # Lists merge element-wise: an optimizer's param groups keep their hyper-parameters and get
    # their non-persistent `params` back.
    merge(sharded, nonpersistent)
    return apply_factory_merges(sharded, factories)


def model_global_tensors(model_chunks) -> dict:
    """Global tensors of a 1-rank model (DDP wrappers removed), by checkpoint key."""
    from megatron_sparkling.mcore.model import unwrap

    tensors = {}
    for chunk in unwrap(model_chunks):
        tensors.update(gather_global(chunk.sharded_state_dict())[0])
    return tensors


def load_model_global_tensors(model_chunks, tensors: dict, strict: bool = True) -> None:
    """Load global tensors (by checkpoint key) into a model of any parallel layout."""
    from megatron_sparkling.mcore.model import unwrap

    for chunk in unwrap(model_chunks):
        missing = [k for k in _sharded_keys(chunk.sharded_state_dict()) if k not in tensors]
        if missing and strict:
            raise KeyError(f"global tensors lack {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        state = fill_from_global(chunk.sharded_state_dict(), lambda k: tensors[k])
        chunk.load_state_dict(state, strict=strict)


def _sharded_keys(sharded_state_dict) -> set:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    keys = set()
    for item in nested_values(sharded_state_dict):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            keys.add(item.key)
    return keys
