"""`megatron-sparkling expand` on real checkpoints of the pre-training script: plain format
conversion, growth with the registered `sparkling` method (width, depth, experts), safety,
atomicity and memory."""
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (REPO, edit_common_state, megatron_run, saved_and_continued,
                      tiny_moe_flags, tree_hashes)
from megatron_sparkling.cli import main

SAVE_AT, TOTAL = 4, 8
NARROW = dict(train_iters=TOTAL, lr_warmup_iters=2, hidden_dropout=0, attention_dropout=0,
              use_distributed_optimizer=True)
WIDE = dict(NARROW, hidden_size=128, kv_channels=16, moe_ffn_hidden_size=256,
            ffn_hidden_size=128)


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus_prefix):
    """A dp_reshardable checkpoint at iteration 4 and the losses of iterations 5..8 of the same
    run continued without interruption (dropout off: RNG state does not matter)."""
    root = str(tmp_path_factory.mktemp("source") / "ckpt")
    return root, saved_and_continued(tiny_moe_flags(corpus_prefix, **NARROW), root, SAVE_AT, TOTAL)


def expand(*argv) -> int:
    return main(["expand", "--no-progress", *map(str, argv)])


CHANCE = math.log(256)   # the loss of an untrained model over the byte vocabulary


def assert_loads_and_trains(losses, source_losses):
    """A grown checkpoint that loaded and trains, judged on the batches the source run went on
    with (`source_losses`): each loss keeps at least half of the source's gain over chance (a
    model that lost its weights is at chance), and the loss falls at least half as much as the
    source's did over the same batches."""
    n = len(losses)
    assert all(loss < (CHANCE + ref) / 2 for loss, ref in zip(losses, source_losses)), (
        losses, source_losses)
    assert losses[0] - losses[-1] > (source_losses[0] - source_losses[n - 1]) / 2, (
        losses, source_losses)


def resume(corpus_prefix, load, n, **flags):
    with megatron_run(tiny_moe_flags(corpus_prefix, load=load, **flags)) as trainer:
        assert trainer.iteration == SAVE_AT
        return [trainer.train_step()["lm loss"] for _ in range(n)]


