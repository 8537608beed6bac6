"""Read one global tensor (or one region of it) at a time out of a torch_dist checkpoint.

A torch_dist checkpoint (`iter_N/`) is a PyTorch Distributed Checkpoint (DCP): `.metadata` lists
every tensor by its global key with its global shape, dtype and the chunks the saving ranks
wrote, and where each chunk lies in the `__R_K.distcp` files. megatron-core stores its
ShardedObjects there as bytes (`<key>/shard_<offset>_<shape>`, `torch.save([data])`).

`DcpCheckpoint` reads that metadata once and then serves requests without a process group and
without building a model: `read(key)` assembles one global tensor (or a region of it) from the
chunks that cover it, so memory stays bounded by what is asked for. Nothing is ever written.
"""
from __future__ import annotations

import bisect
import collections
import ctypes
import io
import math
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_sparkling.checkpoint.paths import CheckpointError


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch._utils._element_size(self.dtype)


class _ChunkIndex:
    """The saved chunks of one 1-D tensor sorted by offset, to find a region's chunks by
    bisection (a flat bucket tensor of a big run has one chunk per parameter and rank)."""

    def __init__(self, md: TensorStorageMetadata):
        self.chunks = sorted(md.chunks, key=lambda c: c.offsets[0])
        self.starts = [c.offsets[0] for c in self.chunks]

    def overlapping(self, start: int, end: int) -> list:
        first = max(bisect.bisect_right(self.starts, start) - 1, 0)
        last = bisect.bisect_left(self.starts, end)
        return self.chunks[first:last]


class _RegionPlanner(LoadPlanner):
    """Loads requested regions of global tensors into given buffers, and raw object bytes."""

    def __init__(self, tensor_requests: dict, object_requests: Sequence[str],
                 chunk_index=None):
        self.tensor_requests = tensor_requests   # key -> (offsets, destination tensor)
        self.object_requests = list(object_requests)
        self.objects: dict[str, bytes] = {}
        self._chunk_index = chunk_index

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, dest) in self.tensor_requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            md = self.metadata.state_dict_metadata[key]
            if len(md.size) == 1 and self._chunk_index is not None:
                candidates = self._chunk_index(key).overlapping(offsets[0],
                                                                offsets[0] + dest.shape[0])
                md = TensorStorageMetadata(md.properties, md.size, candidates)
            items += create_read_items_for_chunk_list(key, md, [chunk])
        for key in self.object_requests:
            index = MetadataIndex(key)
            items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=index,
                                  dest_offsets=torch.Size((0,)), storage_index=index,
                                  storage_offsets=torch.Size((0,)), lengths=torch.Size((0,))))
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.objects[read_item.dest_index.fqn] = value.getvalue()

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.tensor_requests[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass


# ---------------------------------------------------------------------------- chunk reads
@dataclass(frozen=True)
class _SavedLayout:
    """Where torch.save put one tensor's elements: its storage (key, dtype, elements) and the
    tensor's offset, size and stride in it."""
    key: str
    dtype: torch.dtype
    storage_numel: int
    offset: int
    size: tuple
    stride: tuple

    def contiguous_region(self, offsets, lengths):
        """(first element, elements) of the region [offsets, offsets + lengths) where it is
        one contiguous run of the storage; None where it is not."""
        if (self.offset or math.prod(self.size) != self.storage_numel
                or not len(offsets) == len(lengths) == len(self.size)):
            return None
        expected = 1
        for n, st in zip(reversed(self.size), reversed(self.stride)):
            if n != 1 and st != expected:
                return None
            expected *= n
        # one run iff every dim after the first one longer than 1 is whole
        k = next((i for i, n in enumerate(lengths) if n != 1), len(lengths))
        if any(o != 0 or l != n for o, l, n in zip(offsets[k + 1:], lengths[k + 1:],
                                                  self.size[k + 1:])):
            return None
        first = sum(o * st for o, st in zip(offsets, self.stride))
        return first, math.prod(lengths)


class _LayoutUnpickler(pickle.Unpickler):
    """A saved tensor's data.pkl read for its layout only: no data, and no name but those of a
    saved tensor (what torch.load's weights_only allows of them)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._layout
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage") and name != "UntypedStorage":
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a saved tensor")

    def persistent_load(self, pid):
        kind, storage_type, key, _, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        return key, storage_type._dtype, numel   # (`.dtype` warns that TypedStorage is deprecated)

    @staticmethod
    def _layout(storage, offset, size, stride, *rest):
        key, dtype, numel = storage
        return _SavedLayout(key, dtype, numel, offset, tuple(size), tuple(stride))


class _FileSlice(io.RawIOBase):
    """A read-only window [offset, offset + length) of an open file (one DCP chunk), read with
    pread (the file's own position is left alone)."""

    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.offset, self.length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.length}[whence]
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        got = self.read_at(view[:max(0, min(len(view), self.length - self._pos))], self._pos)
        self._pos += got
        return got

    def read_at(self, view: memoryview, position: int) -> int:
        """Fill `view` from `position` in the window (fewer bytes only at the file's end)."""
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], self.offset + position + done)
            if got == 0:
                break
            done += got
        return done


