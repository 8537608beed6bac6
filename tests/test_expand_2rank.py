"""The converter against 2-rank runs (torchrun, gloo): checkpoints written at TP=2 / EP=2 in
every format read the same; converted checkpoints load with strict loading at other layouts and
training resumes with the same losses; a checkpoint grown with `sparkling` (2x hidden, 2x expert
FFN; with depth too) keeps the loss at TP=2 / EP=2 (and from TP=2 back to TP=1) and training goes
on with the loss falling; the converter itself runs split across 2 ranks."""
import json
import os

import pytest
import torch

from conftest import (PRETRAIN, REPO, megatron_run, read_metrics, saved_and_continued,
                      tiny_moe_flags, torchrun, train_losses)
from megatron_sparkling.cli import main

SAVE_FORMATS = os.path.join(REPO, "tests", "save_formats.py")
FIGURES = os.environ.get("SPARKLING_GROWTH_FIGURES")  # JSON lines of the measured figures
SAVE_AT, TOTAL = 3, 6
AFTER = 4   # training steps after growth (loss keeps falling)
BASE = dict(train_iters=TOTAL, lr_warmup_iters=1, hidden_dropout=0, attention_dropout=0,
            use_distributed_optimizer=True, group_query_attention=True, num_query_groups=2,
            log_interval=1)
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "ep2": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
}
TARGET = {"tp2": "--target-tensor-model-parallel-size", "ep2": "--target-expert-model-parallel-size"}
WIDER = ["--hidden-size", 128, "--moe-ffn-hidden-size", 256, "--method", "sparkling"]
WIDE = dict(hidden_size=128, kv_channels=16, moe_ffn_hidden_size=256, ffn_hidden_size=128)


def expand(*argv) -> int:
    return main(["expand", "--no-progress", *map(str, argv)])


def _same_state(a, b):
    assert sorted(a.model_tensors) == sorted(b.model_tensors)
    for key in a.model_tensors:
        assert torch.equal(a.read_model(key), b.read_model(key)), key
    assert a.optimizer.keys == b.optimizer.keys
    for key in a.optimizer.keys:
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.optimizer.read(key, kind), b.optimizer.read(key, kind)), (key, kind)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "ep2"])
def test_two_rank_checkpoints_convert_back_to_one_rank(tmp_path, corpus_prefix, layout):
    """dp_reshardable and legacy checkpoints of a TP=2 (GQA, SwiGLU fc1 split per rank) or EP=2
    (chained dense + expert optimizer) run read exactly like its fully_reshardable save; the
    converted dp_reshardable one resumes at TP=1, EP=1 with the 2-rank run's own losses."""
    from megatron_sparkling.checkpoint.source import open_checkpoint

    out = tmp_path / "formats"
    metrics = tmp_path / "metrics.jsonl"
    torchrun(2, SAVE_FORMATS, tiny_moe_flags(corpus_prefix, **BASE) + LAYOUTS[layout] + [
        "--formats-out", str(out), "--save-at", str(SAVE_AT), "--log-metrics-path", str(metrics)])
    reference = open_checkpoint(str(out / "fully_reshardable"))
    for fmt in ("dp_reshardable", "legacy"):
        _same_state(reference, open_checkpoint(str(out / fmt)))
    continued = train_losses(read_metrics(metrics))
    assert expand("--load", out / "dp_reshardable", "--save", tmp_path / "one",
                  "--target-tensor-model-parallel-size", 1,
                  "--target-expert-model-parallel-size", 1) == 0
    with megatron_run(tiny_moe_flags(corpus_prefix, load=str(tmp_path / "one"),
                                     dist_ckpt_strictness="raise_all", **BASE)) as trainer:
        resumed = [trainer.train_step()["lm loss"] for _ in range(TOTAL - SAVE_AT)]
    expected = [continued[i] for i in range(SAVE_AT + 1, TOTAL + 1)]
    assert max(abs(a - b) for a, b in zip(resumed, expected)) < 1e-4, (resumed, expected)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, corpus_prefix):
    """A TP=1, EP=1 dp_reshardable checkpoint at iteration 3 and the run's losses after it."""
    root = str(tmp_path_factory.mktemp("narrow") / "ckpt")
    return root, saved_and_continued(tiny_moe_flags(corpus_prefix, **BASE), root, SAVE_AT, TOTAL)


