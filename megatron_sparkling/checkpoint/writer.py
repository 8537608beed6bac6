"""Write a torch_dist checkpoint STREAMING: each global tensor is produced only when written.

The tensors are declared up front by key, global shape and dtype; their data comes from a
callable `produce(key, layer)` that is called once per tensor, or once per layer slice for
tensors stacked over layers (megatron-core stores every layer's weights of one kind as ONE
global tensor `(L, ...)`, so whole tensors would grow with the model's depth), while PyTorch's
DCP writer works through them; each piece is dropped right after it is on disk (one piece per
`.distcp` file, so the writer keeps no file's worth of tensors alive). Peak memory is therefore
the largest produced piece plus what `produce` needs to make it, whatever the checkpoint's size.
The result loads in megatron-core at ANY TP/EP/PP/DP layout (files: `write_torch_dist`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    BytesIOWriteData,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from megatron_sparkling.checkpoint.paths import CheckpointError
from megatron_sparkling.core import layout as layout_lib


TORCH_DIST_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


class ProducedTensorError(ValueError):
    """A produced tensor does not have the declared shape or dtype."""


@dataclass
class WriteStats:
    """Bytes of produced pieces alive at once (counted as DCP drops them): the streaming
    property, independent of allocator and machine load; `digests`: {file name: digest} of the
    data files this rank wrote (write_torch_dist's `digest`)."""
    held_bytes: int = 0
    peak_held_bytes: int = 0
    pieces: int = 0
    digests: dict = field(default_factory=dict)
    # pieces are made in one thread (_ProduceAhead) and dropped in another
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def hold(self, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        with self._lock:
            self.held_bytes += n
            self.pieces += 1
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        weakref.finalize(tensor, self._drop, n)

    def _drop(self, n: int) -> None:
        with self._lock:
            self.held_bytes -= n


def first_failure(exc: BaseException) -> BaseException:
    """The exception a rank raised inside DCP's save (which wraps every rank's failure in a
    CheckpointException, a BaseException): the project's own error first."""
    if not isinstance(exc, CheckpointException):
        return exc
    failures = [pair[0] for pair in exc.failures.values()]
    return next((f for f in failures if isinstance(f, CheckpointError)),
                failures[0] if failures else exc)


def work_items(specs: dict, layered: dict) -> list[tuple]:
    """(key, layer or None, nbytes) for every piece that is produced and written on its own, in
    stream order: a key listed in `layered` is written one leading-axis slice (one layer) at a
    time; each model weight (or layer of it) is followed by its optimizer state, main param
    first (`_stream_order`: integrity.ValueChecks compares the two without reading either
    again)."""
    items = []
    for key in sorted(specs):
        spec = specs[key]
        if layered.get(key):
            per_layer = spec.nbytes // spec.shape[0]
            items += [(key, i, per_layer) for i in range(spec.shape[0])]
        else:
            items.append((key, None, spec.nbytes))
    return sorted(items, key=_stream_order)


def unit_of(item: tuple) -> tuple:
    """(model key, layer): a weight and its optimizer state, produced and written together."""
    key, layer = item[0], item[1]
    return layout_lib.split_state_key(key)[1], -1 if layer is None else layer


def _stream_order(item: tuple) -> tuple:
    key = item[0]
    prefix = layout_lib.split_state_key(key)[0]
    return (*unit_of(item), prefix != "", layout_lib.KIND_NAMES.index(layout_lib.state_kind(key)),
            key)


class _ProduceAhead:
    """Makes the pieces in a background thread, one ahead of the writer, in the order the
    writer will ask for them: reading the source and the growth arithmetic (torch and file
    reads release the GIL) overlap DCP's serialisation and writes. One thread, in order: `make`
    sees the same sequence as without it (integrity.ValueChecks pairs neighbours), and at most
    two pieces are alive at once (the one written, the one made ahead)."""

    def __init__(self, make: Callable, order: list):
        self._make = make
        self._order = order
        self._pieces: queue.Queue = queue.Queue()
        self._turn = threading.Semaphore(1)   # released when the writer takes a piece
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="produce-ahead")
        self._thread.start()

    def _run(self) -> None:
        for key, layer in self._order:
            self._turn.acquire()
            if self._stop:
                return
            try:
                self._pieces.put((key, layer, self._make(key, layer), None))
            except BaseException as e:   # raised again in the writer's thread, by `take`
                self._pieces.put((key, layer, None, e))
                return

    def take(self, key: str, layer) -> torch.Tensor:
        made_key, made_layer, piece, failure = self._pieces.get()
        self._turn.release()
        if failure is not None:
            raise failure
        if (made_key, made_layer) != (key, layer):   # DCP's order is not the plan's
            raise RuntimeError(f"the writer asked for {key} layer {layer} but {made_key} layer "
                               f"{made_layer} was made next")
        return piece

    def close(self) -> None:
        """Stop (after a failure the writer asks for nothing more) and let the thread end."""
        self._stop = True
        self._turn.release()
        self._thread.join()


class _StreamingSavePlanner(DefaultSavePlanner):
    """DCP save planner whose tensor chunks are produced on demand (`_ProduceAhead`, in the
    final plan's order, started by `finish_plan`) and handed out in `resolve_data`."""

    def __init__(self, specs: dict, items: list, produce, objects: dict, progress=None,
                 stats: WriteStats | None = None, finish: Callable | None = None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._stats = stats
        self._finish = finish     # called after the last piece is produced (inside DCP's save)
        self._produced = 0
        self._specs = specs
        self._items = items
        self._produce = produce
        self._objects = objects
        self._progress = progress
        self._ahead: _ProduceAhead | None = None

    def create_local_plan(self) -> SavePlan:
        writes = []
        for key, layer, _ in self._items:
            spec = self._specs[key]
            if layer is None:
                offsets, sizes, kind = (0,) * len(spec.shape), spec.shape, WriteItemType.TENSOR
            else:
                offsets = (layer,) + (0,) * (len(spec.shape) - 1)
                sizes, kind = (1,) + tuple(spec.shape[1:]), WriteItemType.SHARD
            writes.append(WriteItem(
                index=MetadataIndex(key, offsets), type=kind,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets),
                                               sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=spec.dtype), size=torch.Size(spec.shape))))
        for key, data in self._objects.items():
            writes.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO,
                                    bytes_io_data=BytesIOWriteData(len(data))))
        self.plan = SavePlan(writes)
        return self.plan

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)
        order = [(item.index.fqn, _layer_of(item)) for item in plan.items
                 if item.type != WriteItemType.BYTE_IO]
        self._ahead = _ProduceAhead(self._make, order)
        return plan

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()

    def _make(self, key: str, layer) -> torch.Tensor:
        """One piece, checked against its declaration, as DCP writes it (the chunk's shape)."""
        spec = self._specs[key]
        tensor = self._produce(key, layer)
        expected = tuple(spec.shape) if layer is None else tuple(spec.shape[1:])
        if tuple(tensor.shape) != expected or tensor.dtype != spec.dtype:
            where = "" if layer is None else f" layer {layer}"
            raise ProducedTensorError(
                f"{key}{where}: produced {tuple(tensor.shape)} {tensor.dtype}, the checkpoint "
                f"declares {expected} {spec.dtype}")
        out = tensor.detach().to("cpu").contiguous()
        out = out if layer is None else out.unsqueeze(0)
        if self._stats is not None:
            self._stats.hold(out)
        return out

    def resolve_data(self, write_item):
        key = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            # already megatron-core's serialized form (torch.save([data])): written as is
            return io.BytesIO(self._objects[key])
        tensor = self._ahead.take(key, _layer_of(write_item))
        self._produced += 1
        if self._produced == len(self._items) and self._finish is not None:
            self._finish()   # a failure here still fails the save on every rank
        if self._progress is not None:
            self._progress.update(tensor.numel() * tensor.element_size())
            self._progress.set_postfix_str(key[-60:], refresh=False)
        return tensor


