"""A torch norm for megatron-core's local layer spec that works with sequence parallelism.

The local spec's `WrappedTorchNorm` asserts `not config.sequence_parallel`, yet megatron-core
requires sequence parallelism for MoE with TP > 1. Apex's FusedLayerNorm (what Megatron-LM uses
where apex is installed) only needs its weight tagged `sequence_parallel`, so that
`finalize_model_grads` all-reduces the norm's gradient over the TP group; this norm does the same.
Parameter names and shapes are those of torch.nn.RMSNorm / LayerNorm, so checkpoints are unchanged.
"""
from __future__ import annotations

import copy
import dataclasses

import torch


class SequenceParallelTorchNorm:
    """Factory with WrappedTorchNorm's signature; returns torch.nn.RMSNorm or LayerNorm."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not supported by the "
                             "local spec; use RMSNorm or LayerNorm")
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm


def replace_torch_norm(spec):
    """A copy of a layer or block spec with every WrappedTorchNorm replaced."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def walk(node):
        if node is WrappedTorchNorm:
            return SequenceParallelTorchNorm
        if isinstance(node, ModuleSpec):
            node = copy.copy(node)
            node.module = walk(node.module)
            node.submodules = walk(node.submodules)
            return node
        if isinstance(node, list):
            return [walk(n) for n in node]
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            changes = {f.name: walk(getattr(node, f.name)) for f in dataclasses.fields(node)
                       if f.init}
            return dataclasses.replace(node, **changes)
        return node

    return walk(spec)
