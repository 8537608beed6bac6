"""SPARKLING's learning-rate re-warmup of new elements, on real megatron-core models and optimizers.

A narrow MoE (hidden 32, expert FFN 64, 2 experts) trains T_E iterations; its weights are copied
along a growth plan's element maps into the tiny wide model (hidden 64, expert FFN 128, 4 experts),
which then trains with the re-warmup. Expected learning rates are written out here in closed form
(cosine base schedule), independently of megatron_sparkling.live.rewarmup (rewarmup_checks.py).
"""
import contextlib
import os
import shutil

import pytest
import torch

from conftest import megatron_run, single_rank, tiny_moe_flags
from rewarmup_checks import (GBS, LR, MIN_LR, NARROW, R, REWARMUP, RUN, T_E, TOTAL, W, WIDE,
                             base_lr, capture_next_step, check_one_step, inner_optimizers,
                             masks_of, new_lr, ramp_lrs)
from megatron_sparkling.live import element_lr
from megatron_sparkling.core import layout
from megatron_sparkling.core.record import RECORD_KEY
from megatron_sparkling.live import rewarmup as schedule
from megatron_sparkling.methods.base import Grower, GrowthMethod
from megatron_sparkling.core.spec import GrowthSpec, ModelShape


@pytest.fixture(scope="module")
def narrow_model(corpus_prefix):
    """Global tensors and shape of the narrow model after T_E iterations."""
    from megatron_sparkling.live.state import model_global_tensors

    with megatron_run(tiny_moe_flags(corpus_prefix, **NARROW, **RUN)) as narrow:
        for _ in range(T_E):
            narrow.train_step()
        return model_global_tensors(narrow.model), ModelShape.from_args(narrow.args)


def grow(trainer, narrow_model):
    """Load the narrow weights, copied along a twin plan, into the wide trainer's model; returns
    the growth record (Grower.record())."""
    from megatron_sparkling.live.state import load_model_global_tensors

    tensors, source = narrow_model
    grower = Grower(GrowthSpec(source, ModelShape.from_args(trainer.args), "sparkling", seed=3),
                    GrowthMethod())

    def copied(key, tensor):
        lay = layout.resolve(key, source.swiglu)
        for dim, m in enumerate(grower.plan.tensor_maps(lay)):
            tensor = tensor.index_select(dim, m.source.clamp(min=0))
        return tensor

    load_model_global_tensors(trainer.model, {k: copied(k, v) for k, v in tensors.items()})
    return grower.record()


@contextlib.contextmanager
def grown_run(corpus_prefix, narrow_model, bf16=False, **flags):
    """A wide run at iteration T_E (optimizer state and schedule real) holding grown weights."""
    argv = tiny_moe_flags(corpus_prefix, **WIDE, **RUN, **flags)
    with (_bf16_run(argv) if bf16 else megatron_run(argv)) as trainer:
        for _ in range(T_E):
            trainer.train_step()
        record = grow(trainer, narrow_model)
        if bf16:
            trainer.optimizer.reload_model_params()  # main params from the grown bf16 weights
        yield trainer, record


@contextlib.contextmanager
def _bf16_run(argv):
    """A 1-rank run with bf16 params (megatron-core's Float16Optimizer). The CLI refuses --bf16 on
    CPU (training is fp32 there); megatron-core itself runs bf16 on CPU, which is all this needs."""
    from megatron_sparkling.training.initialize import initialize
    from megatron_sparkling.training.loop import Pretrainer, _add_run_flags, _chain_providers

    with single_rank():
        args = initialize(argv, _chain_providers(_add_run_flags, schedule.add_rewarmup_args))
        args.bf16, args.params_dtype = True, torch.bfloat16
        yield Pretrainer(args)


def config(scope="new", bias_correction="global"):
    return schedule.RewarmupConfig(warmup_iters=W, peak_ratio=R, scope=scope,
                                   samples_per_iteration=GBS, bias_correction=bias_correction)


