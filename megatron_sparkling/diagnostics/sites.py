"""Which module of a live megatron-core GPTModel is which observation site.

Parameters are named by their checkpoint keys through the model's own sharded state dict, and a
key's layout (megatron_sparkling.core.layout) says what a linear is (QKV, attention output, dense /
routed-expert / shared-expert fc1 and fc2, router, output layer), which layer it is in and which
expert it belongs to. Norms all share one layout (a hidden-size gain), so which norm is which comes
from megatron-core's module structure: TransformerLayer.input_layernorm and .pre_mlp_layernorm,
SelfAttention.q_layernorm and .k_layernorm, TransformerBlock.final_layernorm. Transformer layers
are found by type (TransformerLayer, numbered by its global `layer_number`).

Needs every shard of the model in this process (1 rank: TP = PP = EP = CP = 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.core.layout import Axis, Kind
from megatron_sparkling.mcore.model import unwrap


@dataclass(frozen=True)
class Site:
    """One observed place. `name` is one of SITE_ORDER; layer and expert are global indices
    (None for model-level sites, and for a layer's figures pooled over all its experts)."""
    name: str
    layer: Optional[int] = None
    expert: Optional[int] = None

    def label(self) -> str:
        parts = [self.name]
        if self.layer is not None:
            parts.append(f"L{self.layer}")
        if self.expert is not None:
            parts.append(f"E{self.expert}")
        return ".".join(parts)

    def pooled(self) -> "Site":
        return Site(self.name, self.layer, None)


# The order rows are reported in, within a layer.
SITE_ORDER = ("layer", "input_norm", "qkv", "q_norm", "k_norm", "attn_proj",
              "pre_mlp_norm", "router", "fc1", "fc2", "expert_fc1", "expert_fc2", "shared_fc1",
              "shared_fc2", "final_norm", "output_layer")
NORM_SITES = ("input_norm", "q_norm", "k_norm", "pre_mlp_norm", "final_norm")
LINEAR_SITES = ("qkv", "attn_proj", "router", "fc1", "fc2", "expert_fc1", "expert_fc2",
                "shared_fc1", "shared_fc2", "output_layer")
EXPERT_SITES = ("expert_fc1", "expert_fc2")

_FFN_PREFIX = {Axis.DENSE_FFN: "", Axis.EXPERT_FFN: "expert_", Axis.SHARED_FFN: "shared_"}


def sort_key(site: Site):
    layer = -1 if site.layer is None else site.layer
    if site.name in ("final_norm", "output_layer"):
        layer = 1 << 30
    expert = -1 if site.expert is None else site.expert
    return (layer, SITE_ORDER.index(site.name), expert)


def linear_site_name(lay: layout_lib.TensorLayout) -> Optional[str]:
    """The site name of a linear from its weight's layout (None if the tensor is no linear)."""
    if lay.kind is Kind.ROUTER:
        return "router"
    if lay.kind is not Kind.LINEAR_WEIGHT:
        return None
    out, inp = lay.dims[-2].axis, lay.dims[-1].axis
    if out is Axis.QKV:
        return "qkv"
    if inp is Axis.HEADS:
        return "attn_proj"
    if out in _FFN_PREFIX and inp is Axis.HIDDEN:
        return _FFN_PREFIX[out] + "fc1"
    if inp in _FFN_PREFIX:
        return _FFN_PREFIX[inp] + "fc2"
    if out is Axis.VOCAB:
        return "output_layer"
    return None  # e.g. the shared-expert gate (a bare parameter, not a module)


@dataclass(frozen=True)
class ParamRef:
    """Where a live parameter sits in its checkpoint tensor."""
    key: str
    layout: layout_lib.TensorLayout
    offset: tuple        # global offset of this (local) parameter inside the global tensor

    def index_along(self, axis: Axis) -> Optional[int]:
        d = self.layout.dim_of(axis)
        return None if d is None else int(self.offset[d])

    @property
    def layer(self) -> Optional[int]:
        if self.layout.layer is not None:
            return self.layout.layer
        return self.index_along(Axis.LAYER) if self.layout.stacked else None


def bare_model(model):
    """The GPTModel of a model given as a chunk list (as Pretrainer.model) or one module."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    bare = unwrap(chunks)
    if len(bare) != 1:
        raise ValueError(f"diagnostics need one model chunk (no virtual pipelining); got "
                         f"{len(bare)}")
    return bare[0]


def require_whole_model(gpt) -> None:
    """Refuse a model split over ranks: figures need every shard in this process."""
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return
    sizes = {
        "tensor": mpu.get_tensor_model_parallel_world_size(),
        "pipeline": mpu.get_pipeline_model_parallel_world_size(),
        "expert": mpu.get_expert_model_parallel_world_size(),
        "context": mpu.get_context_parallel_world_size(),
    }
    split = {k: v for k, v in sizes.items() if v != 1}
    if split:
        raise ValueError(f"diagnostics need the whole model on one rank, but it is split "
                         f"({', '.join(f'{k}-parallel {v}' for k, v in split.items())}); run them "
                         "at 1 rank (megatron-sparkling verify loads checkpoints that way)")


def swiglu_of(gpt) -> bool:
    return bool(gpt.config.gated_linear_unit)


def param_refs(gpt) -> dict[int, ParamRef]:
    """id(parameter) -> its checkpoint key, layout and global offset, from sharded_state_dict()."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    swiglu = swiglu_of(gpt)
    refs: dict[int, ParamRef] = {}
    for item in nested_values(gpt.sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            first = next(v for v in nested_values(built) if isinstance(v, ShardedTensor))
            offset = first.global_offset
        elif isinstance(item, ShardedTensor):
            offset = item.global_offset
        else:
            continue
        if layout_lib.is_extra_state(item.key) or not isinstance(item.data, torch.nn.Parameter):
            continue
        refs[id(item.data)] = ParamRef(item.key, layout_lib.resolve(item.key, swiglu),
                                       tuple(offset))
    return refs


def _is_identity(module) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return module is None or isinstance(module, IdentityOp)


def norm_sites(gpt) -> dict[torch.nn.Module, Site]:
    """Norm modules by megatron-core's structure. A norm fused into the next linear (Transformer
    Engine's LayerNormLinear) is no module of its own and has no site."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    sites = {}
    for module in gpt.modules():
        if not isinstance(module, TransformerLayer):
            continue
        layer = module.layer_number - 1
        attention = getattr(module, "self_attention", None)
        for name, norm in (("input_norm", getattr(module, "input_layernorm", None)),
                           ("pre_mlp_norm", getattr(module, "pre_mlp_layernorm", None)),
                           ("q_norm", getattr(attention, "q_layernorm", None)),
                           ("k_norm", getattr(attention, "k_layernorm", None))):
            if not _is_identity(norm):
                sites[norm] = Site(name, layer)
    final = getattr(getattr(gpt, "decoder", None), "final_layernorm", None)
    if not _is_identity(final):
        sites[final] = Site("final_norm")
    return sites


def layer_sites(gpt) -> dict[torch.nn.Module, Site]:
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return {m: Site("layer", m.layer_number - 1) for m in gpt.modules()
            if isinstance(m, TransformerLayer)}


def linear_sites(gpt, refs: Optional[dict] = None) -> dict[torch.nn.Module, Site]:
    """Linear modules (and the router) by their weights' layouts. A module holding one expert
    (SequentialMLP's experts) gets that expert's index; a grouped module holding several
    experts gets expert None (its figures pool all of them)."""
    refs = param_refs(gpt) if refs is None else refs
    sites = {}
    for module in gpt.modules():
        own = [refs[id(p)] for p in module.parameters(recurse=False) if id(p) in refs]
        names = {linear_site_name(r.layout) for r in own} - {None}
        if not names:
            continue
        if len(names) > 1:
            raise ValueError(f"{type(module).__name__} holds tensors of several sites {names}; "
                             "extend megatron_sparkling/diagnostics/sites.py for it")
        name = names.pop()
        layers = {r.layer for r in own}
        experts = {r.index_along(Axis.EXPERT) for r in own} if name in EXPERT_SITES else {None}
        sites[module] = Site(name, layers.pop() if len(layers) == 1 else None,
                             experts.pop() if len(experts) == 1 else None)
    output_layer = getattr(gpt, "output_layer", None)
    if output_layer is not None and getattr(gpt, "post_process", True):
        sites[output_layer] = Site("output_layer")  # tied: its weight is the embedding's
    return sites
