"""What a conversion needs from the machine, checked before it starts, and I/O failures in one line.

`check_writable` (a probe file: as root, permission bits stop nothing, a read-only or immutable
directory does), `check_space` (bytes to write vs free space and the file-size limit),
`check_memory` (the estimated peak vs available memory) refuse with one line naming what is
needed, what there is and the fix; `io_failure` turns an OSError (or the stream error torch
raises for one) met while writing into the same kind of line.
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
import tempfile
from typing import Optional

from megatron_sparkling.checkpoint.paths import CheckpointError

GiB = 2 ** 30
# growing one piece holds the source piece, the grown piece and a cast/contiguous copy of it
PEAK_FACTOR = 3
BASE_BYTES = 512 * 2 ** 20     # the process itself, megatron-core and the meta-device layouts


def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 100 else f"{n / 2 ** 20:.1f} MiB"


def existing_parent(path: str) -> str:
    """`path`, or its nearest ancestor that exists (where a write would create it)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(root: str) -> None:
    """A file can be created where `root` is (or would be created)."""
    where = existing_parent(root)
    try:
        fd, probe = tempfile.mkstemp(prefix=".sparkling-probe-", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"--save {root}: cannot write in {where} ({e.strerror}); choose a "
                              "writable directory for --save") from None


def check_space(root: str, needed: int, largest_file: int) -> None:
    """`needed` bytes fit on the device of `root`, and `largest_file` under `ulimit -f`."""
    where = existing_parent(root)
    free = shutil.disk_usage(where).free
    if needed > free:
        raise CheckpointError(f"--save {root}: the checkpoint needs {_fmt(needed)} but "
                              f"{where} has {_fmt(free)} free; free space or choose --save on "
                              "a larger device")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and largest_file > limit:
        raise CheckpointError(f"--save {root}: the largest file is {_fmt(largest_file)} but this "
                              f"process may write files of {_fmt(limit)} at most (ulimit -f); "
                              "raise the limit (ulimit -f unlimited)")


def available_memory() -> Optional[int]:
    """MemAvailable, capped by the cgroup's memory limit; None where neither is known."""
    found = []
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(largest_piece: int, what: str) -> None:
    """The conversion's estimated peak (PEAK_FACTOR x the largest piece grown at once, `what`,
    plus a fixed base) fits in the available memory."""
    estimate = PEAK_FACTOR * largest_piece + BASE_BYTES
    available = available_memory()
    if available is not None and estimate > available:
        raise CheckpointError(f"the conversion needs about {_fmt(estimate)} of memory (growing "
                              f"{what}, {_fmt(largest_piece)} at once) but {_fmt(available)} is "
                              "available; run it on a machine with more memory, or check the "
                              "target sizes")


def _os_error(exc: BaseException) -> BaseException:
    """The OSError behind `exc` (torch.save reports a failed write as a RuntimeError raised
    while the OSError is handled), else `exc`."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def io_failure(exc: BaseException, where: str) -> Optional[CheckpointError]:
    """One line for an I/O failure while writing `where`; None if `exc` is not one."""
    exc = _os_error(exc)
    code = getattr(exc, "errno", None)
    text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    free = shutil.disk_usage(existing_parent(where)).free
    if code in (errno.ENOSPC, errno.EDQUOT) or (
            code is None and isinstance(exc, RuntimeError) and free < 64 * 2 ** 20
            and ("unexpected pos" in text or "PytorchStreamWriter" in text)):
        return CheckpointError(f"no space left writing {where} ({_fmt(free)} free); free space "
                               "or choose --save on a larger device, then run again")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CheckpointError(f"cannot write {where} ({os.strerror(code)}); choose a writable "
                               "directory for --save")
    if code == errno.EFBIG:
        return CheckpointError(f"writing {where}: a file exceeds the file-size limit (ulimit -f);"
                               " raise the limit (ulimit -f unlimited)")
    if isinstance(exc, OSError):
        return CheckpointError(f"writing {where} failed ({os.strerror(code) if code else text}); "
                               "check the device and run again")
    return None