# ---------------------------------------------------------------------------- masks
def test_masks_mark_exactly_the_new_elements_of_each_local_parameter(corpus_prefix, narrow_model):
    with grown_run(corpus_prefix, narrow_model) as (trainer, record):
        rewarmup = schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                             record, config())
        model = trainer.model[0].module
        params = dict(model.named_parameters())
        masks = element_lr.model_param_masks(trainer.model, *schedule.plan_of(record))

        def mask(name):
            entry = masks.get(id(params[name]))
            return torch.zeros_like(params[name], dtype=torch.bool) if entry is None else entry[1]

        h_new = torch.arange(64) >= 32
        assert torch.equal(mask("decoder.final_layernorm.weight"), h_new)
        assert torch.equal(mask("embedding.word_embeddings.weight"), h_new.expand(256, 64))
        router = mask("decoder.layers.1.mlp.router.weight")            # (experts, hidden)
        assert torch.equal(router, (torch.arange(4) >= 2)[:, None] | h_new[None, :])
        fc1 = mask("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight")  # [gate; up]
        f_new = torch.arange(128) >= 64
        assert torch.equal(fc1, torch.cat([f_new, f_new])[:, None] | h_new[None, :])
        fc2 = mask("decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight")  # (h, f)
        assert torch.equal(fc2, h_new[:, None] | f_new[None, :])
        for e in (2, 3):  # experts that growth added are new as a whole
            assert mask(f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc2.weight").all()
        # every new element of every global tensor is masked once, and nothing else
        plan, swiglu = schedule.plan_of(record)
        from megatron_sparkling.live.state import model_global_tensors

        expected = sum(int(m.sum()) for m in (
            element_lr.global_new_mask(plan, k, swiglu) for k in model_global_tensors(trainer.model))
            if m is not None)
        assert rewarmup.new_elements == expected == sum(int(m.sum()) for _, m in masks.values())
        assert 0 < rewarmup.new_elements < rewarmup.elements


# ---------------------------------------------------------------------------- schedule
def test_new_and_old_learning_rates_follow_their_schedules(corpus_prefix, narrow_model, capsys):
    with grown_run(corpus_prefix, narrow_model, log_interval=1) as (trainer, record):
        schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler, record,
                                  config())
        records = trainer.train()[T_E:]
    assert [r["iteration"] for r in records] == list(range(T_E + 1, TOTAL + 1))
    # each record holds the LR of the next step (as Megatron-LM logs it)
    for r in records:
        it = r["iteration"]
        assert abs(r[schedule.OLD_LR] - base_lr(it)) < 1e-12, it
        assert r["learning rate"] == r[schedule.OLD_LR]
        assert abs(r[schedule.NEW_LR] - new_lr(it)) < 1e-12, (it, r[schedule.NEW_LR], new_lr(it))
    by_it = {r["iteration"]: r[schedule.NEW_LR] for r in records}
    assert by_it[T_E + W] == pytest.approx(R * base_lr(T_E), rel=1e-12)   # the peak
    assert by_it[TOTAL] == pytest.approx(MIN_LR, rel=1e-12)
    out = capsys.readouterr().out
    assert "SPARKLING re-warmup (growth at scheduler step 32 (iteration 4))" in out
    assert "| learning rate (new elements): " in out and "| learning rate (old elements): " in out


# ---------------------------------------------------------------------------- one step
@pytest.mark.parametrize("style", ["linear", "WSD", "constant"])
def test_new_element_schedule_follows_the_base_decay_style(style):
    """Megatron-core's decay styles, in closed form: ramp 10 -> 20 (samples), then the style."""
    base = dict(init_lr=0.0, max_lr=1.0, min_lr=0.1, lr_warmup_steps=5, lr_decay_steps=100,
                lr_decay_style=style, wsd_decay_steps=20 if style == "WSD" else None,
                lr_wsd_decay_style="linear" if style == "WSD" else None)
    sched = schedule.NewElementSchedule(base, growth_step=10, warmup_steps=10, peak_ratio=1.3)
    group = {"max_lr": 1.0, "min_lr": 0.1}
    eta_e = 1.0 if style in ("WSD", "constant") else 1.0 - 0.9 * 5 / 95   # base LR at step 10
    peak = 1.3 * eta_e
    expected = {10: eta_e, 15: (eta_e + peak) / 2, 20: peak}
    if style == "linear":
        expected.update({60: 0.1 + (peak - 0.1) * (1 - 40 / 80), 100: 0.1, 120: 0.1})
    elif style == "WSD":   # constant until the anneal starts at 80, then linear to min-lr
        expected.update({50: peak, 80: peak, 90: 0.1 + (peak - 0.1) * 0.5, 100: 0.1})
    else:
        expected.update({50: peak, 200: peak})
    for step, lr in expected.items():
        assert sched.lr(group, step) == pytest.approx(lr, rel=1e-12, abs=1e-15), (style, step)
    # a group of its own (decoupled LR): its own eta_e and min-lr
    own = {"max_lr": 2.0, "min_lr": 0.3}
    assert sched.lr_at_growth(own) == pytest.approx(2 * eta_e if style != "linear" else
                                                    2.0 - 1.7 * 5 / 95, rel=1e-12)
    # no ramp (W = 0): the peak at once; a ramp past the end of the decay: min-lr after it
    assert schedule.NewElementSchedule(base, 10, 0, 1.3).lr(group, 10) == pytest.approx(peak)
    late = schedule.NewElementSchedule(base, 95, 10, 1.3)
    assert late.lr(group, 100) == pytest.approx(late.lr_at_growth(group) * (1 + 0.3 * 0.5))
    assert late.lr(group, 106) == pytest.approx(peak if style == "constant" else 0.1)


