"""bf16 without the distributed optimizer (issue 16, item 4): megatron-core's
Float16OptimizerWithFloat16Params keeps fp32 main params and loads them from
`optimizer.state.fp32_param.<key>`; `expand` writes them there for such a run (the distributed
optimizer and fp32 runs: `optimizer.state.param.<key>`). Run on CPU through the bridges."""
import pytest

from conftest import megatron_run, saved_and_continued, tiny_moe_flags
from megatron_sparkling.cli import main

SAVE_AT, TOTAL = 4, 6
NARROW = dict(train_iters=TOTAL, lr_warmup_iters=2, hidden_dropout=0, attention_dropout=0,
              bf16=True)
WIDE = dict(NARROW, hidden_size=128, kv_channels=16, moe_ffn_hidden_size=256)
FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"


@pytest.fixture(scope="module")
def cpu_half():
    from megatron_sparkling.training import arguments

    before, arguments.CPU_HALF_PRECISION = arguments.CPU_HALF_PRECISION, True
    yield
    arguments.CPU_HALF_PRECISION = before


@pytest.fixture(scope="module")
def bf16_source(cpu_half, tmp_path_factory, corpus_prefix):
    """A bf16 run without the distributed optimizer saved at iteration 4, and its losses on."""
    root = str(tmp_path_factory.mktemp("bf16") / "ckpt")
    return root, saved_and_continued(tiny_moe_flags(corpus_prefix, **NARROW), root, SAVE_AT,
                                     TOTAL)


def resume(corpus_prefix, load, n, **flags):
    with megatron_run(tiny_moe_flags(corpus_prefix, load=load, dist_ckpt_strictness="raise_all",
                                     **flags)) as trainer:
        assert trainer.iteration == SAVE_AT
        assert type(trainer.optimizer.chained_optimizers[0]).__name__ == (
            "Float16OptimizerWithFloat16Params")
        return [trainer.train_step()["lm loss"] for _ in range(n)]


def test_conversion_writes_fp32_params_where_the_float16_optimizer_asks(
        bf16_source, tmp_path, corpus_prefix):
    from megatron_sparkling.checkpoint.source import open_checkpoint

    src, continued = bf16_source
    assert f"optimizer.state.fp32_param.{FC1}" in open_checkpoint(src).dcp.tensors
    dst = tmp_path / "converted"
    assert main(["expand", "--no-progress", "--load", src, "--save", str(dst)]) == 0
    tensors = open_checkpoint(str(dst)).dcp.tensors
    assert f"optimizer.state.fp32_param.{FC1}" in tensors
    assert f"optimizer.state.param.{FC1}" not in tensors
    assert resume(corpus_prefix, str(dst), TOTAL - SAVE_AT, **NARROW) == continued


def test_grown_bf16_checkpoint_loads_into_the_float16_optimizer(
        bf16_source, tmp_path, corpus_prefix):
    """2x hidden and expert FFN (copy): the grown fp32 main params load, and the first loss is
    the narrow run's on the same batch to bf16 rounding."""
    src, continued = bf16_source
    dst = tmp_path / "grown"
    assert main(["expand", "--no-progress", "--load", src, "--save", str(dst), "--hidden-size",
                 "128", "--moe-ffn-hidden-size", "256", "--method", "copy"]) == 0
    first = resume(corpus_prefix, str(dst), 1, **WIDE)[0]
    print(f"\nbf16, no distributed optimizer, copy 2x: first loss after growth {first:.6f}, "
          f"narrow on the same batch {continued[0]:.6f} "
          f"({(first - continued[0]) / continued[0]:+.2e})")
    assert abs(first - continued[0]) / continued[0] < 2 ** -8   # bf16 keeps 8 significant bits
