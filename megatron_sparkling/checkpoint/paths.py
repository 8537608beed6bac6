"""Where a Megatron checkpoint lives on disk, and the one error every checkpoint step raises.

    <root>/latest_checkpointed_iteration.txt     the iteration (or `release`), written last
    <root>/iter_0000100/  (or <root>/release/)   one checkpoint
"""
from __future__ import annotations

import os
from typing import Optional

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, written or loaded as asked; the message says what to
    change."""


def tracker_path(root: str) -> str:
    return os.path.join(root, TRACKER)


def iteration_dir(root: str, iteration: int, release: bool = False) -> str:
    return os.path.join(root, "release" if release else f"iter_{iteration:07d}")


def read_tracker(root: str) -> tuple[int, bool]:
    """(iteration, release) from the tracker file; (-1, False) when there is none."""
    path = tracker_path(root)
    if not os.path.isfile(path):
        return -1, False
    text = open(path).read().strip()
    if text == "release":
        return 0, True
    try:
        return int(text), False
    except ValueError:
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; "
                              "rewrite it with the iteration of the checkpoint to load") from None


def checkpoint_to_load(root: Optional[str], iteration: Optional[int] = None) -> tuple[int, bool]:
    """(iteration, release) a load of `root` reads (Megatron-LM's --load and --ckpt-step):
    `iteration` when given, else the tracker's; (-1, False) when there is none."""
    found, release = read_tracker(root) if root else (-1, False)
    return (found, release) if iteration is None else (iteration, release)


def checkpoint_dir_to_load(root: Optional[str], iteration: Optional[int] = None) -> Optional[str]:
    """The iter_N/ (or release/) directory a load of `root` reads; None if there is none."""
    found, release = checkpoint_to_load(root, iteration)
    return iteration_dir(root, found, release) if found >= 0 else None