DECOUPLED = (2e-3, 2e-4)  # --decoupled-lr / --decoupled-min-lr of embedding and output layer


@pytest.mark.parametrize("optimizer", ["fp32", "distributed", "bf16", "decoupled-lr"])
def test_one_step_matches_adamw_with_the_new_elements_lr(corpus_prefix, narrow_model, optimizer):
    flags = dict(use_distributed_optimizer=optimizer == "distributed")
    groups = ((LR, MIN_LR),)
    if optimizer == "decoupled-lr":
        flags.update(decoupled_lr=DECOUPLED[0], decoupled_min_lr=DECOUPLED[1])
        groups += (DECOUPLED,)
    with grown_run(corpus_prefix, narrow_model, bf16=optimizer == "bf16", **flags) as (
            trainer, record):
        rewarmup = schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                             record, config())
        trainer.train_step()
        trainer.train_step()
        # the third step after growth runs at scheduler step (T_E + 2) x GBS: inside the ramp
        # (the base groups by their max_lr: megatron-core 0.15 puts the decoupled group first)
        base = [float(g["lr"]) for g in trainer.optimizer.param_groups if g["max_lr"] == LR]
        assert base == pytest.approx([base_lr(T_E + 2)] * len(base), rel=1e-12) and base
        dev_new, dev_old, dev_abs, n_new = check_one_step(trainer, masks_of(rewarmup),
                                                          ramp_lrs(T_E + 2, groups))
        if optimizer == "decoupled-lr":   # the embedding's own schedule, re-warmed
            embedding = [g for g in trainer.optimizer.param_groups if g["max_lr"] == DECOUPLED[0]]
            assert embedding and embedding[0]["lr"] == pytest.approx(
                base_lr(T_E + 3, *DECOUPLED), rel=1e-12)
            assert trainer.scheduler.rewarmup.lr_new(embedding[0]) == pytest.approx(
                new_lr(T_E + 3, *DECOUPLED), rel=1e-12)
    print(f"[{optimizer}] one step: max deviation from hand AdamW {dev_abs:.3e} (new elements "
          f"{dev_new:.2f} ulp, old {dev_old:.2f} ulp), lr new/old "
          f"{new_lr(T_E + 2) / base_lr(T_E + 2):.4f}")
    assert n_new == rewarmup.new_elements > 0
    # fp32 rounding only (torch's own AdamW is a few ulp off the float64 formula); a wrong LR
    # would be off by ~40% of an update: thousands of ulp
    assert dev_new <= 4.0 and dev_old <= 4.0


def _zero_new_moments(rewarmup):
    """New elements' Adam moments to zero, as SPARKLING's S' = [S, 0] leaves them (the test's
    growth copies weights only: the moments are the wide run's own)."""
    for inner, masks in rewarmup.hooks.opt_masks:
        for p, mask in masks.values():
            for kind in ("exp_avg", "exp_avg_sq"):
                state = inner.state[p][kind]
                state.zero_() if mask is None else state.masked_fill_(mask, 0.0)


