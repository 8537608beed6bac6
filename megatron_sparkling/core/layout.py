"""The one table of megatron-core's tensor layouts: which axis of which tensor is what.

Every other module asks this table; nothing else parses parameter names. Keys are the global
(unsharded) keys megatron-core's `sharded_state_dict()` and torch_dist checkpoints use, e.g.
    decoder.layers.mlp.experts.experts.linear_fc1.weight     (L, E, 2f, h)   stacked layers
    decoder.layers.3.mlp.linear_fc1.weight                    (2F, h)         per-layer key
Homogeneous layers are stored with the layer index as a leading axis ("stacked"); mixed stacks
(e.g. dense and MoE layers via --moe-layer-freq) are stored per layer, `decoder.layers.{i}.`.
Optimizer state in model space carries the model key behind a prefix
(`optimizer.state.exp_avg.<model key>`); `split_state_key` separates the two. Each tensor
dimension is a `Dim`: an `Axis` (what it counts), a `Role` (how it behaves when that axis
grows) and a `Packing`.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Optional


class Axis(str, enum.Enum):
    LAYER = "layer"
    EXPERT = "expert"
    HIDDEN = "hidden"              # residual stream, --hidden-size
    EXPERT_FFN = "expert_ffn"      # --moe-ffn-hidden-size
    SHARED_FFN = "shared_ffn"      # --moe-shared-expert-intermediate-size
    DENSE_FFN = "dense_ffn"        # --ffn-hidden-size (dense layers)
    QKV = "qkv"                    # fused QKV rows: (heads + 2 groups) x head_dim
    HEADS = "heads"                # attention output columns: heads x head_dim
    HEAD_DIM = "head_dim"          # --kv-channels (q/k layernorm)
    VOCAB = "vocab"                # padded vocabulary
    POSITION = "position"          # learned absolute positions
    ONE = "one"                    # a size-1 dimension (shared-expert gate)


class Role(str, enum.Enum):
    """How a dimension behaves when its axis grows:
    - OUT: output rows of a linear (fan-out when the axis grows: new rows);
    - IN: input columns of a linear (fan-in: new columns, and a rescale to keep the output's
      scale);
    - GAIN: a norm's per-unit scale;
    - UNIT: an index over whole units (layers, experts, vocabulary rows, positions)."""
    OUT = "out"
    IN = "in"
    GAIN = "gain"
    UNIT = "unit"


class Packing(str, enum.Enum):
    """The two packed layouts on disk:
    - GLU: SwiGLU fc1 rows are [gate; up], two halves of the FFN size each (whatever the TP
      size);
    - QKV: fused QKV rows are grouped per query group, [q_1 .. q_{np/ng}, k, v] x ng, each
      head_dim rows."""
    NONE = "none"
    GLU = "glu"
    QKV = "qkv"


@dataclass(frozen=True)
class Dim:
    axis: Axis
    role: Role
    packing: Packing = Packing.NONE

    def __repr__(self):
        extra = f"/{self.packing.value}" if self.packing is not Packing.NONE else ""
        return f"{self.axis.value}:{self.role.value}{extra}"


class Kind(str, enum.Enum):
    LINEAR_WEIGHT = "linear_weight"
    LINEAR_BIAS = "linear_bias"
    NORM_WEIGHT = "norm_weight"
    NORM_BIAS = "norm_bias"
    EMBEDDING = "embedding"
    ROUTER = "router"
    BUFFER = "buffer"
    EXTRA_STATE = "extra_state"   # Transformer Engine's per-module state (a ShardedObject)


H_OUT = Dim(Axis.HIDDEN, Role.OUT)
H_IN = Dim(Axis.HIDDEN, Role.IN)
H_GAIN = Dim(Axis.HIDDEN, Role.GAIN)
EXPERT_UNIT = Dim(Axis.EXPERT, Role.UNIT)


@dataclass(frozen=True)
class Entry:
    """A layout rule: a key pattern (relative to `decoder.layers.` for layer tensors) and the
    dims of ONE layer's tensor (the stacked layer axis, when present, is added in front)."""
    pattern: str
    kind: Kind
    dims: tuple
    in_layer: bool = True
    feeds_output: bool = False    # the final norm: its output feeds only the output layer