class _DirectReader(FileSystemReader):
    """DCP's reader, with each tensor region read straight from the file into its destination
    when torch.save stored it plainly (contiguous, little-endian: the layout from data.pkl, the
    offset from the zip's directory); anything else is loaded as DCP loads it (torch.load with
    weights_only, then copied). It saves torch.load's own buffer and the copy out of it."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        if any(self.storage_data[r.storage_index].transform_descriptors for r in plan.items):
            return super().read_data(plan, planner)   # compressed or otherwise transformed
        per_file: dict[str, list] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for name, reqs in per_file.items():
            fd = os.open(os.path.join(str(self.path), name), os.O_RDONLY)
            try:
                for req in reqs:
                    info = self.storage_data[req.storage_index]
                    chunk = _FileSlice(fd, info.offset, info.length)
                    if req.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(req, io.BytesIO(chunk.read()))
                    elif not self._read_direct(chunk, req, planner):
                        self._read_loaded(chunk, req, planner)
            finally:
                os.close(fd)
        fut = torch.futures.Future()
        fut.set_result(None)
        return fut

    @staticmethod
    def _read_direct(chunk: _FileSlice, req, planner) -> bool:
        try:
            reader = torch._C.PyTorchFileReader(chunk)
            if reader.get_record("byteorder").decode() != sys.byteorder:
                return False
            layout = _LayoutUnpickler(io.BytesIO(reader.get_record("data.pkl"))).load()
            data_at = reader.get_record_offset(f"data/{layout.key}")
        except (RuntimeError, pickle.UnpicklingError, AttributeError, ValueError, TypeError):
            return False   # not the plain layout: torch.load reads it (or names the damage)
        region = layout.contiguous_region(tuple(req.storage_offsets), tuple(req.lengths))
        target = planner.resolve_tensor(req).detach()
        if (region is None or not target.is_contiguous() or target.dtype != layout.dtype
                or tuple(target.shape) != tuple(req.lengths)):
            return False
        item = target.element_size()
        if data_at + layout.storage_numel * item > chunk.length:
            raise EOFError(f"a chunk of {req.storage_index.fqn} is shorter than its tensor")
        first, count = region
        view = memoryview((ctypes.c_char * (count * item)).from_address(target.data_ptr()))
        if chunk.read_at(view.cast("B"), data_at + first * item) != count * item:
            raise EOFError(f"a chunk of {req.storage_index.fqn} ends early")
        planner.commit_tensor(req, target)
        return True

    @staticmethod
    def _read_loaded(chunk, req, planner) -> None:
        chunk.seek(0)
        tensor = torch.load(io.BufferedReader(chunk), map_location="cpu", weights_only=True)
        for dim, (offset, length) in enumerate(zip(req.storage_offsets, req.lengths)):
            tensor = tensor.narrow(dim, offset, length)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise ValueError(f"{req.storage_index.fqn}: a chunk region of {tuple(tensor.shape)} "
                             f"for {tuple(target.shape)}")
        target.copy_(tensor)
        planner.commit_tensor(req, target)


class DcpCheckpoint:
    """The tensors and ShardedObjects of one torch_dist checkpoint directory, read lazily."""

    def __init__(self, path: str):
        self.path = path
        self._reader = _DirectReader(path)
        try:
            self.metadata = self._reader.read_metadata()
        except FileNotFoundError:
            raise CheckpointError(f"{path} has no .metadata (PyTorch DCP index): the checkpoint "
                                  "is incomplete; point --load at a complete one") from None
        except Exception as e:  # a truncated or foreign .metadata
            raise CheckpointError(f"{path}/.metadata cannot be read ({type(e).__name__}); the "
                                  "checkpoint is damaged, copy it again from its source") from None
        self._reader.set_up_storage_reader(self.metadata, True)
        self._chunk_indexes: dict[str, _ChunkIndex] = {}
        self.tensors: dict[str, TensorSpec] = {}
        self.objects: list[str] = []
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self.tensors[key] = TensorSpec(tuple(md.size), md.properties.dtype)
            elif isinstance(md, BytesStorageMetadata):
                self.objects.append(key)

    # ------------------------------------------------------------------ integrity
    def check_files(self) -> None:
        """Every data file the index points at exists and is long enough (before any work)."""
        needed: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        for name, end in sorted(needed.items()):
            path = os.path.join(self.path, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"shard {path} is missing; the checkpoint is incomplete, "
                                      "copy the whole iter_* directory again")
            size = os.path.getsize(path)
            if size < end:
                raise CheckpointError(f"shard {path} is truncated ({size} of {end} bytes); "
                                      "copy the whole iter_* directory again")

    def files_of(self, key: str, offsets: Optional[Sequence[int]] = None,
                 sizes: Optional[Sequence[int]] = None) -> list[str]:
        """The data files holding the chunks of `key` (those overlapping a region, if given)."""
        md = self.metadata.state_dict_metadata.get(key)
        if md is None:
            return []
        if isinstance(md, BytesStorageMetadata):
            info = self.metadata.storage_data.get(MetadataIndex(key))
            return [info.relative_path] if info is not None else []
        out = []
        for chunk in md.chunks:
            if offsets is not None and any(
                    c_off >= o + s or o >= c_off + c_size for c_off, c_size, o, s
                    in zip(chunk.offsets, chunk.sizes, offsets, sizes)):
                continue
            info = self.metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
            if info is not None and info.relative_path not in out:
                out.append(info.relative_path)
        return sorted(out)

    def tensors_in(self, name: str) -> list[str]:
        """The keys with data in file `name` (what a damaged file takes with it)."""
        return sorted({index.fqn for index, info in self.metadata.storage_data.items()
                       if info.relative_path == name})

    # ------------------------------------------------------------------ reads
    def _load(self, planner: _RegionPlanner) -> None:
        planner.set_up_planner({}, self.metadata, True)
        plan = self._reader.prepare_local_plan(planner.create_local_plan())
        plan = self._reader.prepare_global_plan([plan])[0]
        try:
            self._reader.read_data(plan, planner).wait()
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: reading failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160]}); a shard is damaged, copy "
                                  "the checkpoint again") from None

    def read(self, key: str, offsets: Optional[Sequence[int]] = None,
             sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The global tensor `key`, or its region [offsets, offsets + sizes)."""
        if key not in self.tensors:
            raise CheckpointError(f"{self.path} holds no tensor {key!r}")
        spec = self.tensors[key]
        offsets = tuple(offsets) if offsets is not None else (0,) * len(spec.shape)
        sizes = tuple(sizes) if sizes is not None else spec.shape
        dest = torch.empty(sizes, dtype=spec.dtype)
        if dest.numel() == 0:
            return dest
        self._load(_RegionPlanner({key: (offsets, dest)}, (), self._chunk_index))
        return dest

    def _chunk_index(self, key: str) -> _ChunkIndex:
        if key not in self._chunk_indexes:
            self._chunk_indexes[key] = _ChunkIndex(self.metadata.state_dict_metadata[key])
        return self._chunk_indexes[key]

    def read_layer(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The global tensor `key`, or one slice of its leading (layer) axis, without that axis."""
        if layer is None:
            return self.read(key)
        shape = self.tensors[key].shape
        return self.read(key, (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:])[0]

    def read_object_bytes(self, unique_key: str) -> bytes:
        """The stored bytes of one ShardedObject (megatron-core's `torch.save([data])`)."""
        if unique_key not in self.objects:
            raise CheckpointError(f"{self.path} holds no object {unique_key!r}")
        planner = _RegionPlanner({}, [unique_key])
        self._load(planner)
        return planner.objects[unique_key]

    def read_object(self, unique_key: str):
        """The data of one ShardedObject (as megatron-core's loader unpickles it)."""
        stored = torch.load(io.BytesIO(self.read_object_bytes(unique_key)), weights_only=False)
        return stored[0] if isinstance(stored, list) and len(stored) == 1 else stored
