"""Megatron-LM's legacy per-rank `torch` checkpoint format, read as global tensors.

    iter_N/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt   one per (TP, PP, EP) rank
                                                 /distrib_optim.pt     with the distributed optimizer

Where each local tensor goes in the global tensor is not re-derived here: `shadow` rebuilds the
writing ranks' models on the meta device (see `LegacyCheckpoint`).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_sparkling.checkpoint import optimizer_state, shadow
from megatron_sparkling.checkpoint.dcp import TensorSpec
from megatron_sparkling.checkpoint.base import SourceCheckpoint, object_bytes
from megatron_sparkling.checkpoint.paths import CheckpointError

# model_optim_rng.pt holds the rank's LOCAL model state dict (`state_dict_for_save_checkpoint`:
# per-layer names, local experts `local_experts.j`, TP shards, SwiGLU fc1 rows as [W_i; V_i]),
# `optimizer.state_dict()` (param groups; without the distributed optimizer also every
# parameter's Adam moments, by position in the optimizer) and the scheduler; distrib_optim.pt
# holds the distributed optimizer's DP-gathered buffers (`save_parameter_state`: per buffer and
# dtype, the buckets' unpadded ranges concatenated).
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"


def rank_directory(coordinates: dict, pipeline_parallel: bool, expert_parallel: bool) -> str:
    """Megatron-LM's directory name for a rank (get_checkpoint_name)."""
    name = f"mp_rank_{coordinates['tp']:02d}"
    if pipeline_parallel:
        name += f"_{coordinates['pp']:03d}"
    if expert_parallel:
        name += f"_{coordinates['ep']:03d}"
    return name


def _load(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"shard {path} is missing; the checkpoint is incomplete, copy the "
                              "whole iter_* directory again")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"shard {path} cannot be read ({type(e).__name__}); it is damaged "
                              "or truncated, copy the checkpoint again") from None