def _glu(axis: Axis) -> Dim:
    return Dim(axis, Role.OUT, Packing.GLU)


# Layer tensors (pattern relative to "decoder.layers." or "decoder.layers.{i}.").
# `glu` below marks fc1 rows; a model without --swiglu stores plain rows: see resolve().
_LAYER_ENTRIES = [
    Entry(r"self_attention\.linear_qkv\.weight", Kind.LINEAR_WEIGHT,
          (Dim(Axis.QKV, Role.OUT, Packing.QKV), H_IN)),
    Entry(r"self_attention\.linear_qkv\.bias", Kind.LINEAR_BIAS,
          (Dim(Axis.QKV, Role.OUT, Packing.QKV),)),
    Entry(r"(self_attention\.linear_qkv\.layer_norm_weight|input_layernorm\.weight)",
          Kind.NORM_WEIGHT, (H_GAIN,)),
    Entry(r"(self_attention\.linear_qkv\.layer_norm_bias|input_layernorm\.bias)",
          Kind.NORM_BIAS, (H_GAIN,)),
    Entry(r"self_attention\.linear_proj\.weight", Kind.LINEAR_WEIGHT,
          (H_OUT, Dim(Axis.HEADS, Role.IN))),
    Entry(r"self_attention\.linear_proj\.bias", Kind.LINEAR_BIAS, (H_OUT,)),
    Entry(r"self_attention\.(q|k)_layernorm\.weight", Kind.NORM_WEIGHT,
          (Dim(Axis.HEAD_DIM, Role.GAIN),)),
    Entry(r"self_attention\.(q|k)_layernorm\.bias", Kind.NORM_BIAS,
          (Dim(Axis.HEAD_DIM, Role.GAIN),)),
    Entry(r"(mlp\.linear_fc1\.layer_norm_weight|pre_mlp_layernorm\.weight)",
          Kind.NORM_WEIGHT, (H_GAIN,)),
    Entry(r"(mlp\.linear_fc1\.layer_norm_bias|pre_mlp_layernorm\.bias)",
          Kind.NORM_BIAS, (H_GAIN,)),
    # dense MLP
    Entry(r"mlp\.linear_fc1\.weight", Kind.LINEAR_WEIGHT, (_glu(Axis.DENSE_FFN), H_IN)),
    Entry(r"mlp\.linear_fc1\.bias", Kind.LINEAR_BIAS, (_glu(Axis.DENSE_FFN),)),
    Entry(r"mlp\.linear_fc2\.weight", Kind.LINEAR_WEIGHT, (H_OUT, Dim(Axis.DENSE_FFN, Role.IN))),
    Entry(r"mlp\.linear_fc2\.bias", Kind.LINEAR_BIAS, (H_OUT,)),
    # MoE router
    Entry(r"mlp\.router\.weight", Kind.ROUTER, (EXPERT_UNIT, H_IN)),
    Entry(r"mlp\.router\.bias", Kind.ROUTER, (EXPERT_UNIT,)),
    Entry(r"mlp\.router\.expert_bias", Kind.BUFFER, (EXPERT_UNIT,)),
    # routed experts (SequentialMLP and TEGroupedMLP store the same keys)
    Entry(r"mlp\.experts\.experts\.linear_fc1\.weight", Kind.LINEAR_WEIGHT,
          (EXPERT_UNIT, _glu(Axis.EXPERT_FFN), H_IN)),
    Entry(r"mlp\.experts\.experts\.linear_fc1\.bias", Kind.LINEAR_BIAS,
          (EXPERT_UNIT, _glu(Axis.EXPERT_FFN))),
    Entry(r"mlp\.experts\.experts\.linear_fc2\.weight", Kind.LINEAR_WEIGHT,
          (EXPERT_UNIT, H_OUT, Dim(Axis.EXPERT_FFN, Role.IN))),
    Entry(r"mlp\.experts\.experts\.linear_fc2\.bias", Kind.LINEAR_BIAS, (EXPERT_UNIT, H_OUT)),
    # shared expert
    Entry(r"mlp\.shared_experts\.linear_fc1\.weight", Kind.LINEAR_WEIGHT,
          (_glu(Axis.SHARED_FFN), H_IN)),
    Entry(r"mlp\.shared_experts\.linear_fc2\.weight", Kind.LINEAR_WEIGHT,
          (H_OUT, Dim(Axis.SHARED_FFN, Role.IN))),
    Entry(r"mlp\.shared_experts\.gate_weight", Kind.LINEAR_WEIGHT,
          (Dim(Axis.ONE, Role.OUT), H_IN)),
]