def test_format_conversion_resumes_exactly_and_never_writes_the_source(
        source, tmp_path, corpus_prefix, capsys):
    from megatron.core import dist_checkpointing

    src, continued = source
    before = tree_hashes(src)
    dst = tmp_path / "converted"
    assert expand("--load", src, "--save", dst) == 0
    out = capsys.readouterr().out
    assert "dp_reshardable -> fully_reshardable" in out and "--no-load-rng" in out
    assert tree_hashes(src) == before
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == str(SAVE_AT)
    assert sorted(os.listdir(dst)) == ["iter_0000004", "latest_checkpointed_iteration.txt"]
    common = dist_checkpointing.load_common_state_dict(str(dst / "iter_0000004"))
    assert common["content_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
    assert common["args"].no_save_rng and common["iteration"] == SAVE_AT
    assert common["optimizer"]["optimizer"]["param_groups"][0]["step"] == SAVE_AT
    assert "growth" not in common["sparkling"]
    assert common["sparkling"]["source"]["optimizer_format"] == "dp_reshardable"
    resumed = resume(corpus_prefix, str(dst), TOTAL - SAVE_AT, dist_ckpt_strictness="raise_all",
                     **NARROW)
    assert resumed == continued  # bit-identical: same weights, moments, step, scheduler


def test_converted_checkpoint_loads_without_the_distributed_optimizer(
        source, tmp_path, corpus_prefix):
    src, continued = source
    assert expand("--load", src, "--save", tmp_path / "c") == 0
    resumed = resume(corpus_prefix, str(tmp_path / "c"), TOTAL - SAVE_AT,
                     **dict(NARROW, use_distributed_optimizer=False))
    assert max(abs(a - b) for a, b in zip(resumed, continued)) < 1e-5


def test_growth_through_the_cli_preserves_the_loss(source, tmp_path, corpus_prefix, capsys):
    """2x hidden and 2x expert FFN with `sparkling` (copy-copy: function preserving at 2x): the
    grown model's first loss is the narrow model's loss on the same batch; every optimizer
    tensor is grown too (old elements keep their Adam state, new ones start at zero)."""
    from megatron_sparkling.checkpoint.source import open_checkpoint

    src, continued = source
    dst = tmp_path / "grown"
    assert expand("--load", src, "--save", dst, "--hidden-size", 128, "--moe-ffn-hidden-size",
                  256, "--method", "sparkling", "--seed", 7, "--rewarmup-iters", 3,
                  "--rewarmup-peak-ratio", 0.5, "--new-state-bias-correction", "per-element") == 0
    out = capsys.readouterr().out
    assert "--hidden-size 128" in out and "--kv-channels 16" in out
    assert "--sparkling-rewarmup-iters 3" in out
    assert "--sparkling-new-state-bias-correction per-element" in out
    grown = open_checkpoint(str(dst))
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    assert grown.model_tensors[fc1].shape == (2, 4, 512, 128)
    assert grown.optimizer.format == "fully_reshardable"
    assert grown.optimizer.read(fc1, "exp_avg_sq").shape == (2, 4, 512, 128)
    record = grown.common["sparkling"]
    assert record["growth"]["method"] == "sparkling" and record["growth"]["seed"] == 7
    assert record["rewarmup"] == {"iters": 3, "peak_ratio": 0.5, "start_iteration": SAVE_AT,
                                  "bias_correction": "per-element"}
    from megatron_sparkling.live.element_lr import global_new_mask
    from megatron_sparkling.core.plan import GrowthPlan
    from megatron_sparkling.core.spec import GrowthSpec, ModelShape

    growth = record["growth"]
    plan = GrowthPlan.from_state_dict(GrowthSpec(ModelShape(**growth["source"]),
                                                 ModelShape(**growth["target"])), growth["plan"])
    new = global_new_mask(plan, fc1, True)
    m = grown.optimizer.read(fc1, "exp_avg")
    assert 0 < new.float().mean() < 1 and not m[new].any()          # S' = [S, 0]
    assert torch.equal(m[~new].sort().values,
                       open_checkpoint(src).optimizer.read(fc1, "exp_avg").flatten().sort().values)
    assert grown.args.hidden_size == 128 and grown.args.moe_ffn_hidden_size == 256
    first = resume(corpus_prefix, str(dst), 1, dist_ckpt_strictness="raise_all", **WIDE)[0]
    # function-preserving growth: the same loss, fp32 rounding apart
    assert abs(first - continued[0]) / continued[0] < 1e-5, (first, continued[0])


def test_expert_count_growth_loads_strictly(source, tmp_path, corpus_prefix):
    """4 -> 8 experts: every per-expert tensor, optimizer state and `_extra_state` object of the
    grown model is written, so a strict load finds exactly what it asks for."""
    src, continued = source
    dst = tmp_path / "more_experts"
    assert expand("--load", src, "--save", dst, "--num-experts", 8, "--method", "sparkling") == 0
    losses = resume(corpus_prefix, str(dst), 2, dist_ckpt_strictness="raise_all",
                    **dict(NARROW, num_experts=8))
    print(f"\n4 -> 8 experts: losses {losses}, source continued {continued}")
    assert_loads_and_trains(losses, continued)


def _logits(corpus_prefix, load, **flags):
    """Logits of a checkpoint's model on the first validation micro-batch (eval mode)."""
    from megatron_sparkling.training import data
    from megatron_sparkling.mcore import model as model_lib

    with megatron_run(tiny_moe_flags(corpus_prefix, load=load, **flags)) as trainer:
        batch = data.to_device(next(data.microbatches(trainer.valid_ds, 0, 1, trainer.args)))
        chunk = model_lib.unwrap(trainer.model)[0]
        chunk.eval()
        with torch.no_grad():
            return chunk(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))


