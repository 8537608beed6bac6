"""Benchmark: the converter's peak memory and speed on two model sizes 4x apart.

    python bench/convert.py                     build two checkpoints, convert each, print figures
    python bench/convert.py --measure SRC DST   convert one in this process, print JSON figures
    python bench/convert.py --checks-only       only the integrity checks' cost (with / without)

Each conversion is measured in its own process: after the checkpoint is opened and everything is
validated (source layouts rebuilt, target shapes known), the RSS high-water mark is reset
(/proc/self/clear_refs) and the streaming write runs; the figure is the high-water mark above
the RSS at that point. The checkpoints are dp_reshardable (Megatron's default), converted to
fully_reshardable with no size change (every tensor is read, mapped and written), and grown 2x
in expert FFN size with sparkling. Throughput is bytes read + written per second, beside that of
a plain file copy of the same checkpoint on the same disk (copied and fsynced like the
converter's output). The integrity checks (checkpoint/integrity.py: every value read checked,
main params compared with the weights, the manifest of checksums written with the source's
checksums) are timed against the same conversion without them (`--no-checks`): the ratio row.
"""
import argparse
import json
import os
import subprocess
import sys
import shutil
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

SIZES = {  # 4x apart in parameters (experts dominate): 4x the layers
    "small": dict(num_layers=2, hidden_size=256, moe_ffn_hidden_size=1024, num_experts=8),
    "large": dict(num_layers=8, hidden_size=256, moe_ffn_hidden_size=1024, num_experts=8),
}


def _vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def dir_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def file_copy_seconds(src: str, dst: str) -> float:
    """A plain copy of the checkpoint folder, fsynced (the converter fsyncs its output too)."""
    start = time.time()
    shutil.copytree(src, dst)
    for d, _, files in os.walk(dst):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.time() - start


def measure(load: str, save: str, sizes: dict = None, checks: bool = True) -> dict:
    from megatron_sparkling.checkpoint import expand as convert
    from megatron_sparkling.checkpoint import integrity
    from megatron_sparkling.checkpoint.commit import StagedIteration
    from megatron_sparkling.checkpoint.writer import work_items, write_torch_dist

    req = convert.ExpandRequest(load=load, save=save, sizes=sizes or {}, progress=False,
                                checks=checks)
    conv = convert.Conversion(req)
    specs = conv.specs.values()
    pieces = work_items(conv.specs, conv.layered())
    open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
    base = _vm("VmRSS:")
    start = time.time()
    stage = StagedIteration(req.save, conv.common["iteration"])
    stats = write_torch_dist(stage.prepare(), conv.specs, conv.produce, conv.objects,
                             conv.common, layered=conv.layered(), progress=False)
    stage.commit(seal=(lambda d: integrity.write_manifest(d, conv.read_record())) if checks
                 else None)
    return {"peak_bytes": _vm("VmHWM:") - base, "rss_before_bytes": base,
            "peak_held_bytes": stats.peak_held_bytes, "checks": checks,
            "largest_tensor_bytes": max(s.nbytes for s in specs),
            "largest_piece_bytes": max(n for _, _, n in pieces),
            "written_bytes": sum(s.nbytes for s in specs), "tensors": len(conv.specs),
            "seconds": time.time() - start,
            "io_bytes": dir_bytes(load) + dir_bytes(save)}   # read + written


def _build(root: str, corpus: str, size: dict) -> None:
    from conftest import megatron_run, tiny_moe_flags

    flags = tiny_moe_flags(corpus, train_iters=2, lr_warmup_iters=1, micro_batch_size=2,
                           global_batch_size=2, use_distributed_optimizer=True, save=root, **size)
    with megatron_run(flags) as trainer:
        trainer.train(until_iteration=1)
        trainer.save()


