"""Atomic publication of a new checkpoint iteration under a Megatron checkpoint root.

    <save>/.sparkling-tmp-iter_0002000-<token>/   written and fsynced here first
    <save>/iter_0002000/                            appears by one rename when complete
    <save>/latest_checkpointed_iteration.txt        written last (tmp file, fsync, rename)

A run killed at any point leaves no tracker naming an incomplete directory, so Megatron finds
nothing to load (or the previous complete checkpoint); the staging folder of a killed run is
removed by the next run. An existing checkpoint at the target is refused unless `overwrite`:
then the new iteration replaces it only once the new one is complete.
"""
from __future__ import annotations

import glob
import os
import shutil
import uuid

from megatron_sparkling.checkpoint.writer import fsync_path, write_file_synced
from megatron_sparkling.checkpoint.paths import (
    TRACKER,
    CheckpointError,
    iteration_dir,
)

STAGING_PREFIX = ".sparkling-tmp-"
RETIRED_PREFIX = ".sparkling-old-"


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

    def check(self) -> None:
        """Refuse a target that overlaps the source, is a file, or holds a checkpoint already
        (unless overwrite). Cheap: called before any work, and again right before writing."""
        check_target(self.root, self.source, self.overwrite)

    def prepare(self, token: str = "") -> str:
        """Check the target, remove stale staging folders, create ours (rank 0 only)."""
        self.check()
        os.makedirs(self.root, exist_ok=True)
        self.remove_stale()
        self.staging = self.staging_path(token or uuid.uuid4().hex[:12])
        os.makedirs(self.staging)
        return self.staging

    def staging_path(self, token: str) -> str:
        return os.path.join(self.root, f"{STAGING_PREFIX}{os.path.basename(self.final)}-{token}")

    def remove_stale(self) -> None:
        for pattern in (STAGING_PREFIX + "*", RETIRED_PREFIX + "*"):
            for path in glob.glob(os.path.join(self.root, pattern)):
                shutil.rmtree(path, ignore_errors=True)

    def commit(self) -> str:
        """fsync the staging folder, rename it into place, then write the tracker file."""
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