_MODEL_ENTRIES = [
    Entry(r"embedding\.word_embeddings\.weight", Kind.EMBEDDING,
          (Dim(Axis.VOCAB, Role.UNIT), H_OUT), in_layer=False),
    Entry(r"embedding\.position_embeddings\.weight", Kind.EMBEDDING,
          (Dim(Axis.POSITION, Role.UNIT), H_OUT), in_layer=False),
    Entry(r"decoder\.final_layernorm\.weight", Kind.NORM_WEIGHT, (H_GAIN,), in_layer=False,
          feeds_output=True),
    Entry(r"decoder\.final_layernorm\.bias", Kind.NORM_BIAS, (H_GAIN,), in_layer=False,
          feeds_output=True),
    Entry(r"output_layer\.weight", Kind.LINEAR_WEIGHT,
          (Dim(Axis.VOCAB, Role.UNIT), H_IN), in_layer=False),
    Entry(r"output_layer\.bias", Kind.LINEAR_BIAS, (Dim(Axis.VOCAB, Role.UNIT),),
          in_layer=False),
]

_LAYER_KEY = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?(.+)$")
_EXTRA_STATE = re.compile(r"\._extra_state(/.*)?$")


@dataclass(frozen=True)
class StateKind:
    """One kind of per-parameter optimizer state, as megatron-core 0.16.1 stores it."""
    name: str          # the growth methods' `kind` argument
    prefixes: tuple    # model-space key prefixes (`<prefix><model key>`); expand writes the first
    state_key: str     # its key in torch's per-param state and the distributed optimizer's buffers
    moment: bool       # grown by the optimizer-state rules (operators/optimizer.py); else a weight
    required: bool     # expand writes it for every param with optimizer state (Adam's; missing in
                       # the source is an error), else only where the source carries it
    float16_prefix: Optional[str] = None   # its prefix for Float16OptimizerWithFloat16Params

    def prefix_for(self, args) -> str:
        """The prefix a run with `args` asks this state under when it loads: megatron-core's
        Float16OptimizerWithFloat16Params (--bf16/--fp16 without --use-distributed-optimizer)
        names its main params `fp32_param.`; every other optimizer the first prefix."""
        half = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
        if self.float16_prefix and half and not getattr(args, "use_distributed_optimizer", False):
            return self.float16_prefix
        return self.prefixes[0]


# THE table of optimizer-state kinds: prefix parsing, the growth methods' kinds, the moment rules,
# the readers and what expand writes all derive from it. A new optimizer's state is one entry.
STATE_KINDS = (
    # the fp32 main param: `param.` (fully_reshardable), `fp32_param.` (fp16/bf16 without the
    # distributed optimizer, fully_sharded_model_space)
    StateKind("param", ("optimizer.state.param.", "optimizer.state.fp32_param."), "param",
              moment=False, required=True, float16_prefix="optimizer.state.fp32_param."),
    StateKind("exp_avg", ("optimizer.state.exp_avg.",), "exp_avg", moment=True, required=True),
    StateKind("exp_avg_sq", ("optimizer.state.exp_avg_sq.",), "exp_avg_sq", moment=True,
              required=True),
    # Muon (and SGD) momentum; Muon keeps it only for the matrices it steps (Adam the rest)
    StateKind("momentum", ("optimizer.state.momentum_buffer.",), "momentum_buffer", moment=True,
              required=False),
)
KIND_NAMES = tuple(k.name for k in STATE_KINDS)
STATE_KIND = {k.name: k for k in STATE_KINDS}
# prefix -> kind name, for parsing stored keys
_PREFIX_KINDS = {prefix: k.name for k in STATE_KINDS for prefix in k.prefixes}
OPTIMIZER_PREFIXES = tuple(_PREFIX_KINDS)
_CHAINED = re.compile(r"^chained_(\d+)\.")


