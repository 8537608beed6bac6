"""Integrity of a stored checkpoint: a manifest of file checksums, and the checks every value read
out of a checkpoint passes (ONE implementation: `ValueChecks`, which checkpoint/grown.py's stream
applies for `expand` and growth on load alike, and `verify` through `check_all`).

    iter_N/sparkling_manifest.json   {"algorithm": "crc32", "files": {name: [bytes, crc]}, "read": ...}

The checksum is zlib's CRC-32: it guards against accidental damage (a flipped bit, a truncated or
half-copied file), not against tampering, and runs at several GB/s (3x sha256 here), so checking
a manifest costs about one extra read of the files. torch_dist itself stores no checksum, so a
checkpoint without a manifest (one Megatron wrote) is checked by its values: finite, Adam's
second moment >= 0, fp32 main params equal to the weights they shadow, the step consistent.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from typing import Optional

import torch

from megatron_sparkling.checkpoint.paths import CheckpointError
from megatron_sparkling.checkpoint.writer import write_file_synced
from megatron_sparkling.core import layout as layout_lib

MANIFEST = "sparkling_manifest.json"
_BLOCK = 8 << 20
RECOPY = "the checkpoint is damaged: copy it again from where it was written (or use an earlier iteration)"


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose bytes or values are damaged; the message names the file and tensor."""


# ---------------------------------------------------------------------------- manifest
class Crc32:
    """A running checksum of one file as the manifest keeps it: bytes and zlib's CRC-32."""

    def __init__(self):
        self.crc, self.size = 0, 0

    def update(self, data) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.size += memoryview(data).nbytes

    def value(self) -> tuple[int, str]:
        return self.size, f"{self.crc:08x}"


def file_checksum(path: str) -> tuple[int, str]:
    """(bytes, CRC-32 as 8 hex digits) of one file."""
    running = Crc32()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            running.update(block)
    return running.value()


def checksums(directory: str, share: tuple = (0, 1), known: Optional[dict] = None) -> dict:
    """{relative name: [bytes, crc]} of every file under `directory` but the manifest; `share`
    (index, count): only every count-th file from index (ranks divide the reading); `known`:
    checksums already taken of some files (as they were written), used while the size holds."""
    names = []
    for dirpath, _, files in os.walk(directory):
        names += [os.path.relpath(os.path.join(dirpath, n), directory) for n in files]
    index, count = share
    out = {}
    for i, rel in enumerate(sorted(n for n in names if n != MANIFEST)):
        if i % count != index:
            continue
        path = os.path.join(directory, rel)
        held = (known or {}).get(rel)
        out[rel] = (list(held) if held is not None and held[0] == os.path.getsize(path)
                    else list(file_checksum(path)))
    return out


def write_manifest(directory: str, read: Optional[dict] = None,
                   known: Optional[dict] = None) -> None:
    """Write the manifest of every file in `directory` (fsynced); `read`: what was read to make it
    (the source's path, iteration and file checksums); `known`: checksums taken as files were
    written (checksums())."""
    body = {"algorithm": "crc32", "files": checksums(directory, known=known), "read": read or {}}
    write_file_synced(os.path.join(directory, MANIFEST), json.dumps(body, indent=1).encode())