def _layer_of(write_item) -> int | None:
    """The layer of a per-layer piece (a SHARD: one leading-axis slice), None for a tensor."""
    if write_item.type == WriteItemType.TENSOR:
        return None
    return int(write_item.tensor_data.chunk.offsets[0])


def split_among_ranks(items: list, world: int) -> list[list]:
    """Work items per rank, balanced by bytes: whole units (`unit_of`: a weight with its
    optimizer state), largest first onto the least loaded rank; each rank's in stream order."""
    units: dict[tuple, list] = {}
    for item in items:
        units.setdefault(unit_of(item), []).append(item)
    order = {id(item): i for i, item in enumerate(items)}
    shares: list[list] = [[] for _ in range(world)]
    loads = [0] * world
    for unit, members in sorted(units.items(), key=lambda u: (-sum(n for *_, n in u[1]), u[0])):
        r = loads.index(min(loads))
        shares[r] += members
        loads[r] += sum(n for *_, n in members)
    return [sorted(share, key=lambda it: order[id(it)]) for share in shares]


class _SyncBehind:
    """fsync each file DCP has finished writing in a background thread, while the next piece is
    produced and written (os.fsync releases the GIL), and keep its digest (taken as it was
    written, `_DigestedStream`; none where that was spoiled: the manifest reads the file); `join`
    waits for all, re-raises the first failure and returns the digests by path. A duplicated
    descriptor is synced, so a file renamed meanwhile (DCP's `.metadata.tmp`, not digested) is
    synced too."""

    def __init__(self, digest: Callable | None = None):
        self.digest = digest
        self.digests: dict = {}
        self._queue: queue.Queue = queue.Queue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            fd, path, value = job
            try:
                if self._failure is None:
                    os.fsync(fd)
                    if value is not None and not path.endswith(".tmp"):
                        self.digests[path] = value
            except OSError as e:
                self._failure = e
            finally:
                os.close(fd)

    def add(self, fd: int, path: str, value=None) -> None:
        """Sync, then close, descriptor `fd` (a duplicate of written file `path`'s); `value`:
        the file's digest, if taken."""
        self._queue.put((fd, path, value))

    def join(self) -> dict:
        self._queue.put(None)
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self.digests


