"""Optimizer state of a torch_dist checkpoint, in MODEL SPACE, whatever format stored it.

Every reader here answers the same questions: which model keys have optimizer state, which
kinds (core/layout.py's STATE_KINDS: `param` = the fp32 main parameter, `exp_avg`, `exp_avg_sq`,
`momentum`), the step, the param groups' options, and `read(key, kind)`: one global tensor of
the model key's global shape, in fp32. The formats megatron-core 0.16.1 writes are listed on
`sharding_type`; keys may carry a `chained_N.` prefix (ChainedOptimizer without avoid-prefix).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch

from megatron_sparkling.checkpoint.dcp import DcpCheckpoint
from megatron_sparkling.checkpoint.paths import CheckpointError
from megatron_sparkling.core import layout as layout_lib

# the distributed optimizer's buckets (and the legacy per-rank files) hold Adam's state only:
# the required kinds of the table
KINDS = tuple(k.name for k in layout_lib.STATE_KINDS if k.required)
_MODEL_SPACE = re.compile(r"^(chained_\d+\.)?("
                          + "|".join(map(re.escape, layout_lib.OPTIMIZER_PREFIXES)) + r")(.+)$")
_BUCKET = re.compile(r"^(chained_\d+\.)?optimizer\.distributed\.")
_GROUPS_OBJECT = re.compile(r"^(chained_\d+\.)?optimizer\.distributed\.dp_group_idx_\d+\.optimizer/")


def state_key(kind: str) -> str:
    """A kind's key in torch's per-param state and in the distributed optimizer's buffers."""
    return layout_lib.STATE_KIND[kind].state_key


RESAVE = "re-save it with --dist-ckpt-optim-fully-reshardable (megatron-core >= 0.14)"


class OptimizerState:
    """Model-space view of a checkpoint's optimizer state (see the module docstring)."""

    format: str = ""
    kinds: tuple = KINDS

    def __init__(self, param_groups: list, step):
        self.param_groups = param_groups
        self.step = step

    @property
    def keys(self) -> list:
        raise NotImplementedError

    def kinds_of(self, key: str) -> tuple:
        """The kinds stored for one model key (Muon keeps momentum for some params only)."""
        return self.kinds

    def read(self, key: str, kind: str, layer: Optional[int] = None) -> torch.Tensor:
        """One global fp32 state tensor of a model key, or its slice of one layer."""
        raise NotImplementedError

    def files_of(self, key: str, kind: str) -> list[str]:
        """The data files holding one kind of a model key's state ([] when unknown)."""
        return []


class ModelSpaceState(OptimizerState):
    """`optimizer.state.<kind>.<model key>` tensors (no distributed optimizer, fully_reshardable,
    fully_sharded_model_space)."""

    def __init__(self, dcp: DcpCheckpoint, fmt: str, param_groups: list, step,
                 model_shapes: dict):
        super().__init__(param_groups, step)
        self.format = fmt
        self._dcp = dcp
        self._where: dict[tuple, str] = {}
        for ckpt_key, spec in dcp.tensors.items():
            m = _MODEL_SPACE.match(ckpt_key)
            if not m:
                continue
            kind = layout_lib.state_kind(ckpt_key)
            model_key = m.group(3)
            if model_key in model_shapes and spec.shape != model_shapes[model_key]:
                raise CheckpointError(
                    f"{ckpt_key} is stored with shape {spec.shape}, not its parameter's "
                    f"{model_shapes[model_key]} (an older flattened {fmt} layout); {RESAVE}")
            self._where[(model_key, kind)] = ckpt_key
        self._keys = sorted({k for k, _ in self._where})
        self.kinds = tuple(k for k in layout_lib.KIND_NAMES
                           if any(kind == k for _, kind in self._where))

    @property
    def keys(self) -> list:
        return self._keys

    def kinds_of(self, key: str) -> tuple:
        return tuple(k for k in self.kinds if (key, k) in self._where)

    def read(self, key: str, kind: str, layer: Optional[int] = None) -> torch.Tensor:
        where = self._where.get((key, kind))
        if where is None:
            raise CheckpointError(f"the checkpoint has no {kind} optimizer state for {key}")
        return self._dcp.read_layer(where, layer).float()

    def files_of(self, key: str, kind: str) -> list[str]:
        where = self._where.get((key, kind))
        return self._dcp.files_of(where) if where else []