class LegacyCheckpoint(SourceCheckpoint):
    """A legacy checkpoint's model tensors, read as global tensors.

    `shadow` rebuilds every writing rank's model with megatron-core on the meta device, and its
    `sharded_state_dict()` (the same mapping megatron-core's own torch -> torch_dist conversion
    uses) gives each local name's pieces of global checkpoint keys. Files are memory-mapped, so
    a read touches only the shards it needs."""
    format = "torch"

    def __init__(self, path: str, iteration: int, release: bool, verify: bool = True):
        super().__init__(path, iteration, release)
        first = self._first_file()
        head = _load(first)
        if "args" not in head:
            raise CheckpointError(f"{first} stores no args; growth needs the model's sizes: "
                                  "re-save it with Megatron-LM (which stores args)")
        args = head["args"]
        self._use_do = bool(getattr(args, "use_distributed_optimizer", False))
        self.common = {k: head[k] for k in ("args", "checkpoint_version", "iteration",
                                            "opt_param_scheduler",
                                            "num_floating_point_operations_so_far")
                       if k in head}
        self.common["content_metadata"] = {}
        self._files: dict[int, str] = {}
        self._loaded: dict[str, dict] = {}
        ranks = shadow.expert_dp_first_ranks(args)
        self.layouts = shadow.build_layouts(args, ranks, with_optimizer=True)
        pp = args.pipeline_model_parallel_size > 1
        ep = (getattr(args, "expert_model_parallel_size", 1) or 1) > 1
        for lay in self.layouts:
            directory = os.path.join(path, rank_directory(lay.coordinates, pp, ep))
            self._files[lay.rank] = directory
            for name in (MODEL_FILE,) + ((OPTIM_FILE,) if self._use_do and self._has_optimizer(
                    head) else ()):
                fpath = os.path.join(directory, name)
                if name == MODEL_FILE and not os.path.isfile(fpath):
                    raise CheckpointError(f"shard {fpath} is missing; the checkpoint is "
                                          "incomplete, copy the whole iter_* directory again")
        self._index(head)
        self._optimizer_obj = self._open_optimizer(head)

    # ------------------------------------------------------------------ files
    def _first_file(self) -> str:
        names = sorted(n for n in os.listdir(self.path) if n.startswith("mp_rank_"))
        for n in names:
            if all(int(part) == 0 for part in n[len("mp_rank_"):].split("_")):
                return os.path.join(self.path, n, MODEL_FILE)
        raise CheckpointError(f"{self.path} has no mp_rank_00* directory; the checkpoint is "
                              "incomplete, copy the whole iter_* directory again")

    def _file(self, rank: int, name: str) -> dict:
        path = os.path.join(self._files[rank], name)
        if path not in self._loaded:
            self._loaded[path] = _load(path)
        return self._loaded[path]

    @staticmethod
    def _has_optimizer(head) -> bool:
        return "optimizer" in head and not getattr(head["args"], "no_save_optim", False)

    # ------------------------------------------------------------------ model
    def _index(self, head) -> None:
        self._pieces: dict[str, list] = {}
        for lay in self.layouts:
            for name, local in lay.tensors.items():
                for piece in local.pieces:
                    if piece.main:
                        self._pieces.setdefault(piece.key, []).append((lay.rank, name, piece))
                    shape = lay.global_shapes[piece.key]
                    self.model_tensors[piece.key] = TensorSpec(tuple(shape), local.dtype)
        missing = [k for k in self.model_tensors if k not in self._pieces]
        if missing:
            raise CheckpointError(f"no rank holds the main copy of {missing[:3]}; the rebuilt "
                                  "model does not match this checkpoint")
        self.objects = sorted({u for lay in self.layouts for u in lay.objects})

    def _local(self, rank: int, name: str) -> torch.Tensor:
        model = self._file(rank, MODEL_FILE)["model"]
        if name not in model:
            raise CheckpointError(f"{os.path.join(self._files[rank], MODEL_FILE)} lacks {name}; "
                                  "the stored args do not describe this checkpoint: fix them")
        return model[name]

    def read_model(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        spec = self.model_tensors[key]
        out = torch.empty(spec.shape if layer is None else spec.shape[1:], dtype=spec.dtype)
        for rank, name, piece in self._pieces[key]:
            where = optimizer_state.in_layer(piece.global_slice, layer)
            if where is not None:
                out[where] = piece.view_of(self._local(rank, name).reshape(-1))
        return out

    def read_object(self, unique_key: str):
        return None  # extra state (Transformer Engine FP8 metadata) restarts from defaults

    def read_object_bytes(self, unique_key: str) -> bytes:
        return object_bytes(None)

    # ------------------------------------------------------------------ optimizer
    @property
    def optimizer(self):
        return self._optimizer_obj

    @optimizer.setter
    def optimizer(self, value):
        self._optimizer_obj = value

    def _open_optimizer(self, head) -> Optional[optimizer_state.OptimizerState]:
        if not self._has_optimizer(head):
            return None
        optimizer = head["optimizer"]
        groups, step = optimizer_state.param_groups_and_step({"optimizer": _strip(optimizer)},
                                                             None)
        if step is None:
            step = _torch_step(optimizer)
        shapes = {k: v.shape for k, v in self.model_tensors.items()}
        return LegacyOptimizerState(self, groups, step, shapes, self._use_do)


def _strip(node):
    """The optimizer state dict without its per-parameter state (param groups remain)."""
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "state"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _torch_step(node):
    """The step of a torch Adam state dict (per parameter `step`), wherever it is nested."""
    def pick(d):
        state = d.get("state")
        if isinstance(state, dict):
            for v in state.values():
                if isinstance(v, dict) and "step" in v:
                    return optimizer_state.as_float(v["step"])
        return None
    return optimizer_state.first_nested(node, pick)


class LegacyOptimizerState(optimizer_state.OptimizerState):
    """Adam state of a legacy checkpoint in model space."""

    def __init__(self, ckpt: LegacyCheckpoint, groups: list, step, shapes: dict, distributed: bool):
        super().__init__(groups, step)
        self.format = "torch (distrib_optim.pt)" if distributed else "torch (optimizer.state_dict)"
        self._ckpt = ckpt
        self._shapes = shapes
        self._distributed = distributed
        self._where: dict[str, list] = {}     # model key -> [(rank, opt index, locator, pieces)]
        for lay in ckpt.layouts:
            for o_index, opt in enumerate(lay.optimizers):
                for name, locator in self._locators(opt):
                    pieces_by_key = optimizer_state.main_pieces_by_key(lay.tensors[name])
                    for key, pieces in pieces_by_key.items():
                        self._where.setdefault(key, []).append((lay.rank, o_index, locator,
                                                                pieces, name))
        self.kinds = optimizer_state.KINDS

    def _locators(self, opt):
        if self._distributed:
            yield from optimizer_state.world_locators(opt)
        else:
            position = 0
            for g_index, names in enumerate(opt.group_params):
                for i, name in enumerate(names):
                    yield name, (g_index, i, position)
                    position += 1

    @property
    def keys(self) -> list:
        return sorted(self._where)

    def _state_dict_of(self, rank: int, o_index: int, n_optimizers: int):
        if self._distributed:
            states = self._ckpt._file(rank, OPTIM_FILE)
            state = states[o_index] if isinstance(states, list) else states
        else:
            states = self._ckpt._file(rank, MODEL_FILE)["optimizer"]
            state = states[o_index] if isinstance(states, list) else states
        if state is None:
            raise CheckpointError(f"{self._ckpt._files[rank]} lacks the state of optimizer "
                                  f"{o_index}; the checkpoint is incomplete")
        return state

    def _local_state(self, rank, o_index, locator, kind, name) -> torch.Tensor:
        n = len(next(lay for lay in self._ckpt.layouts if lay.rank == rank).optimizers)
        state = self._state_dict_of(rank, o_index, n)
        if self._distributed:
            gbuf_idx, start, end = locator
            (world,) = state[gbuf_idx].values()
            return world[optimizer_state.state_key(kind)][start:end]
        g_index, i, position = locator
        inner = state.get("optimizer", state)  # Float16 optimizer wraps the torch state dict
        if kind == "param":
            fp32 = state.get("fp32_from_fp16_params")
            if fp32 is not None:
                return fp32[g_index][i].reshape(-1)
            return self._ckpt._local(rank, name).reshape(-1).float()
        ids = inner["param_groups"][g_index]["params"]
        return inner["state"][ids[i]][optimizer_state.state_key(kind)].reshape(-1)

    def read(self, key: str, kind: str, layer: Optional[int] = None) -> torch.Tensor:
        if key not in self._where:
            raise CheckpointError(f"the checkpoint has no {kind} optimizer state for {key}")
        shape = self._shapes[key] if layer is None else self._shapes[key][1:]
        out = torch.empty(shape, dtype=torch.float32)
        for rank, o_index, locator, pieces, name in self._where[key]:
            placed = [(w, p) for p in pieces
                      if (w := optimizer_state.in_layer(p.global_slice, layer)) is not None]
            if placed:
                flat = self._local_state(rank, o_index, locator, kind, name).float()
                for where, piece in placed:
                    out[where] = piece.view_of(flat)
        return out