def test_identity_depth_growth_through_the_cli_keeps_the_logits(source, tmp_path, corpus_prefix,
                                                                 capsys):
    """2 -> 4 layers, identity layers inserted in the middle (--insert-at 1): the converted
    checkpoint loads strictly at 4 layers and its logits equal the source's; the new layers'
    Adam moments are reset, their weights copy layer 0 with zero output projections, and the
    growth record marks exactly those layers new (the re-warmup mask)."""
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.live.element_lr import global_new_mask
    from megatron_sparkling.core import plan
    from megatron_sparkling.core.plan import GrowthPlan
    from megatron_sparkling.core.record import growth_record
    from megatron_sparkling.core.spec import GrowthSpec, ModelShape

    src, _ = source
    dst = tmp_path / "deeper"
    assert expand("--load", src, "--save", dst, "--num-layers", 4, "--depth-method", "identity",
                  "--insert-at", 1) == 0
    assert "--num-layers 4" in capsys.readouterr().out
    before = _logits(corpus_prefix, src, **NARROW)
    after = _logits(corpus_prefix, str(dst), dist_ckpt_strictness="raise_all",
                    **dict(NARROW, num_layers=4))
    diff = (after - before).abs().max().item()
    print(f"\nidentity depth 2 -> 4 through expand: max logit change {diff:.2e}")
    assert diff < 1e-5, diff

    old, grown = open_checkpoint(src), open_checkpoint(str(dst))
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    proj = "decoder.layers.self_attention.linear_proj.weight"
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    source_qkv = old.read_model(qkv)
    assert grown.model_tensors[qkv].shape[0] == 4
    lmap = plan.stack_map(2, 4, insert_at=1)  # layers 0 | new 1, 0 | 1 (block cycled)
    assert lmap.source.tolist() == [0, 1, 0, 1]
    assert torch.equal(grown.read_model(qkv), source_qkv[lmap.source])
    new = lmap.is_new
    assert not grown.read_model(proj)[new].any() and grown.read_model(proj)[~new].any()
    assert not grown.optimizer.read(fc1, "exp_avg")[new].any()
    assert torch.equal(grown.optimizer.read(fc1, "exp_avg")[~new], old.optimizer.read(fc1, "exp_avg"))
    record = growth_record(grown.common)
    assert record["depth"]["method"] == "identity" and record["depth"]["insert_at"] == 1
    spec = GrowthSpec(ModelShape(**record["source"]), ModelShape(**record["target"]))
    plan = GrowthPlan.from_state_dict(spec, record["plan"])
    mask = global_new_mask(plan, fc1, True)
    assert mask[new].all() and not mask[~new].any()


def test_random_depth_and_width_in_one_conversion(source, tmp_path, corpus_prefix):
    """2 -> 3 layers (random: a fresh layer drawn as megatron-core initialises one, with the
    grown run's --init-method-std) and 2x expert FFN in one conversion: the fresh layer's weights
    and fp32 main params agree, its Adam moments are zero, it is no copy of a source layer, and
    the result loads strictly and trains."""
    from megatron_sparkling.checkpoint.source import open_checkpoint

    src, continued = source
    dst = tmp_path / "random"
    assert expand("--load", src, "--save", dst, "--num-layers", 3, "--depth-method", "random",
                  "--moe-ffn-hidden-size", 256) == 0
    grown, old = open_checkpoint(str(dst)), open_checkpoint(src)
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    fresh = grown.read_model(qkv)[2]
    assert all(not torch.allclose(fresh, layer) for layer in old.read_model(qkv))
    assert abs(fresh.std().item() / grown.args.init_method_std - 1) < 0.1
    assert torch.equal(grown.optimizer.read(qkv, "param")[2], fresh.float())
    assert not grown.optimizer.read(fc1, "exp_avg_sq")[2].any()
    assert grown.read_model(fc1).shape == (3, 4, 512, 64)
    losses = resume(corpus_prefix, str(dst), 2, dist_ckpt_strictness="raise_all",
                    **dict(NARROW, num_layers=3, moe_ffn_hidden_size=256))
    print(f"\nrandom depth + 2x FFN: losses {losses}, source continued {continued}")
    assert_loads_and_trains(losses, continued)


