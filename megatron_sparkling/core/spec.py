"""What grows, by how much, how: model shapes and the growth spec, validated before any work.

`ModelShape` holds the sizes of a megatron-core GPT/MoE model, read from (and written back to)
Megatron-LM's args namespace. `GrowthSpec` pairs a source and a target shape with a method and a
seed; `validate()` refuses a target that cannot be (smaller, not divisible, ...) with a one-line
message naming the axis and the valid choices, before a single tensor is touched. Growable sizes
come from core/sizes.py.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megatron_sparkling.core.layout import Axis
from megatron_sparkling.core.plan import (
    DEPTH_PLACEMENTS,
    grown_moe_pattern,
    placement_of,
    plan_layer_map,
)
from megatron_sparkling.core.sizes import PARALLEL_NAMES, SIZES, WIDTH_FIELDS


class GrowthSpecError(ValueError):
    """A growth that cannot be done; the message names the axis and the valid choices."""


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    padded_vocab_size: int
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_router_topk: int = 2
    moe_layer_freq: object = 1
    swiglu: bool = True
    tied_embeddings: bool = True
    max_position_embeddings: int = 0
    learned_positions: bool = False
    zero_centered_gamma: bool = False   # --apply-layernorm-1p: norms store gain - 1

    @classmethod
    def from_args(cls, args) -> "ModelShape":
        groups = args.num_query_groups if getattr(args, "group_query_attention", False) else (
            args.num_attention_heads)
        kv = args.kv_channels or args.hidden_size // args.num_attention_heads
        freq = getattr(args, "moe_layer_freq", 1)
        return cls(
            num_layers=args.num_layers, hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads, num_query_groups=groups,
            kv_channels=kv, ffn_hidden_size=args.ffn_hidden_size,
            padded_vocab_size=getattr(args, "padded_vocab_size", 0) or 0,
            num_experts=args.num_experts or None,
            moe_ffn_hidden_size=getattr(args, "moe_ffn_hidden_size", None),
            moe_shared_expert_intermediate_size=getattr(
                args, "moe_shared_expert_intermediate_size", None),
            moe_router_topk=getattr(args, "moe_router_topk", 2),
            moe_layer_freq=list(freq) if isinstance(freq, (list, tuple)) else freq,
            swiglu=bool(getattr(args, "swiglu", False)),
            tied_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
            max_position_embeddings=getattr(args, "max_position_embeddings", 0) or 0,
            learned_positions=getattr(args, "position_embedding_type",
                                      "learned_absolute") == "learned_absolute",
            zero_centered_gamma=bool(getattr(args, "apply_layernorm_1p", False)
                                     or getattr(args, "layernorm_zero_centered_gamma", False)),
        )

    def replace(self, **changes) -> "ModelShape":
        return dataclasses.replace(self, **changes)

    def axis_size(self, axis: Axis) -> Optional[int]:
        """Size of an axis as stored (QKV and HEADS in rows/columns, not heads)."""
        hn = self.kv_channels
        return {
            Axis.LAYER: self.num_layers,
            Axis.EXPERT: self.num_experts,
            Axis.HIDDEN: self.hidden_size,
            Axis.EXPERT_FFN: self.moe_ffn_hidden_size,
            Axis.SHARED_FFN: self.moe_shared_expert_intermediate_size,
            Axis.DENSE_FFN: self.ffn_hidden_size,
            Axis.QKV: (self.num_attention_heads + 2 * self.num_query_groups) * hn,
            Axis.HEADS: self.num_attention_heads * hn,
            Axis.HEAD_DIM: hn,
            Axis.VOCAB: self.padded_vocab_size,
            Axis.POSITION: self.max_position_embeddings,
            Axis.ONE: 1,
        }[axis]

    def is_moe_layer(self, index: int) -> bool:
        if not self.num_experts:
            return False
        if isinstance(self.moe_layer_freq, int):
            return index % self.moe_layer_freq == 0
        return bool(self.moe_layer_freq[index])

    def apply_to_args(self, args):
        """A copy of Megatron-LM's args namespace with these sizes written in."""
        out = copy.copy(args)
        out.num_layers = self.num_layers
        out.hidden_size = self.hidden_size
        out.num_attention_heads = self.num_attention_heads
        out.kv_channels = self.kv_channels
        out.group_query_attention = self.num_query_groups != self.num_attention_heads or bool(
            getattr(args, "group_query_attention", False))
        out.num_query_groups = self.num_query_groups if out.group_query_attention else getattr(
            args, "num_query_groups", None)
        out.ffn_hidden_size = self.ffn_hidden_size
        out.num_experts = self.num_experts
        out.moe_ffn_hidden_size = self.moe_ffn_hidden_size
        out.moe_shared_expert_intermediate_size = self.moe_shared_expert_intermediate_size
        out.moe_router_topk = self.moe_router_topk
        out.moe_layer_freq = self.moe_layer_freq
        return out