class UnknownTensorError(KeyError):
    """A checkpoint key this table does not know: growing it blind could corrupt the model."""

    def __str__(self):
        return (f"no layout known for checkpoint key {self.args[0]!r}; megatron_sparkling handles "
                "megatron-core GPT/MoE tensors (see megatron_sparkling/core/layout.py)")


@dataclass(frozen=True)
class TensorLayout:
    """What each dimension of one stored tensor is."""
    key: str                  # model key (optimizer prefix removed)
    kind: Kind
    dims: tuple               # one Dim per tensor dimension, stacked layer axis included
    layer: Optional[int]      # the layer of a per-layer key ("decoder.layers.3....")
    stacked: bool             # leading axis is the layer index
    feeds_output: bool = False  # a norm whose output feeds only the output layer (final norm)

    @property
    def axes(self) -> tuple:
        return tuple(d.axis for d in self.dims)

    def dim_of(self, axis: Axis) -> Optional[int]:
        for i, d in enumerate(self.dims):
            if d.axis is axis:
                return i
        return None


def split_state_key(key: str) -> tuple[str, str]:
    """('optimizer.state.exp_avg.', model key) for optimizer state; ('', key) for model keys.

    A `chained_N.` prefix (ChainedOptimizer without avoid-prefix) is kept in the returned prefix.
    """
    chained = ""
    m = _CHAINED.match(key)
    if m:
        chained, key = key[:m.end()], key[m.end():]
    for prefix in OPTIMIZER_PREFIXES:
        if key.startswith(prefix):
            return chained + prefix, key[len(prefix):]
    return chained, key


def is_extra_state(key: str) -> bool:
    return bool(_EXTRA_STATE.search(key))


def resolve(key: str, swiglu: bool = True) -> TensorLayout:
    """The layout of a model key (no optimizer prefix). `swiglu` says whether fc1 rows are GLU
    packed (the stored args' --swiglu). Raises UnknownTensorError for a key it does not know."""
    m = _LAYER_KEY.match(key)
    if m:
        layer = int(m.group(1)) if m.group(1) is not None else None
        entries, rest = _LAYER_ENTRIES, m.group(2)
    else:
        layer, entries, rest = None, _MODEL_ENTRIES, key
    for entry in entries:
        if re.fullmatch(entry.pattern, rest):
            dims = tuple(Dim(d.axis, d.role, Packing.NONE)
                         if d.packing is Packing.GLU and not swiglu else d for d in entry.dims)
            stacked = entry.in_layer and layer is None
            if stacked:
                dims = (Dim(Axis.LAYER, Role.UNIT),) + dims
            return TensorLayout(key, entry.kind, dims, layer, stacked, entry.feeds_output)
    raise UnknownTensorError(key)


