"""Stage timing: the scaling-law fit recovers known parameters, the growth point is where the
per-FLOP slopes meet (and minimises staged compute), and `megatron-sparkling plan` answers on a
synthetic log and on a real run's log."""
import json
import math

import numpy as np
import pytest

from conftest import megatron_run, tiny_moe_flags
from megatron_sparkling import cli
from megatron_sparkling.planning import stage_timing
from megatron_sparkling.planning.stage_timing import PUBLISHED, Curve, ScalingLaw
from megatron_sparkling.mcore import model as model_lib

STEPS = np.arange(100, 20001, 100)


def _curve(law, n, noise=0.0, seed=0, steps=STEPS):
    losses = law.loss(n, steps) + np.random.default_rng(seed).normal(0, noise, len(steps))
    return Curve(n, steps.tolist(), losses.tolist())


def _rel(a, b):
    return abs(a / b - 1)


def test_fit_recovers_the_law_from_synthetic_curves():
    truth = PUBLISHED
    exact = stage_timing.fit([_curve(truth, 1e7)])            # one size: a_N fixed (published)
    assert _rel(exact.law.a_s, truth.a_s) < 1e-4 and _rel(exact.law.s_c, truth.s_c) < 1e-3
    assert _rel(exact.law.n_c, truth.n_c) < 1e-2 and exact.rmse < 1e-6
    other = ScalingLaw(n_c=3e12, s_c=900.0, a_n=0.1, a_s=0.5)
    two = stage_timing.fit([_curve(other, 1e7), _curve(other, 4e7)])    # two sizes: a_N fitted
    for name in ("n_c", "s_c", "a_n", "a_s"):
        assert _rel(getattr(two.law, name), getattr(other, name)) < 1e-3, name
    # late curve only (steps 2000..20000: the S term falls 1.8 -> 0.3 nats) with loss noise 0.02
    for seed in range(3):
        noisy = stage_timing.fit([_curve(truth, 1e7, noise=0.02, seed=seed,
                                         steps=np.arange(2000, 20001, 100))])
        errors = {k: _rel(getattr(noisy.law, k), getattr(truth, k)) for k in ("a_s", "s_c", "n_c")}
        print(f"\nfit, loss noise 0.02, steps 2000-20000, seed {seed} (one curve, a_N fixed): "
              "relative errors " + ", ".join(f"{k} {v:.2%}" for k, v in errors.items())
              + f"; rmse {noisy.rmse:.4f}")
        assert errors["a_s"] < 0.05 and errors["s_c"] < 0.1 and errors["n_c"] < 0.15
    with pytest.raises(stage_timing.StageTimingError, match="does not flatten"):
        stage_timing.fit([Curve(1e7, [1, 2, 3, 4, 5], [1.0, 1.1, 1.2, 1.3, 1.4])])


def test_growth_point_matches_slopes_and_minimises_staged_compute():
    law, n, n2, tokens = PUBLISHED, 1e8, 4e8, 5e5
    c, c2 = 6 * n * tokens, 6 * n2 * tokens
    budget = 60000 * c2
    advice = stage_timing.growth_point(law, n, n2, budget, c, c2)
    assert 0 < advice.effective_step < advice.grow_step < advice.budget_steps
    assert float(law.loss(n, advice.grow_step)) == pytest.approx(advice.grow_loss, rel=1e-9)
    # per-FLOP slopes by finite differences of each curve at the growth loss
    h = 1e-3
    slope_small = (law.loss(n, advice.grow_step * (1 + h)) - law.loss(n, advice.grow_step)) / (
        advice.grow_step * h * c)
    slope_big = (law.loss(n2, advice.effective_step * (1 + h))
                 - law.loss(n2, advice.effective_step)) / (advice.effective_step * h * c2)
    assert slope_small == pytest.approx(slope_big, rel=2e-3)
    # brute force: staged compute to the from-scratch final loss, over candidate growth steps
    candidates = np.linspace(advice.grow_step * 0.2, advice.grow_step * 3, 4001)
    cost = [g * c + (advice.budget_steps - law.steps_to(n2, float(law.loss(n, g)))) * c2
            for g in candidates]
    best = candidates[int(np.argmin(cost))]
    assert best == pytest.approx(advice.grow_step, rel=0.01)
    assert min(cost) == pytest.approx(advice.staged_flops, rel=1e-6)
    assert 0 < advice.saving < 1 and advice.worth_growing
    print(f"\npublished law, 1e8 -> 4e8 params, budget {budget:.3g} FLOPs: grow at step "
          f"{advice.grow_step:.0f} (loss {advice.grow_loss:.4f}), continue at step "
          f"{advice.effective_step:.0f}; saving {advice.saving:.1%}")
    small_budget = stage_timing.growth_point(law, n, n2, advice.effective_step * c2 * 0.5, c, c2)
    assert not small_budget.worth_growing and small_budget.saving == 0