@pytest.mark.parametrize("optimizer", ["fp32", "distributed", "bf16"])
def test_per_element_bias_correction_gives_new_elements_fresh_adam_steps(corpus_prefix,
                                                                         narrow_model, optimizer):
    """New elements with zero moments: the first step after growth is a fresh Adam's first step,
    lr g / (|g| + eps) (not ~ lr g / (|g| sqrt(1 - b2^t)): the global step's kick); the third,
    inside the ramp, is AdamW at bias-correction step 3 with the new-element LR. Old elements
    step as plain AdamW at the global step t."""
    flags = dict(use_distributed_optimizer=optimizer == "distributed")
    with grown_run(corpus_prefix, narrow_model, bf16=optimizer == "bf16", **flags) as (
            trainer, record):
        rewarmup = schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                             record, config(bias_correction="per-element"))
        assert rewarmup.state.growth_adam_step == T_E
        _zero_new_moments(rewarmup)
        of = masks_of(rewarmup)
        seen, handles = capture_next_step(trainer.optimizer)
        first = check_one_step(trainer, of, ramp_lrs(T_E), new_step=1)
        for h in handles:
            h.remove()
        # the first update of every new element, against lr g / (|g| + eps) from the gradient
        sign_dev, n_sign = 0.0, 0
        for c in seen:
            mask = of(c["param"])
            if not mask.any():
                continue
            lr, wd = c["lr"], c["wd"]
            update = (c["before"] * (1 - lr * wd) - c["param"].detach().double())[mask] / lr
            fresh = c["grad"][mask] / (c["grad"][mask].abs() + c["eps"])
            # fp32 rounding of the stored weight (a few ulp of |p|), in units of lr
            ulp = 4 * 2.0 ** -23 * (c["before"][mask].abs() + lr) / lr
            sign_dev = max(sign_dev, float(((update - fresh).abs() / ulp).max()))
            n_sign += int(mask.sum())
        trainer.train_step()
        third = check_one_step(trainer, of, ramp_lrs(T_E + 2), new_step=3)
    print(f"[{optimizer}] per-element bias correction: first step {first[0]:.2f} / {first[1]:.2f}"
          f" ulp (new/old), lr*g/(|g|+eps) within {sign_dev:.2f} x 4 ulp of |p| on {n_sign} "
          f"elements; third step {third[0]:.2f} / {third[1]:.2f} ulp")
    assert first[3] == third[3] == n_sign == rewarmup.new_elements > 0
    assert first[0] <= 4.0 and first[1] <= 4.0 and third[0] <= 4.0 and third[1] <= 4.0
    assert sign_dev <= 1.0


@pytest.mark.parametrize("scope", ["all", "none"])
def test_per_element_bias_correction_with_any_rewarmup_scope(corpus_prefix, narrow_model, scope):
    """Without scope "new" the hooks only count new elements' bias correction from growth: with
    "all" every element has the re-warmed LR, with "none" the base one."""
    with grown_run(corpus_prefix, narrow_model) as (trainer, record):
        rewarmup = schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                             record, config(scope, "per-element"))
        _zero_new_moments(rewarmup)
        lr = (new_lr if scope == "all" else base_lr)(T_E)
        dev_new, dev_old, _, n_new = check_one_step(trainer, masks_of(rewarmup),
                                                    lambda c: (lr, lr), new_step=1)
        figures = schedule.lr_figures(trainer.scheduler)
        assert figures == {} if scope == "none" else figures == pytest.approx(
            {schedule.NEW_LR: new_lr(T_E + 1), schedule.OLD_LR: new_lr(T_E + 1)}, rel=1e-12)
    assert n_new == rewarmup.new_elements > 0
    assert dev_new <= 4.0 and dev_old <= 4.0


def test_per_element_bias_correction_needs_adam(corpus_prefix, narrow_model):
    with grown_run(corpus_prefix, narrow_model, optimizer="sgd") as (trainer, record):
        with pytest.raises(schedule.RewarmupError, match="needs Adam"):
            schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                      record, config(bias_correction="per-element"))
        # global (the default) leaves SGD alone
        schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler, record,
                                  config())


@pytest.mark.parametrize("copied", [{"method": "copy"}, {"method": "staged"},
                                    {"depth": {"new_state": "copy"}}])
def test_per_element_bias_correction_is_refused_for_copied_state(corpus_prefix, narrow_model,
                                                                 copied):
    """New elements that start from copied moments (copy, copy-opt, hypercloning, staged, depth
    copies) have no fresh Adam to count from: one-line refusal, nothing installed."""
    with grown_run(corpus_prefix, narrow_model) as (trainer, record):
        record = {**record, **copied}
        with pytest.raises(schedule.RewarmupError, match="start with zero Adam moments"):
            schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                      record, config(bias_correction="per-element"))
        assert not hasattr(trainer.scheduler, "rewarmup")