class BucketSpaceState(OptimizerState):
    """`dp_reshardable`: flat per-bucket tensors, mapped through rebuilt DDP bucket layouts."""

    format = "dp_reshardable"

    def __init__(self, dcp: DcpCheckpoint, layouts: list, param_groups: list, step,
                 model_shapes: dict):
        super().__init__(param_groups, step)
        self._dcp = dcp
        self._shapes = model_shapes
        self._sources: dict[str, list] = {}   # model key -> [(flat key stem, start, end, pieces)]
        self._check_and_index(layouts)

    def _check_and_index(self, layouts) -> None:
        checked = set()
        for lay in layouts:
            for opt in lay.optimizers:
                if not opt.distributed:
                    raise CheckpointError("the checkpoint says dp_reshardable but its stored args "
                                          "build no distributed optimizer; fix the args")
                group = f"{opt.prefix}optimizer.distributed.dp_group_idx_{opt.dp_group_idx}"
                if group not in checked:
                    self._check_bucket_sizes(group, opt)
                    checked.add(group)
                for gbuf_idx, buffer in enumerate(opt.buffers):
                    for name, (bucket, start, end) in buffer.params.items():
                        stem = (f"{group}.gbuf_idx_{gbuf_idx}.dtype_{buffer.dtype_key}"
                                f".bucket_idx_{bucket}")
                        for key, pieces in main_pieces_by_key(lay.tensors[name]).items():
                            self._sources.setdefault(key, []).append((stem, start, end, pieces))
        for key, sources in self._sources.items():
            covered = sum(_numel(p.size) for _, _, _, pieces in sources for p in pieces)
            if covered != _numel(self._shapes[key]):
                raise CheckpointError(f"the rebuilt bucket layout covers {covered} of "
                                      f"{_numel(self._shapes[key])} elements of {key}; {RESAVE}")

    def _check_bucket_sizes(self, group: str, opt) -> None:
        rebuilt = [[u for _, u in buffer.buckets] for buffer in opt.buffers]
        obj = next((k for k in self._dcp.objects
                    if k.startswith(group + ".per_bucket_numel_unpadded/")), None)
        if obj is not None:
            stored = [list(sizes) for per_gbuf in self._dcp.read_object(obj)
                      for sizes in per_gbuf.values()]
            if stored != rebuilt:
                raise CheckpointError(
                    f"the DDP buckets rebuilt from the stored args ({rebuilt}) differ from the "
                    f"checkpoint's ({stored}) for {group}; the args do not describe the run "
                    f"that saved it: {RESAVE}")
        for gbuf_idx, buffer in enumerate(opt.buffers):
            for bucket, (_, unpadded) in enumerate(buffer.buckets):
                for kind in KINDS:
                    key = (f"{group}.gbuf_idx_{gbuf_idx}.dtype_{buffer.dtype_key}"
                           f".bucket_idx_{bucket}.{state_key(kind)}")
                    spec = self._dcp.tensors.get(key)
                    if spec is None:
                        raise CheckpointError(f"the checkpoint lacks {key} that its rebuilt "
                                              f"bucket layout needs; {RESAVE}")
                    if spec.shape != (unpadded,):
                        raise CheckpointError(f"{key} holds {spec.shape[0]} elements but the "
                                              f"rebuilt bucket has {unpadded}; {RESAVE}")

    @property
    def keys(self) -> list:
        return sorted(self._sources)

    def read(self, key: str, kind: str, layer: Optional[int] = None) -> torch.Tensor:
        if key not in self._sources:
            raise CheckpointError(f"the checkpoint has no {kind} optimizer state for {key}")
        shape = self._shapes[key] if layer is None else self._shapes[key][1:]
        reads = []
        for stem, start, end, pieces in self._sources[key]:
            placed = [(where, p) for p in pieces
                      if (where := in_layer(p.global_slice, layer)) is not None]
            if placed:
                reads.append((f"{stem}.{state_key(kind)}", start, end, placed))
        if len(reads) == 1 and len(reads[0][3]) == 1:   # one piece holding it all: no copy
            name, start, end, placed = reads[0]
            flat = self._dcp.read(name, (start,), (end - start,))
            whole = placed[0][1].view_of(flat)
            if (tuple(whole.shape) == tuple(shape) and whole.is_contiguous()
                    and whole.numel() == flat.numel()):
                return whole
            reads = [(flat, None, None, placed)]   # read already
        out = torch.empty(shape, dtype=torch.float32)
        for name, start, end, placed in reads:
            flat = name if start is None else self._dcp.read(name, (start,), (end - start,))
            for where, piece in placed:
                out[where] = piece.view_of(flat)
        return out

    def files_of(self, key: str, kind: str) -> list[str]:
        files = set()
        for stem, start, end, _ in self._sources.get(key, ()):
            files.update(self._dcp.files_of(f"{stem}.{state_key(kind)}", (start,), (end - start,)))
        return sorted(files)