def test_depth_growth_of_a_mixed_dense_moe_stack(tmp_path, corpus_prefix, capsys):
    """A dense/MoE stack (--moe-layer-freq [1,0]: megatron-core stores it per layer) grown 2 -> 4
    layers (alternate) and 2x expert FFN in one conversion: per-layer keys of the new layers
    come from their source layers, the grown --moe-layer-freq keeps each copy's type and is
    printed, the result loads strictly and trains; identity layers keep the logits."""
    from megatron_sparkling.checkpoint.source import open_checkpoint

    mixed = dict(NARROW, moe_layer_freq="[1,0]", ffn_hidden_size=96)
    src = tmp_path / "mixed"
    continued = saved_and_continued(tiny_moe_flags(corpus_prefix, **mixed), str(src), SAVE_AT,
                                    SAVE_AT + 2)
    dst = tmp_path / "alternate"
    assert expand("--load", src, "--save", dst, "--num-layers", 4, "--depth-method", "alternate",
                  "--moe-ffn-hidden-size", 256) == 0
    assert "--moe-layer-freq [1,1,0,0]" in capsys.readouterr().out
    grown = open_checkpoint(str(dst))
    fc2 = "decoder.layers.{}.mlp.linear_fc2.weight"       # dense layers 2, 3 copy layer 1
    old = open_checkpoint(str(src))
    assert torch.equal(grown.read_model(fc2.format(3)), old.read_model(fc2.format(1)))
    assert not grown.optimizer.read(fc2.format(3), "exp_avg").any()
    assert torch.equal(grown.optimizer.read(fc2.format(2), "exp_avg"),
                       old.optimizer.read(fc2.format(1), "exp_avg"))
    losses = resume(corpus_prefix, str(dst), 2, dist_ckpt_strictness="raise_all",
                    **dict(mixed, num_layers=4, moe_layer_freq="[1,1,0,0]",
                           moe_ffn_hidden_size=256))
    print(f"\nmixed stack 2 -> 4 layers + 2x FFN: losses {losses}, source continued {continued}")
    assert_loads_and_trains(losses, continued)
    identity = tmp_path / "identity"
    assert expand("--load", src, "--save", identity, "--num-layers", 4,
                  "--depth-method", "identity") == 0
    before = _logits(corpus_prefix, str(src), **mixed)
    after = _logits(corpus_prefix, str(identity), dist_ckpt_strictness="raise_all",
                    **dict(mixed, num_layers=4, moe_layer_freq="[1,0,1,0]"))
    assert (after - before).abs().max().item() < 1e-5


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("megatron-sparkling expand: error: ")]
    assert len(lines) == 1, lines  # one line
    return lines[0]


def test_bad_inputs_fail_before_writing_with_one_line(source, tmp_path, capsys):
    src, _ = source
    dst = tmp_path / "out"

    def refused(*argv, match):
        assert expand(*argv) == 1
        line = _error(capsys)
        assert match in line, line
        assert not dst.exists() or not any(n.startswith("iter_") or n.startswith(".sparkling")
                                           for n in os.listdir(dst))

    refused("--load", src, "--save", dst, "--hidden-size", 32, match="smaller than the source")
    refused("--load", src, "--save", dst, "--num-experts", 6, "--target-expert-model-parallel-size",
            4, match="number of experts: 6 is not divisible by the expert-parallel size 4")
    refused("--load", src, "--save", dst, "--num-layers", 1,
            match="number of layers (--num-layers): target 1 is smaller than the source's 2")
    refused("--load", src, "--save", dst, "--num-layers", 4, "--insert-at", 3,
            match="--insert-at 3 is outside the source's layers; choose 0 .. 2")
    refused("--load", src, "--save", dst, "--num-layers", 3, "--target-pipeline-model-parallel-size",
            2, match="number of layers (--num-layers): 3 is not divisible by the pipeline-parallel "
                     "size 2; choose a multiple of 2")
    refused("--load", src, "--save", dst, "--num-layers", 3, "--depth-method", "alternate",
            match="alternate needs a whole growth factor")
    refused("--load", src, "--save", dst, "--depth-method", "stack",
            match="--depth-method stack: the layer count stays 2")
    refused("--load", src, "--save", os.path.join(src, "inside"), match="overlaps --load")
    refused("--load", src, "--save", dst, "--iteration", 9, match="choose --iteration among")
    (tmp_path / "empty").mkdir()
    refused("--load", tmp_path / "empty", "--save", dst,
            match="has no latest_checkpointed_iteration.txt")
    refused("--load", src, "--save", dst, "--method", "no-such", "--hidden-size", 128,
            match="unknown growth method")
    refused("--load", src, "--save", dst, "--method", "copy", "--hidden-size", 128,
            "--new-state-bias-correction", "per-element", match="start with zero Adam moments")

    iter_dir = "iter_0000004"
    missing = _copy(src, tmp_path / "missing")
    shard = sorted(p.name for p in (missing / iter_dir).glob("*.distcp"))[-1]
    os.remove(missing / iter_dir / shard)
    refused("--load", missing, "--save", dst, match=f"{shard} is missing")
    truncated = _copy(src, tmp_path / "truncated")
    with open(truncated / iter_dir / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)
    refused("--load", truncated, "--save", dst, match="is truncated (1000 of")
    foreign = tmp_path / "foreign"
    (foreign / iter_dir).mkdir(parents=True)
    (foreign / "latest_checkpointed_iteration.txt").write_text("4")
    (foreign / iter_dir / "weights.bin").write_bytes(b"\0" * 64)
    refused("--load", foreign, "--save", dst, match="neither a torch_dist checkpoint")

    lying = _copy(src, tmp_path / "lying")
    edit_common_state(lying / iter_dir, lambda common: setattr(common["args"], "hidden_size", 96))
    refused("--load", lying, "--save", dst, match="the checkpoint's args do not describe its tensors")


