"""Width-progressive MoE pre-training against training from scratch, measured in FLOPs.

    python bench/progressive.py --quick            # CPU, 2 cores, under 10 minutes
    python bench/progressive.py --full --sweep     # a GPU: bigger models, growth-time sweep

In one process (1 rank), on the tokenized standard-library corpus and the project's own
pre-training loop (megatron-core GPTModel with MoE layers, optimizer, scheduler, datasets):
- (a) the wide MoE model from scratch, one per setting (expert FFN 2x, hidden 2x, both);
- (b) the narrow model for the first part of the token budget (shared by every setting and
  method: one narrow run, saved at the growth point), then growth with each method (the product's
  Grower, with the asymmetric optimizer state and, for SPARKLING and its ablations, the LR
  re-warmup) and the rest of the budget wide.
All runs read the same data in the same order with the same seed. Training FLOPs are counted from
the shapes of the model actually run (forward + backward, MoE top-k included:
megatron_sparkling/training/flops.py). Outputs (in --out): results.json (every curve), the plot
progressive.png (validation loss against FLOPs, growth point marked) and results.md (per setting:
compute to reach the scratch run's best validation loss, saving, loss jump at growth, twin
gradient cosine ~100 steps after growth).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import analysis  # noqa: E402

SETTINGS = {
    "expert-ffn-2x": {"moe_ffn_hidden_size": 2},
    "hidden-2x": {"hidden_size": 2},
    "both-2x": {"moe_ffn_hidden_size": 2, "hidden_size": 2},
}
# name -> (growth method, method options, re-warmup scope)
METHODS = {
    "sparkling": ("sparkling", {}, "new"),
    "copy": ("copy", {}, "none"),
    "hypercloning": ("hypercloning", {}, "none"),
    "staged": ("staged", {}, "none"),
    "msg": ("msg", {}, "none"),
    "zero": ("zero", {}, "none"),
    "random": ("random", {}, "none"),
    "drop-opt": ("drop-opt", {}, "new"),
    "copy-opt": ("copy-opt", {}, "new"),
    "sparkling-rewarm-all": ("sparkling", {}, "all"),
    # beyond the list (not run by default): RMS-consistent random new units
    "sparkling-random": ("sparkling", {"new_units": "random"}, "new"),
}
DEFAULT_METHODS = [m for m in METHODS if m != "sparkling-random"]
# what a sweep may change (growth point: --grow-at)
OVERRIDES = {"train_iters": int, "extend": float, "lr": float, "min_lr": float, "eval_iters": int,
             "rewarmup_iters": int, "rewarmup_peak_ratio": float, "msg_ramp": int}
PAPER_SAVING = {"expert-ffn-2x": 0.20, "hidden-2x": 0.25, "both-2x": 0.35}

QUICK = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, num_experts=4,
    moe_ffn_hidden_size=64, moe_router_topk=2, seq_length=64, micro_batch_size=8,
    global_batch_size=8, train_iters=320, lr=1.5e-3, min_lr=1.5e-4, lr_warmup_iters=16,
    eval_interval=16, eval_iters=4, rewarmup_iters=48, rewarmup_peak_ratio=1.3, msg_ramp=16,
    twin_after=100, extend=0.25)
# Quick settings, from short scans on hidden-2x (README, "Results"): lr 1.5e-3 (3e-3 made the
# wide scratch run unstable, 1e-3 was slower); re-warmup over 48 iterations (30% of the wide
# part; 16 left sparkling 0.6% above scratch's final loss).
FULL = dict(
    num_layers=8, hidden_size=512, num_attention_heads=8, kv_channels=64, num_experts=16,
    moe_ffn_hidden_size=512, moe_router_topk=2, seq_length=512, micro_batch_size=8,
    global_batch_size=64, train_iters=6000, lr=1e-3, min_lr=1e-4, lr_warmup_iters=200,
    eval_interval=100, eval_iters=10, rewarmup_iters=250, rewarmup_peak_ratio=1.3, msg_ramp=250,
    twin_after=100, extend=0.25)
# `extend`: a grown run that has not reached scratch's final loss at the end of the budget goes on
# (at the schedule's min LR: the schedule still ends at the budget) for up to this fraction of the
# budget, so "compute to reach scratch's final loss" is measured, not just "reached or not".


def budget_iters(cfg: dict) -> int:
    return cfg["train_iters"]


def extension_iters(cfg: dict) -> int:
    return int(round(cfg.get("extend", 0) * cfg["train_iters"]))


def base_flags(cfg: dict, data_path: str, out: str) -> list[str]:
    flags = {
        "num_layers": cfg["num_layers"], "hidden_size": cfg["hidden_size"],
        "num_attention_heads": cfg["num_attention_heads"], "kv_channels": cfg["kv_channels"],
        "num_experts": cfg["num_experts"], "moe_ffn_hidden_size": cfg["moe_ffn_hidden_size"],
        "moe_router_topk": cfg["moe_router_topk"], "moe_aux_loss_coeff": 0.01,
        "swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope",
        "disable_bias_linear": True, "untie_embeddings_and_output_weights": True,
        "seq_length": cfg["seq_length"], "max_position_embeddings": cfg["seq_length"],
        "micro_batch_size": cfg["micro_batch_size"],
        "global_batch_size": cfg["global_batch_size"],
        # datasets sized for the extension; the LR schedule ends at the budget for every run
        "train_iters": budget_iters(cfg) + extension_iters(cfg),
        "lr_decay_iters": budget_iters(cfg),
        "lr": cfg["lr"], "min_lr": cfg["min_lr"], "lr_warmup_iters": cfg["lr_warmup_iters"],
        "lr_decay_style": "cosine", "weight_decay": 0.1, "clip_grad": 1.0,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "use_distributed_optimizer": True,
        "eval_interval": cfg["eval_interval"], "eval_iters": cfg["eval_iters"],
        "log_interval": 10 ** 9, "data_path": data_path, "split": "98,2,0", "seed": 1234,
        "sparkling_rewarmup_iters": cfg["rewarmup_iters"],
        "sparkling_rewarmup_peak_ratio": cfg["rewarmup_peak_ratio"],
    }
    argv = []
    for name, value in flags.items():
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


class Bench:
    """All runs in one initialized megatron-core process (1 rank)."""

    def __init__(self, cfg, data_path, out, grow_at: float, verbose=False, extra_flags=()):
        from megatron_sparkling.training import initialize as init_lib
        from megatron_sparkling.training.loop import _add_run_flags, _chain_providers
        from megatron_sparkling.live import rewarmup as schedule

        self.cfg, self.out, self.verbose = cfg, out, verbose
        os.makedirs(out, exist_ok=True)
        argv = base_flags(cfg, data_path, out) + list(extra_flags)   # later flags win
        self.narrow_args = init_lib.initialize(
            argv, _chain_providers(_add_run_flags, schedule.add_rewarmup_args))
        from megatron_sparkling.training import data
        from megatron_sparkling.mcore import model as model_lib

        self.narrow_args.padded_vocab_size = model_lib.padded_vocab_size(
            data.build_tokenizer(self.narrow_args).vocab_size, self.narrow_args)
        self.grow_iteration = int(round(grow_at * cfg["train_iters"]))
        self.narrow_ckpt = os.path.join(out, f"narrow_ckpt_{self.grow_iteration}")

    # ------------------------------------------------------------------ runs
    def _trainer(self, args):
        from megatron_sparkling.training.initialize import set_random_seed
        from megatron_sparkling.training.loop import Pretrainer, _hooks_from_args

        set_random_seed(args.seed)
        return Pretrainer(args, _hooks_from_args(args))   # training modes, e.g. progressive depth

    def _curve(self, trainer):
        return [{"iteration": r["iteration"], "flops": r["flops"], "loss": r["validation lm loss"],
                 **{k: True for k in ("after_growth", "extended") if r.get(k)}}
                for r in trainer.history if "validation lm loss" in r]

    def _train(self, trainer, label, target=None):
        """Train to the end of the budget; with `target`, go on (extension) until the validation
        loss reaches it or the extension ends."""
        from tqdm import tqdm

        args = trainer.args
        budget = budget_iters(self.cfg)
        last = budget + (extension_iters(self.cfg) if target is not None else 0)
        bar = tqdm(total=budget - trainer.iteration, desc=label, leave=False,
                   disable=not sys.stderr.isatty())
        loss = float("inf")
        while trainer.iteration < last and not (trainer.iteration >= budget and loss <= target):
            trainer.train_step()
            bar.update(1)
            if trainer.iteration % args.eval_interval == 0 or trainer.iteration == budget:
                loss = self._validate(
                    trainer, **({"extended": True} if trainer.iteration > budget else {}))
            if getattr(self, "_twin_probe", None) and trainer.iteration == self._twin_probe[0]:
                self._twin_probe[1](trainer)
        if trainer.iteration > budget and trainer.iteration % args.eval_interval:
            self._validate(trainer, extended=True)   # the extension's end
        bar.close()

    @staticmethod
    def _validate(trainer, **extra):
        loss = trainer.evaluate()
        trainer.history.append({"iteration": trainer.iteration, "validation lm loss": loss,
                                "flops": trainer.num_floating_point_operations_so_far, **extra})
        return loss

    def wide_args(self, setting: str):
        from megatron_sparkling.core.spec import ModelShape

        shape = ModelShape.from_args(self.narrow_args)
        scale = SETTINGS[setting]
        target = shape.replace(**{k: getattr(shape, k) * f for k, f in scale.items()})
        return target.apply_to_args(self.narrow_args)

    def scratch(self, setting: str) -> dict:
        args = copy.copy(self.wide_args(setting))
        trainer = self._trainer(args)
        self._validate(trainer)
        start = time.time()
        self._train(trainer, f"scratch {setting}")
        return {"kind": "scratch", "setting": setting, "curve": self._curve(trainer),
                "flops_per_iteration": trainer.flops_per_iteration,
                "seconds": time.time() - start}

    def narrow(self) -> dict:
        args = copy.copy(self.narrow_args)
        args.save = self.narrow_ckpt
        trainer = self._trainer(args)
        self._validate(trainer)
        start = time.time()
        while trainer.iteration < self.grow_iteration:
            trainer.train_step()
            if trainer.iteration % args.eval_interval == 0:
                self._validate(trainer)
        if trainer.iteration % args.eval_interval:
            self._validate(trainer)
        trainer.save()
        self.narrow_curve = self._curve(trainer)
        return {"kind": "narrow", "curve": self.narrow_curve,
                "flops_per_iteration": trainer.flops_per_iteration,
                "seconds": time.time() - start}

    def grown(self, setting: str, name: str, target: float = None) -> dict:
        from megatron_sparkling.live import rewarmup as schedule
        from megatron_sparkling.diagnostics import twin_similarity
        from megatron_sparkling.live.mask_ramp import MaskRamp
        from megatron_sparkling.methods import Grower
        from megatron_sparkling.core.spec import GrowthSpec, ModelShape
        from megatron_sparkling.training import data

        method, options, scope = METHODS[name]
        if method == "msg":
            options = dict(options, ramp_steps=self.cfg["msg_ramp"])
        narrow_args = copy.copy(self.narrow_args)
        narrow_args.load = self.narrow_ckpt
        trainer = self._trainer(narrow_args)
        assert trainer.iteration == self.grow_iteration
        wide = self.wide_args(setting)
        spec = GrowthSpec(ModelShape.from_args(narrow_args), ModelShape.from_args(wide), method,
                          seed=narrow_args.seed, options=options)
        grower = Grower(spec)
        start = time.time()
        trainer.grow_model(wide, lambda key, shape, sources: grower.grow(key, sources[key]))
        config = dataclasses.replace(schedule.RewarmupConfig.from_args(wide), scope=scope)
        schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                  grower.record(), config)
        if method == "msg":
            MaskRamp(grower.plan, trainer.iteration, self.cfg["msg_ramp"]).install(
                trainer.model, lambda: trainer.iteration)
        trainer.history = [dict(p, **{"validation lm loss": p["loss"]}) for p in self.narrow_curve]
        self._validate(trainer, after_growth=True)

        twin = {}
        probe_at = min(trainer.iteration + self.cfg["twin_after"], budget_iters(self.cfg))
        batches = list(data.microbatches(trainer.valid_ds, 0, 1, wide))

        def probe(t):
            sims = twin_similarity(t.model, grower.plan, batches)
            twin["gradient"] = {axis: s["mean"] for axis, s in sims["gradient"].items()
                                if s.get("mean") is not None}
            twin["weight"] = {axis: s["mean"] for axis, s in sims["weight"].items()
                              if s.get("mean") is not None}
        self._twin_probe = (probe_at, probe)
        self._train(trainer, f"{name} {setting}", target)
        self._twin_probe = None
        curve = self._curve(trainer)
        growth_flops = self.narrow_curve[-1]["flops"]
        grads = list(twin.get("gradient", {}).values())
        return {"kind": "grown", "setting": setting, "method": name, "curve": curve,
                "growth_iteration": self.grow_iteration, "growth_flops": growth_flops,
                "loss_jump": analysis.growth_jump(curve, growth_flops),
                "twin_cosine": sum(grads) / len(grads) if grads else None,
                "twin": twin, "twin_iteration": probe_at,
                "flops_per_iteration": trainer.flops_per_iteration,
                "seconds": time.time() - start}


# ---------------------------------------------------------------------- reporting
def report(results: dict, out: str) -> str:
    lines = [f"# Progressive MoE pre-training vs from scratch ({results['mode']} mode)", "",
             f"Command: `{results['command']}`", "",
             f"Growth at iteration {results['grow_iteration']} of {results['train_iters']} "
             f"({results['grow_at']:.0%} of the token budget). Saving = 1 - FLOPs to reach the "
             "scratch run's best validation loss / the scratch run's FLOPs to reach it; a grown "
             "run that has not reached it at the end of the budget goes on at the schedule's "
             f"min LR for up to {results['config'].get('extend', 0):.0%} more iterations (— when "
             "it still does not). Final loss and total FLOPs are at the end of the budget; at "
             "equal loss = 1 - those FLOPs / scratch's FLOPs to reach that final loss.", ""]
    for setting, runs in results["settings"].items():
        table_runs = {"scratch": runs["scratch"], **{m: r for m, r in runs["grown"].items()}}
        rows = analysis.summarize(table_runs, "scratch")
        lines += [f"## {setting} (paper: {PAPER_SAVING[setting]:.0%} saved)", "",
                  analysis.markdown_table(rows), ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


def plot(results: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["settings"])
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        runs = results["settings"][setting]
        sc = runs["scratch"]["curve"]
        ax.plot([p["flops"] for p in sc], [p["loss"] for p in sc], "k-", lw=2.2, label="scratch")
        for name, run in runs["grown"].items():
            c = run["curve"]
            ax.plot([p["flops"] for p in c], [p["loss"] for p in c], lw=1.2, label=name,
                    ls="-" if name == "sparkling" else "--" if "opt" in name or "all" in name
                    else ":" if name in ("zero", "random") else "-.")
        ymin = min(p["loss"] for p in sc)
        ax.set_ylim(ymin - 0.1, ymin + 1.2)
        gf = results["growth_flops"]
        ax.axvline(gf, color="gray", lw=0.8)
        ax.text(gf, 0.98, " growth", va="top", fontsize=8, color="gray",
                transform=ax.get_xaxis_transform())
        ax.set_title(setting)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = os.path.join(out, "progressive.png")
    fig.savefig(path, dpi=110)
    return path


def bench_parser(description: str, name: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags every benchmark here shares: mode, corpus, output folder (runs/<name>)."""
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=quick_help)
    mode.add_argument("--full", action="store_true", help="bigger models (for a GPU)")
    p.add_argument("--data-path", default=os.path.join(REPO, "data", "stdlib_text_document"))
    p.add_argument("--out", default=os.path.join(REPO, "runs", name))
    p.add_argument("--wandb-project", default=None,
                   help="log every run's curve and figures to wandb (WANDB_MODE=offline works)")
    return p