class _DigestedStream:
    """A file as DCP writes it, each block fed to a running digest on its way to the file (no
    second read). DCP only appends; a seek spoils the digest (integrity.checksums then reads the
    file)."""

    def __init__(self, stream, running):
        self._stream = stream
        self.running = running

    def write(self, data) -> int:
        if self.running is not None:
            self.running.update(data)
        return self._stream.write(data)

    def seek(self, *args):
        self.running = None
        return self._stream.seek(*args)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _SyncBehindWriter(FileSystemWriter):
    """FileSystemWriter whose files are digested as written and fsynced behind the writing
    (`_SyncBehind`), not inline."""

    def __init__(self, path: str, sync: _SyncBehind, **kwargs):
        super().__init__(path, sync_files=False, **kwargs)
        create = self.fs.create_stream

        @contextlib.contextmanager
        def create_stream(path, mode):
            fd, digested = None, None
            try:
                with create(path, mode) as stream:
                    if "w" in mode:
                        fd = os.dup(stream.fileno())   # DCP closes `stream`
                        if sync.digest is not None:
                            stream = digested = _DigestedStream(stream, sync.digest())
                    yield stream
            finally:
                if fd is not None:
                    running = digested.running if digested is not None else None
                    sync.add(fd, str(path), running.value() if running is not None else None)
        self.fs.create_stream = create_stream


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


def write_torch_dist(directory: str, specs: dict, produce: Callable, objects: dict,
                     common: dict, layered: dict | None = None, progress: bool = True,
                     desc: str = "writing", finish: Callable | None = None,
                     digest: Callable | None = None) -> WriteStats:
    """Write a complete torch_dist checkpoint into the EXISTING empty `directory`.

    `specs`: {key: TensorSpec} of every tensor; `produce(key, layer)` makes one tensor (layer
    None) or one layer slice of it (without the leading axis) for keys marked in `layered`;
    `objects`: {unique key: bytes} of ShardedObjects (written by rank 0); `common`: the common
    state dict (rank 0 writes common.pt); `finish()`: called after this rank's last piece is
    produced, before the save completes (what checks the produced stream); `digest()`: a new
    running digest (`update(bytes)`, `value()`, e.g. integrity.Crc32) fed each data file this
    rank writes as it is written (WriteStats.digests). Collective under torch.distributed (same
    arguments).

    The result is what megatron-core's dist_checkpointing loads at ANY TP/EP/PP/DP layout:
    - `.metadata` + `__R_K.distcp`: every tensor under its global key with its global shape
      (one chunk each), ShardedObjects as bytes under their unique keys (`torch.save([data])`);
    - `common.pt`: the non-tensor state (args, iteration, optimizer param groups, ...);
    - `metadata.json`: `{"sharded_backend": "torch_dist", ...}`, written last.
    Under torchrun the tensors are split among the ranks (balanced by bytes): each rank produces
    and writes its share, DCP's coordinator (rank 0) writes the index. Every file is fsynced.
    A failure inside DCP is re-raised as the exception that caused it (`first_failure`).
    Returns this rank's WriteStats."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    mine = split_among_ranks(work_items(specs, layered or {}), world)[rank]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(n for _, _, n in mine), unit="B", unit_scale=True,
                   unit_divisor=1024, position=rank, leave=True, disable=None,
                   desc=f"{desc} ({len({k for k, _, _ in mine})} tensors"
                        f"{f', rank {rank}' if distributed else ''})")
    stats = WriteStats()
    failure = None
    sync = _SyncBehind(digest)
    planner = _StreamingSavePlanner(specs, mine, produce, objects if rank == 0 else {}, bar,
                                    stats, finish)
    try:
        # one item per file: FileSystemWriter keeps a file's tensors alive until it is closed
        writer = _SyncBehindWriter(directory, sync, single_file_per_rank=False,
                                   thread_count=1, overwrite=False)
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=not distributed)
    except CheckpointException as e:
        failure = first_failure(e)
    finally:
        planner.close()
        if bar is not None:
            bar.close()
        try:
            stats.digests = {os.path.relpath(path, directory): value
                             for path, value in sync.join().items()}
        except OSError as e:
            failure = failure or e
    if failure is not None:   # raised here, not in the handler: its own __context__ is kept
        raise failure
    if rank == 0:
        buf = io.BytesIO()
        torch.save(common, buf)
        write_file_synced(os.path.join(directory, "common.pt"), buf.getvalue())
        write_file_synced(os.path.join(directory, "metadata.json"),
                          json.dumps(TORCH_DIST_CONFIG).encode())
        fsync_path(directory)
    if distributed:
        dist.barrier()
    return stats
