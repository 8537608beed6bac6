"""Staged training's LR restart (live/lr_restart.py) on megatron-core's real scheduler: the
paper's formula (allenai/staged-training, get_restart_linear_schedule_with_warmup), carried in
the scheduler's state dict and continued after a load."""
import pytest
import torch

from conftest import single_rank
from megatron_sparkling.core.spec import GrowthSpec, ModelShape
from megatron_sparkling.live import lr_restart
from megatron_sparkling.methods import Grower

SHAPE = ModelShape(num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=2,
                   kv_channels=4, ffn_hidden_size=16, padded_vocab_size=32, num_experts=2,
                   moe_ffn_hidden_size=8, tied_embeddings=False)
MAX_LR, WARMUP, TOTAL, BATCH = 1e-3, 10, 100, 4   # iterations; the scheduler counts samples


def _scheduler():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=MAX_LR)
    return OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=MAX_LR, min_lr=0.0, lr_warmup_steps=WARMUP * BATCH,
        lr_decay_steps=TOTAL * BATCH, lr_decay_style="linear", start_wd=0.0, end_wd=0.0,
        wd_incr_steps=1, wd_incr_style="constant")


def paper_lr(step, restart, rewarm):
    """allenai/staged-training's lr_lambda(current_step) * max_lr, in iterations."""
    if restart and rewarm and restart <= step < restart + rewarm:
        if step < WARMUP:
            return (step - restart) / rewarm * (restart + rewarm) / WARMUP * MAX_LR
        return (step - restart) / rewarm * (TOTAL - restart - rewarm) / (TOTAL - WARMUP) * MAX_LR
    if step < WARMUP:
        return step / WARMUP * MAX_LR
    return max(0.0, (TOTAL - step) / (TOTAL - WARMUP)) * MAX_LR


@pytest.mark.parametrize("restart_iteration", [-1, 25])
def test_lr_restart_follows_the_papers_schedule_and_survives_a_reload(restart_iteration):
    growth_iteration, rewarm = 40, 8
    record = Grower(GrowthSpec(SHAPE, SHAPE.replace(hidden_size=16), "staged", 1,
                               {"restart_warmup_iters": rewarm,
                                "restart_iteration": restart_iteration})).record()
    restart = growth_iteration if restart_iteration < 0 else restart_iteration
    with single_rank():
        sched = _scheduler()
        sched.step(growth_iteration * BATCH)
        assert lr_restart.install_lr_restart(sched, record, BATCH) is not None
        lrs = [sched.optimizer.param_groups[0]["lr"]]
        for _ in range(30):
            sched.step(BATCH)
            lrs.append(sched.optimizer.param_groups[0]["lr"])
        expected = [paper_lr(restart + t, restart, rewarm) for t in range(31)]
        assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert lrs[0] == 0.0 and lrs[rewarm] == pytest.approx(paper_lr(restart + rewarm, 0, 0))
        # resumed inside the re-warmup: the scheduler's state carries it
        sched = _scheduler()
        sched.step((growth_iteration + 3) * BATCH)
        saved = _scheduler()
        saved.step(growth_iteration * BATCH)
        lr_restart.install_lr_restart(saved, record, BATCH)
        saved.step(3 * BATCH)
        common = {"opt_param_scheduler": saved.state_dict(), "sparkling": record}
        assert lr_restart.STATE_KEY in common["opt_param_scheduler"]
        restored = lr_restart.lr_restart_after_load(sched, common, type("A", (), {
            "global_batch_size": BATCH})())
        assert restored.growth_step == growth_iteration * BATCH
        assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(
            paper_lr(restart + 3, restart, rewarm), rel=1e-9)


def test_staged_without_restart_options_keeps_the_base_schedule():
    record = Grower(GrowthSpec(SHAPE, SHAPE.replace(hidden_size=16), "staged", 1)).record()
    assert lr_restart.restart_options(record) is None
    with pytest.raises(ValueError, match="restart_warmup_iters must be >= 0"):
        Grower(GrowthSpec(SHAPE, SHAPE.replace(hidden_size=16), "staged", 1,
                          {"restart_warmup_iters": -2}))


@pytest.mark.slow
def test_relaunch_from_an_expanded_staged_checkpoint_restarts_the_schedule(tmp_path,
                                                                          corpus_prefix):
    """`expand --method staged` with restart_warmup_iters=2, relaunched with the printed flags:
    the LR re-warms from 0 (first step after growth at LR 0, then half of the base LR two
    iterations on, then the base schedule, which continues from the growth iteration), and the
    first loss is the small model's (staged keeps the function)."""
    from conftest import megatron_run, saved_and_continued, tiny_moe_flags
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron_sparkling.checkpoint.expand import ExpandRequest, expand

    base = dict(train_iters=8, lr_warmup_iters=1, hidden_dropout=0, attention_dropout=0,
                use_distributed_optimizer=True)
    narrow, dst = str(tmp_path / "narrow"), str(tmp_path / "grown")
    continued = saved_and_continued(tiny_moe_flags(corpus_prefix, **base), narrow, 3, 4)
    result = expand(ExpandRequest(load=narrow, save=dst, sizes=dict(hidden_size=128),
                                  method="staged", seed=1,
                                  options={"restart_warmup_iters": 2}, progress=False))
    argv = tiny_moe_flags(corpus_prefix, **base) + result.relaunch_flags + [
        "--sparkling-rewarmup-scope", "none"]
    with megatron_run(argv) as trainer:
        args, gbs = trainer.args, trainer.args.global_batch_size
        formula = OptimizerParamScheduler(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0), init_lr=0.0,
            max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters * gbs,
            lr_decay_steps=args.train_iters * gbs, lr_decay_style=args.lr_decay_style,
            start_wd=0.0, end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant")

        def base_lr(iteration):
            formula.num_steps = iteration * gbs
            return formula.get_lr({})
        assert trainer.scheduler.lr_restart is not None
        lrs = [trainer.optimizer.param_groups[0]["lr"]]
        first = trainer.train_step()["lm loss"]
        for _ in range(3):
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.train_step()
    assert first == pytest.approx(continued[0], rel=1e-5)
    assert lrs == pytest.approx([0.0, 0.5 * base_lr(5), base_lr(5), base_lr(6)], rel=1e-9)
