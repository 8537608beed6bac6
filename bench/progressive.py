"""Width-progressive MoE pre-training against training from scratch, measured in FLOPs.

    python bench/progressive.py --quick --seeds 3   # CPU, 2 cores: docs/results/progressive_quick.*
    python bench/progressive.py --medium --seeds 2  # CPU, 2 cores, deeper/wider and longer
    python bench/progressive.py --full --sweep      # a GPU: bigger models, growth-time sweep
    python bench/progressive.py --quick --estimate  # time a few steps of each model: run time

Per seed, in 1-rank megatron-core processes on the tokenized standard-library corpus and the
project's own pre-training loop (megatron-core GPTModel with MoE layers, optimizer, scheduler,
datasets):
- (a) the wide MoE model from scratch, one per setting (expert FFN 2x, hidden 2x, both);
- (b) the narrow model for the first part of the token budget (one per seed, shared by every
  setting and variant, saved at the growth point and reused by later runs with the same key),
  then growth with each variant (VARIANTS: a growth method, its options, the re-warmup scope and
  the grown run's flags) and the rest of the budget wide.
The seed sets the initialization, the data order and the growth plan. Every run is deterministic:
each process uses the same thread count whatever --jobs is, deterministic kernels and fixed seeds,
so the same command gives the same figures and seeds are the only noise. Training FLOPs are
counted from the shapes of the model actually run (megatron_sparkling/training/flops.py).
Outputs (in --out, and for a mode's standard run also docs/results/progressive_<mode>.*):
results.json (every curve, the command, the configuration), results.md (mean ± std over seeds,
both savings, which gaps are beyond noise: bench/analysis.py) and progressive.png.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import heapq
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import analysis  # noqa: E402
from megatron_sparkling.training.arguments import flags_to_argv  # noqa: E402

SETTINGS = {
    "expert-ffn-2x": {"moe_ffn_hidden_size": 2},
    "hidden-2x": {"hidden_size": 2},
    "both-2x": {"moe_ffn_hidden_size": 2, "hidden_size": 2},
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to grow: a growth method (megatron_sparkling.methods), its options, which
    elements re-warm their LR after growth (new | all | none) and the grown run's flags
    (attributes of its args namespace, e.g. {"sparkling_rewarmup_iters": 96})."""
    method: str
    options: dict = dataclasses.field(default_factory=dict)
    rewarmup: str = "new"
    args: dict = dataclasses.field(default_factory=dict)


VARIANTS = {
    "sparkling": Variant("sparkling"),
    "copy": Variant("copy", rewarmup="none"),
    "hypercloning": Variant("hypercloning", rewarmup="none"),
    "staged": Variant("staged", rewarmup="none"),
    "msg": Variant("msg", rewarmup="none"),
    "zero": Variant("zero", rewarmup="none"),
    "random": Variant("random", rewarmup="none"),
    "drop-opt": Variant("drop-opt"),
    "copy-opt": Variant("copy-opt"),
    "sparkling-rewarm-all": Variant("sparkling", rewarmup="all"),
    # new elements' Adam bias correction counted from growth (issue 13's candidate improvement)
    "sparkling-per-element": Variant(
        "sparkling", args={"sparkling_new_state_bias_correction": "per-element"}),
    # not run by default: RMS-consistent random new units
    "sparkling-random": Variant("sparkling", {"new_units": "random"}),
}
DEFAULT_VARIANTS = [m for m in VARIANTS if m != "sparkling-random"]
REWARMUP_SCOPES = ("new", "all", "none")
# what a sweep may change (growth point: --grow-at)
OVERRIDES = {"train_iters": int, "extend": float, "lr": float, "min_lr": float,
             "lr_warmup_iters": int, "eval_iters": int, "eval_interval": int,
             "rewarmup_iters": int, "rewarmup_peak_ratio": float, "msg_ramp": int}
PAPER_SAVING = {"expert-ffn-2x": 0.20, "hidden-2x": 0.25, "both-2x": 0.35}
FIRST_SEED = 1234

QUICK = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, num_experts=4,
    moe_ffn_hidden_size=64, moe_router_topk=2, seq_length=64, micro_batch_size=8,
    global_batch_size=8, train_iters=320, lr=1.5e-3, min_lr=1.5e-4, lr_warmup_iters=16,
    eval_interval=16, eval_iters=4, rewarmup_iters=48, rewarmup_peak_ratio=1.3, msg_ramp=16,
    twin_after=100, extend=0.25)