@dataclass(frozen=True)
class ParallelLayout:
    """The target run's model-parallel sizes (the data-parallel size never constrains growth)."""
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    expert_tensor: Optional[int] = None

    @property
    def expert_tp(self) -> int:
        return self.expert_tensor or self.tensor


DEPTH_METHODS = ("stack", "alternate", "interpolate", "identity", "random")
NEW_LAYER_STATES = ("reset", "copy")


@dataclass(frozen=True)
class DepthOptions:
    """How the layer axis grows (see operators/depth.py).

    method: stack | alternate | interpolate (new layers copy their twin), identity (copies whose
        residual output projections are zero: an exact identity), random (fresh layers).
    insert_at: where `stack` (and identity/random placed like it) inserts the new block
        (default: on top, after the last layer).
    placement: the layer order of identity/random layers (default stack).
    new_state: optimizer state of new layers: reset to zero (default) or copied from the twin.
    """
    method: str = "stack"
    insert_at: Optional[int] = None
    placement: Optional[str] = None
    new_state: str = "reset"


@dataclass(frozen=True)
class GrowthSpec:
    source: ModelShape
    target: ModelShape
    method: str = "sparkling"
    seed: int = 1234
    options: dict = field(default_factory=dict)
    depth: DepthOptions = field(default_factory=DepthOptions)

    def grown_axes(self) -> list[Axis]:
        """Axes whose stored size changes."""
        return [a for a in Axis if self.source.axis_size(a) != self.target.axis_size(a)
                and self.source.axis_size(a) is not None]

    def factor(self, axis: Axis) -> float:
        return self.target.axis_size(axis) / self.source.axis_size(axis)


