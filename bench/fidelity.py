"""Method fidelity at growth: loss jump, first Adam update, RMS ratio of every linear, per factor.

    python bench/fidelity.py            # CPU, 1 rank, a few minutes; writes docs/results/fidelity.json
    FIDELITY_TREE=/path/to/other/checkout python bench/fidelity.py --out before.json
                                        # the same measurement on another tree's methods

A small MoE GPT (SwiGLU, RMSNorm, RoPE, shared expert) is pre-trained for --train-iters
iterations on the tokenized standard-library corpus, then grown by every method at every factor
(hidden, expert FFN, shared-expert FFN and attention heads all by the factor; integer factors only
for the methods that need them). For each growth:
- loss jump: held-out loss of the grown model / the small model's, minus 1 (MSG with its mask at 0);
- first update: one real optimizer step (Adam, distributed optimizer, clipping off) from the
  growth point on the same batch, small and grown; the largest relative gap between the grown
  model's Adam direction m/sqrt(v) at OLD elements and the small model's at the same elements
  (diagnostics/first_update.py; staged: every copy, off-diagonal blocks excluded);
- RMS ratios: r = RMS(y)/RMS(x) of every linear (every expert's apart), grown / small: the worst
  and mean |r'/r - 1|, and each linear's value.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TREE = os.environ.get("FIDELITY_TREE", REPO)   # whose megatron_sparkling is measured
sys.path.insert(0, TREE)

FACTORS = (1.25, 1.5, 2, 2.5, 3)
# name -> (method, options); integer-factor methods skip 1.25, 1.5, 2.5
METHODS = {
    "sparkling": ("sparkling", {}),
    "sparkling-random": ("sparkling", {"new_units": "random"}),
    "copy": ("copy", {}),
    "hypercloning": ("hypercloning", {}),
    "staged": ("staged", {}),
    "zero": ("zero", {}),
    "random": ("random", {}),
    "msg": ("msg", {}),
}
INTEGER_ONLY = ("hypercloning", "staged")
SMALL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16,
             num_experts=4, moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=32)


def flags(data_path: str, train_iters: int) -> list[str]:
    f = dict(SMALL, moe_router_topk=2, moe_aux_loss_coeff=0.01, swiglu=True,
             normalization="RMSNorm", position_embedding_type="rope", disable_bias_linear=True,
             untie_embeddings_and_output_weights=True, seq_length=64, max_position_embeddings=64,
             micro_batch_size=8, global_batch_size=8, train_iters=train_iters + 20, lr=1.5e-3,
             min_lr=1.5e-4, lr_warmup_iters=8, lr_decay_style="cosine", weight_decay=0.1,
             clip_grad=0.0, hidden_dropout=0.0, attention_dropout=0.0,
             use_distributed_optimizer=True, dist_ckpt_optim_fully_reshardable=True,
             eval_interval=0, eval_iters=2, log_interval=10 ** 9, data_path=data_path,
             split="98,2,0", seed=1234)
    argv = []
    for name, value in f.items():
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def first_update_module():
    """diagnostics/first_update.py of the measured tree, or this repository's copy (an older
    tree may not have it; it needs only core.layout and operators.width)."""
    try:
        from megatron_sparkling.diagnostics import first_update
        return first_update
    except ImportError:
        path = os.path.join(REPO, "megatron_sparkling", "diagnostics", "first_update.py")
        spec = importlib.util.spec_from_file_location("fidelity_first_update", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


class Small:
    """The pre-trained small model, its held-out batches and figures, and its first step."""

    def __init__(self, argv, train_iters: int):
        from megatron_sparkling.core.spec import ModelShape
        from megatron_sparkling.diagnostics import measure
        from megatron_sparkling.live.state import global_state, model_global_tensors
        from megatron_sparkling.training import data
        from megatron_sparkling.training.loop import Pretrainer

        self.trainer = Pretrainer.from_argv(argv)
        self.trainer.train(until_iteration=train_iters)
        self.args = self.trainer.args
        self.shape = ModelShape.from_args(self.args)
        self.tensors = model_global_tensors(self.trainer.model)
        state, self.step = global_state(self.args, self.trainer.model, self.trainer.optimizer)
        self.state = {k: v for k, v in state.items() if k.startswith("optimizer.")}
        self.batches = list(data.microbatches(self.trainer.valid_ds, 0, 2, self.args))
        self.figures = measure(self.trainer.model, self.batches)
        self.directions = first_step(self, None)


def first_step(small, grower, ramp_for=None) -> dict:
    """Adam's m/sqrt(v) after one step from the growth point (grower None: the small model)."""
    from megatron_sparkling.live.state import (fill_live, global_state,
                                               load_model_global_tensors)
    from megatron_sparkling.training.loop import Pretrainer

    args = copy.copy(small.args if grower is None else grower.spec.target.apply_to_args(
        small.args))
    trainer = Pretrainer(args)
    trainer.iteration = small.trainer.iteration
    trainer.scheduler.load_state_dict(small.trainer.scheduler.state_dict())
    weights = small.tensors if grower is None else {k: grower.grow(k, v)
                                                   for k, v in small.tensors.items()}
    state = small.state if grower is None else {k: grower.grow(k, v)
                                                for k, v in small.state.items()}
    load_model_global_tensors(trainer.model, weights)
    fill_live(args, trainer.model, trainer.optimizer,
              lambda key, _: state[key] if key in state else weights[key], step=small.step)
    if ramp_for is not None:
        ramp_for(trainer.model)
    trainer.train_step()
    tensors, _ = global_state(args, trainer.model, trainer.optimizer)
    return first_update_module().adam_directions(tensors)


