"""Zero/one-layer progressive training: a real run grows to full depth in process and goes on."""
import math

import pytest
import torch

from conftest import megatron_run, read_metrics, tiny_moe_flags
from megatron_sparkling.training import progressive
from megatron_sparkling.training.arguments import ArgumentError
from megatron_sparkling.training.lvps import decoder_block


def _flags(corpus_prefix, start, **kw):
    # WSD: 1 warm-up iteration, stable, 6 decay iterations; growth at 50% (inside the stable phase)
    flags = dict(num_layers=4, train_iters=30, lr=3e-3, min_lr=3e-4, lr_decay_style="WSD",
                 lr_warmup_iters=1, lr_wsd_decay_iters=6, lr_wsd_decay_style="linear",
                 eval_iters=2, sparkling_progressive_start_layers=start,
                 sparkling_progressive_grow_at=0.5)
    flags.update(kw)
    return tiny_moe_flags(corpus_prefix, **flags)


@pytest.mark.parametrize("start,new_layers", [(0, None), (1, "copy")])
def test_progressive_start_grows_to_full_depth_and_loss_keeps_falling(corpus_prefix, tmp_path,
                                                                       start, new_layers):
    metrics = tmp_path / "metrics.jsonl"
    with megatron_run(_flags(corpus_prefix, start, sparkling_progressive_new_layers=new_layers,
                             log_metrics_path=metrics)) as t:
        assert t.args.num_layers == start and len(decoder_block(t.model).layers) == start
        planned = progressive.planned_compute(t.args, start, 4, 0.5)
        t.train(until_iteration=15)
        at_growth_small = t.evaluate()
        t.hooks[0].before_step(t)            # what train_step does first at iteration 16: grow
        assert t.args.num_layers == 4 and len(decoder_block(t.model).layers) == 4
        after_growth = t.evaluate()
        t.train()
        final = t.evaluate()
        records = read_metrics(metrics)
    lrs = {r["iteration"]: r["learning rate"] for r in records if "learning rate" in r}
    assert lrs[15] == lrs[16] == pytest.approx(3e-3)        # same LR across growth (stable phase)
    flops = {r["iteration"]: r["flops"] for r in records if "lm loss" in r}
    per_iter = {i: flops[i] - flops[i - 1] for i in range(2, 31)}
    assert per_iter[15] < per_iter[16] == per_iter[30]       # full depth from iteration 16 on
    assert flops[30] == pytest.approx(planned["progressive"])
    print(f"\n[start {start}, new layers {new_layers or 'random'}] held-out loss: small model "
          f"{at_growth_small:.4f} at growth, grown {after_growth:.4f} (change "
          f"{after_growth - at_growth_small:+.4f}), end {final:.4f}; compute "
          f"{planned['progressive']:.3e} vs fixed {planned['fixed']:.3e} FLOPs "
          f"(saving {planned['saving']:.1%})")
    assert final < after_growth - 0.05        # training continues after growth: the loss falls
    # new layers (random or copied) do not keep the function: growth may give back at most a
    # tenth of what the small model gained over chance (ln 256, an untrained model's loss)
    assert abs(after_growth - at_growth_small) < 0.1 * (math.log(256) - at_growth_small)


def test_progressive_flags_are_checked(corpus_prefix):
    for kw, words in [
        (dict(sparkling_progressive_new_layers="copy"), "no layer to copy"),
        (dict(sparkling_progressive_grow_at=1.0), "outside 1 .. 29"),
    ]:
        with pytest.raises(ArgumentError, match=words):
            with megatron_run(_flags(corpus_prefix, 0, **kw)):
                pass
    with pytest.raises(ArgumentError, match="inside the LR warm-up"):
        with megatron_run(_flags(corpus_prefix, 1, lr_warmup_iters=20)):
            pass


def test_progressive_resume_after_growth_starts_at_full_depth(corpus_prefix, tmp_path):
    """A checkpoint saved after growth holds the 4-layer model; resuming keeps that depth."""
    save = tmp_path / "ckpt"
    with megatron_run(_flags(corpus_prefix, 1, save=save, train_iters=12,
                             sparkling_progressive_grow_at=0.25, lr_wsd_decay_iters=2)) as t:
        t.train(until_iteration=6)
        t.save()
        before = t.evaluate()
    with megatron_run(_flags(corpus_prefix, 1, load=save, train_iters=12,
                             sparkling_progressive_grow_at=0.25, lr_wsd_decay_iters=2)) as t:
        assert t.iteration == 6 and t.args.num_layers == 4
        assert t.evaluate() == pytest.approx(before, abs=1e-6)
        t.train()
        assert torch.isfinite(torch.tensor(t.history[-1]["lm loss"]))


def test_saving_at_equal_loss_reads_run_histories():
    base = [{"iteration": i, "flops": 10.0 * i, "validation lm loss": 5.0 - i} for i in range(1, 5)]
    run = [{"iteration": 1, "flops": 3.0, "lm loss": 9.0},
           {"iteration": 2, "flops": 12.0, "validation lm loss": 2.5}]
    out = progressive.saving_at_equal_loss(run, base)
    # the baseline reaches 2.5 halfway between 20 FLOPs (loss 3) and 30 FLOPs (loss 2)
    assert out["baseline_flops"] == pytest.approx(25.0) and out["saving"] == pytest.approx(0.52)
    assert progressive.flops_to_reach(base, 0.5) == float("inf")