# One tensor, two names: the local spec saves its norms under Transformer Engine's fused names
# (`input_layernorm.` as `self_attention.linear_qkv.layer_norm_`, `pre_mlp_layernorm.` as
# `mlp.linear_fc1.layer_norm_`), but TE's MoE layers keep a separate pre-MLP norm (TENorm) and
# save `pre_mlp_layernorm.`. A model built with the other spec asks for the other name.
SPEC_SPELLINGS = (("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
                  ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."))


def spelled_like(key: str, stored) -> str:
    """`key` (optimizer prefix kept) under the name `stored` (checkpoint keys) gives the same
    tensor: its other spec's spelling (SPEC_SPELLINGS) when only that one is stored, else
    `key` itself."""
    if key in stored:
        return key
    prefix, model_key = split_state_key(key)
    m = _LAYER_KEY.match(model_key)
    if not m:
        return key
    head, rest = model_key[:m.start(2)], m.group(2)
    for a, b in SPEC_SPELLINGS:
        for mine, other in ((a, b), (b, a)):
            if rest.startswith(mine) and not is_extra_state(rest):
                candidate = prefix + head + other + rest[len(mine):]
                if candidate in stored:
                    return candidate
    return key


def layer_of_key(key: str) -> Optional[int]:
    m = _LAYER_KEY.match(split_state_key(key)[1])
    return int(m.group(1)) if m and m.group(1) is not None else None


def with_layer(key: str, index: int) -> str:
    """The same tensor of another layer: `decoder.layers.3.x` -> `decoder.layers.{index}.x`
    (optimizer prefix kept). Only per-layer keys have a layer index to change."""
    prefix, model_key = split_state_key(key)
    m = _LAYER_KEY.match(model_key)
    if not m or m.group(1) is None:
        raise ValueError(f"{key!r} is not a per-layer key (decoder.layers.<i>.<name>)")
    return f"{prefix}decoder.layers.{index}.{m.group(2)}"


def state_kind(key: str) -> str:
    """The growth state kind of a stored key: the one its optimizer prefix names (STATE_KINDS),
    "param" for model weights."""
    prefix = split_state_key(key)[0]
    prefix = prefix[_CHAINED.match(prefix).end():] if _CHAINED.match(prefix) else prefix
    return _PREFIX_KINDS.get(prefix, "param")


def split_object_key(unique_key: str) -> tuple[str, tuple, tuple]:
    """(key, global offset, global shape) of a ShardedObject's unique key
    (`<key>/shard_<offset>_<shape>`, dot-separated numbers)."""
    key, _, shard = unique_key.rpartition("/shard_")
    if not key:
        raise ValueError(f"{unique_key!r} is not a ShardedObject unique key (<key>/shard_<o>_<s>)")
    offset, shape = shard.split("_")
    return key, tuple(int(x) for x in offset.split(".")), tuple(int(x) for x in shape.split("."))


def object_unique_key(key: str, offset: tuple, shape: tuple) -> str:
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}"


def object_axes(key: str, swiglu: bool = True) -> tuple:
    """The unit axes of a module's `_extra_state` ShardedObject, one per object dimension.

    Megatron shards a module's extra state like the module's weights' prepended axes: the layer
    axis of a stacked key, then the expert axis of an expert module (SequentialMLP and
    TEGroupedMLP alike); a per-layer non-expert module has the single dimension (1,), no axis.
    """
    owner = _EXTRA_STATE.sub("", key)
    try:
        lay = resolve(owner + ".weight", swiglu)
        axes = tuple(d.axis for d in lay.dims if d.role is Role.UNIT
                     and d.axis in (Axis.LAYER, Axis.EXPERT))
    except UnknownTensorError:  # e.g. TE's core_attention: layer-stacked only
        m = _LAYER_KEY.match(owner)
        axes = (Axis.LAYER,) if m and m.group(1) is None else ()
    return axes or (Axis.ONE,)


def layer_key(key: str, layer: int) -> str:
    """The per-layer key of one layer of a stacked key, optimizer prefix kept:
    `decoder.layers.mlp.router.weight` -> `decoder.layers.3.mlp.router.weight`. The converter
    streams stacked tensors layer by layer under these keys (see checkpoint/expand.py)."""
    prefix, model_key = split_state_key(key)
    m = _LAYER_KEY.match(model_key)
    if not m or m.group(1) is not None:
        raise ValueError(f"{key!r} is not a stacked layer key (decoder.layers.<name>)")
    return f"{prefix}decoder.layers.{layer}.{m.group(2)}"


def is_stacked(key: str) -> bool:
    """True for a key whose tensor has the layer index as its leading axis."""
    try:
        return resolve(split_state_key(key)[1]).stacked
    except UnknownTensorError:
        return False