def _measure_in_subprocess(src: str, dst: str, sizes: dict = None, checks: bool = True) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", src, dst,
                          "--sizes", json.dumps(sizes or {})] + ([] if checks else ["--no-checks"]),
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def checks_cost(tmp: str, src: str, repeats: int = 3) -> dict:
    """Seconds of the same conversion (format, no size change) with and without the integrity
    checks, alternated `repeats` times (the minimum of each: the least disturbed run)."""
    times = {True: [], False: []}
    for i in range(repeats):
        for checks in (True, False):
            dst = os.path.join(tmp, f"checks_{checks}_{i}")
            times[checks].append(_measure_in_subprocess(src, dst, checks=checks)["seconds"])
            shutil.rmtree(dst)
    with_s, without_s = min(times[True]), min(times[False])
    return {"with_s": with_s, "without_s": without_s, "ratio": with_s / without_s,
            "runs": {"with": times[True], "without": times[False]}}


def main(checks_only: bool = False, out: str = "") -> None:
    from megatron_sparkling.training import corpus

    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        prefix = os.path.join(tmp, "corpus", "stdlib_text_document")
        corpus.build(corpus.stdlib_files(corpus.default_source_dir()), prefix, 300_000)
        mib = 2 ** 20
        print(f"{'model':>6} {'conversion':>10} {'checkpoint':>11} {'largest tensor':>14} "
              f"{'peak RSS':>9} {'time':>7} {'MiB/s r+w':>9} {'file copy':>9} {'ratio':>6}")
        rows = {}
        for name, size in SIZES.items():
            if checks_only and name != "large":
                continue
            src = os.path.join(tmp, name)
            _build(src, prefix, size)
            if checks_only:
                break
            copy_s = file_copy_seconds(src, os.path.join(tmp, name + "_copy"))
            copy_rate = 2 * dir_bytes(src) / mib / copy_s
            shutil.rmtree(os.path.join(tmp, name + "_copy"))
            for kind, sizes in (("format", {}),
                                ("grow 2x", {"moe_ffn_hidden_size": 2 * size["moe_ffn_hidden_size"]})):
                dst = os.path.join(tmp, f"{name}_{kind.replace(' ', '')}")
                r = _measure_in_subprocess(src, dst, sizes)
                shutil.rmtree(dst)
                rate = r["io_bytes"] / mib / r["seconds"]
                if not sizes:
                    rows[name] = r
                print(f"{name:>6} {kind:>10} {dir_bytes(src) / mib:>7.1f} MiB "
                      f"{r['largest_tensor_bytes'] / mib:>10.1f} MiB {r['peak_bytes'] / mib:>5.1f} MiB "
                      f"{r['seconds']:>6.1f}s {rate:>9.1f} {copy_rate:>9.1f} {rate / copy_rate:>6.2f}",
                      flush=True)
        c = checks_cost(tmp, os.path.join(tmp, "large"))
        print(f"integrity checks (large, format conversion, min of 3): {c['with_s']:.2f} s "
              f"with, {c['without_s']:.2f} s without: ratio {c['ratio']:.3f}", flush=True)
        if out:
            with open(out, "w") as f:
                json.dump({"integrity_checks": c, "rows": rows}, f, indent=1)
        if checks_only:
            return
        s, l = rows["small"], rows["large"]
        print(f"checkpoint grew {l['written_bytes'] / s['written_bytes']:.2f}x, converter peak "
              f"grew {l['peak_bytes'] / s['peak_bytes']:.2f}x (largest streamed piece "
              f"{l['largest_piece_bytes'] / s['largest_piece_bytes']:.2f}x); the peak is "
              f"{100 * l['peak_bytes'] / l['written_bytes']:.0f}% of the large checkpoint")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", nargs=2, metavar=("SRC", "DST"))
    p.add_argument("--sizes", default="{}", help="JSON: target sizes for --measure")
    p.add_argument("--no-checks", action="store_true",
                   help="--measure without the integrity checks (their cost)")
    p.add_argument("--checks-only", action="store_true",
                   help="only time the integrity checks (large model, with vs without)")
    p.add_argument("--out", default="", help="write the figures as JSON to this file")
    ns = p.parse_args()
    if ns.measure:
        print(json.dumps(measure(*ns.measure, sizes=json.loads(ns.sizes),
                                 checks=not ns.no_checks)))
    else:
        main(ns.checks_only, ns.out)
