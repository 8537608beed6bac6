"""Open any Megatron checkpoint and read it one global tensor at a time, never writing to it.

    ckpt = open_checkpoint("/runs/stage1/checkpoints")            # tracker file picks the iteration
    ckpt = open_checkpoint("/runs/stage1/checkpoints", iteration=2000)
    ckpt.format, ckpt.iteration, ckpt.args, ckpt.common, ckpt.content_metadata
    ckpt.model_tensors        {global key: TensorSpec(shape, dtype)}
    ckpt.read_model(key)      one global tensor
    ckpt.objects              ShardedObject unique keys (rng_state, _extra_state, ...)
    ckpt.optimizer            model-space OptimizerState (None without optimizer state)

Formats: torch_dist (megatron-core dist_checkpointing: common state in `common.pt`, or in the
`common_state` ShardedObject newer Megatron writes) and Megatron-LM's legacy per-rank `torch`
format (`mp_rank_XX[_YYY][_ZZZ]/model_optim_rng.pt` + `distrib_optim.pt`, see `legacy`).
Anything else is refused with a one-line message saying how to re-save it.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

import torch

from megatron_sparkling.checkpoint import integrity, optimizer_state, shadow
from megatron_sparkling.checkpoint.base import SourceCheckpoint
from megatron_sparkling.checkpoint.dcp import DcpCheckpoint
from megatron_sparkling.checkpoint.legacy import LegacyCheckpoint
from megatron_sparkling.checkpoint.paths import (
    TRACKER,
    CheckpointError,
    iteration_dir,
    read_tracker,
)

CONVERT_HINT = ("load it once in Megatron-LM and save it with --ckpt-format torch_dist "
                "(e.g. --ckpt-convert-format torch_dist --ckpt-convert-save DIR)")


def locate(root: str, iteration: Optional[int] = None) -> tuple[str, int, bool]:
    """(iteration directory, iteration, release) of a checkpoint root."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise CheckpointError(f"--load {root} is a file, not a directory; point it at a "
                              f"checkpoint directory (the one holding {TRACKER})")
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root} does not exist; point it at a checkpoint directory "
                              f"(the one holding {TRACKER})")
    if iteration is not None:
        path = iteration_dir(root, iteration)
        if not os.path.isdir(path):
            found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "iter_*")))
            raise CheckpointError(f"{path} does not exist; choose --iteration among "
                                  f"{', '.join(found) or 'none (no iter_* directory)'}")
        return path, iteration, False
    it, release = read_tracker(root)
    if it < 0:
        if _is_checkpoint_dir(root):  # pointed straight at an iter_* directory
            name = os.path.basename(os.path.normpath(root))
            number = int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else 0
            return root, number, name == "release"
        raise CheckpointError(f"{root} has no {TRACKER}; pass --iteration N to pick an iter_* "
                              "directory, or point --load at a checkpoint root")
    path = iteration_dir(root, it, release)
    if not os.path.isdir(path):
        raise CheckpointError(f"{TRACKER} in {root} names iteration {it} but {path} is missing; "
                              "pass --iteration N for a checkpoint that exists")
    return path, it, release


def _is_checkpoint_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "metadata.json"))
            or bool(glob.glob(os.path.join(path, "mp_rank_*"))))


def open_checkpoint(root: str, iteration: Optional[int] = None, verify: bool = True):
    """The checkpoint under `root` (see the module docstring); refuses unknown formats."""
    path, it, release = locate(root, iteration)
    meta_json = os.path.join(path, "metadata.json")
    if os.path.isfile(meta_json):
        try:
            backend = json.load(open(meta_json)).get("sharded_backend")
        except (ValueError, OSError):
            raise CheckpointError(f"{meta_json} is not valid JSON; the checkpoint is damaged, "
                                  "copy it again") from None
        if backend != "torch_dist":
            raise CheckpointError(f"{path} is a {backend} checkpoint, not torch_dist; {CONVERT_HINT}")
        return TorchDistCheckpoint(path, it, release, verify=verify)
    if glob.glob(os.path.join(path, "mp_rank_*")):
        return LegacyCheckpoint(path, it, release, verify=verify)
    if os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path} is a plain torch_dcp/fsdp_dtensor checkpoint (no "
                              f"metadata.json), not torch_dist; {CONVERT_HINT}")
    raise CheckpointError(f"{path} is neither a torch_dist checkpoint (metadata.json) nor "
                          "Megatron-LM's legacy torch format (mp_rank_*/model_optim_rng.pt); "
                          "point --load at a Megatron checkpoint root")