# Quick settings, from short scans on hidden-2x (README, "Results"): lr 1.5e-3 (3e-3 made the
# wide scratch run unstable, 1e-3 was slower); re-warmup over 48 iterations (30% of the wide
# part; 16 left sparkling 0.6% above scratch's final loss).
MEDIUM = dict(
    num_layers=4, hidden_size=96, num_attention_heads=4, kv_channels=24, num_experts=4,
    moe_ffn_hidden_size=96, moe_router_topk=2, seq_length=64, micro_batch_size=8,
    global_batch_size=8, train_iters=800, lr=1.5e-3, min_lr=1.5e-4, lr_warmup_iters=40,
    eval_interval=32, eval_iters=4, rewarmup_iters=120, rewarmup_peak_ratio=1.3, msg_ramp=40,
    twin_after=100, extend=0.25)
# Medium: 2x the layers, 1.5x the width and 2.5x the iterations of quick (the re-warmup, 30% of
# the wide part, and the MSG ramp scaled alike), so the schedule's second half is less cold for
# the wide model; sized for its default variants, 2 seeds, in under an hour on 2 cores
# (--estimate).
FULL = dict(
    num_layers=8, hidden_size=512, num_attention_heads=8, kv_channels=64, num_experts=16,
    moe_ffn_hidden_size=512, moe_router_topk=2, seq_length=512, micro_batch_size=8,
    global_batch_size=64, train_iters=6000, lr=1e-3, min_lr=1e-4, lr_warmup_iters=200,
    eval_interval=100, eval_iters=10, rewarmup_iters=250, rewarmup_peak_ratio=1.3, msg_ramp=250,
    twin_after=100, extend=0.25)
MODES = {"quick": QUICK, "medium": MEDIUM, "full": FULL}
# `extend`: a grown run that has not reached scratch's final loss at the end of the budget goes on
# (at the schedule's min LR: the schedule still ends at the budget) for up to this fraction of the
# budget, so "compute to reach scratch's final loss" is measured, not just "reached or not".


def budget_iters(cfg: dict) -> int:
    return cfg["train_iters"]


def extension_iters(cfg: dict) -> int:
    return int(round(cfg.get("extend", 0) * cfg["train_iters"]))


def base_flags(cfg: dict, data_path: str, out: str = None, seed: int = FIRST_SEED) -> list[str]:
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
        "log_interval": 10 ** 9, "data_path": data_path, "split": "98,2,0", "seed": seed,
        # megatron-core's deterministic paths (the embedding's backward as an indexed add)
        "deterministic_mode": True,
        "sparkling_rewarmup_iters": cfg["rewarmup_iters"],
        "sparkling_rewarmup_peak_ratio": cfg["rewarmup_peak_ratio"],
    }
    return flags_to_argv(flags)


# ---------------------------------------------------------------------- determinism
DETERMINISM = ("Deterministic: {threads} intra-op thread(s) and 1 inter-op thread in every "
               "process whatever --jobs is (OMP/MKL set alike, MKL_DYNAMIC off), "
               "torch.use_deterministic_algorithms and megatron-core's --deterministic-mode, "
               "every RNG (python, numpy, torch, megatron-core's tracker, the growth plan, the "
               "data order) seeded from the run's seed.")


def process_env(threads: int) -> dict:
    """The environment of every benchmark process (read by OpenMP/MKL at their start)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "MKL_DYNAMIC": "FALSE", "PYTHONHASHSEED": "0",
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def deterministic_process(threads: int) -> None:
    """Fix this process's thread counts and kernels (before any training)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:   # already set, or inter-op work already ran in this process
        pass
    # On a GPU some megatron-core kernels have no deterministic version: warn, do not stop.
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())


# ---------------------------------------------------------------------- caching
def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_fingerprint() -> str:
    """Hash of what trains the cached runs: the package's Python sources and this file's
    functions on their path (not the variant table, so adding a variant keeps the cache)."""
    import inspect

    h = hashlib.sha256()
    for part in (base_flags, deterministic_process, Bench.__init__, Bench._trainer, Bench._curve,
                 Bench._train, Bench._validate, Bench.wide_args, Bench.scratch, Bench.narrow):
        h.update(inspect.getsource(part).encode())
    root = os.path.join(REPO, "megatron_sparkling")
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def data_fingerprint(data_path: str) -> str:
    return "-".join(_sha256_file(data_path + ext)[:16] for ext in (".bin", ".idx"))


