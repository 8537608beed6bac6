"""Faults and hostile inputs against `expand`, `verify` and growth on load, on a REAL trained
checkpoint (copied fresh for every corruption): damaged bytes are refused in one line naming the
file and the tensor; I/O and resource failures are one line naming cause and fix; concurrent
writers cannot both proceed. Every case asserts the exit code, one line and no traceback, the
source byte-identical and nothing loadable at --save.

How faults are made, as root (tests run as root here, so permission bits stop nothing):
- corruption: bytes XORed inside one tensor's data in a .distcp file (located through DCP's
  own index, so the flip lands where the test says);
- read-only directory: `chattr +i` (an immutable directory refuses new files to root too);
- disk full: a fault-injecting stream under DCP's writer that fails with ENOSPC after a few KiB
  (what the OS does), and the free-space pre-check against a reported free size;
- file-size limit: a real RLIMIT_FSIZE (`ulimit -f`) on the converter's process.
"""
import contextlib
import errno
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, megatron_run, tiny_moe_flags, tree_hashes
from megatron_sparkling.cli import main

SAVE_AT = 3
NARROW = dict(train_iters=6, lr_warmup_iters=2, hidden_dropout=0, attention_dropout=0,
              use_distributed_optimizer=True)
ITER = f"iter_{SAVE_AT:07d}"
ERROR = "megatron-sparkling expand: error: "


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus_prefix):
    """A trained dp_reshardable checkpoint (distributed optimizer, fp32 main params)."""
    root = tmp_path_factory.mktemp("faults") / "ckpt"
    with megatron_run(tiny_moe_flags(corpus_prefix, **NARROW)) as trainer:
        trainer.train(until_iteration=SAVE_AT)
        trainer.save(str(root))
    return str(root)


@pytest.fixture(scope="module")
def grown(source, tmp_path_factory):
    """The source grown 2x in expert FFN by `expand` (it carries a manifest)."""
    dst = tmp_path_factory.mktemp("grown") / "ckpt"
    assert main(["expand", "--no-progress", "--load", source, "--save", str(dst),
                 "--moe-ffn-hidden-size", "256"]) == 0
    return str(dst)


