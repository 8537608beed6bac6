"""Optimizer-state kinds come from ONE table (core/layout.py STATE_KINDS): the key parsing, the
growth methods' kinds, the moment rules, the readers and what `expand` writes agree, and a kind
beyond Adam's (Muon's `momentum_buffer`) is read, grown and written end to end.

megatron-core 0.16.1's Muon cannot run here (emerging_optimizers, Python >= 3.12), so its state
is added to a REAL fully_reshardable checkpoint of the pre-training loop: the checkpoint is
re-saved with `optimizer.state.momentum_buffer.<key>` tensors for the linear weights (Muon steps
matrices; Adam the embeddings, norms, router and output layer)."""
import os
import shutil

import pytest
import torch

from conftest import megatron_run, tiny_moe_flags
from megatron_sparkling.cli import main
from megatron_sparkling.core import layout

MOMENTUM = "optimizer.state.momentum_buffer."


def test_every_kind_list_derives_from_the_table():
    from megatron_sparkling.checkpoint import optimizer_state
    from megatron_sparkling.methods import base
    from megatron_sparkling.operators import optimizer

    names = tuple(k.name for k in layout.STATE_KINDS)
    assert names == ("param", "exp_avg", "exp_avg_sq", "momentum") == base.STATE_KINDS
    assert optimizer.MOMENT_KINDS == ("exp_avg", "exp_avg_sq", "momentum")
    assert optimizer_state.KINDS == ("param", "exp_avg", "exp_avg_sq")  # the buckets' (Adam)
    for kind in layout.STATE_KINDS:
        for prefix in kind.prefixes:
            key = prefix + "output_layer.weight"
            assert layout.state_kind(key) == kind.name
            assert layout.state_kind("chained_1." + key) == kind.name
            assert optimizer_state._MODEL_SPACE.match(key).group(3) == "output_layer.weight"
    assert optimizer_state.state_key("momentum") == "momentum_buffer"


def _steps_with_muon(key: str) -> bool:
    """Muon's params: linear weights except the output layer (megatron-core's split)."""
    return (layout.resolve(key).kind is layout.Kind.LINEAR_WEIGHT
            and key != "output_layer.weight")


def _with_momentum(src_root: str, dst_root: str) -> dict:
    """Re-save the checkpoint at `src_root` into `dst_root` with a momentum buffer for every
    Muon param (-2 x its exp_avg: distinct values, zero exactly where exp_avg is); returns them."""
    from megatron_sparkling.checkpoint.dcp import TensorSpec
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.checkpoint.writer import write_torch_dist

    src = open_checkpoint(src_root)
    momentum = {key: -2 * src.optimizer.read(key, "exp_avg")
                for key in src.optimizer.keys if _steps_with_muon(key)}
    specs = dict(src.dcp.tensors)
    specs.update({MOMENTUM + k: TensorSpec(tuple(m.shape), torch.float32)
                  for k, m in momentum.items()})

    def produce(key, layer=None):
        if key.startswith(MOMENTUM):
            return momentum[key[len(MOMENTUM):]]
        return src.dcp.read_layer(key, layer)

    iter_dir = os.path.join(dst_root, os.path.basename(src.path))
    os.makedirs(iter_dir)
    write_torch_dist(iter_dir, specs, produce, {u: src.read_object_bytes(u) for u in src.objects},
                     src.common, progress=False)
    shutil.copy(os.path.join(src_root, "latest_checkpointed_iteration.txt"), dst_root)
    return momentum


@pytest.fixture(scope="module")
def muon_source(tmp_path_factory, corpus_prefix):
    """A fully_reshardable checkpoint of 3 training iterations, re-saved with momentum buffers."""
    root = tmp_path_factory.mktemp("muon")
    flags = tiny_moe_flags(corpus_prefix, train_iters=3, lr_warmup_iters=1,
                           use_distributed_optimizer=True, dist_ckpt_optim_fully_reshardable=True)
    with megatron_run(flags) as trainer:
        trainer.train()
        trainer.save(str(root / "adam"))
    momentum = _with_momentum(str(root / "adam"), str(root / "muon"))
    return str(root / "muon"), momentum


def expand(*argv) -> int:
    return main(["expand", "--no-progress", *map(str, argv)])


def test_reader_finds_momentum_per_key(muon_source):
    from megatron_sparkling.checkpoint.source import open_checkpoint

    root, momentum = muon_source
    ckpt = open_checkpoint(root)
    assert ckpt.optimizer.format == "fully_reshardable"
    assert ckpt.optimizer.kinds == ("param", "exp_avg", "exp_avg_sq", "momentum")
    assert not any(k.startswith(MOMENTUM) for k in ckpt.model_tensors)  # optimizer keys
    assert {k for k in ckpt.optimizer.keys if "momentum" in ckpt.optimizer.kinds_of(k)} == set(
        momentum)
    assert "momentum" not in ckpt.optimizer.kinds_of("embedding.word_embeddings.weight")
    for key, m in momentum.items():
        assert torch.equal(ckpt.optimizer.read(key, "momentum"), m), key


def test_conversion_keeps_momentum_exactly(muon_source, tmp_path):
    from megatron_sparkling.checkpoint.source import open_checkpoint

    root, momentum = muon_source
    assert expand("--load", root, "--save", tmp_path / "c") == 0
    out = open_checkpoint(str(tmp_path / "c"))
    assert {k[len(MOMENTUM):] for k in out.dcp.tensors if k.startswith(MOMENTUM)} == set(momentum)
    for key, m in momentum.items():
        assert torch.equal(out.optimizer.read(key, "momentum"), m), key


def test_width_growth_grows_momentum_with_the_sparkling_rule(muon_source, tmp_path):
    """2x hidden and 2x expert FFN with `sparkling`: every momentum buffer is written at the wide
    shape, old elements keep their momentum exactly and new ones start at zero (S' = [S, 0],
    the rule exp_avg follows: momentum stays -2 x exp_avg element by element); params Muon does
    not step get no momentum."""
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.core.plan import GrowthPlan
    from megatron_sparkling.core.record import growth_record
    from megatron_sparkling.core.spec import GrowthSpec, ModelShape
    from megatron_sparkling.live.element_lr import global_new_mask

    root, momentum = muon_source
    dst = tmp_path / "wide"
    assert expand("--load", root, "--save", dst, "--hidden-size", 128, "--moe-ffn-hidden-size",
                  256, "--method", "sparkling") == 0
    grown = open_checkpoint(str(dst))
    assert grown.optimizer.kinds == ("param", "exp_avg", "exp_avg_sq", "momentum")
    written = {k[len(MOMENTUM):] for k in grown.dcp.tensors if k.startswith(MOMENTUM)}
    assert written == set(momentum)
    record = growth_record(grown.common)
    plan = GrowthPlan.from_state_dict(GrowthSpec(ModelShape(**record["source"]),
                                                 ModelShape(**record["target"])), record["plan"])
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    assert grown.optimizer.read(fc1, "momentum").shape == (2, 4, 512, 128)
    grew = 0
    for key, old in momentum.items():
        m = grown.optimizer.read(key, "momentum")
        assert m.shape == grown.model_tensors[key].shape, key
        assert torch.equal(m, -2 * grown.optimizer.read(key, "exp_avg")), key
        new = global_new_mask(plan, key, True)
        if new is None:
            assert torch.equal(m, old), key
            continue
        grew += 1
        assert not m[new].any(), key                                    # new slice zero
        assert torch.equal(m[~new].sort().values, old.flatten().sort().values), key  # old kept
    assert grew == len(momentum)  # every Muon matrix touches the hidden size