def test_bias_correction_setting_comes_from_the_flag_then_the_checkpoint():
    import argparse

    parser = schedule.add_rewarmup_args(argparse.ArgumentParser())
    flag = ["--sparkling-new-state-bias-correction", "per-element"]
    for argv, stored, expected in (([], {}, "global"), (flag, {}, "per-element"),
                                   ([], {"bias_correction": "per-element"}, "per-element"),
                                   (flag[:1] + ["global"], {"bias_correction": "per-element"},
                                    "global")):
        args = parser.parse_args(argv)
        args.global_batch_size = GBS
        assert schedule.RewarmupConfig.from_args(args, stored).bias_correction == expected
    with pytest.raises(schedule.RewarmupError, match="choose one of"):
        schedule.RewarmupConfig(bias_correction="local")


def test_scope_all_rewarms_every_element(corpus_prefix, narrow_model):
    with grown_run(corpus_prefix, narrow_model) as (trainer, record):
        rewarmup = schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                             record, config("all"))
        assert rewarmup.hooks is None  # no masks: the group LRs themselves re-warm
        records = [trainer.train_step(), trainer.train_step()]
        for r in records:
            assert r["learning rate"] == r[schedule.NEW_LR] == r[schedule.OLD_LR]
            assert abs(r[schedule.NEW_LR] - new_lr(r["iteration"])) < 1e-12
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(new_lr(T_E + 2), rel=1e-12)
        dev, _, _, n = check_one_step(trainer, lambda p: torch.ones(p.shape, dtype=torch.bool),
                                      lambda c: (base_lr(T_E + 2), new_lr(T_E + 2)))
        assert n == sum(p.numel() for p in trainer.model[0].parameters())
    assert dev <= 4.0


