"""The converter against 2-rank runs (torchrun, gloo): checkpoints written at TP=2 / EP=2 in
every format read the same; converted checkpoints load with strict loading at other layouts and
training resumes with the same losses; a grown checkpoint keeps the loss at TP=2 / EP=2; the
converter itself runs split across 2 ranks."""
import os

import pytest
import torch

from conftest import PRETRAIN, REPO, megatron_run, read_metrics, tiny_moe_flags, torchrun, train_losses
from growth_fixture import copy_method  # noqa: F401  (autouse fixture)
from megatron_sparkling.cli import main

SAVE_FORMATS = os.path.join(REPO, "tests", "save_formats.py")
EXPAND_WITH_FIXTURE = os.path.join(REPO, "tests", "expand_with_fixture.py")
SAVE_AT, TOTAL = 3, 6
BASE = dict(train_iters=TOTAL, lr_warmup_iters=1, hidden_dropout=0, attention_dropout=0,
            use_distributed_optimizer=True, group_query_attention=True, num_query_groups=2,
            log_interval=1)
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "ep2": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
}
TARGET = {"tp2": "--target-tensor-model-parallel-size", "ep2": "--target-expert-model-parallel-size"}


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
    from megatron_sparkling.checkpoint.reader import open_checkpoint

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
    root = tmp_path_factory.mktemp("narrow") / "ckpt"
    with megatron_run(tiny_moe_flags(corpus_prefix, **BASE)) as trainer:
        trainer.train(until_iteration=SAVE_AT)
        trainer.save(str(root))
        continued = [trainer.train_step()["lm loss"] for _ in range(TOTAL - SAVE_AT)]
    return str(root), continued


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


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "ep2"])
def test_grown_checkpoint_keeps_the_loss_at_two_ranks(tmp_path, corpus_prefix, narrow, layout):
    """2x hidden, 2x expert FFN (test copy method): the first loss at TP=2 / EP=2 is the narrow
    model's loss on the same batch (function preserved), and training goes on."""
    src, continued = narrow
    dst = tmp_path / "grown"
    assert expand("--load", src, "--save", dst, "--hidden-size", 128, "--moe-ffn-hidden-size",
                  256, "--method", "test-index-copy", TARGET[layout], 2) == 0
    losses = _relaunch(tmp_path, corpus_prefix, dst, layout, hidden_size=128, kv_channels=16,
                       moe_ffn_hidden_size=256, ffn_hidden_size=128)
    first = losses[SAVE_AT + 1]
    assert abs(first - continued[0]) / continued[0] < 1e-4, (first, continued[0])
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


@pytest.mark.slow
def test_conversion_split_across_two_ranks_equals_one_process(tmp_path, narrow):
    """Under torchrun the tensors are divided among the ranks (each writes its own files); the
    result equals a one-process conversion tensor for tensor, growth included."""
    from megatron_sparkling.checkpoint.reader import open_checkpoint

    src, _ = narrow
    grow = ["--load", src, "--hidden-size", 128, "--moe-ffn-hidden-size", 256, "--method",
            "test-index-copy", "--seed", 5]
    torchrun(2, EXPAND_WITH_FIXTURE, ["expand", "--no-progress", "--save", str(tmp_path / "two")]
             + [str(a) for a in grow])
    assert expand("--save", tmp_path / "one", *grow) == 0
    files = os.listdir(tmp_path / "two" / "iter_0000003")
    assert any(f.startswith("__0_") for f in files) and any(f.startswith("__1_") for f in files)
    one, two = open_checkpoint(str(tmp_path / "one")), open_checkpoint(str(tmp_path / "two"))
    _same_state(one, two)
    assert one.objects == two.objects
    assert two.model_tensors["embedding.word_embeddings.weight"].shape == (256, 128)