def check_manifest(directory: str, tensors_in=None) -> Optional[dict]:
    """The checksums of `directory`'s files, checked against its manifest (CorruptCheckpointError
    naming the file, and the tensors it holds via `tensors_in(name)`); None without a manifest
    (nothing is read then)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    found = checksums(directory)
    try:
        listed = json.load(open(path))["files"]
    except (ValueError, KeyError, TypeError, OSError):
        raise CorruptCheckpointError(f"{path} is not a valid manifest; {RECOPY}") from None
    for name, (size, crc) in listed.items():
        where = os.path.join(directory, name)
        held = _holding(tensors_in, name)
        if name not in found:
            raise CorruptCheckpointError(f"{where}{held} is missing (listed in {MANIFEST}); "
                                         f"{RECOPY}")
        if found[name][0] != size:
            raise CorruptCheckpointError(f"{where}{held} has {found[name][0]} bytes, its manifest "
                                         f"says {size}; {RECOPY}")
        if found[name][1] != crc:
            raise CorruptCheckpointError(f"{where}{held}: checksum {found[name][1]} differs from "
                                         f"{crc} in {MANIFEST}; {RECOPY}")
    return found


def _holding(tensors_in, name: str) -> str:
    keys = tensors_in(name) if tensors_in is not None else []
    if not keys:
        return ""
    more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
    return f" (holding {keys[0]}{more})"


# ---------------------------------------------------------------------------- values
class ValueChecks:
    """Checks every tensor read from source checkpoint `src` as it is read (`tensor`), and the
    optimizer step once (`step`): finite values; exp_avg_sq >= 0; fp32 main params equal, cast
    to the weights' dtype, to the model weights they shadow (every element, once per key and
    layer). Raises CorruptCheckpointError in one line naming the tensor and the file(s).

    `paired`: the reader reads each weight and its main param one right after the other
    (checkpoint/writer.py's stream order), so the first of the two is held until the second
    arrives and they are compared then, without reading either again. Any other order still
    compares every pair: a held side whose partner does not come next, or was changed in place
    since, is compared with its partner read from `src` (as is every pair when not `paired`);
    `finish()` settles the last one."""

    def __init__(self, src, optimizer=None, paired: bool = False):
        self.src = src
        self._optimizer = optimizer
        self._paired = paired
        self._compared: set = set()
        self._held = None   # (key, layer, kind, tensor, its version): a side awaiting its partner

    @property
    def optimizer(self):
        """The source's optimizer state (main params to compare weights with), None without."""
        if self._optimizer is None:
            # TE's precision-aware optimizer stores main-param remainders, not fp32 copies
            remainders = getattr(self.src.common.get("args"), "use_precision_aware_optimizer",
                                 False)
            self._optimizer = False if remainders else (self.src.optimizer or False)
        return self._optimizer or None

    def where(self, key: str, kind: Optional[str], layer: Optional[int]) -> str:
        files = self.src.files_of(key, kind)
        name = key if kind is None else f"{kind} of {key}"
        name += "" if layer is None else f" (layer {layer})"
        if not files:
            return f"{name} in {self.src.path}"
        more = f" (+{len(files) - 1} more)" if len(files) > 1 else ""
        return f"{name} in {os.path.join(self.src.path, files[0])}{more}"

    def tensor(self, key: str, kind: Optional[str], layer: Optional[int],
               tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (model weight: kind None; else an optimizer-state kind), checked."""
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return tensor
        low = self._finite(key, kind, layer, tensor)
        if kind == "exp_avg_sq" and low < 0:
            negative = tensor < 0
            raise CorruptCheckpointError(
                f"{self.where(key, kind, layer)}: {int(negative.sum())} negative values "
                f"(min {low:.3g}) in Adam's mean of squared gradients, which "
                f"is never negative; {RECOPY}")
        if kind in (None, "param"):
            self._shadowed(key, kind, layer, tensor)
        return tensor

    def _finite(self, key, kind, layer, tensor) -> float:
        """The tensor's minimum, refusing NaN and infinities: min and max in one pass (both
        propagate NaN), the exact count only to report a failure."""
        low, high = (float(v) for v in torch.aminmax(tensor.reshape(-1)))
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CorruptCheckpointError(
                f"{self.where(key, kind, layer)}: {bad} of {tensor.numel()} values are NaN or "
                f"infinite; {RECOPY}")
        return low

    def _shadowed(self, key, kind, layer, tensor) -> None:
        """A model weight equals its fp32 main param cast to the weight's dtype."""
        opt = self.optimizer
        if (opt is None or (key, layer) in self._compared or key not in opt.keys
                or "param" not in opt.kinds_of(key)):
            return
        held = self._held
        if held is not None and held[:2] == (key, layer):
            if held[2] == kind:   # the same side again (a layer copied twice): still waiting
                return
            self._held = None
            if held[3]._version == held[4]:   # unchanged since it was checked
                self._compared.add((key, layer))
                self._compare(key, layer, *((tensor, held[3]) if kind is None
                                            else (held[3], tensor)))
                return
        self.finish()
        if self._paired:
            self._held = (key, layer, kind, tensor, tensor._version)
        else:
            self._with_stored_partner(key, layer, kind, tensor)

    def finish(self) -> None:
        """Compare the held side, if any, with its partner read from `src`."""
        if self._held is not None:
            key, layer, kind, tensor, _ = self._held
            self._held = None
            self._with_stored_partner(key, layer, kind, tensor)

    def _with_stored_partner(self, key, layer, kind, tensor) -> None:
        self._compared.add((key, layer))
        if kind is None:
            self._compare(key, layer, tensor, self._read_checked(key, "param", layer))
        else:
            self._compare(key, layer, self._read_checked(key, None, layer), tensor)

    def _compare(self, key, layer, weight, main) -> None:
        if torch.equal(main.to(weight.dtype), weight):
            return
        differ = main.to(weight.dtype) != weight
        n = int(differ.sum())
        gap = float((main - weight.float()).abs().max())
        # a wrong bucket layout scrambles (nearly) every element; damage touches a few
        if n > weight.numel() // 10:
            raise CheckpointError(
                f"main parameters of {key} read from the optimizer state differ from its "
                f"weights in {n} of {weight.numel()} elements: the optimizer layout rebuilt "
                "from the stored args does not fit this checkpoint; re-save it with "
                "--dist-ckpt-optim-fully-reshardable, or pass --no-optimizer")
        raise CorruptCheckpointError(
            f"{self.where(key, None, layer)} differs from its fp32 main parameter "
            f"({self.where(key, 'param', layer).split(' in ', 1)[1]}) in {n} of "
            f"{weight.numel()} elements (up to {gap:.3g}); one of them is damaged; {RECOPY}")

    def _read_checked(self, key, kind, layer) -> torch.Tensor:
        """The other side of a comparison (checked for finiteness, not compared again)."""
        t = (self.src.read_model(key, layer) if kind is None
             else self.optimizer.read(key, kind, layer))
        if t.numel():
            self._finite(key, kind, layer, t)
        return t

    def step(self, optimizer) -> None:
        """The optimizer step: a whole number >= 0, not past the iteration, the same in every
        param group that stores one."""
        if optimizer is None:
            return
        step = optimizer.step
        where = f"{self.src.path}: the optimizer step"
        if step is not None:
            s = float(step)
            if not math.isfinite(s) or s < 0 or s != int(s):
                raise CorruptCheckpointError(f"{where} is {step!r}, not a whole number >= 0; "
                                             f"{RECOPY}")
            if not self.src.release and self.src.iteration > 0 and s > self.src.iteration:
                raise CorruptCheckpointError(f"{where} {s:.0f} is past the iteration "
                                             f"{self.src.iteration}; {RECOPY}")
        steps = set()
        for group in optimizer.param_groups:
            value = group.get("step")
            if value is not None:
                steps.add(float(value.item() if torch.is_tensor(value) else value))
        if len(steps) > 1 or (steps and step is not None and steps != {float(step)}):
            raise CorruptCheckpointError(f"{where} differs between param groups "
                                         f"({sorted(steps)}, common {step}); {RECOPY}")


def check_all(src, optimizer: bool = True) -> int:
    """Read and check every model tensor (and, with `optimizer`, every optimizer-state tensor)
    of `src` one layer at a time, as `verify` does before loading; returns the tensors checked."""
    opt = src.optimizer if optimizer else None
    checks = ValueChecks(src, opt, paired=opt is not None)
    checks.step(opt)
    count = 0
    for key, spec in src.model_tensors.items():
        layers = range(spec.shape[0]) if layout_lib.is_stacked(key) else [None]
        for layer in layers:
            checks.tensor(key, None, layer, src.read_model(key, layer))
            if opt is not None and key in opt.keys:
                for kind in opt.kinds_of(key):
                    checks.tensor(key, kind, layer, opt.read(key, kind, layer))
        count += 1
    checks.finish()
    return count