def _multiples(base: int, start: int, count: int = 3) -> str:
    first = ((start + base - 1) // base) * base
    return ", ".join(str(first + i * base) for i in range(count))


def validate(spec: GrowthSpec, parallel: Optional[ParallelLayout] = None) -> None:
    """Refuse a growth that cannot be, before any work; one line naming the axis and the fix."""
    src, tgt = spec.source, spec.target
    for name, label in WIDTH_FIELDS.items():
        a, b = getattr(src, name), getattr(tgt, name)
        if a is None and b is not None:
            raise GrowthSpecError(f"{label}: the source model has none; growing one from nothing "
                                  "is not supported (keep it unset)")
        if a is not None and b is None:
            raise GrowthSpecError(f"{label}: the target must keep it (source has {a})")
        if a is not None and b < a:
            raise GrowthSpecError(f"{label}: target {b} is smaller than the source's {a}; "
                                  f"choose {a} or more (growth only widens)")
    if tgt.num_layers < src.num_layers:
        raise GrowthSpecError(f"number of layers (--num-layers): target {tgt.num_layers} is smaller than the "
                              f"source's {src.num_layers}; choose {src.num_layers} or more")
    if tgt.num_layers != src.num_layers:
        _validate_depth(spec)
    if tgt.kv_channels != src.kv_channels:
        raise GrowthSpecError(f"head dim (--kv-channels): must stay {src.kv_channels} "
                              f"(growth keeps head dim; got {tgt.kv_channels})")
    if tgt.num_attention_heads % tgt.num_query_groups:
        raise GrowthSpecError(
            f"attention heads: {tgt.num_attention_heads} heads cannot be split into "
            f"{tgt.num_query_groups} query groups; choose a multiple of {tgt.num_query_groups} "
            f"({_multiples(tgt.num_query_groups, tgt.num_attention_heads)})")
    if tgt.num_attention_heads // tgt.num_query_groups < (
            src.num_attention_heads // src.num_query_groups):
        raise GrowthSpecError(
            f"query groups: {tgt.num_query_groups} groups would leave fewer heads per group than "
            f"the source's {src.num_attention_heads // src.num_query_groups}; choose at most "
            f"{tgt.num_attention_heads * src.num_query_groups // src.num_attention_heads} groups")
    if tgt.num_experts and tgt.moe_router_topk > tgt.num_experts:
        raise GrowthSpecError(f"router top-k: {tgt.moe_router_topk} exceeds the "
                              f"{tgt.num_experts} experts; choose at most {tgt.num_experts}")
    if tgt.swiglu != src.swiglu or tgt.tied_embeddings != src.tied_embeddings:
        raise GrowthSpecError("activation (--swiglu) and embedding tying must stay as in the source")
    if tgt.padded_vocab_size != src.padded_vocab_size:
        raise GrowthSpecError(f"vocabulary: must stay {src.padded_vocab_size} (growth does not "
                              "change the tokenizer)")
    if parallel is not None:
        _validate_parallel(tgt, parallel)


def _validate_parallel(tgt: ModelShape, p: ParallelLayout) -> None:
    for size in SIZES:
        value = getattr(tgt, size.field)
        parts = getattr(p, size.divisor) if size.divisor else 1
        if value is not None and parts > 1 and value % parts:
            raise GrowthSpecError(
                f"{size.label}: {value} is not divisible by the {PARALLEL_NAMES[size.divisor]} "
                f"{parts}; choose a multiple of {parts} ({_multiples(parts, value)})")


def _validate_depth(spec: GrowthSpec) -> None:
    """Refuse a depth growth that cannot be, with one line naming the option and the fix."""
    opts, src, tgt = spec.depth, spec.source, spec.target
    old, new = src.num_layers, tgt.num_layers
    if opts.method not in DEPTH_METHODS:
        raise GrowthSpecError(f"depth method {opts.method!r} is unknown; choose one of "
                              f"{', '.join(DEPTH_METHODS)}")
    if opts.placement is not None and opts.placement not in DEPTH_PLACEMENTS:
        raise GrowthSpecError(f"depth placement {opts.placement!r} is unknown; choose one of "
                              f"{', '.join(DEPTH_PLACEMENTS)}")
    if opts.new_state not in NEW_LAYER_STATES:
        raise GrowthSpecError(f"new-layer optimizer state {opts.new_state!r} is unknown; choose "
                              f"one of {', '.join(NEW_LAYER_STATES)}")
    placement = placement_of(opts)
    if old == 0 and opts.method != "random":
        raise GrowthSpecError("depth growth from 0 layers: there is no layer to copy; use depth "
                              "method random")
    if opts.insert_at is not None and placement != "stack":
        raise GrowthSpecError(f"--insert-at only applies to the stack placement, not {placement}; "
                              "drop it or use depth method stack")
    if opts.insert_at is not None and not 0 <= opts.insert_at <= old:
        raise GrowthSpecError(f"--insert-at {opts.insert_at} is outside the source's layers; "
                              f"choose 0 .. {old}")
    if placement == "alternate" and old and new % old:
        raise GrowthSpecError(f"depth method alternate needs a whole growth factor: {old} -> "
                              f"{new} layers is not; choose {_whole_multiples(old, new)} layers "
                              "or use interpolate")
    lmap = plan_layer_map(spec)
    for i, s in enumerate(lmap.source.tolist()):
        if s >= 0 and src.is_moe_layer(s) != tgt.is_moe_layer(i):
            kinds = ("dense", "MoE")
            raise GrowthSpecError(
                f"layer {i} of the grown model is {kinds[tgt.is_moe_layer(i)]} (--moe-layer-freq) "
                f"but copies {kinds[src.is_moe_layer(s)]} layer {s}; give the target "
                f"--moe-layer-freq \"{grown_moe_pattern(src, lmap)}\"")


def _whole_multiples(old: int, new: int) -> str:
    first = -(-new // old) * old
    return ", ".join(str(first + i * old) for i in range(3))
