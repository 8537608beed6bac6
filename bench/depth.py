"""Zero/one-layer progressive depth training (Bu et al.) against the fixed-depth run, in FLOPs.

    python bench/depth.py --quick            # CPU, 2 cores, a few minutes
    python bench/depth.py --full             # a GPU: deeper, wider, longer

In one process (1 rank), on the tokenized standard-library corpus and the project's pre-training
loop, with a warmup-stable-decay schedule (decay over the last 10% of iterations):
- the fixed-depth MoE model (--num-layers) for the whole budget;
- the same run started at 0 layers (new layers fresh, as the paper prefers from 0) and at 1 layer
  (new layers copy it), grown in process to the full depth at --grow-at of the budget (default
  0.8: inside the stable phase), same learning rate and weight decay after growth.
Same data order and seed for all, and deterministic (bench/progressive.py's rule: --threads
intra-op threads, deterministic kernels): the same command gives the same figures. FLOPs are
counted from the model actually run. Writes results.json, depth.png (validation loss against
FLOPs) and results.md (final validation loss, its difference to the fixed run, total FLOPs,
saving, and the saving at equal final loss).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import analysis  # noqa: E402
import progressive as width_bench  # noqa: E402

QUICK = dict(width_bench.QUICK, num_layers=4, train_iters=400, eval_interval=20, extend=0)
FULL = dict(width_bench.FULL, num_layers=16, extend=0)
# name -> (start layers, new layers)
RUNS = {"fixed": (None, None), "0-layer start": (0, "random"), "1-layer start": (1, "copy")}


def wsd_flags(cfg: dict) -> list[str]:
    decay = max(1, cfg["train_iters"] // 10)
    return ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", str(decay),
            "--lr-wsd-decay-style", "linear"]


def run_one(bench, name: str, grow_at: float) -> dict:
    start_layers, new_layers = RUNS[name]
    args = copy.copy(bench.narrow_args)
    if start_layers is not None:
        args.sparkling_progressive_start_layers = start_layers
        args.sparkling_progressive_grow_at = grow_at
        args.sparkling_progressive_new_layers = new_layers
    t0 = time.time()
    trainer = bench._trainer(args)
    bench._validate(trainer)
    bench._train(trainer, name)
    return {"run": name, "start_layers": start_layers, "new_layers": new_layers,
            "curve": bench._curve(trainer), "seconds": time.time() - t0}


def report(results: dict, out: str) -> str:
    text = "\n".join([
        f"# Zero/one-layer progressive depth vs fixed depth ({results['mode']} mode)", "",
        f"Command: `{results['command']}`", "",
        f"{results['config']['num_layers']} layers, {results['train_iters']} iterations, WSD "
        f"schedule, growth at iteration {results['grow_iteration']} ({results['grow_at']:.0%}). "
        "Saving = 1 - total FLOPs / the fixed run's; at equal loss = 1 - total FLOPs / the fixed "
        "run's FLOPs to first reach this run's final loss (— when it never did).", "",
        analysis.depth_table(results), ""])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


def plot(results: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, run in results["runs"].items():
        c = run["curve"]
        ax.plot([p["flops"] for p in c], [p["loss"] for p in c], label=name,
                lw=2.2 if name == "fixed" else 1.3, color="k" if name == "fixed" else None)
    best = min(p["loss"] for r in results["runs"].values() for p in r["curve"])
    ax.set_ylim(best - 0.1, best + 1.5)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title("progressive depth (WSD)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "depth.png")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    p = width_bench.bench_parser(__doc__.split("\n\n")[0], "depth",
                                 "tiny models, CPU, a few minutes")
    p.add_argument("--grow-at", type=float, default=0.8,
                   help="growth point as a fraction of the budget (default 0.8, Bu et al.)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    over = p.add_argument_group("override the mode's settings")
    for name in ("train_iters", "lr", "min_lr", "num_layers"):
        over.add_argument("--" + name.replace("_", "-"), type=type(QUICK[name]), default=None)
    a = p.parse_args(argv)
    if a.wandb_project:
        width_bench.require_wandb()
    cfg = dict(FULL if a.full else QUICK)
    for name in ("train_iters", "lr", "min_lr", "num_layers"):
        if getattr(a, name) is not None:
            cfg[name] = getattr(a, name)
    from megatron_sparkling.training import corpus
    from megatron_sparkling.training.initialize import shutdown

    if not corpus.exists(a.data_path):
        corpus.build(corpus.stdlib_files(corpus.default_source_dir()), a.data_path)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 200))
    width_bench.deterministic_process(a.threads)   # the same command, the same figures
    t0 = time.time()
    bench = width_bench.Bench(cfg, a.data_path, a.out, a.grow_at, extra_flags=wsd_flags(cfg))
    results = {"mode": "full" if a.full else "quick",
               "command": " ".join(["python", "bench/depth.py"] + sys.argv[1:]),
               "grow_at": a.grow_at, "grow_iteration": bench.grow_iteration,
               "train_iters": cfg["train_iters"], "config": cfg, "threads": a.threads,
               "runs": {}}
    try:
        for name in a.runs:
            results["runs"][name] = run_one(bench, name, a.grow_at)
            c = results["runs"][name]["curve"]
            print(f"[{time.time() - t0:6.0f}s] {name}: final {c[-1]['loss']:.4f} at "
                  f"{c[-1]['flops']:.3e} FLOPs", flush=True)
    finally:
        shutdown()
    results["seconds"] = time.time() - t0
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if "fixed" in results["runs"]:
        print(report(results, a.out))
    print(f"plot: {plot(results, a.out)}; {results['seconds']:.0f} s")
    if a.wandb_project:
        width_bench.log_to_wandb(a.wandb_project, a.out, [
            (name, "depth", run["curve"], {"final loss": run["curve"][-1]["loss"]},
             dict(cfg, grow_at=a.grow_at, run=name)) for name, run in results["runs"].items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