def test_existing_target_needs_overwrite(source, tmp_path, capsys):
    src, _ = source
    dst = tmp_path / "out"
    assert expand("--load", src, "--save", dst) == 0
    first = tree_hashes(dst)
    assert expand("--load", src, "--save", dst) == 1
    assert "already holds a checkpoint" in _error(capsys) and tree_hashes(dst) == first
    assert expand("--load", src, "--save", dst, "--overwrite") == 0
    assert sorted(os.listdir(dst)) == ["iter_0000004", "latest_checkpointed_iteration.txt"]


def test_keep_rng_only_at_the_source_layout(source, tmp_path, capsys):
    from megatron_sparkling.checkpoint.source import open_checkpoint

    src, _ = source
    assert expand("--load", src, "--save", tmp_path / "a", "--keep-rng",
                  "--target-tensor-model-parallel-size", 2) == 1
    assert "--keep-rng needs the source's TP/PP/EP sizes" in _error(capsys)
    assert expand("--load", src, "--save", tmp_path / "b", "--keep-rng") == 0
    kept = open_checkpoint(str(tmp_path / "b"))
    assert not kept.args.no_save_rng
    original = open_checkpoint(src)
    rng = [o for o in original.objects if o.startswith("rng_state/")]
    assert rng and all(kept.read_object_bytes(o) == original.read_object_bytes(o) for o in rng)


def _cli(argv, **kw):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "megatron_sparkling.cli", "expand",
                             "--no-progress", *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_killed_conversion_leaves_nothing_loadable_and_a_rerun_succeeds(source, tmp_path):
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.checkpoint.paths import CheckpointError

    src, _ = source
    dst = tmp_path / "out"
    proc = _cli(["--load", src, "--save", dst])
    staged = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        stages = [n for n in os.listdir(dst)] if dst.exists() else []
        stages = [n for n in stages if n.startswith(".sparkling-tmp-")]
        if stages and any(f.endswith(".distcp") for f in os.listdir(dst / stages[0])):
            staged = stages[0]
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert staged is not None, "the converter finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not (dst / "latest_checkpointed_iteration.txt").exists()
    assert not any(n.startswith("iter_") for n in os.listdir(dst))
    with pytest.raises(CheckpointError):
        open_checkpoint(str(dst))
    rerun = _cli(["--load", src, "--save", dst])
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert sorted(os.listdir(dst)) == ["iter_0000004", "latest_checkpointed_iteration.txt"]
    assert open_checkpoint(str(dst)).iteration == SAVE_AT


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"   # not a zombie
    except FileNotFoundError:
        return False