def _relaunch(tmp_path, corpus_prefix, load, layout, **overrides) -> dict:
    metrics = tmp_path / f"{layout}.jsonl"
    flags = tiny_moe_flags(corpus_prefix, load=str(load), dist_ckpt_strictness="raise_all",
                           log_metrics_path=str(metrics), **dict(BASE, **overrides))
    torchrun(2, PRETRAIN, flags + LAYOUTS[layout])
    return train_losses(read_metrics(metrics))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "ep2"])
def test_converted_checkpoint_resumes_at_two_ranks(tmp_path, corpus_prefix, narrow, layout):
    src, continued = narrow
    dst = tmp_path / "converted"
    assert expand("--load", src, "--save", dst, TARGET[layout], 2) == 0
    resumed = _relaunch(tmp_path, corpus_prefix, dst, layout)
    assert sorted(resumed) == list(range(SAVE_AT + 1, TOTAL + 1))
    assert max(abs(resumed[SAVE_AT + 1 + i] - c) for i, c in enumerate(continued)) < 1e-5


def growth_figures(case, narrow_losses, grown_losses, first_after) -> dict:
    """The loss figures at growth: the narrow run's last logged loss (iteration SAVE_AT), the
    narrow model's loss on the first post-growth batch (same weights, same batch: the jump a
    function-preserving growth must not make), the grown run's first loss and its later ones."""
    last_before = narrow_losses[SAVE_AT]
    same_batch = narrow_losses[SAVE_AT + 1]
    first = grown_losses[first_after]
    later = [grown_losses[i] for i in sorted(grown_losses) if i > first_after]
    out = {"case": case, "last_loss_before": last_before, "narrow_same_batch": same_batch,
           "first_loss_after": first, "ratio_first_to_same_batch": first / same_batch,
           "ratio_first_to_last_before": first / last_before, "later_losses": later}
    print(f"\n[{case}] last loss before growth {last_before:.5f} (iteration {SAVE_AT}); narrow "
          f"model on the first post-growth batch {same_batch:.5f}; first loss after growth "
          f"{first:.5f} (ratio {first / same_batch:.6f}; to the last before "
          f"{first / last_before:.4f}); then {', '.join(f'{v:.4f}' for v in later)}")
    if FIGURES:
        with open(FIGURES, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


def assert_growth_kept_the_loss(fig):
    """First loss after growth within 0.5% of the loss before it (same batch), and falling."""
    assert abs(fig["ratio_first_to_same_batch"] - 1) < 0.005, fig
    assert_loss_falls(fig)


@pytest.fixture(scope="module")
def narrow_longer(tmp_path_factory, corpus_prefix):
    """A TP=1, EP=1 checkpoint at iteration 3 and the narrow run's losses 1..3 + AFTER."""
    root = tmp_path_factory.mktemp("narrow_longer") / "ckpt"
    flags = dict(BASE, train_iters=SAVE_AT + AFTER)
    with megatron_run(tiny_moe_flags(corpus_prefix, **flags)) as trainer:
        losses = {r["iteration"]: r["lm loss"] for r in trainer.train(until_iteration=SAVE_AT)}
        trainer.save(str(root))
        for i in range(SAVE_AT + 1, SAVE_AT + AFTER + 1):
            losses[i] = trainer.train_step()["lm loss"]
    return str(root), losses


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "ep2"])
def test_sparkling_growth_keeps_the_loss_at_two_ranks(tmp_path, corpus_prefix, narrow_longer,
                                                      layout):
    """Issue 4's acceptance with the real method: a TP=1, EP=1 checkpoint grown 2x in hidden and
    expert FFN size by `sparkling` (copy-copy, function preserving at 2x) into the TP=2 / EP=2
    layout, relaunched there with strict loading: the first loss equals the narrow model's on
    the same batch within 0.5%, and the loss keeps falling."""
    src, narrow_losses = narrow_longer
    dst = tmp_path / "grown"
    assert expand("--load", src, "--save", dst, *WIDER, TARGET[layout], 2) == 0
    losses = _relaunch(tmp_path, corpus_prefix, dst, layout, train_iters=SAVE_AT + AFTER, **WIDE)
    assert sorted(losses) == list(range(SAVE_AT + 1, SAVE_AT + AFTER + 1))
    assert_growth_kept_the_loss(growth_figures(f"sparkling 2x hidden+expert FFN, TP1/EP1 -> "
                                               f"{layout}", narrow_losses, losses, SAVE_AT + 1))