def world_locators(opt):
    """(local name, (gbuf_idx, start, end)) of every parameter in the DP-gathered "world"
    tensors of one distributed optimizer (`get_parameter_state_dp_zero`: per buffer, the
    buckets' unpadded ranges concatenated) — the layout of `dp_zero_gather_scatter` objects and
    of legacy `distrib_optim.pt` files."""
    for gbuf_idx, buffer in enumerate(opt.buffers):
        offsets = [0]
        for _, unpadded in buffer.buckets:
            offsets.append(offsets[-1] + unpadded)
        for name, (bucket, start, end) in buffer.params.items():
            yield name, (gbuf_idx, offsets[bucket] + start, offsets[bucket] + end)


def main_pieces_by_key(local) -> dict:
    """The main-replica pieces of one local tensor, by global key."""
    out: dict[str, list] = {}
    for piece in local.pieces:
        if piece.main:
            out.setdefault(piece.key, []).append(piece)
    return out


class WorldTensorState(OptimizerState):
    """`dp_zero_gather_scatter`: one ShardedObject per model-parallel rank and optimizer holding
    its DP-gathered world tensors (the whole state of that rank: deprecated, not streamable),
    mapped to parameters through the rebuilt buffers."""

    format = "dp_zero_gather_scatter"

    def __init__(self, dcp: DcpCheckpoint, layouts: list, param_groups: list, step,
                 model_shapes: dict):
        super().__init__(param_groups, step)
        self._dcp = dcp
        self._shapes = model_shapes
        self._objects: dict[str, object] = {}
        self._where: dict[str, list] = {}
        for lay in layouts:
            for opt in lay.optimizers:
                unique = (f"{opt.prefix}optimizer.distributed.dp_group_idx_{opt.dp_group_idx}"
                          ".param_state/shard_0_1")
                if unique not in dcp.objects:
                    raise CheckpointError(f"the checkpoint lacks {unique} that its rebuilt "
                                          f"layout needs; {RESAVE}")
                for name, locator in world_locators(opt):
                    for key, pieces in main_pieces_by_key(lay.tensors[name]).items():
                        self._where.setdefault(key, []).append((unique, locator, pieces))

    @property
    def keys(self) -> list:
        return sorted(self._where)

    def read(self, key: str, kind: str, layer: Optional[int] = None) -> torch.Tensor:
        if key not in self._where:
            raise CheckpointError(f"the checkpoint has no {kind} optimizer state for {key}")
        shape = self._shapes[key] if layer is None else self._shapes[key][1:]
        out = torch.empty(shape, dtype=torch.float32)
        for unique, (gbuf_idx, start, end), pieces in self._where[key]:
            placed = [(w, p) for p in pieces if (w := in_layer(p.global_slice, layer)) is not None]
            if not placed:
                continue
            if unique not in self._objects:
                self._objects[unique] = self._dcp.read_object(unique)
            (world,) = self._objects[unique][gbuf_idx].values()
            flat = world[state_key(kind)][start:end]
            for where, piece in placed:
                out[where] = piece.view_of(flat)
        return out