def machine() -> dict:
    """Library versions and the CPU's vector kernels: other kernels round differently, so a
    run on another machine may differ in the last digits (and then grow apart)."""
    import platform

    import megatron.core
    import torch

    return {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def cache_key(kind: str, argv: list, **inputs) -> str:
    """The key of a cached run: everything its figures depend on (flags, seed and sizes in
    `argv`; growth iteration, setting, thread count, code and data in `inputs`; library
    versions and CPU kernels from machine())."""
    blob = json.dumps({"kind": kind, "argv": list(argv), **machine(), **inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- runs
class Bench:
    """The runs of one seed in one initialized megatron-core process (1 rank)."""

    def __init__(self, cfg, data_path, out, grow_at: float, verbose=False, extra_flags=(),
                 seed: int = FIRST_SEED, narrow_ckpt: str = None):
        from megatron_sparkling.training import initialize as init_lib
        from megatron_sparkling.training.loop import _add_run_flags, _chain_providers
        from megatron_sparkling.live import rewarmup as schedule

        self.cfg, self.out, self.verbose = cfg, out, verbose
        os.makedirs(out, exist_ok=True)
        self.argv = base_flags(cfg, data_path, out, seed) + list(extra_flags)   # later flags win
        self.narrow_args = init_lib.initialize(
            self.argv, _chain_providers(_add_run_flags, schedule.add_rewarmup_args))
        from megatron_sparkling.training import data
        from megatron_sparkling.mcore import model as model_lib

        self.narrow_args.padded_vocab_size = model_lib.padded_vocab_size(
            data.build_tokenizer(self.narrow_args).vocab_size, self.narrow_args)
        self.grow_iteration = int(round(grow_at * cfg["train_iters"]))
        self.narrow_ckpt = narrow_ckpt or os.path.join(out, f"narrow_ckpt_{self.grow_iteration}")

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

    def grown(self, setting: str, name: str, target: float = None,
              variant: Variant = None) -> dict:
        from megatron_sparkling.live import lr_restart, rewarmup as schedule
        from megatron_sparkling.diagnostics import twin_similarity
        from megatron_sparkling.live.mask_ramp import MaskRamp
        from megatron_sparkling.methods import Grower
        from megatron_sparkling.core.spec import GrowthSpec, ModelShape
        from megatron_sparkling.training import data

        variant = variant or VARIANTS[name]
        method, options = variant.method, dict(variant.options)
        if method == "msg":
            options.setdefault("ramp_steps", self.cfg["msg_ramp"])
        if method == "staged":   # staged training's LR restart (Shen et al.), W = the re-warmup's
            options.setdefault("restart_warmup_iters", self.cfg["rewarmup_iters"])
        narrow_args = copy.copy(self.narrow_args)
        narrow_args.load = self.narrow_ckpt
        trainer = self._trainer(narrow_args)
        assert trainer.iteration == self.grow_iteration
        wide = self.wide_args(setting)
        for key, value in variant.args.items():
            setattr(wide, key, value)
        spec = GrowthSpec(ModelShape.from_args(narrow_args), ModelShape.from_args(wide), method,
                          seed=narrow_args.seed, options=options)
        grower = Grower(spec)
        start = time.time()
        trainer.grow_model(wide, lambda key, shape, sources: grower.grow(key, sources[key]))
        config = dataclasses.replace(schedule.RewarmupConfig.from_args(wide),
                                     scope=variant.rewarmup)
        schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                  grower.record(), config)
        lr_restart.install_lr_restart(trainer.scheduler, grower.record(), wide.global_batch_size)
        if method == "msg":
            MaskRamp(grower.plan, trainer.iteration, options["ramp_steps"]).install(
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
        return {"kind": "grown", "setting": setting, "method": name,
                "variant": dataclasses.asdict(variant), "curve": curve,
                "growth_iteration": self.grow_iteration, "growth_flops": growth_flops,
                "loss_jump": analysis.growth_jump(curve, growth_flops),
                "twin_cosine": sum(grads) / len(grads) if grads else None,
                "twin": twin, "twin_iteration": probe_at,
                "flops_per_iteration": trainer.flops_per_iteration,
                "seconds": time.time() - start}


# ---------------------------------------------------------------------- worker tasks
def _write_json(path: str, obj) -> None:
    """Write-then-rename: a reader never sees half a file, a killed run leaves no cache entry."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _task_keys(task: dict) -> dict:
    """The cache keys of a task's narrow run and scratch run."""
    argv = base_flags(task["cfg"], task["data_path"], seed=task["seed"])
    common = dict(grow_iteration=int(round(task["grow_at"] * task["cfg"]["train_iters"])),
                  threads=task["threads"], code=task["code"], data=task["data"])
    keys = {"narrow": cache_key("narrow", argv, **common)}
    if task.get("setting"):
        keys["scratch"] = cache_key("scratch", argv, setting=task["setting"],
                                    threads=task["threads"], code=task["code"],
                                    data=task["data"])
    return keys


def narrow_dir(task: dict) -> str:
    return os.path.join(task["cache"], f"narrow-seed{task['seed']}-{_task_keys(task)['narrow']}")


def scratch_path(task: dict) -> str:
    return os.path.join(task["cache"], f"scratch-seed{task['seed']}-{task['setting']}-"
                                       f"{_task_keys(task)['scratch']}.json")


def run_task(task: dict) -> None:
    """One worker process: the narrow run of a seed, or one (seed, setting): scratch (cached) and
    every variant grown from the seed's narrow checkpoint."""
    from megatron_sparkling.training.initialize import shutdown

    deterministic_process(task["threads"])
    ndir = narrow_dir(task)
    bench = Bench(task["cfg"], task["data_path"], task["out"], task["grow_at"],
                  seed=task["seed"], narrow_ckpt=os.path.join(ndir, "ckpt"))
    t0 = time.time()
    try:
        if task["kind"] == "narrow":
            narrow = bench.narrow()
            _write_json(os.path.join(ndir, "narrow.json"), dict(narrow, key=_task_keys(task)))
            return
        with open(os.path.join(ndir, "narrow.json")) as f:
            bench.narrow_curve = json.load(f)["curve"]
        setting, cached = task["setting"], scratch_path(task)
        if os.path.exists(cached):
            with open(cached) as f:
                scratch = json.load(f)
        else:
            scratch = bench.scratch(setting)
            _write_json(cached, scratch)
        runs = {"scratch": scratch, "grown": {}}
        target = analysis.at_budget(scratch["curve"])["loss"]
        label = f"seed {task['seed']} {setting}"
        print(f"[{time.time() - t0:6.0f}s] {label}: scratch final {target:.4f}", flush=True)
        for name, spec in task["variants"].items():
            r = runs["grown"][name] = bench.grown(setting, name, target, Variant(**spec))
            twin = None if r["twin_cosine"] is None else round(r["twin_cosine"], 3)
            print(f"[{time.time() - t0:6.0f}s] {label} {name}: final "
                  f"{analysis.at_budget(r['curve'])['loss']:.4f}, jump {r['loss_jump']:+.4f}, "
                  f"twin {twin}", flush=True)
        _write_json(task["result"], runs)
    finally:
        shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_tasks(tasks: list, jobs: int, threads: int, logs: str) -> None:
    """Each task in its own process (`jobs` at once, longest first), same environment for all:
    the figures do not depend on --jobs. A failed task is retried once (a port taken between
    choosing and binding it), then the run stops with its log's path."""
    os.makedirs(logs, exist_ok=True)
    pending = sorted(tasks, key=lambda t: -t["weight"])
    running, tries = [], {}
    while pending or running:
        while pending and len(running) < jobs:
            task = pending.pop(0)
            path = os.path.join(logs, task["name"] + ".json")
            _write_json(path, task)
            log = open(os.path.join(logs, task["name"] + ".log"), "w")
            env = dict(os.environ, **process_env(threads), MASTER_PORT=str(_free_port()))
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", path],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((task, proc, log))
        time.sleep(0.5)
        for item in list(running):
            task, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            with open(log.name) as f:
                lines = f.read().splitlines()
            for line in lines:
                if line.startswith("["):
                    print(line, flush=True)
            if proc.returncode:
                tries[task["name"]] = tries.get(task["name"], 0) + 1
                if tries[task["name"]] > 1:
                    raise SystemExit(f"the {task['name']} run failed (exit {proc.returncode}); "
                                     f"its log: {log.name}")
                pending.insert(0, task)


# ---------------------------------------------------------------------- plot
def plot(results: dict, path: str) -> str:
    """Validation loss against FLOPs, mean over seeds (band: ± std), growth marked; the
    command is stored in the PNG's metadata."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = list(results["settings"])
    seeds = list(results["seeds"])
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        per_seed = [results["seeds"][s]["settings"][setting] for s in seeds]
        names = ["scratch"] + list(per_seed[0]["grown"])
        for name in names:
            curves = [r["scratch"]["curve"] if name == "scratch" else r["grown"][name]["curve"]
                      for r in per_seed]
            n = min(len(c) for c in curves)   # extensions end at different points
            flops = np.array([p["flops"] for p in curves[0][:n]])
            loss = np.array([[p["loss"] for p in c[:n]] for c in curves])
            style = dict(color="k", lw=2.2) if name == "scratch" else dict(
                lw=1.2, ls="-" if name == "sparkling" else "--" if "opt" in name or "all" in name
                else ":" if name in ("zero", "random") else "-.")
            line, = ax.plot(flops, loss.mean(0), label=name, **style)
            if len(curves) > 1:
                ax.fill_between(flops, loss.mean(0) - loss.std(0, ddof=1),
                                loss.mean(0) + loss.std(0, ddof=1), color=line.get_color(),
                                alpha=0.12, lw=0)
        ymin = min(analysis.at_budget(r["scratch"]["curve"])["loss"] for r in per_seed)
        ax.set_ylim(ymin - 0.1, ymin + 1.2)
        gf = results["seeds"][seeds[0]]["growth_flops"]
        ax.axvline(gf, color="gray", lw=0.8)
        ax.text(gf, 0.98, " growth", va="top", fontsize=8, color="gray",
                transform=ax.get_xaxis_transform())
        ax.set_title(f"{setting} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Description": results["command"]})
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- estimate
def estimate(cfg, a, grow_at, variants, out) -> dict:
    """Time a few training steps and one evaluation of each model in one process (same
    thread count as the runs), and from them the whole run: list scheduling of the tasks over
    --jobs processes. Upper bound: every grown run uses the whole extension. The projection uses
    the process's CPU time (what an otherwise idle machine would take as wall time with one
    thread per process), so a busy machine does not inflate it; wall times are printed too."""
    import torch

    deterministic_process(a.threads)
    from megatron_sparkling.training.initialize import shutdown

    clock = time.process_time   # CPU seconds of this process (1 thread: wall time when idle)
    bench = Bench(cfg, a.data_path, out, grow_at)
    startup = clock()   # since this process started: imports and set-up, as in a worker
    steps = 6
    timing = {}
    try:
        for name in ["narrow"] + a.settings:
            args = copy.copy(bench.narrow_args if name == "narrow" else bench.wide_args(name))
            t = clock()
            trainer = bench._trainer(args)
            build = clock() - t
            trainer.train_step()   # first step: allocation
            t, wall = clock(), time.time()
            for _ in range(steps):
                trainer.train_step()
            step, wall = (clock() - t) / steps, (time.time() - wall) / steps
            t = clock()
            trainer.evaluate()
            timing[name] = {"build": build, "step": step, "eval": clock() - t, "wall_step": wall}
            del trainer
    finally:
        shutdown()
    iters, g = budget_iters(cfg), bench.grow_iteration
    ext, ev = extension_iters(cfg), cfg["eval_interval"]
    n = timing["narrow"]
    narrow = startup + n["build"] + g * n["step"] + (g // ev + 2) * n["eval"]
    units = []
    for setting in a.settings:
        w = timing[setting]
        scratch = w["build"] + iters * w["step"] + (iters // ev + 2) * w["eval"]
        grown = 2 * w["build"] + (iters - g) * w["step"] + ((iters - g) // ev + 2) * w["eval"]
        extra = ext * w["step"] + (ext // ev + 1) * w["eval"]
        units.append((startup + scratch + len(variants) * grown,
                      startup + scratch + len(variants) * (grown + extra)))

    def schedule(durations):   # longest first, each on the process free first
        ends = [0.0] * a.jobs
        for d in sorted(durations, reverse=True):
            heapq.heapreplace(ends, ends[0] + d)
        return max(ends)
    seeds = a.seeds
    phase1 = schedule([narrow] * seeds)
    low = phase1 + schedule([u[0] for u in units] * seeds)
    high = phase1 + schedule([u[1] for u in units] * seeds)
    result = {"timing_s": timing, "startup_s": startup, "narrow_s": narrow,
              "unit_s": {s: u for s, u in zip(a.settings, units)}, "jobs": a.jobs,
              "threads": a.threads, "seeds": seeds, "variants": len(variants),
              "total_s": [low, high], "load_average": os.getloadavg(),
              "torch_threads": torch.get_num_threads()}
    print(f"estimate ({seeds} seed(s), {len(a.settings)} setting(s), {len(variants)} variants, "
          f"{a.jobs} process(es) x {a.threads} thread(s); load average now "
          f"{os.getloadavg()[0]:.1f}): {low / 60:.1f} - {high / 60:.1f} min (no / full "
          f"extension for every grown run)")
    for name, t in timing.items():
        print(f"  {name}: {t['step'] * 1000:.0f} ms/step ({t['wall_step'] * 1000:.0f} ms wall), "
              f"{t['eval'] * 1000:.0f} ms/eval, {t['build']:.1f} s to build (CPU time)")
    return result


# ---------------------------------------------------------------------- main
def bench_parser(description: str, name: str, quick_help: str,
                 medium_help: str = None) -> argparse.ArgumentParser:
    """The flags every benchmark here shares: mode, corpus, output folder (runs/<name>)."""
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=quick_help)
    if medium_help:
        mode.add_argument("--medium", action="store_true", help=medium_help)
    mode.add_argument("--full", action="store_true", help="bigger models (for a GPU)")
    p.add_argument("--data-path", default=os.path.join(REPO, "data", "stdlib_text_document"))
    p.add_argument("--out", default=os.path.join(REPO, "runs", name))
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads in every process (default 1); part of the result")
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
    for seed, per_seed in results["seeds"].items():
        for setting, runs in per_seed["settings"].items():
            rows = {r["run"]: r for r in analysis.summarize(
                {"scratch": runs["scratch"], **runs["grown"]}, "scratch",
                per_seed["growth_flops"])}
            for name, run in [("scratch", runs["scratch"]), *runs["grown"].items()]:
                out.append((f"{setting}/{name}/seed{seed}", setting, run["curve"], rows[name],
                            dict(results["config"], grow_at=results["grow_at"], method=name,
                                 seed=int(seed))))
    return out


def parse_variant(text: str) -> tuple:
    """NAME=METHOD[,KEY=VALUE...] -> (name, Variant): KEY `rewarmup` is the re-warmup scope,
    `args.FLAG` a grown-run flag (namespace attribute), any other KEY a method option."""
    from megatron_sparkling.methods.base import parse_method_options

    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--variant {text!r}: write NAME=METHOD[,KEY=VALUE...]")
    method, *items = rest.split(",")
    values = parse_method_options(items, "--variant")
    rewarmup = values.pop("rewarmup", "new")
    args = {k[5:]: values.pop(k) for k in list(values) if k.startswith("args.")}
    return name, Variant(method, values, rewarmup, args)


def check_variants(variants: dict, cfg: dict, data_path: str) -> None:
    """Refuse (one line) an unknown method or option, scope or grown-run flag before any run."""
    from megatron_sparkling.methods import get_method
    from megatron_sparkling.live import rewarmup as schedule
    from megatron_sparkling.training import arguments
    from megatron_sparkling.training.loop import _add_run_flags, _chain_providers

    parsed = arguments.build_parser(_chain_providers(
        _add_run_flags, schedule.add_rewarmup_args)).parse_args(base_flags(cfg, data_path))
    try:   # the mode's flags, before any process starts
        arguments.validate_args(copy.copy(parsed), 1, gpu=False)
    except arguments.ArgumentError as e:
        raise SystemExit(f"progressive.py: {e}") from None
    names = vars(parsed)
    for name, v in variants.items():
        options = dict(v.options)
        if v.method == "msg":
            options.setdefault("ramp_steps", cfg["msg_ramp"])
        try:
            get_method(v.method, **options)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"variant {name}: {e}") from None
        if v.rewarmup not in REWARMUP_SCOPES:
            raise SystemExit(f"variant {name}: rewarmup must be one of "
                             f"{', '.join(REWARMUP_SCOPES)} (got {v.rewarmup!r})")
        unknown = sorted(k for k in v.args if k not in names)
        if unknown:
            raise SystemExit(f"variant {name}: no run flag {', '.join(unknown)} (args.NAME takes "
                             "a pre-training flag's attribute name, e.g. sparkling_rewarmup_iters)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = bench_parser(__doc__.split("\n\n")[0], "progressive", "tiny models, CPU (the default)",
                     "deeper/wider and 3x longer than quick, CPU, < 1 hour for 2 seeds")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--variants", "--methods", dest="variants", nargs="+", default=None,
                   help=f"variants to grow with (default: {' '.join(DEFAULT_VARIANTS)}; also "
                        f"{', '.join(v for v in VARIANTS if v not in DEFAULT_VARIANTS)} and those "
                        "given by --variant)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD[,KEY=VALUE]",
                   help="define (or redefine) a variant and run it: KEY rewarmup=new|all|none, "
                        "args.FLAG=VALUE (a grown-run flag), or a method option "
                        "(e.g. sparkling-random=sparkling,new_units=random)")
    p.add_argument("--seeds", type=int, default=1,
                   help="run everything for this many seeds (from --first-seed on)")
    p.add_argument("--first-seed", type=int, default=FIRST_SEED)
    p.add_argument("--grow-at", type=float, default=0.5,
                   help="growth point as a fraction of the token budget (default 0.5)")
    p.add_argument("--sweep", action="store_true",
                   help="repeat for growth at 25%%, 50%% and 75%% of the budget")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes at once (default: the CPU cores; 1 in full mode); the "
                        "figures do not depend on it")
    p.add_argument("--cache", default=None,
                   help="folder of reusable narrow and scratch runs (default: <out>/cache)")
    p.add_argument("--publish", default=None, metavar="PREFIX",
                   help="also write PREFIX.{json,md,png} (PREFIX_grow<G>.* with --sweep; default "
                        "for a mode's standard run, no overrides: docs/results/progressive_<mode>;"
                        " 'none': never)")
    p.add_argument("--estimate", action="store_true",
                   help="time a few steps of each model and print the run's expected duration")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # a task's JSON
    over = p.add_argument_group("override the mode's settings")
    for name, kind in OVERRIDES.items():
        over.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    a = p.parse_args(argv)
    if a.worker:
        with open(a.worker) as f:
            run_task(json.load(f))
        return 0
    mode = "full" if a.full else "medium" if a.medium else "quick"
    if a.jobs is None:
        a.jobs = 1 if a.full else len(os.sched_getaffinity(0))
    if a.wandb_project:
        require_wandb()   # before hours of training, not after
    cfg = dict(MODES[mode])
    overridden = False
    for name in OVERRIDES:
        if getattr(a, name) is not None:
            cfg[name], overridden = getattr(a, name), True
    variants = {}
    try:
        extra = dict(parse_variant(t) for t in a.variant)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    table = dict(VARIANTS, **extra)
    chosen = a.variants or (DEFAULT_VARIANTS + [n for n in extra if n not in DEFAULT_VARIANTS])
    for name in chosen:
        if name not in table:
            raise SystemExit(f"--variants {name}: no such variant; choose from "
                             f"{', '.join(table)} or define it with --variant {name}=METHOD")
        variants[name] = table[name]
    check_variants(variants, cfg, a.data_path)
    if a.threads < 1 or a.jobs < 1 or a.seeds < 1:
        raise SystemExit("--threads, --jobs and --seeds must be at least 1")
    from megatron_sparkling.training import corpus

    if not corpus.exists(a.data_path):
        corpus.build(corpus.stdlib_files(corpus.default_source_dir()), a.data_path)
    grow_points = [0.25, 0.5, 0.75] if a.sweep else [a.grow_at]
    standard = (not overridden and not a.sweep and a.grow_at == 0.5 and a.variants is None
                and not a.variant and a.settings == list(SETTINGS) and a.threads == 1
                and a.first_seed == FIRST_SEED)
    publish = a.publish if a.publish not in (None, "none") else (
        os.path.join(REPO, "docs", "results", f"progressive_{mode}")
        if standard and a.publish is None else None)
    command = analysis.portable_command(["python", "bench/progressive.py"] + argv)
    for grow_at in grow_points:
        out = a.out if len(grow_points) == 1 else os.path.join(a.out, f"grow_at_{grow_at:g}")
        if a.estimate:
            os.environ.update(process_env(a.threads))
            estimate(cfg, a, grow_at, variants, out)
            continue
        run(cfg, a, mode, grow_at, out, variants, command,
            publish if len(grow_points) == 1 or not publish else f"{publish}_grow{grow_at:g}")
    return 0


def run(cfg, a, mode, grow_at, out, variants, command, publish=None) -> dict:
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    cache = os.path.abspath(a.cache or os.path.join(out, "cache"))
    os.makedirs(cache, exist_ok=True)
    seeds = [a.first_seed + i for i in range(a.seeds)]
    base = dict(cfg=cfg, data_path=a.data_path, out=out, grow_at=grow_at, threads=a.threads,
                code=code_fingerprint(), data=data_fingerprint(a.data_path), cache=cache)
    specs = {n: dataclasses.asdict(v) for n, v in variants.items()}
    narrow_tasks, unit_tasks = [], []
    for seed in seeds:
        task = dict(base, kind="narrow", seed=seed, name=f"narrow-seed{seed}", weight=1)
        if os.path.exists(os.path.join(narrow_dir(task), "narrow.json")):
            print(f"seed {seed}: narrow run reused from {narrow_dir(task)}", flush=True)
        else:
            narrow_tasks.append(task)
        for setting in a.settings:
            weight = sum(SETTINGS[setting].values())   # the wider, the longer
            unit_tasks.append(dict(base, kind="unit", seed=seed, setting=setting,
                                   variants=specs, name=f"seed{seed}-{setting}", weight=weight,
                                   result=os.path.join(out, f"seed{seed}-{setting}.json")))
    logs = os.path.join(out, "logs")
    run_tasks(narrow_tasks, a.jobs, a.threads, logs)
    run_tasks(unit_tasks, a.jobs, a.threads, logs)

    results = {"mode": mode, "command": command, "grow_at": grow_at,
               "grow_iteration": int(round(grow_at * cfg["train_iters"])),
               "train_iters": cfg["train_iters"], "config": cfg,
               "variants": specs, "settings": list(a.settings),
               "determinism": DETERMINISM.format(threads=a.threads),
               "threads": a.threads, "jobs": a.jobs, "paper_saving": PAPER_SAVING, "seeds": {}}
    for seed in seeds:
        ndir = narrow_dir(dict(base, seed=seed))
        with open(os.path.join(ndir, "narrow.json")) as f:
            narrow = json.load(f)
        per_seed = {"narrow": {k: narrow[k] for k in ("curve", "flops_per_iteration")},
                    "growth_flops": narrow["curve"][-1]["flops"], "settings": {}}
        for setting in a.settings:
            with open(os.path.join(out, f"seed{seed}-{setting}.json")) as f:
                per_seed["settings"][setting] = json.load(f)
        results["seeds"][str(seed)] = per_seed
    results["seconds"] = time.time() - t0
    results["versions"] = machine()
    _write_json(os.path.join(out, "results.json"), results)
    text = analysis.report(results) + f"\n![validation loss against FLOPs](progressive.png)\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    plot(results, os.path.join(out, "progressive.png"))
    print(text)
    print(f"results: {os.path.join(out, 'results.json')}; {results['seconds']:.0f} s")
    if publish:
        stem = os.path.basename(publish)
        os.makedirs(os.path.dirname(os.path.abspath(publish)), exist_ok=True)
        shutil.copyfile(os.path.join(out, "results.json"), publish + ".json")
        with open(publish + ".md", "w") as f:
            f.write(text.replace("](progressive.png)", f"]({stem}.png)"))
        shutil.copyfile(os.path.join(out, "progressive.png"), publish + ".png")
        print(f"published: {publish}.{{json,md,png}}")
    if a.wandb_project:
        log_to_wandb(a.wandb_project, out, _wandb_runs(results))
    return results


if __name__ == "__main__":
    sys.exit(main())