@pytest.mark.slow
def test_sparkling_growth_from_tp2_back_to_tp1(tmp_path, corpus_prefix):
    """A checkpoint trained at TP=2 grown 2x (hidden, expert FFN) into TP=1 and relaunched at
    one rank with strict loading: the same loss figures."""
    metrics = tmp_path / "tp2.jsonl"
    src = tmp_path / "tp2"
    flags = tiny_moe_flags(corpus_prefix, save=str(src), save_interval=SAVE_AT,
                           log_metrics_path=str(metrics),
                           **dict(BASE, train_iters=SAVE_AT + AFTER))
    torchrun(2, PRETRAIN, flags + LAYOUTS["tp2"])
    narrow_losses = train_losses(read_metrics(metrics))
    dst = tmp_path / "grown"
    assert expand("--load", src, "--save", dst, "--iteration", SAVE_AT, *WIDER,
                  "--target-tensor-model-parallel-size", 1) == 0
    with megatron_run(tiny_moe_flags(corpus_prefix, load=str(dst), dist_ckpt_strictness="raise_all",
                                     **dict(BASE, train_iters=SAVE_AT + AFTER, **WIDE))) as t:
        assert t.iteration == SAVE_AT
        losses = {SAVE_AT + 1 + i: t.train_step()["lm loss"] for i in range(AFTER)}
    assert_growth_kept_the_loss(growth_figures("sparkling 2x hidden+expert FFN, TP2 -> TP1",
                                               narrow_losses, losses, SAVE_AT + 1))


def assert_loss_falls(fig):
    later = fig["later_losses"]
    assert len(later) >= 3 and all(torch.isfinite(torch.tensor(later)))
    assert later[-1] < fig["first_loss_after"] and sum(later[-2:]) / 2 < fig["first_loss_after"], fig


@pytest.mark.slow
@pytest.mark.parametrize("layout,depth_method", [("tp2", "identity"), ("ep2", "stack")])
def test_width_and_depth_in_one_conversion_resume_at_tp2_and_ep2(
        tmp_path, corpus_prefix, narrow_longer, layout, depth_method):
    """Issue 6's acceptance: ONE conversion grows 2 -> 4 layers and 2x hidden and expert FFN
    (sparkling) into the TP=2 / EP=2 layout; it loads strictly there and training goes on with
    the loss falling. Identity layers keep the first loss (the narrow model's on the same
    batch); stacked copies change it by a measured amount."""
    src, narrow_losses = narrow_longer
    dst = tmp_path / "grown"
    assert expand("--load", src, "--save", dst, *WIDER, "--num-layers", 4,
                  "--depth-method", depth_method, TARGET[layout], 2) == 0
    losses = _relaunch(tmp_path, corpus_prefix, dst, layout, train_iters=SAVE_AT + AFTER,
                       num_layers=4, **WIDE)
    fig = growth_figures(f"sparkling 2x hidden+expert FFN + {depth_method} depth 2->4, "
                         f"TP1/EP1 -> {layout}", narrow_losses, losses, SAVE_AT + 1)
    if depth_method == "identity":
        assert_growth_kept_the_loss(fig)
    else:
        assert_loss_falls(fig)


@pytest.mark.slow
def test_conversion_split_across_two_ranks_equals_one_process(tmp_path, narrow):
    """Under torchrun the tensors are divided among the ranks (each writes its own files); the
    result equals a one-process conversion tensor for tensor, growth (width and depth) included."""
    from megatron_sparkling.checkpoint.source import open_checkpoint

    src, _ = narrow
    grow = ["--load", src, *WIDER, "--seed", 5, "--num-layers", 3]
    torchrun(2, "-m", ["megatron_sparkling.cli", "expand", "--no-progress", "--save",
                       str(tmp_path / "two")] + [str(a) for a in grow])
    assert expand("--save", tmp_path / "one", *grow) == 0
    files = os.listdir(tmp_path / "two" / "iter_0000003")
    assert any(f.startswith("__0_") for f in files) and any(f.startswith("__1_") for f in files)
    one, two = open_checkpoint(str(tmp_path / "one")), open_checkpoint(str(tmp_path / "two"))
    _same_state(one, two)
    assert one.objects == two.objects
    assert two.model_tensors["embedding.word_embeddings.weight"].shape == (256, 128)
    assert two.model_tensors["decoder.layers.self_attention.linear_qkv.weight"].shape[0] == 3