class TorchDistCheckpoint(SourceCheckpoint):
    format = "torch_dist"

    def __init__(self, path: str, iteration: int, release: bool, verify: bool = True):
        super().__init__(path, iteration, release)
        self.dcp = DcpCheckpoint(path)
        self.dcp.check_files()
        self.checksums = None
        if verify:
            self.check_manifest()
        self.common = self._load_common()
        self.model_tensors = {k: v for k, v in self.dcp.tensors.items()
                              if not _is_optimizer_key(k)}
        self.objects = [o for o in self.dcp.objects if o.split("/")[0] != "common_state"]
        self._verify = verify
        self._optimizer_loaded = False

    def _load_common(self) -> dict:
        common_pt = os.path.join(self.path, "common.pt")
        if os.path.isfile(common_pt):
            from megatron.core import dist_checkpointing

            try:
                return dist_checkpointing.load_common_state_dict(self.path)
            except Exception as e:
                raise CheckpointError(f"{common_pt} cannot be read ({type(e).__name__}); the "
                                      "checkpoint is damaged, copy it again") from None
        unique = next((o for o in self.dcp.objects if o.split("/")[0] == "common_state"), None)
        if unique is None:
            raise CheckpointError(f"{self.path} has neither common.pt nor a common_state object; "
                                  "the checkpoint is incomplete, copy it again")
        return self.dcp.read_object(unique)

    # ------------------------------------------------------------------ reads
    def read_model(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        return self.dcp.read_layer(key, layer)

    def read_object_bytes(self, unique_key: str) -> bytes:
        return self.dcp.read_object_bytes(unique_key)

    def check_manifest(self) -> Optional[dict]:
        """Check the files against the manifest `expand` wrote, where there is one (every byte
        is read once); the checksums, None without a manifest."""
        self.checksums = integrity.check_manifest(self.path, self.dcp.tensors_in)
        return self.checksums

    def files_of(self, key: str, kind: Optional[str] = None) -> list[str]:
        if kind is None:
            return self.dcp.files_of(key)
        return self.optimizer.files_of(key, kind) if self.optimizer is not None else []

    def read_object(self, unique_key: str):
        return self.dcp.read_object(unique_key)

    @property
    def optimizer(self):
        if not self._optimizer_loaded:
            self._optimizer = self._open_optimizer()
            self._optimizer_loaded = True
        return self._optimizer

    @optimizer.setter
    def optimizer(self, value):
        self._optimizer, self._optimizer_loaded = value, value is not None

    def _open_optimizer(self):
        fmt = optimizer_state.sharding_type(self.common, self.dcp)
        if fmt is None:
            return None
        groups, step = optimizer_state.param_groups_and_step(self.common, self.dcp)
        shapes = {k: v.shape for k, v in self.model_tensors.items()}
        if fmt in ("none", "fully_reshardable", "fully_sharded_model_space"):
            return optimizer_state.ModelSpaceState(self.dcp, fmt, groups, step, shapes)
        if fmt in ("dp_reshardable", "dp_zero_gather_scatter"):
            args = self.args
            layouts = shadow.build_layouts(args, shadow.representative_ranks(args))
            if fmt == "dp_zero_gather_scatter":
                return optimizer_state.WorldTensorState(self.dcp, layouts, groups, step, shapes)
            return optimizer_state.BucketSpaceState(self.dcp, layouts, groups, step, shapes)
        raise CheckpointError(f"optimizer state stored as {fmt!r} cannot be converted; "
                              f"{optimizer_state.RESAVE}, or pass --no-optimizer to drop it")


def _is_optimizer_key(key: str) -> bool:
    return bool(optimizer_state._MODEL_SPACE.match(key) or optimizer_state._BUCKET.match(key))
