"""The pre-training loop on real megatron-core parts at 1 rank, in process."""
import copy
import json
import os

import pytest
import torch

from conftest import megatron_run, tiny_moe_flags


def _losses(trainer, n):
    return [trainer.train_step()["lm loss"] for _ in range(n)]


@pytest.mark.parametrize("distributed_optimizer,optim_format", [
    (False, None), (True, "dp_reshardable"), (True, "fully_reshardable")])
def test_resume_equals_straight_run(tmp_path, corpus_prefix, distributed_optimizer, optim_format):
    """N iterations straight == N/2, save, load into a fresh model, N/2 more (dropout on)."""
    n = 12
    flags = tiny_moe_flags(corpus_prefix, train_iters=n, hidden_dropout=0.1, attention_dropout=0.1,
                           use_distributed_optimizer=distributed_optimizer,
                           dist_ckpt_optim_fully_reshardable=optim_format == "fully_reshardable",
                           save=str(tmp_path / "ckpt"))
    with megatron_run(flags) as straight:
        reference = _losses(straight, n)
    with megatron_run(flags) as first_half:
        first = _losses(first_half, n // 2)
        first_half.save()
    with megatron_run(flags + ["--load", str(tmp_path / "ckpt")]) as second_half:
        assert second_half.iteration == n // 2
        assert second_half.args.consumed_train_samples == n // 2 * 8
        second = _losses(second_half, n // 2)
    assert len(set(reference)) == n  # the run really changes: losses differ step to step
    assert max(abs(a - b) for a, b in zip(reference, first + second)) < 1e-5


def _process_group_threads() -> int:
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sum(n in ("pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv") for n in names)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_finished_run_leaves_nothing_behind(tmp_path, corpus_prefix):
    """A run that trained and saved in this process is freed when it ends: its model, and its
    process groups' threads (left behind, ~50 per run, they slowed a test session to a crawl)."""
    import gc
    import weakref

    gc.collect()   # what earlier tests left for the collector
    before = _process_group_threads()
    flags = tiny_moe_flags(corpus_prefix, train_iters=8, use_distributed_optimizer=True,
                           save=str(tmp_path / "ckpt"))
    with megatron_run(flags) as trainer:
        _losses(trainer, 2)
        trainer.save()
        model = weakref.ref(trainer.model[0])
        assert _process_group_threads() > before   # the run's own groups are counted
    del trainer
    gc.collect()
    assert model() is None
    assert _process_group_threads() == before


def test_validation_loss_goes_down_on_real_text(corpus_prefix):
    flags = tiny_moe_flags(corpus_prefix, train_iters=60, lr=3e-3, lr_warmup_iters=5,
                           eval_iters=4)
    with megatron_run(flags) as trainer:
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()
    # byte-level text starts near ln(256) = 5.55 and must be well below it after training
    assert before > 5.0
    assert after < before - 1.0, (before, after)


def test_checkpoint_has_megatron_lm_layout(tmp_path, corpus_prefix):
    from megatron.core import dist_checkpointing

    save = tmp_path / "ckpt"
    flags = tiny_moe_flags(corpus_prefix, train_iters=4, lr_warmup_iters=1, use_distributed_optimizer=True,
                           save=str(save))
    with megatron_run(flags) as trainer:
        trainer.train()
        trainer.save()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    ckpt = save / "iter_0000004"
    assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    args = common["args"]
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 4
    assert (args.num_layers, args.hidden_size, args.num_experts, args.moe_ffn_hidden_size) == (
        2, 64, 4, 128)
    assert args.consumed_train_samples == 32 and args.padded_vocab_size == 256
    assert common["content_metadata"]["distrib_optim_sharding_type"] == "dp_reshardable"
    assert "opt_param_scheduler" in common and common["opt_param_scheduler"]["num_steps"] == 32
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    shapes = {k: tuple(v.size) for k, v in keys.items() if hasattr(v, "size")}
    assert shapes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (2, 4, 256, 64)
    assert shapes["decoder.layers.mlp.router.weight"] == (2, 4, 64)
    assert shapes["decoder.layers.self_attention.linear_qkv.weight"] == (2, 192, 64)
    assert any(k.startswith("optimizer.distributed.") for k in keys)
    assert any(k.startswith("rng_state") for k in keys)


def test_load_refuses_other_model_shape_with_a_clear_message(tmp_path, corpus_prefix):
    from megatron_sparkling.checkpoint.paths import CheckpointError

    save = str(tmp_path / "ckpt")
    with megatron_run(tiny_moe_flags(corpus_prefix, train_iters=2, lr_warmup_iters=1, save=save)) as trainer:
        trainer.train()
        trainer.save()
    # (without the flag a wider run grows the checkpoint on load: tests/test_load_hook.py)
    with pytest.raises(CheckpointError, match="other sizes than this run .hidden_size 64 -> 128"):
        with megatron_run(tiny_moe_flags(corpus_prefix, hidden_size=128, load=save,
                                         sparkling_no_grow_on_load=True)):
            pass


def test_flops_are_counted_per_iteration(corpus_prefix):
    from megatron_sparkling.training import flops

    with megatron_run(tiny_moe_flags(corpus_prefix, train_iters=2, lr_warmup_iters=1)) as trainer:
        trainer.train()
        args = trainer.args
        per_iter = flops.training_flops_per_iteration(args)
        assert trainer.num_floating_point_operations_so_far == 2 * per_iter
        # a top-2 MoE of 4 experts costs less than running all 4 experts
        dense_all = copy.copy(args)
        dense_all.moe_router_topk = 4
        assert flops.training_flops_per_iteration(dense_all) > per_iter


def test_metrics_and_log_lines(tmp_path, corpus_prefix, capsys):
    path = tmp_path / "metrics.jsonl"
    flags = tiny_moe_flags(corpus_prefix, train_iters=3, lr_warmup_iters=1, log_interval=1, eval_interval=3,
                           log_metrics_path=str(path))
    with megatron_run(flags) as trainer:
        trainer.run()
    out = capsys.readouterr().out
    assert "iteration        3/       3 |" in out and "| lm loss: " in out
    assert "validation loss at iteration 3 | lm loss value:" in out
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in records if "lm loss" in r] == [1, 2, 3]
    assert any("validation lm loss" in r for r in records)
    assert all(torch.isfinite(torch.tensor(r.get("lm loss", 0.0))) for r in records)
    assert os.path.exists(path)