def require_wandb():
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb-project needs wandb: pip install 'megatron-sparkling[wandb]' "
                         "(or drop --wandb-project)") from None
    return wandb


def log_to_wandb(project: str, out: str, runs: list) -> None:
    """One wandb run per curve (offline with WANDB_MODE=offline): `runs` holds (name, group,
    curve, summary figures, config)."""
    wandb = require_wandb()
    for name, group, curve, summary, config in runs:
        run = wandb.init(project=project, name=name, group=group, dir=out, config=config,
                         settings=wandb.Settings(console="off"))
        for point in curve:
            run.log({"validation loss": point["loss"], "flops": point["flops"],
                     "iteration": point["iteration"]})
        run.summary.update({k: v for k, v in summary.items() if v is not None})
        run.finish()


def _wandb_runs(results: dict) -> list:
    out = []
    for setting, runs in results["settings"].items():
        rows = {r["run"]: r for r in analysis.summarize(
            {"scratch": runs["scratch"], **runs["grown"]}, "scratch")}
        for name, run in [("scratch", runs["scratch"]), *runs["grown"].items()]:
            out.append((f"{setting}/{name}", setting, run["curve"], rows[name],
                        dict(results["config"], grow_at=results["grow_at"], method=name)))
    return out


def main(argv=None) -> int:
    p = bench_parser(__doc__.split("\n\n")[0], "progressive", "tiny models, CPU, < 10 minutes")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--grow-at", type=float, default=0.5,
                   help="growth point as a fraction of the token budget (default 0.5)")
    p.add_argument("--sweep", action="store_true",
                   help="full mode: repeat for growth at 25%%, 50%% and 75%% of the budget")
    p.add_argument("--jobs", type=int, default=None,
                   help="settings run in this many processes at once after the shared narrow "
                        "run (default: the CPU cores in quick mode, 1 in full mode)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # narrow curve JSON
    over = p.add_argument_group("override the mode's settings")
    for name, kind in OVERRIDES.items():
        over.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    a = p.parse_args(argv)
    if a.jobs is None:
        a.jobs = 1 if a.full else len(os.sched_getaffinity(0))
    if a.wandb_project:
        require_wandb()   # before hours of training, not after
    cfg = dict(FULL if a.full else QUICK)
    for name in OVERRIDES:
        if getattr(a, name) is not None:
            cfg[name] = getattr(a, name)
    from megatron_sparkling.training import corpus

    if not corpus.exists(a.data_path):
        corpus.build(corpus.stdlib_files(corpus.default_source_dir()), a.data_path)
    grow_points = [0.25, 0.5, 0.75] if a.sweep else [a.grow_at]
    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
    all_results = []
    for grow_at in grow_points:
        out = a.out if len(grow_points) == 1 else os.path.join(a.out, f"grow_at_{grow_at:g}")
        all_results.append(run(cfg, a, grow_at, out))
    return 0


def run_setting(bench, setting: str, methods, t0: float) -> dict:
    runs = {"scratch": bench.scratch(setting), "grown": {}}
    target = min(p["loss"] for p in runs["scratch"]["curve"])
    print(f"[{time.time() - t0:6.0f}s] {setting}: scratch best {target:.4f}", flush=True)
    for name in methods:
        r = runs["grown"][name] = bench.grown(setting, name, target=target)
        twin = None if r["twin_cosine"] is None else round(r["twin_cosine"], 3)
        print(f"[{time.time() - t0:6.0f}s] {setting} {name}: final "
              f"{analysis.at_budget(r['curve'])['loss']:.4f}, jump {r['loss_jump']:+.4f}, "
              f"twin {twin}", flush=True)
    return runs


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(a, cfg, grow_at, out, narrow_curve) -> dict:
    """The settings in `a.jobs` processes at once (each its own 1-rank megatron-core run, the
    CPU cores shared out), all growing the narrow checkpoint saved by this process."""
    import subprocess

    curve_path = os.path.join(out, "narrow_curve.json")
    with open(curve_path, "w") as f:
        json.dump(narrow_curve, f)
    argv = [sys.executable, os.path.abspath(__file__), "--full" if a.full else "--quick",
            "--data-path", a.data_path, "--out", out, "--grow-at", str(grow_at), "--jobs", "1",
            "--worker", curve_path, "--methods", *a.methods]
    argv += [f"--{k.replace('_', '-')}={cfg[k]}" for k in OVERRIDES if k in cfg]
    threads = str(max(1, len(os.sched_getaffinity(0)) // a.jobs))
    pending, running = list(a.settings), []
    while pending or running:
        while pending and len(running) < a.jobs:
            setting = pending.pop(0)
            env = dict(os.environ, OMP_NUM_THREADS=threads, MASTER_PORT=str(_free_port()))
            running.append((setting, subprocess.Popen(argv + ["--settings", setting], env=env)))
        time.sleep(1)
        for setting, proc in list(running):
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"the {setting} worker failed (exit {proc.returncode})")
                running.remove((setting, proc))
    settings = {}
    for setting in a.settings:
        with open(os.path.join(out, f"setting_{setting}.json")) as f:
            settings[setting] = json.load(f)
    return settings


def run(cfg, a, grow_at, out) -> dict:
    from megatron_sparkling.training.initialize import shutdown

    t0 = time.time()
    bench = Bench(cfg, a.data_path, out, grow_at)
    results = {"mode": "full" if a.full else "quick", "command": " ".join(
        ["python", "bench/progressive.py"] + (sys.argv[1:] if a is not None else [])),
        "grow_at": grow_at, "grow_iteration": bench.grow_iteration,
        "train_iters": cfg["train_iters"], "config": cfg, "settings": {}}
    try:
        if a.worker:   # one setting of a parallel run: the narrow run is done
            with open(a.worker) as f:
                bench.narrow_curve = json.load(f)
            for setting in a.settings:
                with open(os.path.join(out, f"setting_{setting}.json"), "w") as f:
                    json.dump(run_setting(bench, setting, a.methods, t0), f)
            return {}
        narrow = bench.narrow()
        results["narrow"] = narrow
        results["growth_flops"] = narrow["curve"][-1]["flops"]
        if a.jobs > 1 and len(a.settings) > 1:
            results["settings"] = run_workers(a, cfg, grow_at, out, narrow["curve"])
        else:
            for setting in a.settings:
                results["settings"][setting] = run_setting(bench, setting, a.methods, t0)
    finally:
        shutdown()
    results["seconds"] = time.time() - t0
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(report(results, out))
    print(f"plot: {plot(results, out)}; results: {os.path.join(out, 'results.json')}; "
          f"{results['seconds']:.0f} s")
    if a.wandb_project:
        log_to_wandb(a.wandb_project, out, _wandb_runs(results))
    return results


if __name__ == "__main__":
    sys.exit(main())
