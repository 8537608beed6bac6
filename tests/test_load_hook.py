"""Growth on load (megatron_sparkling.live.load_hook): a run started wider with --load at a narrow
checkpoint grows it in memory, with no conversion step, and ends in the same state as
`megatron-sparkling expand` followed by a normal load."""
import pytest

from conftest import (PRETRAIN, edit_common_state, megatron_run, read_metrics, tiny_moe_flags,
                      torchrun, train_losses)

SAVE_AT, TOTAL = 3, 8
NARROW = dict(train_iters=TOTAL, lr_warmup_iters=2, hidden_dropout=0, attention_dropout=0,
              use_distributed_optimizer=True)
WIDE = dict(NARROW, hidden_size=128, kv_channels=16, moe_ffn_hidden_size=256)
GROWTH = dict(sparkling_method="sparkling", sparkling_seed=11, sparkling_rewarmup_iters=2)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, corpus_prefix):
    """A narrow checkpoint at iteration 3 (dp_reshardable optimizer state), the loss of its last
    iteration, and the losses of iterations 4..8 of the same run continued uninterrupted."""
    root = tmp_path_factory.mktemp("narrow") / "ckpt"
    with megatron_run(tiny_moe_flags(corpus_prefix, **NARROW)) as trainer:
        last = [trainer.train_step()["lm loss"] for _ in range(SAVE_AT)][-1]
        trainer.save(str(root))
        continued = [trainer.train_step()["lm loss"] for _ in range(TOTAL - SAVE_AT)]
    return str(root), last, continued


def _state(trainer) -> dict:
    """Every global tensor of the live run: weights and model-space optimizer state."""
    from megatron_sparkling.training import growth

    tensors, step = growth.global_state(trainer.args, trainer.model, trainer.optimizer)
    return {"tensors": tensors, "step": float(step), "iteration": trainer.iteration,
            "num_steps": trainer.scheduler.num_steps,
            "lr": [g["lr"] for g in trainer.optimizer.param_groups],
            "consumed": trainer.args.consumed_train_samples,
            "rewarmup": trainer.scheduler.rewarmup.state.state_dict(),
            "new_elements": trainer.scheduler.rewarmup.new_elements}


def test_wider_run_grows_the_narrow_checkpoint_on_load(narrow, corpus_prefix, capsys):
    root, last, continued = narrow
    flags = tiny_moe_flags(corpus_prefix, load=root, dist_ckpt_strictness="raise_all",
                           **WIDE, **GROWTH)
    with megatron_run(flags) as trainer:
        assert trainer.iteration == SAVE_AT
        assert trainer.args.consumed_train_samples == SAVE_AT * 8
        assert trainer.scheduler.rewarmup.new_elements > 0
        losses = [trainer.train_step()["lm loss"] for _ in range(TOTAL - SAVE_AT)]
    out = capsys.readouterr().out
    assert "growing" in out and "hidden_size 64 -> 128" in out and "seed 11" in out
    first = losses[0]
    print(f"\nlast narrow loss (iteration {SAVE_AT}) {last:.6f}; narrow on iteration "
          f"{SAVE_AT + 1}'s batch {continued[0]:.6f}; first loss after growth {first:.6f} "
          f"({(first - continued[0]) / continued[0]:+.2e} vs the same batch, "
          f"{(first - last) / last:+.2%} vs the last before); wide losses {losses}; narrow "
          f"continued {continued}")
    # sparkling at integer factors keeps the function: the grown model's loss on the next batch
    # is the narrow model's (fp32 rounding apart: relative 1e-5, as tests/test_expand.py)
    assert abs(first - continued[0]) / continued[0] < 1e-5
    assert abs(first - last) / last < 0.05   # same regime as the last loss before (other batch)
    assert losses[-1] < first and losses[-2] < first  # and training goes on falling


def test_growth_on_load_counts_new_elements_bias_correction_from_growth(narrow, corpus_prefix):
    """--sparkling-new-state-bias-correction per-element through growth on load: Adam's step
    count at growth is the narrow run's (the grown optimizer keeps it), so new elements' first
    step uses k = 1; the setting is in the scheduler's state."""
    root, _, _ = narrow
    flags = tiny_moe_flags(corpus_prefix, load=root, sparkling_new_state_bias_correction=(
        "per-element"), **WIDE, **GROWTH)
    with megatron_run(flags) as trainer:
        state = trainer.scheduler.rewarmup.state
        assert (state.bias_correction, state.growth_adam_step) == ("per-element", SAVE_AT)
        assert trainer.scheduler.state_dict()["sparkling_rewarmup"]["growth_adam_step"] == SAVE_AT
        assert trainer.scheduler.rewarmup.new_step(SAVE_AT + 1) == 1
        trainer.train_step()