def test_a_killed_converter_leaves_no_worker_behind():
    """The converter builds its layouts in a spawned worker (checkpoint/shadow.py); when the
    converter is killed (SIGKILL: no cleanup runs) the worker ends too, within seconds."""
    code = ("import time\nfrom megatron_sparkling.checkpoint import shadow\n"
            "print(*shadow._pool()._processes, flush=True)\ntime.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    assert _running(worker)
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while _running(worker) and time.time() < deadline:
        time.sleep(0.2)
    assert not _running(worker), f"worker {worker} outlived its killed converter"


def test_converter_peak_memory_is_bounded_by_the_largest_piece(source, tmp_path):
    """Streaming, counted by the writer itself (WriteStats: bytes of produced pieces alive at
    once, as DCP drops them), so no machine load can move the figure: at most two pieces are
    held at any time, while the checkpoint is many pieces. The RSS this gives is measured by
    bench/convert.py (peak RSS vs checkpoint size, two model sizes 4x apart)."""
    from megatron_sparkling.checkpoint import expand as convert
    from megatron_sparkling.checkpoint.commit import StagedIteration
    from megatron_sparkling.checkpoint.writer import work_items, write_torch_dist

    src, _ = source
    req = convert.ExpandRequest(load=src, save=str(tmp_path / "dst"), progress=False,
                                sizes={"moe_ffn_hidden_size": 256})
    conv = convert.Conversion(req)
    pieces = work_items(conv.specs, conv.layered())
    largest, total = max(n for _, _, n in pieces), sum(n for _, _, n in pieces)
    stage = StagedIteration(req.save, conv.common["iteration"])
    stats = write_torch_dist(stage.prepare(), conv.specs, conv.produce, conv.objects,
                             conv.common, layered=conv.layered(), progress=False)
    stage.commit()
    print(f"peak held {stats.peak_held_bytes / 2**10:.0f} KiB, largest piece "
          f"{largest / 2**10:.0f} KiB, checkpoint {total / 2**10:.0f} KiB in {len(pieces)} pieces")
    assert stats.pieces == len(pieces) and stats.held_bytes == 0
    assert total > 10 * largest
    assert largest <= stats.peak_held_bytes <= 2 * largest


def test_work_is_divided_among_ranks_in_whole_units_and_no_rank_takes_more_than_its_share(
        source, tmp_path):
    """What each rank of `torchrun ... expand` produces (writer.split_among_ranks, the real
    conversion's pieces): every piece exactly once, a weight and its optimizer state on one rank
    and one after the other, main param first (the integrity check compares them without a
    second read), and no rank more than an even share plus one unit (the split is by bytes).
    tests/test_expand_2rank.py runs it under torchrun and compares every tensor with one
    process's output."""
    from megatron_sparkling.checkpoint import expand as convert
    from megatron_sparkling.checkpoint.writer import split_among_ranks, unit_of, work_items
    from megatron_sparkling.core import layout

    src, _ = source
    conv = convert.Conversion(convert.ExpandRequest(load=src, save=str(tmp_path / "dst"),
                                                    sizes={"moe_ffn_hidden_size": 256}))
    items = work_items(conv.specs, conv.layered())
    total = sum(n for *_, n in items)
    units = {}
    for item in items:
        units.setdefault(unit_of(item), []).append(item)
    largest_unit = max(sum(n for *_, n in u) for u in units.values())
    for world in (1, 2, 3, 4):
        shares = split_among_ranks(items, world)
        assert sorted(i for share in shares for i in share) == sorted(items)
        for share in shares:
            assert sum(n for *_, n in share) <= total / world + largest_unit
            assert {unit_of(i) for i in share} == {u for u in units if units[u][0] in share}
            assert [i for i in items if i in share] == share      # stream order kept
    for members in units.values():
        kinds = [layout.split_state_key(k)[0] and layout.state_kind(k) for k, *_ in members]
        if "param" in kinds:   # the weight, then its main param right after it
            assert kinds[:2] == ["", "param"], members


def test_written_param_groups_are_what_fused_adam_and_the_relaunch_ask_for(source, tmp_path,
                                                                          corpus_prefix):
    """Fused Adam (TE, apex) passes the group's `step` to a kernel taking an int, so it is
    written as an int; the keys megatron-core matches groups on at load come from the relaunched
    run's own groups (a strict relaunch at the grown sizes loads them)."""
    from megatron.core import dist_checkpointing

    from megatron_sparkling.checkpoint.optimizer_common import identifier_keys

    src, _ = source
    dst = tmp_path / "grown"
    assert expand("--load", src, "--save", dst, "--hidden-size", 128,
                  "--moe-ffn-hidden-size", 256, "--ffn-hidden-size", 128) == 0
    common = dist_checkpointing.load_common_state_dict(str(dst / f"iter_{SAVE_AT:07d}"))
    groups = (common["optimizer"]["optimizer"]["param_groups"]
              + common["optimizer"]["param_groups"])
    assert groups and all(type(g["step"]) is int and g["step"] == SAVE_AT for g in groups)
    with megatron_run(tiny_moe_flags(corpus_prefix, load=str(dst),
                                     dist_ckpt_strictness="raise_all", **WIDE)) as trainer:
        live = [g for g in trainer.optimizer.param_groups]
        written = common["optimizer"]["optimizer"]["param_groups"]
        for key in identifier_keys():
            assert sorted(map(str, (g.get(key) for g in live))) == sorted(
                map(str, (g.get(key) for g in written))), key