# ---------------------------------------------------------------------------- helpers
def data_location(root, key_end: str):
    """(file, offset of the raw tensor data, the tensor) of the largest chunk of the first key
    ending with `key_end`, found through the checkpoint's own DCP index."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from megatron_sparkling.checkpoint.dcp import DcpCheckpoint

    dcp = DcpCheckpoint(os.path.join(root, ITER))
    key = next(k for k in sorted(dcp.tensors) if k.endswith(key_end))
    md = dcp.metadata.state_dict_metadata[key]
    chunk = max(md.chunks, key=lambda c: torch.Size(c.sizes).numel())
    info = dcp.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
    tensor = dcp.read(key, chunk.offsets, chunk.sizes).contiguous()
    raw = tensor.numpy().tobytes()
    path = os.path.join(root, ITER, info.relative_path)
    region = open(path, "rb").read()[info.offset:info.offset + info.length]
    start = region.find(raw[:256])
    assert start >= 0 and region[start:start + len(raw)] == raw, key
    return path, info.offset + start, tensor.flatten()


def xor_bytes(path, offset, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(len(data))
        f.seek(offset)
        f.write(bytes(a ^ b for a, b in zip(old, data)))


def corrupted(source, tmp_path, key_end, how) -> str:
    """A copy of `source` with the data of `key_end` damaged: `how` is "sign" (the sign bit of
    4 positive float32 values), "bytes" (16 bytes XOR 0xFF: finite, far-off values) or "nan"."""
    copy = str(tmp_path / f"corrupt_{how}")
    shutil.copytree(source, copy)
    path, offset, values = data_location(copy, key_end)
    middle = values.numel() // 2
    if how == "sign":
        positive = [i for i in range(middle, values.numel()) if values[i] > 0][:4]
        assert len(positive) == 4
        for i in positive:
            xor_bytes(path, offset + 4 * i + 3, b"\x80")
    elif how == "bytes":
        xor_bytes(path, offset + 4 * middle, b"\xff" * 16)
    else:
        with open(path, "r+b") as f:
            f.seek(offset + 4 * middle)
            f.write(bytes.fromhex("0000c07f"))   # float32 NaN, little-endian
    return copy


def expand(*argv) -> int:
    return main(["expand", "--no-progress", *map(str, argv)])


def one_line(capsys, prefix=ERROR) -> str:
    """The single error line; no traceback anywhere in the output."""
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out, out.err[-3000:]
    lines = [line for line in out.err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, out.err[-3000:]
    return lines[0]


def nothing_loadable(save) -> None:
    """No tracker, no iteration directory, no staging folder, no lock left at --save."""
    if not os.path.exists(save):
        return
    left = [n for n in os.listdir(save) if n.startswith(("iter_", ".sparkling", "latest", "release"))]
    assert not left, left


def refused(capsys, src, save, *argv, match, code=1):
    before = tree_hashes(src)
    assert expand("--load", src, "--save", save, *argv) == code
    line = one_line(capsys)
    assert match in line, line
    assert tree_hashes(src) == before
    nothing_loadable(save)
    return line


# ---------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("key_end, how, argv, names", [
    (".exp_avg_sq", "sign", (), "negative values"),
    ("linear_proj.weight", "bytes", ("--no-optimizer",), "differs from its fp32 main parameter"),
    (".param", "bytes", (), "differs from its fp32 main parameter"),
    ("linear_fc1.weight", "nan", ("--no-optimizer",), "NaN or infinite"),
], ids=["exp_avg_sq-negative", "weight-finite-flip", "master-param-flip", "weight-nan"])
def test_a_corrupted_source_is_refused_naming_file_and_tensor(source, tmp_path, capsys, key_end,
                                                             how, argv, names):
    bad = corrupted(source, tmp_path, key_end, how)
    line = refused(capsys, bad, tmp_path / "out", *argv, "--moe-ffn-hidden-size", 256,
                   match=names)
    assert ".distcp" in line and "damaged" in line and "bucket layout" not in line, line
    key = key_end.strip(".")
    assert key in line or "decoder." in line, line


def test_a_damaged_file_under_a_manifest_is_refused_by_every_reader(grown, tmp_path, capsys,
                                                                    corpus_prefix):
    """expand writes a manifest; a flipped byte in any file of its output is refused by expand,
    verify and growth on load, naming the file and the tensor it holds."""
    from megatron_sparkling.checkpoint.integrity import MANIFEST, CorruptCheckpointError

    assert os.path.isfile(os.path.join(grown, ITER, MANIFEST))
    bad = str(tmp_path / "bad")
    shutil.copytree(grown, bad)
    path, offset, _ = data_location(bad, "linear_fc2.weight")
    xor_bytes(path, offset + 8, b"\x01")     # one bit: a finite value, only the checksum sees it
    line = refused(capsys, bad, tmp_path / "out", match="differs from")
    assert os.path.basename(path) in line and "linear_fc2.weight" in line, line
    assert verify("--before", bad, "--after", grown) == 2
    assert "checksum" in one_line(capsys, "megatron-sparkling verify: ")
    flags = tiny_moe_flags(corpus_prefix, load=bad, **dict(NARROW, moe_ffn_hidden_size=512))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        with megatron_run(flags):
            pass


def test_growth_on_load_refuses_a_corrupted_source(source, tmp_path, corpus_prefix):
    from megatron_sparkling.checkpoint.integrity import CorruptCheckpointError

    bad = corrupted(source, tmp_path, ".exp_avg_sq", "sign")
    flags = tiny_moe_flags(corpus_prefix, load=bad, **dict(NARROW, moe_ffn_hidden_size=256))
    with pytest.raises(CorruptCheckpointError) as info:
        with megatron_run(flags):
            pass
    text = str(info.value)
    assert "exp_avg_sq of " in text and ".distcp" in text and "\n" not in text, text


# ---------------------------------------------------------------------------- verify
def verify(*argv) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(["verify", "--batches", "1", "--no-twins", *map(str, argv)])


def test_verify_refuses_damaged_inputs_in_one_line(source, grown, tmp_path, capsys):
    truncated = str(tmp_path / "truncated")
    shutil.copytree(source, truncated)
    shard = sorted(n for n in os.listdir(os.path.join(truncated, ITER)) if n.endswith(".distcp"))[0]
    with open(os.path.join(truncated, ITER, shard), "r+b") as f:
        f.truncate(1000)
    assert verify("--before", truncated, "--after", grown) == 2
    assert "is truncated (1000 of" in one_line(capsys, "megatron-sparkling verify: ")
    no_index = str(tmp_path / "no_index")
    shutil.copytree(source, no_index)
    os.remove(os.path.join(no_index, ITER, ".metadata"))
    assert verify("--before", no_index, "--after", grown) == 2
    assert "has no .metadata" in one_line(capsys, "megatron-sparkling verify: ")
    assert verify("--before", os.path.join(source, "latest_checkpointed_iteration.txt"),
                  "--after", grown) == 2
    assert "is a file, not a directory" in one_line(capsys, "megatron-sparkling verify: ")
    bad = corrupted(source, tmp_path, ".exp_avg_sq", "sign")
    assert verify("--before", bad, "--after", grown) == 2
    assert "negative values" in one_line(capsys, "megatron-sparkling verify: ")
    assert verify("--before", grown, "--after", source) == 2
    assert "look swapped" in one_line(capsys, "megatron-sparkling verify: ")


def test_verify_exits_non_zero_when_a_bound_breaks(source, grown, tmp_path, capsys):
    """Function-preserving growth (sparkling at 2x) passes the default bounds; growth with
    random new hidden units does not, and verify names the bound."""
    assert verify("--before", source, "--after", grown) == 0
    random_hidden = tmp_path / "random"
    assert expand("--load", source, "--save", random_hidden, "--hidden-size", 128,
                  "--method", "random", "--no-optimizer") == 0
    capsys.readouterr()
    assert verify("--before", source, "--after", random_hidden) == 1
    line = one_line(capsys, "megatron-sparkling verify: failed: ")
    assert "exceeds --max-loss-change 0.01" in line or "exceeds --max-logit-diff 0.1" in line
    assert verify("--before", source, "--after", grown, "--max-logit-diff", "0") == 1
    assert "exceeds --max-logit-diff 0" in one_line(capsys, "megatron-sparkling verify: failed: ")


# ---------------------------------------------------------------------------- refusals
def test_bad_paths_and_sizes_are_refused_in_one_line(source, tmp_path, capsys):
    tracker = os.path.join(source, "latest_checkpointed_iteration.txt")
    refused(capsys, tracker, tmp_path / "a", match="is a file, not a directory")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    refused(capsys, source, busy, match="is not empty (notes.txt) and holds no checkpoint")
    assert sorted(os.listdir(busy)) == ["notes.txt"]
    assert expand("--load", source, "--save", busy, "--overwrite") == 0
    assert sorted(os.listdir(busy)) == [ITER, "latest_checkpointed_iteration.txt", "notes.txt"]
    capsys.readouterr()
    # the relaunch at TP 2 defaults its expert TP to 2, which cannot split 129
    refused(capsys, source, tmp_path / "b", "--moe-ffn-hidden-size", 129,
            "--target-tensor-model-parallel-size", 2,
            match="129 is not divisible by the expert tensor-parallel size 2")
    line = refused(capsys, source, tmp_path / "c", "--moe-ffn-hidden-size", 10 ** 7,
                   match="of memory")
    assert "GiB" in line and "available" in line, line


# ---------------------------------------------------------------------------- I/O faults
def test_disk_full_is_refused_before_writing(source, tmp_path, capsys, monkeypatch):
    from megatron_sparkling.checkpoint import resources

    real = shutil.disk_usage
    monkeypatch.setattr(resources.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=64 * 1024))
    refused(capsys, source, tmp_path / "out", match="free; free space or choose --save")


def test_disk_full_while_writing_is_one_line(source, tmp_path, capsys, monkeypatch):
    """The device fills up after 16 KiB: DCP's writer gets ENOSPC from the OS (injected in the
    stream it writes through); the staging folder is removed."""
    from torch.distributed.checkpoint import filesystem

    budget = [16 * 1024]

    class FullDisk:
        def __init__(self, stream):
            self._stream = stream

        def write(self, data):
            budget[0] -= len(data)
            if budget[0] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._stream.write(data)

        def __getattr__(self, name):
            return getattr(self._stream, name)

    original = filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with original(self, path, mode) as stream:
            yield FullDisk(stream) if "w" in mode else stream

    monkeypatch.setattr(filesystem.FileSystem, "create_stream", create_stream)
    refused(capsys, source, tmp_path / "out", match="no space left writing")


def test_file_size_limit_is_refused_before_writing(source, tmp_path):
    """A real `ulimit -f` of 64 KiB on the converter's process (root is bound by it too)."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    before = tree_hashes(source)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "megatron_sparkling.cli", "expand", "--no-progress",
                          "--load", source, "--save", str(tmp_path / "out")], env=env,
                         cwd=REPO, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1 and "(ulimit -f)" in lines[0], out.stderr[-3000:]
    assert tree_hashes(source) == before
    nothing_loadable(tmp_path / "out")