# ---------------------------------------------------------------------------- checkpoints
def inject_record(ckpt_dir, record):
    """Put a growth record under `sparkling` in a checkpoint's common state, as the converter does."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    common[RECORD_KEY] = record
    torch.save(common, os.path.join(ckpt_dir, "common.pt"))


@pytest.fixture(scope="module")
def grown_checkpoints(tmp_path_factory, corpus_prefix, narrow_model):
    """{distributed optimizer?: (checkpoint without a record, the same with the growth record)}:
    a grown wide model saved at iteration T_E, the record under `sparkling` in its common state
    (as the converter writes it)."""
    out = {}
    for distributed in (False, True):
        root = tmp_path_factory.mktemp(f"grown_do{int(distributed)}")
        plain, grown = str(root / "plain"), str(root / "grown")
        with grown_run(corpus_prefix, narrow_model, use_distributed_optimizer=distributed) as (
                trainer, record):
            trainer.save(plain)
        shutil.copytree(plain, grown)
        inject_record(os.path.join(grown, f"iter_{T_E:07d}"), record)
        out[distributed] = plain, grown, record
    return out


def _train(trainer, n):
    return [trainer.train_step() for _ in range(n)]


@pytest.mark.parametrize("distributed", [False, True])
def test_resume_inside_the_ramp_continues_it_exactly(tmp_path, corpus_prefix, grown_checkpoints,
                                                     distributed):
    _, grown, record = grown_checkpoints[distributed]
    flags = tiny_moe_flags(corpus_prefix, **WIDE, **RUN, use_distributed_optimizer=distributed)
    flags += REWARMUP
    n, cut = 8, 2                                   # the ramp spans iterations T_E .. T_E + W
    with megatron_run(flags + ["--load", grown]) as straight:
        assert straight.iteration == T_E
        assert straight.scheduler.rewarmup.state.growth_step == T_E * GBS
        reference = _train(straight, n)
    with megatron_run(flags + ["--load", grown]) as first:
        pieced = _train(first, cut)
        first.save(str(tmp_path / "resume"))
    # the flags of the resumed run differ: the checkpoint's re-warmup state wins
    with megatron_run(tiny_moe_flags(corpus_prefix, **WIDE, **RUN,
                                     use_distributed_optimizer=distributed,
                                     load=str(tmp_path / "resume"))) as second:
        state = second.scheduler.rewarmup.state
        assert (state.growth_step, state.warmup_iters, state.peak_ratio) == (T_E * GBS, W, R)
        pieced += _train(second, n - cut)
    assert [r["iteration"] for r in pieced] == [r["iteration"] for r in reference]
    for key in ("lm loss", schedule.NEW_LR, schedule.OLD_LR):
        assert max(abs(a[key] - b[key]) for a, b in zip(reference, pieced)) < 1e-5, key
    assert all(abs(r[schedule.NEW_LR] - new_lr(r["iteration"])) < 1e-12 for r in pieced)
    assert len({r["lm loss"] for r in reference}) == n
    if distributed:
        return
    # grown again at the saved iteration (another record): a fresh re-warmup replaces the saved one
    again = Grower(GrowthSpec(ModelShape(**record["source"]), ModelShape(**record["target"]),
                              "copy", seed=4), GrowthMethod()).record()
    inject_record(str(tmp_path / "resume" / f"iter_{T_E + cut:07d}"), again)
    with megatron_run(flags + ["--load", str(tmp_path / "resume")]) as regrown:
        state = regrown.scheduler.rewarmup.state
        assert state.growth_step == (T_E + cut) * GBS and state.record["seed"] == 4
        step = regrown.train_step()
    eta_e = base_lr(T_E + cut)
    assert step[schedule.NEW_LR] == pytest.approx(eta_e * (1 + (R - 1) / W), rel=1e-12)


@pytest.mark.parametrize("distributed", [False, True])
def test_per_element_resume_right_after_growth_is_bit_identical(tmp_path, corpus_prefix,
                                                                grown_checkpoints, distributed):
    """Per-element bias correction, saved 2 steps after growth and resumed (flags not repeated):
    the same bits as a straight run; and not the bits of the global bias correction."""
    _, grown, _ = grown_checkpoints[distributed]
    flags = tiny_moe_flags(corpus_prefix, **WIDE, **RUN, use_distributed_optimizer=distributed)
    flags += REWARMUP
    per_element = ["--sparkling-new-state-bias-correction", "per-element"]
    n, cut = 5, 2
    with megatron_run(flags + per_element + ["--load", grown]) as straight:
        assert straight.scheduler.rewarmup.state.growth_adam_step == T_E
        reference = _train(straight, n)
    with megatron_run(flags + ["--load", grown]) as global_run:
        assert global_run.scheduler.rewarmup.state.bias_correction == "global"
        global_losses = [r["lm loss"] for r in _train(global_run, n)]
    with megatron_run(flags + per_element + ["--load", grown]) as first:
        pieced = _train(first, cut)
        first.save(str(tmp_path / "resume"))
    with megatron_run(flags + ["--load", str(tmp_path / "resume")]) as second:
        state = second.scheduler.rewarmup.state
        assert (state.bias_correction, state.growth_adam_step) == ("per-element", T_E)
        pieced += _train(second, n - cut)
    losses = [r["lm loss"] for r in reference]
    assert [r["lm loss"] for r in pieced] == losses
    # the first loss is before any step: equal; every later one follows a different update
    assert global_losses[0] == losses[0]
    assert all(a != b for a, b in zip(global_losses[1:], losses[1:])), (global_losses, losses)


def test_without_a_growth_record_training_is_unchanged(corpus_prefix, grown_checkpoints):
    """No record: nothing installed, the same bits as a run with the re-warmup switched off."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    plain, grown, _ = grown_checkpoints[True]
    flags = tiny_moe_flags(corpus_prefix, **WIDE, **RUN, use_distributed_optimizer=True)
    runs = {}
    for name, extra in {"off": ["--load", grown, "--sparkling-rewarmup-scope", "none"],
                        "no record": ["--load", plain] + REWARMUP}.items():
        with megatron_run(flags + extra) as trainer:
            assert type(trainer.scheduler) is OptimizerParamScheduler
            for inner in inner_optimizers(trainer.optimizer):
                assert not inner._optimizer_step_pre_hooks
                assert not inner._optimizer_step_post_hooks
            runs[name] = _train(trainer, 4)
            assert schedule.STATE_KEY not in trainer.scheduler.state_dict()
    for a, b in zip(runs["off"], runs["no record"]):
        assert a["lm loss"] == b["lm loss"] and a["learning rate"] == b["learning rate"]
        assert schedule.NEW_LR not in a and schedule.NEW_LR not in b


def test_a_record_that_does_not_fit_the_model_is_refused(corpus_prefix, narrow_model):
    with grown_run(corpus_prefix, narrow_model) as (trainer, record):
        source = ModelShape(**record["source"])   # a record of growth to hidden 128 instead
        wrong = Grower(GrowthSpec(source, ModelShape.from_args(trainer.args).replace(
            hidden_size=128), "copy"), GrowthMethod()).record()
        with pytest.raises(element_lr.ElementMaskError, match="does not match this model"):
            schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                      wrong, config())
        with pytest.raises(schedule.RewarmupError, match="peak-ratio"):
            schedule.RewarmupConfig(peak_ratio=0.0)
