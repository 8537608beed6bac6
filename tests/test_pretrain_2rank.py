"""examples/pretrain_moe.py under torchrun at 2 ranks (gloo): TP=2, EP=2 and PP=2 each train,
save, and resume to exactly the losses of an uninterrupted run."""
import pytest

from conftest import PRETRAIN, read_metrics, tiny_moe_flags, torchrun, train_losses

LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "ep2": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "ep2", "pp2"])
def test_two_ranks_train_save_resume(tmp_path, corpus_prefix, layout):
    n = 10
    base = tiny_moe_flags(corpus_prefix, train_iters=n, log_interval=n, use_distributed_optimizer=True)
    base += LAYOUTS[layout]
    straight, resumed, ckpt = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl", tmp_path / "ckpt"
    torchrun(2, PRETRAIN, base + ["--log-metrics-path", str(straight)])
    torchrun(2, PRETRAIN, base + ["--log-metrics-path", str(resumed), "--save", str(ckpt),
                                  "--exit-interval", str(n // 2)])
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(n // 2)
    out = torchrun(2, PRETRAIN, base + ["--log-metrics-path", str(resumed), "--save", str(ckpt),
                                        "--load", str(ckpt)])
    assert f"iteration {n:8d}/{n:8d}" in out.stdout
    reference, pieced = train_losses(read_metrics(straight)), train_losses(read_metrics(resumed))
    assert sorted(pieced) == list(range(1, n + 1))
    assert max(abs(reference[i] - pieced[i]) for i in reference) < 1e-5
    assert reference[n] < reference[1]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(n)