def test_read_only_target_is_one_line(source, tmp_path, capsys):
    """An immutable directory (chattr +i) refuses new files to root as well."""
    parent = tmp_path / "read_only"
    parent.mkdir()
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        refused(capsys, source, parent / "out", match="cannot write in")
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


# ---------------------------------------------------------------------------- concurrency
def test_a_second_writer_is_refused_and_only_abandoned_staging_is_removed(source, tmp_path,
                                                                           capsys):
    import json

    from megatron_sparkling.checkpoint.commit import OWNER, TargetLock

    dst = tmp_path / "out"
    dst.mkdir()
    lock = TargetLock(str(dst))
    lock.acquire()
    try:
        before = tree_hashes(source)
        assert expand("--load", source, "--save", dst) == 1
        line = one_line(capsys)
        assert f"is being written by another expand (pid {os.getpid()}" in line, line
        assert "wait for it to finish or choose another --save" in line
        assert tree_hashes(source) == before
    finally:
        lock.release()
    nothing_loadable(dst)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("live", os.getpid()), ("dead", dead.pid)):
        folder = dst / f".sparkling-tmp-{ITER}-{name}"
        folder.mkdir()
        (folder / OWNER).write_text(json.dumps({"pid": pid, "host": os.uname().nodename,
                                                "started": "now"}))
    assert expand("--load", source, "--save", dst) == 0
    left = sorted(os.listdir(dst))
    assert left == [f".sparkling-tmp-{ITER}-live", ITER, "latest_checkpointed_iteration.txt"]