def target_shape(shape, factor: float):
    heads = shape.num_attention_heads * factor
    sizes = dict(hidden_size=shape.hidden_size * factor,
                 moe_ffn_hidden_size=shape.moe_ffn_hidden_size * factor,
                 moe_shared_expert_intermediate_size=(
                     shape.moe_shared_expert_intermediate_size * factor),
                 num_attention_heads=heads, num_query_groups=heads)
    return shape.replace(**{k: int(round(v)) for k, v in sizes.items()})


def linear_r(figures) -> dict:
    out = {}
    for f in figures.ordered():
        s = f.site
        if s.name in ("layer",) or "norm" in s.name or f.r is None:
            continue
        name = s.name + (f"[{s.layer}]" if s.layer is not None else "") + (
            f"/e{s.expert}" if s.expert is not None else "")
        out[name] = f.r
    return out


def grow_one(small, name: str, factor: float) -> dict:
    from megatron_sparkling.core.spec import GrowthSpec
    from megatron_sparkling.diagnostics import measure
    from megatron_sparkling.live.state import load_model_global_tensors
    from megatron_sparkling.mcore import model as model_lib
    from megatron_sparkling.methods import Grower

    method, options = METHODS[name]
    grower = Grower(GrowthSpec(small.shape, target_shape(small.shape, factor), method, 7,
                               options))
    ramp_for = None
    if method == "msg":
        from megatron_sparkling.live.mask_ramp import MaskRamp

        def ramp_for(model):
            MaskRamp(grower.plan, start_iteration=0, ramp_steps=10).install(model, lambda: 0)
    wide = model_lib.build_model(grower.spec.target.apply_to_args(small.args),
                                 wrap_with_ddp=False)
    load_model_global_tensors(wide, {k: grower.grow(k, v) for k, v in small.tensors.items()})
    if ramp_for is not None:
        ramp_for(wide)
    figures = measure(wide, small.batches)
    before, after = linear_r(small.figures), linear_r(figures)
    ratios = {k: after[k] / before[k] for k in before if k in after}
    devs = [abs(v - 1) for v in ratios.values()]
    gaps = first_update_module().first_update_gaps(
        grower, small.directions, first_step(small, grower, ramp_for),
        elements="copies" if method == "staged" else "old")
    gaps = {k: v for k, v in gaps.items() if v is not None}
    worst_gap = max(gaps, key=gaps.get)
    return {"method": name, "factor": factor, "loss_jump": figures.loss / small.figures.loss - 1,
            "first_update_gap": gaps[worst_gap], "first_update_worst_tensor": worst_gap,
            "first_update_gaps": gaps, "rms_worst_dev": max(devs),
            "rms_mean_dev": sum(devs) / len(devs), "rms_ratios": ratios}


def table(rows: list) -> str:
    lines = ["| method | factor | loss jump | first-update gap (worst tensor) | RMS ratio: "
             "worst / mean abs dev |", "|---|---|---|---|---|"]
    for r in rows:
        worst = r["first_update_worst_tensor"].replace("decoder.layers.", "")
        lines.append(f"| {r['method']} | {r['factor']:g} | {100 * r['loss_jump']:+.3f}% | "
                     f"{r['first_update_gap']:.2e} ({worst}) | "
                     f"{100 * r['rms_worst_dev']:.2f}% / {100 * r['rms_mean_dev']:.2f}% |")
    return "\n".join(lines)


def tree_commit(tree: str) -> str:
    try:
        out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--",
                                "megatron_sparkling"], capture_output=True, text=True).stdout
        return out + ("+changes" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", default=os.path.join(REPO, "data", "stdlib_text_document"))
    p.add_argument("--out", default=os.path.join(REPO, "docs", "results", "fidelity.json"))
    p.add_argument("--train-iters", type=int, default=40,
                   help="pre-training iterations of the small model (default 40)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--factors", nargs="+", type=float, default=list(FACTORS))
    a = p.parse_args(argv)
    from megatron_sparkling.training import corpus
    from megatron_sparkling.training.initialize import shutdown

    if not corpus.exists(a.data_path):
        corpus.build(corpus.stdlib_files(corpus.default_source_dir()), a.data_path)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 200))
    t0 = time.time()
    commit = tree_commit(TREE)   # the measured tree by its commit, not by one machine's path
    command = " ".join(([f"FIDELITY_TREE=<a checkout of {commit}>"] if TREE != REPO else [])
                       + ["python", "bench/fidelity.py"] + sys.argv[1:])
    rows = []
    try:
        small = Small(flags(a.data_path, a.train_iters), a.train_iters)
        print(f"[{time.time() - t0:5.0f}s] small model: {a.train_iters} iterations, held-out "
              f"loss {small.figures.loss:.4f}", flush=True)
        for name in a.methods:
            for factor in a.factors:
                if METHODS[name][0] in INTEGER_ONLY and factor != int(factor):
                    continue
                rows.append(grow_one(small, name, factor))
                r = rows[-1]
                print(f"[{time.time() - t0:5.0f}s] {name} {factor:g}x: loss "
                      f"{100 * r['loss_jump']:+.3f}%, first-update gap "
                      f"{r['first_update_gap']:.2e}, RMS worst dev "
                      f"{100 * r['rms_worst_dev']:.2f}%", flush=True)
    finally:
        shutdown()
    results = {"command": command,
               "tree": "this repository" if TREE == REPO else "another checkout",
               "tree_commit": commit,
               "train_iters": a.train_iters, "small_model": SMALL,
               "small_loss": small.figures.loss, "seconds": time.time() - t0, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(table(rows))
    print(f"wrote {a.out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