def _write_megatron_log(path, law, n):
    with open(path, "w") as f:
        for s in STEPS:
            f.write(f" [2026-01-01 00:00:00] iteration {s:8d}/{20000:8d} | consumed samples: "
                    f"{s * 8:12d} | learning rate: 1.0E-04 | lm loss: {law.loss(n, s):.6E} | "
                    "grad norm: 1.0 |\n")


def test_plan_command_on_a_synthetic_megatron_log(tmp_path, capsys):
    log = tmp_path / "train.log"
    _write_megatron_log(log, PUBLISHED, 1e8)
    args = ["plan", "--log", str(log), "--params", "1e8", "--target-params", "4e8",
            "--tokens-per-iteration", "5e5", "--budget-flops", f"{60000 * 6 * 4e8 * 5e5:.6g}",
            "--skip-fraction", "0"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "grow 1e+08 -> 4e+08 parameters at iteration" in text and "compute saved" in text
    assert cli.main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["law"]["a_s"] == pytest.approx(PUBLISHED.a_s, rel=1e-3) and out["saving"] > 0
    assert cli.main(["plan", "--log", str(tmp_path / "missing"), "--params", "1",
                     "--target-params", "2", "--tokens-per-iteration", "1",
                     "--budget-flops", "1"]) == 2
    assert "cannot read the loss log" in capsys.readouterr().err
    with capsys.disabled():
        print("\n" + text)


def test_plan_command_on_a_real_run(corpus_prefix, tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    with megatron_run(tiny_moe_flags(corpus_prefix, num_layers=1, train_iters=40, lr=3e-3,
                                     lr_warmup_iters=3,
                                     log_metrics_path=metrics)) as t:
        t.train()
        chunk = model_lib.unwrap(t.model)[0]
        layer_params = sum(p.numel() for name, p in chunk.named_parameters()
                           if name.startswith("decoder.layers."))
    capsys.readouterr()                                  # the run's own log lines
    tokens = 8 * 64
    budget = 6 * 2 * layer_params * tokens * 2000     # 2000 iterations of the 4-layer model
    assert cli.main(["plan", "--log", str(metrics), "--params", str(layer_params),
                     "--target-params", str(2 * layer_params), "--tokens-per-iteration",
                     str(tokens), "--budget-flops", str(budget), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    with capsys.disabled():
        print(f"\nreal 40-iteration run ({layer_params} layer params -> 2x): {out}")
    law = out["law"]
    assert all(math.isfinite(v) and v > 0 for v in law.values())
    # the law describes the curve: its residual is the curve's batch-to-batch noise, whose level
    # successive differences give without any fit (1.5: two estimates' spread over ~36 points)
    losses = np.asarray(cli._curve(str(metrics), layer_params, 0.1).losses)
    noise = math.sqrt(np.mean(np.diff(losses) ** 2) / 2)
    assert out["rmse"] < 1.5 * noise, (out["rmse"], noise)

    def loss(n, s):   # the law by hand: L = (N_c / N)^a_N + (2 S_c / S)^a_S
        return (law["n_c"] / n) ** law["a_n"] + (2 * law["s_c"] / s) ** law["a_s"]

    def slope_per_flop(n, s):   # dL/dS / (6 N T)
        return -law["a_s"] * (2 * law["s_c"]) ** law["a_s"] * s ** (-law["a_s"] - 1) / (
            6 * n * tokens)

    small, big = layer_params, 2 * layer_params
    grow, eff = out["grow_step"], out["effective_step"]
    assert loss(small, grow) == pytest.approx(out["grow_loss"], rel=1e-9)
    assert loss(big, eff) == pytest.approx(out["grow_loss"], rel=1e-9)
    # grown where the small model's loss-per-FLOP slope meets the grown model's at that loss
    assert slope_per_flop(small, grow) == pytest.approx(slope_per_flop(big, eff), rel=1e-6)
    assert eff < grow                                    # the bigger model gets there sooner
    assert out["budget_steps"] == pytest.approx(2000, rel=1e-12)
    staged = 6 * tokens * (small * grow + big * (out["budget_steps"] - eff))
    assert out["saving"] == pytest.approx(1 - staged / budget, rel=1e-9, abs=1e-12)