def test_two_concurrent_writers_cannot_both_proceed(source, tmp_path):
    from megatron_sparkling.checkpoint.source import open_checkpoint

    dst = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "megatron_sparkling.cli", "expand", "--no-progress",
           "--load", source, "--save", str(dst)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1 and ("being written by another expand" in lines[0]
                                or "already holds a checkpoint" in lines[0]), err[-3000:]
    assert sorted(os.listdir(dst)) == [ITER, "latest_checkpointed_iteration.txt"]
    assert open_checkpoint(str(dst)).iteration == SAVE_AT


@pytest.mark.slow
def test_under_torchrun_a_refusal_is_one_line_from_the_children(source, tmp_path):
    """2 ranks on a corrupted source: the failing rank's error reaches rank 0 through DCP and
    is printed once; no child prints a traceback; torchrun's failure summary carries the line
    (the launcher's own ChildFailedError report stays torchrun's)."""
    from conftest import free_port

    bad = corrupted(source, tmp_path, ".exp_avg_sq", "sign")
    before = tree_hashes(bad)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "megatron_sparkling.cli",
                          "expand", "--no-progress", "--load", bad, "--save",
                          str(tmp_path / "out"), "--moe-ffn-hidden-size", "256"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    lines = [line for line in text.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1 and "negative values" in lines[0], text[-4000:]
    assert not [line for line in text.splitlines()                  # no child's frames
                if line.strip().startswith('File "') and "megatron_sparkling" in line], text
    assert text.count("Traceback (most recent call last)") <= 1    # torchrun's own, if any
    assert "traceback : exp_avg_sq of" in text, text[-4000:]
    assert tree_hashes(bad) == before
    nothing_loadable(tmp_path / "out")


@pytest.mark.slow
def test_nproc_per_node_refusal_is_one_line_and_no_traceback(source, tmp_path):
    """`expand --nproc-per-node 2` (the same ranks without torchrun's launcher): the corrupted
    source is refused in exactly one line, with no traceback at all, and a non-zero exit."""
    bad = corrupted(source, tmp_path, ".exp_avg_sq", "sign")
    before = tree_hashes(bad)
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "megatron_sparkling.cli", "expand",
                          "--nproc-per-node", "2", "--no-progress", "--load", bad, "--save",
                          str(tmp_path / "out"), "--moe-ffn-hidden-size", "256"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and "negative values" in errors[0], text[-4000:]
    assert tree_hashes(bad) == before
    nothing_loadable(tmp_path / "out")
