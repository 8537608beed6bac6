"""Reading Megatron checkpoints in model space: every format megatron-core 0.16.1 writes, and
Megatron-LM's legacy per-rank format, give the SAME global tensors, byte for byte.

One real run saves one state in several formats (tests/save_formats.py does the same at 2 ranks,
see test_expand_2rank.py)."""
import contextlib
import os
import shutil

import pytest
import torch

from conftest import megatron_run, tiny_moe_flags
from legacy_format import save_legacy


@contextlib.contextmanager
def _sharding_type(name):
    """Save the distributed optimizer's state as `name` (the pre-training script offers only
    Megatron-LM's two current choices)."""
    from megatron_sparkling.training import checkpointing

    original = checkpointing.sharded_state_dict_metadata

    def metadata(args):
        return dict(original(args), distrib_optim_sharding_type=name)

    checkpointing.sharded_state_dict_metadata = metadata
    try:
        yield
    finally:
        checkpointing.sharded_state_dict_metadata = original


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus_prefix):
    """{(distributed optimizer?, format): checkpoint root} of one training state per optimizer."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for distributed in (True, False):
        flags = tiny_moe_flags(corpus_prefix, train_iters=3, lr_warmup_iters=1,
                               use_distributed_optimizer=distributed, group_query_attention=True,
                               num_query_groups=2)
        with megatron_run(flags) as trainer:
            trainer.train()
            formats = ("dp_reshardable", "fully_reshardable") if distributed else ("torch_dist",)
            for fmt in formats:
                trainer.args.dist_ckpt_optim_fully_reshardable = fmt == "fully_reshardable"
                out[distributed, fmt] = str(root / f"{distributed}_{fmt}")
                trainer.save(out[distributed, fmt])
            if distributed:  # the deprecated format megatron-core still writes on request
                with _sharding_type("dp_zero_gather_scatter"):
                    out[True, "dp_zero_gather_scatter"] = str(root / "dp_zero")
                    trainer.save(out[True, "dp_zero_gather_scatter"])
            out[distributed, "legacy"] = str(root / f"{distributed}_legacy")
            save_legacy(trainer, out[distributed, "legacy"])
    return out


def _assert_same_state(a, b):
    assert sorted(a.model_tensors) == sorted(b.model_tensors)
    for key in a.model_tensors:
        assert torch.equal(a.read_model(key), b.read_model(key)), key
    assert a.optimizer.keys == b.optimizer.keys and a.optimizer.keys
    assert a.optimizer.step == b.optimizer.step == 3
    kinds = set(a.optimizer.kinds) & set(b.optimizer.kinds)
    assert {"exp_avg", "exp_avg_sq"} <= kinds
    for key in a.optimizer.keys:
        for kind in kinds:
            assert torch.equal(a.optimizer.read(key, kind), b.optimizer.read(key, kind)), (key, kind)


def test_every_distributed_optimizer_format_reads_the_same_model_space_state(saved):
    from megatron_sparkling.checkpoint.source import open_checkpoint

    reference = open_checkpoint(saved[True, "fully_reshardable"])
    assert reference.optimizer.format == "fully_reshardable"
    assert reference.optimizer.kinds == ("param", "exp_avg", "exp_avg_sq")
    for fmt in ("dp_reshardable", "dp_zero_gather_scatter", "legacy"):
        other = open_checkpoint(saved[True, fmt])
        assert other.format == ("torch" if fmt == "legacy" else "torch_dist")
        _assert_same_state(reference, other)
    # the bucket-space state really is flat buckets, mapped back by the rebuilt layout
    dp = open_checkpoint(saved[True, "dp_reshardable"])
    assert dp.optimizer.format == "dp_reshardable"
    assert any(k.startswith("optimizer.distributed.") for k in dp.dcp.tensors)
    # main params equal the fp32 weights exactly (the reader checks this for bucket space)
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    assert torch.equal(dp.optimizer.read(key, "param"), dp.read_model(key))


def test_without_distributed_optimizer_torch_dist_and_legacy_agree(saved):
    from megatron_sparkling.checkpoint.source import open_checkpoint

    a = open_checkpoint(saved[False, "torch_dist"])
    b = open_checkpoint(saved[False, "legacy"])
    assert a.optimizer.format == "none" and a.optimizer.kinds == ("exp_avg", "exp_avg_sq")
    _assert_same_state(a, b)


def test_common_state_metadata_and_regions(saved):
    from megatron_sparkling.checkpoint.source import open_checkpoint

    ckpt = open_checkpoint(saved[True, "fully_reshardable"])
    assert ckpt.iteration == 3 and ckpt.common["iteration"] == 3
    assert ckpt.args.hidden_size == 64 and ckpt.args.num_query_groups == 2
    assert ckpt.content_metadata["distrib_optim_sharding_type"] == "fully_reshardable"
    assert ckpt.common["opt_param_scheduler"]["num_steps"] == 24
    spec = ckpt.model_tensors["decoder.layers.self_attention.linear_qkv.weight"]
    assert spec.shape == (2, (4 + 2 * 2) * 16, 64) and spec.dtype == torch.float32
    full = ckpt.read_model("decoder.layers.mlp.experts.experts.linear_fc1.weight")
    region = ckpt.dcp.read("decoder.layers.mlp.experts.experts.linear_fc1.weight",
                           (1, 2, 100, 3), (1, 2, 50, 20))
    assert torch.equal(region, full[1:2, 2:4, 100:150, 3:23])
    rng = [o for o in ckpt.objects if o.startswith("rng_state/")]
    assert rng and "rng_tracker_states" in ckpt.read_object(rng[0])[0]
    extra = [o for o in ckpt.objects if "_extra_state" in o]
    assert extra and ckpt.read_object(extra[0]) is None  # local spec: no TE state


def test_common_state_stored_as_a_sharded_object_is_read(saved, tmp_path):
    """Newer Megatron stores the common state as the `common_state` ShardedObject, no common.pt."""
    from megatron_sparkling.checkpoint.base import object_bytes
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.checkpoint.writer import write_torch_dist

    source = open_checkpoint(saved[True, "fully_reshardable"])
    target = tmp_path / "iter_0000003"
    target.mkdir()
    specs = dict(source.model_tensors)
    objects = {"common_state/shard_0_1": object_bytes(source.common)}
    write_torch_dist(str(target), specs, source.read_model, objects, {}, progress=False)
    os.remove(target / "common.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    ckpt = open_checkpoint(str(tmp_path))
    assert ckpt.args.hidden_size == 64 and ckpt.common["iteration"] == 3
    assert "common_state/shard_0_1" not in ckpt.objects
    key = "output_layer.weight"
    assert torch.equal(ckpt.read_model(key), source.read_model(key))


def test_iteration_choice_and_clear_errors(saved, tmp_path):
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.checkpoint.paths import CheckpointError

    root = saved[True, "fully_reshardable"]
    assert open_checkpoint(root, iteration=3).iteration == 3
    with pytest.raises(CheckpointError, match="choose --iteration among iter_0000003"):
        open_checkpoint(root, iteration=7)
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="has no latest_checkpointed_iteration.txt"):
        open_checkpoint(str(tmp_path))
    shutil.copytree(root, tmp_path / "zarr")
    meta = tmp_path / "zarr" / "iter_0000003" / "metadata.json"
    meta.write_text(meta.read_text().replace("torch_dist", "zarr"))
    with pytest.raises(CheckpointError, match="zarr checkpoint, not torch_dist; load it once"):
        open_checkpoint(str(tmp_path / "zarr"))


def test_chained_optimizer_prefixes_are_read(saved, tmp_path):
    """Older Megatron (no `chained_optim_avoid_prefix`) prefixes a ChainedOptimizer's model-space
    keys with `chained_<i>.`; they read as the unprefixed ones."""
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.checkpoint.writer import write_torch_dist

    source = open_checkpoint(saved[True, "fully_reshardable"])
    renamed = {}
    for key in source.dcp.tensors:
        expert = ".experts." in key
        new = f"chained_{int(expert)}.{key}" if key.startswith("optimizer.") else key
        renamed[new] = key
    target = tmp_path / "iter_0000003"
    target.mkdir()
    common = dict(source.common, content_metadata=dict(source.content_metadata,
                                                       chained_optim_avoid_prefix=False))
    write_torch_dist(str(target), {k: source.dcp.tensors[v] for k, v in renamed.items()},
                     lambda k, layer: source.dcp.read_layer(renamed[k], layer), {}, common,
                     progress=False)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    prefixed = open_checkpoint(str(tmp_path))
    assert any(k.startswith("chained_1.optimizer.state.exp_avg.") for k in prefixed.dcp.tensors)
    _assert_same_state(source, prefixed)


@pytest.mark.parametrize("fmt", ["dp_reshardable", "fully_reshardable"])
def test_chunks_read_straight_into_place_equal_torch_dcp_load(saved, fmt, monkeypatch):
    """checkpoint/dcp.py reads a region stored plainly in its chunk straight from the file into
    its destination (no torch.load): every tensor, region, layer slice and region not in one run
    of its chunk (loaded and copied as DCP does) equals torch's own DCP load of the tensor."""
    import glob

    import torch.distributed.checkpoint as torch_dcp

    from megatron_sparkling.checkpoint import dcp

    direct = []
    read_direct = dcp._DirectReader._read_direct

    def counted(*args):
        direct.append(read_direct(*args))
        return direct[-1]

    monkeypatch.setattr(dcp._DirectReader, "_read_direct", staticmethod(counted))
    path = glob.glob(os.path.join(saved[True, fmt], "iter_*"))[0]
    ckpt = dcp.DcpCheckpoint(path)
    whole = {k: torch.empty(s.shape, dtype=s.dtype) for k, s in ckpt.tensors.items()}
    torch_dcp.load(whole, checkpoint_id=path, no_dist=True)
    for key, ref in whole.items():
        shape = tuple(ref.shape)
        assert torch.equal(ckpt.read(key), ref), key
        if len(shape) == 1 and shape[0] > 10:
            lo, hi = shape[0] // 3, 2 * shape[0] // 3
            assert torch.equal(ckpt.read(key, (lo,), (hi - lo,)), ref[lo:hi]), key
        if len(shape) >= 2 and shape[0] > 1:
            assert torch.equal(ckpt.read_layer(key, 1), ref[1]), key
        if len(shape) >= 3 and shape[-1] > 1:
            half = shape[-1] // 2
            region = ckpt.read(key, (1,) + (0,) * (len(shape) - 1),
                               (1,) + shape[1:-1] + (half,))
            assert torch.equal(region, ref[1:2, ..., :half]), key
    assert any(direct) and not all(direct)   # both ways were taken