def in_layer(global_slice: tuple, layer: Optional[int]):
    """Where a piece goes in one layer's slice (None if it is in another layer); the whole
    global slice when `layer` is None."""
    if layer is None:
        return global_slice
    first = global_slice[0]
    if isinstance(first, int):
        return global_slice[1:] if first == layer else None
    raise CheckpointError("a stacked tensor is split along its layer axis inside one rank; "
                          f"the converter cannot stream it layer by layer; {RESAVE}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------- detection
def _walk_groups(node, found: list) -> None:
    if isinstance(node, dict):
        groups = node.get("param_groups")
        if isinstance(groups, list) and groups and isinstance(groups[0], dict):
            found.extend(groups)
        for k, v in node.items():
            if k != "param_groups":
                _walk_groups(v, found)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _walk_groups(v, found)


def first_nested(node, pick: Callable):
    """The first non-None `pick(d)` over the dicts nested in `node` (dicts and lists, depth
    first): optimizer state dicts nest differently per optimizer kind and chaining."""
    if isinstance(node, dict):
        found = pick(node)
        if found is not None:
            return found
        children = node.values()
    elif isinstance(node, (list, tuple)):
        children = node
    else:
        return None
    for child in children:
        found = first_nested(child, pick)
        if found is not None:
            return found
    return None


def as_float(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


def _common_step(node):
    """FP32Optimizer's `state.common_step`, wherever the optimizer entry nests it."""
    def pick(d):
        state = d.get("state")
        if isinstance(state, dict) and "common_step" in state:
            return as_float(state["common_step"])
        return None
    return first_nested(node, pick)


def param_groups_and_step(common: dict, dcp: Optional[DcpCheckpoint]) -> tuple[list, Optional[float]]:
    """The source's param-group options (without params) and the optimizer step."""
    groups: list = []
    _walk_groups(common.get("optimizer"), groups)
    if not groups and dcp is not None:
        for unique in dcp.objects:
            if _GROUPS_OBJECT.match(unique):
                _walk_groups(dcp.read_object(unique), groups)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    unique, seen = [], set()
    for g in groups:
        ident = repr(sorted(g.items(), key=lambda kv: kv[0]))
        if ident not in seen:
            seen.add(ident)
            unique.append(g)
    steps = {float(g["step"]) for g in unique if g.get("step") is not None}
    step = _common_step(common.get("optimizer"))
    if step is None and steps:
        step = max(steps)
    return unique, step


def sharding_type(common: dict, dcp: DcpCheckpoint) -> Optional[str]:
    """How the checkpoint stores its optimizer state; None when it stores none.

    Formats megatron-core 0.16.1 writes (content metadata `distrib_optim_sharding_type`):
    - no distributed optimizer: `optimizer.state.exp_avg.<key>` / `exp_avg_sq` (and
      `optimizer.state.fp32_param.<key>` with fp16/bf16 params), the step in the common state;
    - `fully_reshardable`: `optimizer.state.param.<key>`, `exp_avg`, `exp_avg_sq`;
    - any model-space format may also carry `optimizer.state.momentum_buffer.<key>` (Muon);
    - `fully_sharded_model_space` (older name): `optimizer.state.fp32_param.<key>`, ... — read
      when its tensors are stored with the model's global shapes;
    - `dp_zero_gather_scatter` (deprecated): one object per model-parallel rank with the
      DP-gathered buffers, mapped like `dp_reshardable` (but held in memory a rank at a time);
    - `dp_reshardable` (the default): flat per-bucket tensors
      `[chained_N.]optimizer.distributed.dp_group_idx_G.gbuf_idx_B.dtype_D.bucket_idx_K.<kind>`,
      mapped back to parameters through the DDP bucket layout rebuilt by `shadow` from the
      stored args, and verified: every main parameter read from the buckets, cast to the
      model's dtype, must equal the stored model weight exactly."""
    metadata = common.get("content_metadata") or {}
    fmt = metadata.get("distrib_optim_sharding_type")
    if fmt is None:
        found = []

        def walk(node):
            if isinstance(node, dict):
                if "param_state_sharding_type" in node:
                    found.append(node["param_state_sharding_type"])
                for v in node.values():
                    walk(v)
        walk(common.get("optimizer"))
        fmt = found[0] if found else None
    has_model_space = any(_MODEL_SPACE.match(k) for k in dcp.tensors)
    has_buckets = any(_BUCKET.match(k) for k in list(dcp.tensors) + dcp.objects)
    if fmt is None:
        if has_model_space:
            return "none"   # no distributed optimizer
        return None if not has_buckets else "dp_zero_gather_scatter"
    if fmt in ("fully_reshardable", "fully_sharded_model_space") and not has_model_space:
        return None if "optimizer" not in common else fmt
    return fmt
