"""Benchmark: the converter's speed against a plain copy, across ranks, and its peak memory.

    python bench/convert.py [--out docs/results/convert.json]   everything below, one run
    python bench/convert.py --measure SRC DST [--sizes JSON]     one conversion in this process
                                                                 (or in each rank under torchrun)
    python bench/convert.py --checks-only --out docs/results/integrity_cost.json

Three checkpoints (dp_reshardable: Megatron's default optimizer format), `small`, `large` (4x the
parameters: the peak-memory comparison) and `xl` (>= 2 GiB, larger than the page cache flatters),
each converted to fully_reshardable with no size change (`format`: every tensor read, mapped,
checked and written) and grown 2x in expert FFN size with sparkling (`grow 2x`).

Speed is bytes read + written per second of the streaming write (after the source is opened and
everything validated, the same in every rank), beside a plain copy of the same checkpoint folder
on the same disk, fsynced like the converter's output. Every conversion starts COLD: the source's
pages are evicted from the page cache first (posix_fadvise DONTNEED on each file: per file, no
root needed, other processes' cache untouched); the copy is timed cold the same way and warm
(source read once just before), and the ratio is to the cold copy. The `xl` conversions also run
under torchrun at 1 and 2 ranks (gloo; work split by writer.split_among_ranks): the speed-up of
2 ranks over 1. Peak RSS per rank: the RSS high-water mark (reset via /proc/self/clear_refs once
the source is open) above the RSS at that point. Cores: the CPU seconds (user + system, every
thread of every rank) per second of the conversion; on this 2-core machine, where one process
already keeps more than one core busy (its pieces are made in a thread ahead of the writer, files
are synced and checksummed in another), that bounds what a second rank can add. The integrity
checks (checkpoint/integrity.py) are timed against the same conversion without them
(`--no-checks`), alternated 3 times.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import analysis  # noqa: E402

SIZES = {  # small -> large: 4x the parameters (experts dominate: 4x the layers); xl >= 2 GiB
    "small": dict(num_layers=2, hidden_size=256, moe_ffn_hidden_size=1024, num_experts=8),
    "large": dict(num_layers=8, hidden_size=256, moe_ffn_hidden_size=1024, num_experts=8),
    "xl": dict(num_layers=24, hidden_size=256, moe_ffn_hidden_size=1024, num_experts=8),
}
MIB = 2 ** 20


def _vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _files(root: str):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def dir_bytes(root: str) -> int:
    return sum(os.path.getsize(p) for p in _files(root))


def settle() -> None:
    """Write back every dirty page first (the last run's output, a just-built source), so that
    no run is timed while the disk still flushes the one before."""
    os.sync()


def evict(root: str) -> None:
    """Drop `root`'s files from the page cache (clean pages; fsynced first to be sure)."""
    for path in _files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(root: str) -> None:
    for path in _files(root):
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def file_copy_seconds(src: str, dst: str) -> float:
    """A plain copy of the checkpoint folder, fsynced (the converter fsyncs its output too)."""
    start = time.time()
    shutil.copytree(src, dst)
    for path in _files(dst):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.time() - start


def measure(load: str, save: str, sizes: dict = None, checks: bool = True) -> dict:
    """One conversion in this process; under torchrun (WORLD_SIZE set) every rank calls it
    and the ranks split the work as `expand` does. Returns this rank's figures."""
    import torch.distributed as dist

    from megatron_sparkling.checkpoint import expand as convert
    from megatron_sparkling.checkpoint.commit import StagedIteration
    from megatron_sparkling.checkpoint.writer import split_among_ranks, work_items

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    opened = time.time()
    req = convert.ExpandRequest(load=load, save=save, sizes=sizes or {}, progress=False,
                                checks=checks)
    conv = convert.Conversion(req)
    pieces = work_items(conv.specs, conv.layered())
    mine = split_among_ranks(pieces, world)[rank]
    open_s = time.time() - opened
    if dist.is_initialized():
        dist.barrier()
    open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
    base = _vm("VmRSS:")
    cpu = _cpu_seconds()
    start = time.time()
    stage = StagedIteration(req.save, conv.common["iteration"])
    box = [stage.prepare() if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    seal = conv.write(box[0], manifest=checks)
    stats = conv.stats
    if rank == 0:
        stage.staging = box[0]
        stage.commit(seal=seal)
    if dist.is_initialized():
        dist.barrier()
    seconds = time.time() - start
    cpu = _cpu_seconds() - cpu
    out = {"rank": rank, "cpu_seconds": cpu, "world": world, "peak_bytes": _vm("VmHWM:") - base,
           "rss_before_bytes": base, "peak_held_bytes": stats.peak_held_bytes, "checks": checks,
           "largest_tensor_bytes": max(s.nbytes for s in conv.specs.values()),
           "largest_piece_bytes": max(n for _, _, n in pieces),
           "rank_bytes": sum(n for _, _, n in mine),
           "written_bytes": sum(s.nbytes for s in conv.specs.values()),
           "tensors": len(conv.specs), "open_seconds": open_s, "seconds": seconds}
    if rank == 0:
        out["io_bytes"] = dir_bytes(load) + dir_bytes(save)   # read + written
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def _build(root: str, corpus: str, size: dict) -> None:
    from conftest import megatron_run, tiny_moe_flags

    flags = tiny_moe_flags(corpus, train_iters=2, lr_warmup_iters=1, micro_batch_size=2,
                           global_batch_size=2, use_distributed_optimizer=True, save=root, **size)
    with megatron_run(flags) as trainer:
        trainer.train(until_iteration=1)
        trainer.save()


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _results(stdout: str) -> list[dict]:
    return [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]


def _args(src, dst, sizes, checks) -> list:
    return ([os.path.abspath(__file__), "--measure", src, dst, "--sizes", json.dumps(sizes or {})]
            + ([] if checks else ["--no-checks"]))


def run_conversion(src: str, dst: str, sizes: dict = None, checks: bool = True,
                   ranks: int = 0) -> dict:
    """One cold conversion in a fresh process (`ranks` > 0: under torchrun with that many);
    the figures of every rank, the output removed again."""
    from conftest import free_port

    settle()
    evict(src)
    cmd = [sys.executable] + _args(src, dst, sizes, checks)
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}"] + cmd[1:]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    per_rank = sorted(_results(proc.stdout), key=lambda r: r["rank"])
    shutil.rmtree(dst)
    first = per_rank[0]
    return {"seconds": max(r["seconds"] for r in per_rank), "io_bytes": first["io_bytes"],
            "mib_per_s": first["io_bytes"] / MIB / max(r["seconds"] for r in per_rank),
            "peak_rss_bytes_per_rank": [r["peak_bytes"] for r in per_rank],
            "cpu_seconds": sum(r["cpu_seconds"] for r in per_rank),
            "bytes_per_rank": [r["rank_bytes"] for r in per_rank],
            "open_seconds": max(r["open_seconds"] for r in per_rank),
            "largest_piece_bytes": first["largest_piece_bytes"],
            "written_bytes": first["written_bytes"], "ranks": ranks or None}


def copy_rates(src: str, tmp: str) -> dict:
    """MiB/s (read + written) of a plain fsynced copy: cold (source evicted) and warm."""
    out = {}
    for state in ("cold", "warm"):
        settle()
        evict(src)
        if state == "warm":
            warm(src)
        dst = os.path.join(tmp, "copy")
        seconds = file_copy_seconds(src, dst)
        shutil.rmtree(dst)
        out[state] = {"seconds": seconds, "mib_per_s": 2 * dir_bytes(src) / MIB / seconds}
    return out


def checks_cost(tmp: str, src: str, repeats: int = 3) -> dict:
    """Seconds of the same conversion (format, no size change) with and without the integrity
    checks, alternated `repeats` times (the minimum of each: the least disturbed run)."""
    times = {True: [], False: []}
    for i in range(repeats):
        for checks in (True, False):
            dst = os.path.join(tmp, f"checks_{checks}_{i}")
            times[checks].append(run_conversion(src, dst, checks=checks)["seconds"])
    with_s, without_s = min(times[True]), min(times[False])
    return {"with_s": with_s, "without_s": without_s, "ratio": with_s / without_s,
            "runs": {"with": times[True], "without": times[False]},
            "command": "python bench/convert.py --checks-only"}


def _kinds(size: dict) -> tuple:
    return (("format", {}), ("grow 2x", {"moe_ffn_hidden_size": 2 * size["moe_ffn_hidden_size"]}))


def main(checks_only: bool = False, out: str = "", models=None) -> None:
    from megatron_sparkling.training import corpus

    began = time.time()
    models = models or list(SIZES)
    root = os.environ.get("BENCH_TMP") or None
    with tempfile.TemporaryDirectory(prefix="bench_convert_", dir=root) as tmp:
        prefix = os.path.join(tmp, "corpus", "stdlib_text_document")
        corpus.build(corpus.stdlib_files(corpus.default_source_dir()), prefix, 300_000)
        if checks_only:
            src = os.path.join(tmp, "large")
            _build(src, prefix, SIZES["large"])
            c = checks_cost(tmp, src)
            print(f"integrity checks (large, format conversion, min of 3): {c['with_s']:.2f} s "
                  f"with, {c['without_s']:.2f} s without: ratio {c['ratio']:.3f}", flush=True)
            if out:
                with open(out, "w") as f:
                    json.dump({"integrity_checks": c}, f, indent=1)
            return
        print(analysis.CONVERT_HEADER, flush=True)
        command = analysis.portable_command(["python", "bench/convert.py"] + sys.argv[1:])
        result = {"models": {}, "command": command}
        for name in models:
            src = os.path.join(tmp, name)
            _build(src, prefix, SIZES[name])
            copy = copy_rates(src, tmp)
            rows = {}
            runs = [(kind, sizes, 0) for kind, sizes in _kinds(SIZES[name])]
            if name == "xl":
                runs += [(kind, sizes, n) for n in (1, 2) for kind, sizes in _kinds(SIZES[name])]
            for kind, sizes, ranks in runs:
                r = run_conversion(src, os.path.join(tmp, "out"), sizes, ranks=ranks)
                r["ratio_to_cold_copy"] = r["mib_per_s"] / copy["cold"]["mib_per_s"]
                r["ratio_to_warm_copy"] = r["mib_per_s"] / copy["warm"]["mib_per_s"]
                rows[f"{kind}/{ranks or 'process'}"] = r
                print(analysis.convert_row(name, f"{kind}/{ranks or 'process'}", r,
                                           dir_bytes(src), copy), flush=True)
            result["models"][name] = {"checkpoint_bytes": dir_bytes(src), "copy": copy,
                                      "conversions": rows}
            if name == "large":
                result["integrity_checks"] = checks_cost(tmp, src)
            shutil.rmtree(src)
        m = result["models"]
        if "xl" in m:
            c = m["xl"]["conversions"]
            result["speedup_2_ranks"] = {
                kind: c[f"{kind}/1"]["seconds"] / c[f"{kind}/2"]["seconds"]
                for kind, _ in _kinds(SIZES["xl"])}
        if "small" in m and "large" in m:
            s, l = m["small"]["conversions"], m["large"]["conversions"]
            result["peak_rss_growth_small_to_large"] = {
                k: max(l[k]["peak_rss_bytes_per_rank"]) / max(s[k]["peak_rss_bytes_per_rank"])
                for k in s}
        for line in analysis.convert_summary(result):
            print(line, flush=True)
        if "integrity_checks" in result:
            c = result["integrity_checks"]
            print(f"integrity checks (large, format, min of 3): {c['with_s']:.2f} s with, "
                  f"{c['without_s']:.2f} s without: ratio {c['ratio']:.3f}", flush=True)
        result["wall_seconds"] = time.time() - began
        print(f"the whole run took {result['wall_seconds']:.0f} s", flush=True)
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", nargs=2, metavar=("SRC", "DST"))
    p.add_argument("--sizes", default="{}", help="JSON: target sizes for --measure")
    p.add_argument("--no-checks", action="store_true",
                   help="--measure without the integrity checks (their cost)")
    p.add_argument("--checks-only", action="store_true",
                   help="only time the integrity checks (large model, with vs without)")
    p.add_argument("--models", nargs="+", choices=list(SIZES), default=None,
                   help="only these checkpoints (default: all three)")
    p.add_argument("--out", default=None,
                   help="write the figures as JSON to this file ('' for none; default "
                        "docs/results/convert.json, with --checks-only integrity_cost.json)")
    ns = p.parse_args()
    if ns.measure:
        line = "RESULT " + json.dumps(measure(*ns.measure, sizes=json.loads(ns.sizes),
                                              checks=not ns.no_checks)) + "\n"
        sys.stdout.write(line)   # one write (< PIPE_BUF): ranks sharing stdout do not interleave
        sys.stdout.flush()
    else:
        out = ns.out if ns.out is not None else os.path.join(
            REPO, "docs", "results", "integrity_cost.json" if ns.checks_only else "convert.json")
        main(ns.checks_only, out, ns.models)
