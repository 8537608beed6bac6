"""Write a torch_dist checkpoint STREAMING: each global tensor is produced only when written.

The tensors are declared up front by key, global shape and dtype; their data comes from a
callable `produce(key)` that is called once per tensor while PyTorch's DCP writer works through
them, and the tensor is dropped right after it is on disk (one tensor per `.distcp` file, so the
writer keeps no file's worth of tensors alive). Peak memory is therefore the largest produced
tensor plus what `produce` needs to make it, whatever the checkpoint's size.

The result is what megatron-core's dist_checkpointing loads at ANY TP/EP/PP/DP layout:
- `.metadata` + `__R_K.distcp`: every tensor under its global key with its global shape (one
  chunk each), ShardedObjects as bytes under their unique keys (`torch.save([data])`);
- `common.pt`: the non-tensor state (args, iteration, optimizer param groups, ...);
- `metadata.json`: `{"sharded_backend": "torch_dist", ...}`, written last.
Under torchrun the tensors are split among the ranks (balanced by bytes): each rank produces
and writes its share, DCP's coordinator (rank 0) writes the index. Every file is fsynced.
"""
from __future__ import annotations

import io
import json
import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_sparkling.checkpoint.dcp import TensorSpec

TORCH_DIST_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


class ProducedTensorError(ValueError):
    """A produced tensor does not have the declared shape or dtype."""


class _StreamingSavePlanner(DefaultSavePlanner):
    """DCP save planner whose tensors are placeholders, produced on demand in `resolve_data`."""

    def __init__(self, specs: dict, produce: Callable[[str], torch.Tensor], progress=None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._specs = specs
        self._produce = produce
        self._progress = progress

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            # already megatron-core's serialized form: written as is
            return self.lookup_object(write_item.index)
        key = write_item.index.fqn
        spec = self._specs[key]
        tensor = self._produce(key)
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ProducedTensorError(
                f"{key}: produced {tuple(tensor.shape)} {tensor.dtype}, the checkpoint declares "
                f"{spec.shape} {spec.dtype}")
        if self._progress is not None:
            self._progress.update(spec.nbytes)
            self._progress.set_postfix_str(key[-60:], refresh=False)
        return tensor.detach().to("cpu").contiguous()


def split_among_ranks(specs: dict, world: int) -> list[list[str]]:
    """Keys per rank, balanced by bytes (largest first onto the least loaded rank)."""
    shares: list[list[str]] = [[] for _ in range(world)]
    loads = [0] * world
    for key in sorted(specs, key=lambda k: (-specs[k].nbytes, k)):
        r = loads.index(min(loads))
        shares[r].append(key)
        loads[r] += specs[key].nbytes
    return shares


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_torch_dist(directory: str, specs: dict, produce: Callable[[str], torch.Tensor],
                     objects: dict, common: dict, progress: bool = True,
                     desc: str = "writing") -> None:
    """Write a complete torch_dist checkpoint into the EXISTING empty `directory`.

    `specs`: {key: TensorSpec} of every tensor; `produce(key)` makes one (called once per key,
    on the rank that writes it); `objects`: {unique key: bytes} of ShardedObjects (written by
    rank 0); `common`: the common state dict (written by rank 0 as common.pt). Collective under
    torch.distributed (every rank passes the same specs)."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    mine = split_among_ranks(specs, world)[rank]
    state: dict = {k: torch.empty(specs[k].shape, dtype=specs[k].dtype, device="meta")
                   for k in mine}
    if rank == 0:
        state.update({k: io.BytesIO(v) for k, v in objects.items()})
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(specs[k].nbytes for k in mine)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"{desc} ({len(mine)} tensors{f', rank {rank}' if distributed else ''})",
                   position=rank, leave=True, disable=None)
    try:
        planner = _StreamingSavePlanner({k: specs[k] for k in mine}, produce, bar)
        # one tensor per file: FileSystemWriter keeps a file's tensors alive until it is closed
        writer = FileSystemWriter(directory, single_file_per_rank=False, sync_files=True,
                                  thread_count=1, overwrite=False)
        dcp.save(state, storage_writer=writer, planner=planner, no_dist=not distributed)
    finally:
        if bar is not None:
            bar.close()
    if rank == 0:
        buf = io.BytesIO()
        torch.save(common, buf)
        write_file_synced(os.path.join(directory, "common.pt"), buf.getvalue())
        write_file_synced(os.path.join(directory, "metadata.json"),
                          json.dumps(TORCH_DIST_CONFIG).encode())
        fsync_path(directory)
    if distributed:
        dist.barrier()


def spec_of(tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(tensor.shape), tensor.dtype)


