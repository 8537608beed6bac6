"""Atomic publication of a new checkpoint iteration under a Megatron checkpoint root.

    <save>/.sparkling-tmp-iter_0002000-<token>/   written and fsynced here first
    <save>/iter_0002000/                            appears by one rename when complete
    <save>/latest_checkpointed_iteration.txt        written last (tmp file, fsync, rename)

A run killed at any point leaves no tracker naming an incomplete directory, so Megatron finds
nothing to load (or the previous complete checkpoint). One writer at a time: `<save>/.sparkling-
lock` is held (flock) from preparing to publishing, a second writer is refused in one line; the
holder removes only staging folders provably abandoned (their owner file names a dead process,
or none). An existing checkpoint at the target is refused unless `overwrite`: then the new
iteration replaces it only once the new one is complete.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import time
import uuid

from megatron_sparkling.checkpoint.writer import fsync_path, write_file_synced
from megatron_sparkling.checkpoint.paths import (
    TRACKER,
    CheckpointError,
    iteration_dir,
)

STAGING_PREFIX = ".sparkling-tmp-"
RETIRED_PREFIX = ".sparkling-old-"
LOCK = ".sparkling-lock"
OWNER = ".sparkling-owner"     # in a staging folder: {"pid", "host", "started"} of its writer
OWN_PREFIX = ".sparkling-"     # names this module puts in --save besides the checkpoint


class TargetLock:
    """An exclusive flock on `<root>/.sparkling-lock`, refused (CheckpointError) while another
    process holds it. The kernel drops it when its holder dies (kill -9 included)."""

    def __init__(self, root: str):
        self.path = os.path.join(root, LOCK)
        self.fd = -1

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_owner(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise CheckpointError(
                    f"--save {os.path.dirname(self.path)} is being written by another expand "
                    f"({holder}); wait for it to finish or choose another --save") from None
            try:   # the file may have been unlinked by the holder we waited for: lock the live one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(owner()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1


def owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _read_owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['started']}"
    except (ValueError, KeyError, OSError):
        return "owner unknown"


def _abandoned(folder: str) -> bool:
    """A staging folder no live writer owns: its owner file names a process on this host that
    is gone, or another host (whose writer would hold the lock we hold), or there is none."""
    try:
        info = json.load(open(os.path.join(folder, OWNER)))
        pid, host = int(info["pid"]), info["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _same_or_inside(path: str, other: str) -> bool:
    """`path` is `other` or lies inside it."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def existing_checkpoint(root: str) -> list[str]:
    """What in `root` Megatron could load (tracker, iter_*, release)."""
    found = [p for p in (os.path.join(root, TRACKER), os.path.join(root, "release"))
             if os.path.exists(p)]
    return found + sorted(glob.glob(os.path.join(root, "iter_*")))


def check_target(root: str, source: str = "", overwrite: bool = False) -> None:
    """`source`: the --load path (a checkpoint root or an iteration directory)."""
    if source and (_same_or_inside(root, source) or _same_or_inside(
            os.path.dirname(os.path.realpath(source)), root) and _is_iteration_dir(source)):
        raise CheckpointError(f"--save {root} overlaps --load {source}; the source is never "
                              "written: choose another --save directory")
    if os.path.exists(root) and not os.path.isdir(root):
        raise CheckpointError(f"--save {root} is a file; choose a directory")
    existing = existing_checkpoint(root) if os.path.isdir(root) else []
    if existing and not overwrite:
        raise CheckpointError(f"--save {root} already holds a checkpoint "
                              f"({os.path.basename(existing[0])}); choose an empty directory or "
                              "pass --overwrite")
    others = sorted(n for n in os.listdir(root) if not n.startswith(OWN_PREFIX)) \
        if os.path.isdir(root) and not existing else []
    if others and not overwrite:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise CheckpointError(f"--save {root} is not empty ({others[0]}{more}) and holds no "
                              "checkpoint; choose an empty directory, or pass --overwrite to "
                              "write the checkpoint beside those files")


def _is_iteration_dir(path: str) -> bool:
    name = os.path.basename(os.path.normpath(path))
    return name == "release" or name.startswith("iter_")


class StagedIteration:
    """A staging folder for `iter_N` under `root`; `commit()` publishes it atomically."""

    def __init__(self, root: str, iteration: int, release: bool = False, overwrite: bool = False,
                 source: str = ""):
        self.root = root
        self.iteration = iteration
        self.release = release
        self.overwrite = overwrite
        self.final = iteration_dir(root, iteration, release)
        self.source = source
        self.staging = ""
        self.lock = TargetLock(root)

    def check(self) -> None:
        """Refuse a target that overlaps the source, is a file, or holds a checkpoint already
        (unless overwrite). Cheap: called before any work, and again right before writing."""
        check_target(self.root, self.source, self.overwrite)

    def prepare(self, token: str = "") -> str:
        """Take the target's lock, check the target, remove abandoned staging folders, create
        ours with its owner file (rank 0 only); the lock is held until commit() or abort()."""
        self.check()
        os.makedirs(self.root, exist_ok=True)
        self.lock.acquire()
        try:
            self.check()   # again under the lock: another writer may have published meanwhile
            self.remove_stale()
            self.staging = self.staging_path(token or uuid.uuid4().hex[:12])
            os.makedirs(self.staging)
            with open(os.path.join(self.staging, OWNER), "w") as f:
                json.dump(owner(), f)
        except BaseException:
            self.lock.release()
            raise
        return self.staging

    def staging_path(self, token: str) -> str:
        return os.path.join(self.root, f"{STAGING_PREFIX}{os.path.basename(self.final)}-{token}")

    def remove_stale(self) -> None:
        """Remove the abandoned staging and retired folders (called holding the lock)."""
        for pattern in (STAGING_PREFIX + "*", RETIRED_PREFIX + "*"):
            for path in glob.glob(os.path.join(self.root, pattern)):
                if _abandoned(path):
                    shutil.rmtree(path, ignore_errors=True)

    def commit(self, seal=None) -> str:
        """`seal(staging)` (e.g. write a manifest) once the owner file is gone, fsync the
        staging folder, rename it into place, then write the tracker file; the lock is
        released after."""
        try:
            return self._commit(seal)
        finally:
            self.lock.release()

    def _commit(self, seal) -> str:
        owner_file = os.path.join(self.staging, OWNER)
        if os.path.exists(owner_file):
            os.remove(owner_file)
        if seal is not None:
            seal(self.staging)
        for dirpath, _, names in os.walk(self.staging):
            for n in names:
                fsync_path(os.path.join(dirpath, n))
            fsync_path(dirpath)
        retired = ""
        if os.path.exists(self.final):
            if not self.overwrite:
                raise CheckpointError(f"{self.final} appeared while converting; pass --overwrite "
                                      "or choose another --save directory")
            retired = os.path.join(self.root, RETIRED_PREFIX + uuid.uuid4().hex[:12])
            os.rename(self.final, retired)
        os.rename(self.staging, self.final)
        fsync_path(self.root)
        tracker = os.path.join(self.root, TRACKER)
        write_file_synced(tracker + ".tmp", ("release" if self.release
                                             else str(self.iteration)).encode())
        os.replace(tracker + ".tmp", tracker)
        fsync_path(self.root)
        if retired:
            shutil.rmtree(retired, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        if self.staging and os.path.isdir(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)
        self.lock.release()

