"""Benchmark: the share of a training step the element re-warmup costs (live/element_lr.py).

    python bench/rewarmup_cost.py [--out docs/results/rewarmup_cost.json] [--rounds 8]

One real megatron-core MoE run (distributed optimizer, fp32, CPU) of the size of a grown model
(hidden 512, 4 layers, 8 experts of FFN 1024: its growth record says it was grown 2x from half
the hidden size, half the expert FFN and half the experts, so 84% of the elements are new and
masked: the most the masks ever cover). A step is 4 micro-batches of 4 x 256 tokens (16K tokens
for 55M parameters: fewer tokens per parameter than a real run's step, e.g. 4M tokens for 7B,
so the hooks' share here is an upper bound; they run once per optimizer step).
After warm-up steps the re-warmup is installed as growth on load installs it (scope `new`: the
step hooks keep the masked elements before each optimizer step and scale their change after).
Then, in the same process, blocks of steps alternate with the hooks on and off (removed and
registered again; the schedule itself is the same), `--rounds` times. Two figures:
- direct: the seconds spent inside the hooks / the step's seconds, per step with the hooks on
  (median): what the masks cost, little moved by other load on the machine;
- A/B: (median step with hooks - median step without) / median step with hooks.
Without a growth record nothing is installed (tests/test_rewarmup.py::
test_without_a_growth_record_training_is_unchanged): the cost is exactly zero.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

MODEL = dict(num_layers=4, hidden_size=512, num_attention_heads=8, num_experts=8,
             moe_ffn_hidden_size=1024, seq_length=256, max_position_embeddings=256,
             micro_batch_size=4, global_batch_size=16, use_distributed_optimizer=True,
             train_iters=1000, lr_warmup_iters=1)
GROWN_FROM = dict(hidden_size=256, moe_ffn_hidden_size=512, num_experts=4, ffn_hidden_size=None)


def _timed_hooks(element_lr):
    """ScaledMaskedSteps that adds the seconds spent in its hooks to `spent[0]`."""
    spent = [0.0]

    class Timed(element_lr.ScaledMaskedSteps):
        def _keep(self, masks):
            hook = super()._keep(masks)

            def timed(*a):
                t = time.perf_counter()
                hook(*a)
                spent[0] += time.perf_counter() - t
            return timed

        def _scale(self, *a):
            t = time.perf_counter()
            super()._scale(*a)
            spent[0] += time.perf_counter() - t
    return Timed, spent


def main(rounds: int, block: int, out: str) -> None:
    import torch

    from conftest import megatron_run, tiny_moe_flags
    from megatron_sparkling.core.spec import GrowthSpec, ModelShape
    from megatron_sparkling.live import element_lr
    from megatron_sparkling.live import rewarmup as schedule
    from megatron_sparkling.methods.base import Grower, GrowthMethod
    from megatron_sparkling.training import corpus

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="bench_rewarmup_") as tmp:
        prefix = os.path.join(tmp, "corpus", "stdlib_text_document")
        corpus.build(corpus.stdlib_files(corpus.default_source_dir()), prefix, 300_000)
        with megatron_run(tiny_moe_flags(prefix, **MODEL)) as trainer:
            for _ in range(2):
                trainer.train_step()
            target = ModelShape.from_args(trainer.args)
            source = target.replace(**{k: v for k, v in GROWN_FROM.items() if v is not None})
            record = Grower(GrowthSpec(source, target, "copy"), GrowthMethod()).record()
            config = schedule.RewarmupConfig(warmup_iters=10_000, peak_ratio=1.0, scope="new",
                                             samples_per_iteration=MODEL["global_batch_size"])
            rewarmup = schedule.install_rewarmup(trainer.model, trainer.optimizer,
                                                 trainer.scheduler, record, config)
            opt_masks = rewarmup.hooks.opt_masks
            rewarmup.hooks.remove()
            Timed, spent = _timed_hooks(element_lr)
            steps = {"on": [], "off": []}
            direct = []
            for _ in range(rounds):
                for state in ("on", "off"):
                    hooks = Timed(opt_masks, rewarmup.ratio) if state == "on" else None
                    for _ in range(block):
                        spent[0] = 0.0
                        t = time.perf_counter()
                        trainer.train_step()
                        seconds = time.perf_counter() - t
                        steps[state].append(seconds)
                        if hooks is not None:
                            direct.append(spent[0] / seconds)
                    if hooks is not None:
                        hooks.remove()
            on, off = statistics.median(steps["on"]), statistics.median(steps["off"])
            result = {
                "model": MODEL, "grown_from": GROWN_FROM,
                "new_elements": rewarmup.new_elements, "elements": rewarmup.elements,
                "median_step_s": {"hooks_on": on, "hooks_off": off},
                "direct_share_median": statistics.median(direct),
                "direct_share_max": max(direct),
                "ab_share": (on - off) / on, "rounds": rounds, "block": block,
                "steps": steps, "command": "python bench/rewarmup_cost.py"}
    print(f"model: {MODEL['num_layers']} layers, hidden {MODEL['hidden_size']}, "
          f"{MODEL['num_experts']} experts of FFN {MODEL['moe_ffn_hidden_size']}, "
          f"{MODEL['global_batch_size']}x{MODEL['seq_length']} tokens a step; "
          f"{result['new_elements']} of {result['elements']} elements new (masked)")
    print(f"median step {on:.3f} s with the re-warmup hooks, {off:.3f} s without "
          f"({rounds} rounds of {block} steps each, alternated)")
    print(f"re-warmup share of the step: {100 * result['direct_share_median']:.2f}% (time inside "
          f"the hooks, median; max {100 * result['direct_share_max']:.2f}%), "
          f"{100 * result['ab_share']:.2f}% (A/B of medians)")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--block", type=int, default=3, help="steps per block")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "results", "rewarmup_cost.json"))
    ns = p.parse_args()
    main(ns.rounds, ns.block, ns.out)