def test_growth_on_load_equals_expand_then_load(narrow, corpus_prefix, tmp_path):
    from megatron_sparkling.cli import main

    root, _, _ = narrow
    dst = tmp_path / "expanded"
    assert main(["expand", "--no-progress", "--load", root, "--save", str(dst),
                 "--hidden-size", "128", "--moe-ffn-hidden-size", "256", "--method", "sparkling",
                 "--seed", "11", "--rewarmup-iters", "2"]) == 0
    with megatron_run(tiny_moe_flags(corpus_prefix, load=str(dst),
                                     dist_ckpt_strictness="raise_all", **WIDE)) as trainer:
        expanded = _state(trainer)
        expanded_loss = trainer.train_step()["lm loss"]
    with megatron_run(tiny_moe_flags(corpus_prefix, load=root, **WIDE, **GROWTH)) as trainer:
        hooked = _state(trainer)
        hooked_loss = trainer.train_step()["lm loss"]
    a, b = expanded.pop("tensors"), hooked.pop("tensors")
    assert sorted(a) == sorted(b) and any(k.startswith("optimizer.state.exp_avg.") for k in a)
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    worst = max(diffs, key=diffs.get)
    print(f"\n{len(a)} global tensors (weights and optimizer state); max |expand+load - hook| "
          f"{diffs[worst]:.3e} ({worst}); first losses {expanded_loss:.7f} / {hooked_loss:.7f}")
    assert diffs[worst] <= 1e-6
    assert expanded.pop("rewarmup")["record"]["plan"].keys() == hooked["rewarmup"]["record"][
        "plan"].keys()
    hooked.pop("rewarmup")
    assert expanded == hooked
    assert abs(expanded_loss - hooked_loss) <= 1e-6 * abs(expanded_loss)


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=32, kv_channels=16, moe_ffn_hidden_size=64),
     "hidden size: target 32 is smaller than the source's 64"),
    (dict(num_layers=3), "growth on load widens only"),
    (dict(moe_ffn_hidden_size=256), None),  # kv-channels follow hidden size: fine, no growth
    (dict(hidden_size=128), "head dim (--kv-channels): must stay 16"),
    (dict(hidden_size=128, kv_channels=16, sparkling_no_grow_on_load=True),
     "--sparkling-no-grow-on-load is set"),
    (dict(hidden_size=128, kv_channels=16, sparkling_method="nope"), "unknown growth method"),
])
def test_bad_growth_on_load_is_one_line(narrow, corpus_prefix, change, message):
    from megatron_sparkling.checkpoint.paths import CheckpointError

    root, _, _ = narrow
    flags = tiny_moe_flags(corpus_prefix, load=root, **dict(NARROW, **change))
    if message is None:
        with megatron_run(flags) as trainer:   # moe FFN only: grows, nothing refused
            assert trainer.scheduler.rewarmup.new_elements > 0
        return
    with pytest.raises(CheckpointError) as info:
        with megatron_run(flags):
            pass
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_precision_aware_optimizer_state_is_refused_before_growing(narrow, corpus_prefix,
                                                                   tmp_path):
    """TE's precision-aware optimizer stores main-param remainders where the main params would be:
    growing them would load garbage, so growth on load refuses (one line); weights alone grow."""
    import shutil

    from megatron_sparkling.checkpoint.paths import CheckpointError

    root = tmp_path / "ckpt"
    shutil.copytree(narrow[0], root)
    edit_common_state(root / f"iter_{SAVE_AT:07d}",
                      lambda common: setattr(common["args"], "use_precision_aware_optimizer", True))
    flags = tiny_moe_flags(corpus_prefix, load=str(root), **WIDE, **GROWTH)
    with pytest.raises(CheckpointError) as info:
        with megatron_run(flags):
            pass
    text = str(info.value)
    assert "--use-precision-aware-optimizer" in text and "\n" not in text, text
    weights_only = tiny_moe_flags(corpus_prefix, load=str(root), no_load_optim=True, **WIDE,
                                  **GROWTH)
    with megatron_run(weights_only) as trainer:
        assert trainer.iteration == SAVE_AT


def test_install_wraps_our_loader_once():
    import megatron_sparkling
    from megatron_sparkling.live import load_hook as hook
    from megatron_sparkling.training import checkpointing

    original = checkpointing.load_checkpoint
    try:
        assert megatron_sparkling.install() == (
            "megatron_sparkling.training.checkpointing.load_checkpoint")
        wrapped = checkpointing.load_checkpoint
        assert wrapped is not original and getattr(wrapped, hook.GROWING)
        assert megatron_sparkling.install() and checkpointing.load_checkpoint is wrapped
    finally:
        checkpointing.load_checkpoint = original


def test_flags_compose_with_the_rewarmup_flags():
    import argparse

    from megatron_sparkling.live import load_hook as hook
    from megatron_sparkling.live import rewarmup as schedule

    parser = schedule.add_rewarmup_args(argparse.ArgumentParser())
    hook.add_args(hook.add_args(parser))   # twice: each flag added once
    ns = parser.parse_args(["--sparkling-method", "copy", "--sparkling-seed", "3",
                            "--sparkling-rewarmup-iters", "5", "--sparkling-method-option",
                            "new_units=random"])
    assert (ns.sparkling_method, ns.sparkling_seed, ns.sparkling_rewarmup_iters) == ("copy", 3, 5)
    assert ns.sparkling_method_option == ["new_units=random"]
    titles = [g.title for g in parser._action_groups]
    assert "sparkling" in titles


@pytest.mark.slow
def test_growth_on_load_at_two_ranks(narrow, corpus_prefix, tmp_path):
    """The 1-rank narrow checkpoint grows on load into a 2-rank run at TP=2 (sequence parallel),
    loaded strictly; same first loss, still falling."""
    root, last, continued = narrow
    metrics = tmp_path / "metrics.jsonl"
    flags = tiny_moe_flags(corpus_prefix, load=root, dist_ckpt_strictness="raise_all",
                           tensor_model_parallel_size=2, sequence_parallel=True,
                           log_metrics_path=str(metrics), **WIDE, **GROWTH)
    proc = torchrun(2, PRETRAIN, flags)
    assert "growing" in proc.stdout
    losses = [v for k, v in sorted(train_losses(read_metrics(metrics)).items())]
    first = losses[0]
    print(f"\nTP=2: first loss after growth {first:.6f} vs narrow {continued[0]:.6f} "
          f"({(first - continued[0]) / continued[0]:+.2e}); losses {losses}")
    assert len(losses) == TOTAL - SAVE_AT
    assert abs(first - continued[0]) / continued[0] < 1e-5   # function kept, fp32 rounding apart
    assert losses[-1] < first and losses[-2] < first
