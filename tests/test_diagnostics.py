"""Diagnostics on real megatron-core MoE models: activation RMS, r of every linear, loss and logit
change, twin symmetry, and `megatron-sparkling verify` on checkpoints written by the Pretrainer."""
import contextlib
import copy
import io
import json
import math

import pytest
import torch

from conftest import edit_common_state, megatron_run, tiny_moe_flags
from element_copy import element_copy
from megatron_sparkling import diagnostics as dg
from megatron_sparkling.core import layout
from megatron_sparkling.live.state import load_model_global_tensors, model_global_tensors
from megatron_sparkling.methods.base import GrowthMethod, Grower
from megatron_sparkling.core.plan import GrowthPlan
from megatron_sparkling.core.spec import GrowthSpec, ModelShape
from megatron_sparkling.training import data
from megatron_sparkling.mcore import model as model_lib

# A narrow MoE model with a dense second layer and a shared expert, so every site kind is seen.
NARROW = dict(moe_layer_freq="[1,0]", ffn_hidden_size=96, moe_shared_expert_intermediate_size=64,
              train_iters=30, lr=3e-3, lr_warmup_iters=3)
# Everything at 2x (heads 4 -> 8 at fixed head dim 16). No dropout after growth: its random masks
# on the residual stream and on attention would break the symmetry of hidden units and heads.
WIDE = dict(NARROW, hidden_size=128, kv_channels=16, num_attention_heads=8, moe_ffn_hidden_size=256,
            ffn_hidden_size=192, moe_shared_expert_intermediate_size=128, hidden_dropout=0,
            attention_dropout=0)


class ElementCopy(GrowthMethod):
    """Net2Net along the plan's element maps: copy every element from its source, divide fan-in
    columns by their copy count (function-preserving at integer factors)."""
    name = "element-copy"

    def grow_tensor(self, key, tensor, kind, lay, plan):
        return element_copy(plan, lay, tensor)


class ZeroNew(GrowthMethod):
    """New elements zero, old elements unchanged (no rescale): the mid-stage disruption."""
    name = "zero-new"

    def make_plan(self, spec):
        return GrowthPlan.twins(spec, fresh_axes=tuple(layout.Axis))

    def grow_tensor(self, key, tensor, kind, lay, plan):
        for d, m in enumerate(plan.tensor_maps(lay)):
            tensor = tensor.index_select(d, m.source.clamp(min=0))
        mask = plan.new_mask(lay)
        return tensor if mask is None else tensor.masked_fill(mask, 0.0)


def grown_tensors(grower, tensors):
    return {k: grower.grow(k, v) for k, v in tensors.items()}


@pytest.fixture(scope="module")
def narrow(corpus_prefix, tmp_path_factory):
    """A narrow model trained 30 iterations (mid-training weights), saved by the Pretrainer."""
    root = str(tmp_path_factory.mktemp("narrow") / "ckpt")
    with megatron_run(tiny_moe_flags(corpus_prefix, save=root, **NARROW)) as run:
        run.train()
        run.save()
        result = {"tensors": model_global_tensors(run.model), "args": copy.copy(run.args),
                       "shape": ModelShape.from_args(run.args), "root": root,
                       "iteration": run.iteration}
    return result


def _model_of(args, tensors):
    """A second live model (no DDP) built from `args` inside the current 1-rank run."""
    model = model_lib.build_model(args, wrap_with_ddp=False)
    load_model_global_tensors(model, tensors)
    return model


def _batches(run, count=2):
    return list(data.microbatches(run.valid_ds, 0, 1, run.args))[:count]


def _close(a, b, tol):
    return a is not None and b is not None and abs(a - b) <= tol


def test_identical_models_change_nothing(narrow, corpus_prefix):
    with megatron_run(tiny_moe_flags(corpus_prefix, **NARROW)) as run:
        load_model_global_tensors(run.model, narrow["tensors"])
        twin = _model_of(narrow["args"], narrow["tensors"])
        report = dg.compare(twin, run.model, _batches(run))
    assert report.logits["max_abs_diff"] == 0.0 and report.loss["delta"] == 0.0
    figures = report.after
    # every site kind of the model is observed, experts one by one and pooled per layer
    names = {s.name for s in figures.sites}
    assert names == {"layer", "input_norm", "pre_mlp_norm", "final_norm", "qkv", "attn_proj",
                     "router", "expert_fc1", "expert_fc2", "shared_fc1", "shared_fc2", "fc1",
                     "fc2", "output_layer"}
    per_expert = [s for s in figures.sites if s.name == "expert_fc1" and s.expert is not None]
    assert sorted(s.expert for s in per_expert) == [0, 1, 2, 3]
    assert {s.layer for s in per_expert} == {0}
    assert figures.get("fc1", 1) is not None and figures.get("fc1", 0) is None  # layer 1 is dense
    # figures hang together: layer l's output is layer l+1's input and the final norm's input
    (l0, in0, out0), (l1, in1, out1) = figures.residual()
    assert (l0, l1) == (0, 1) and math.isclose(out0, in1, rel_tol=1e-9)
    assert math.isclose(out1, figures.get("final_norm").rms_in, rel_tol=1e-9)
    assert math.isclose(figures.logits_rms, figures.get("output_layer").rms_out, rel_tol=1e-9)
    assert 0.8 < figures.get("input_norm", 0).rms_out < 1.3  # RMSNorm output near unit RMS
    # pooled expert figure = token-weighted RMS of the experts
    experts = [figures.get("expert_fc2", 0, e) for e in range(4)]
    pooled = math.sqrt(sum(f.rms_out ** 2 * f.elements_out for f in experts if f.elements_out)
                       / sum(f.elements_out for f in experts))
    assert math.isclose(figures.get("expert_fc2", 0).rms_out, pooled, rel_tol=1e-9)
    for row in report.residual():
        assert row["in_ratio"] == 1.0 and row["out_ratio"] == 1.0
    for row in report.norms() + report.linears() + report.experts():
        ratios = [row[k] for k in row if k.endswith("ratio")]
        assert all(r == 1.0 for r in ratios), row
    assert all(r["r_before"] > 0 for r in report.linears())


def test_copy_growth_preserves_function_rms_and_twins(narrow, corpus_prefix):
    with megatron_run(tiny_moe_flags(corpus_prefix, **WIDE)) as run:
        spec = GrowthSpec(narrow["shape"], ModelShape.from_args(run.args), "element-copy", seed=5)
        grower = Grower(spec, ElementCopy())
        load_model_global_tensors(run.model, grown_tensors(grower, narrow["tensors"]))
        before = _model_of(narrow["args"], narrow["tensors"])
        batches = _batches(run)
        report = dg.compare(before, run.model, batches, plan=grower.plan)
        # copies stay copies under Adam from identical (zero) state: the symmetry lock
        for _ in range(5):
            run.train_step()
        locked = dg.twin_similarity(run.model, grower.plan, batches)
    assert abs(report.loss["delta"]) < 1e-5, report.loss
    assert report.logits["max_abs_diff"] < 1e-4, report.logits
    for row in report.residual():
        assert _close(row["in_ratio"], 1.0, 1e-5) and _close(row["out_ratio"], 1.0, 1e-5), row
    for row in report.norms():
        assert _close(row["out_ratio"], 1.0, 1e-5), row
    for row in report.linears():
        assert _close(row["r_ratio"], 1.0, 1e-4), row
    twins = report.twins
    assert set(twins["gradient"]) == {"hidden", "expert_ffn", "dense_ffn", "shared_ffn", "heads",
                                      "qkv_groups"}
    expected_units = {"hidden": 64, "expert_ffn": 1 * 4 * 128, "dense_ffn": 96,
                      "shared_ffn": 64, "heads": 2 * 4, "qkv_groups": 2 * 4}
    for axis, summary in twins["gradient"].items():
        assert summary["units"] == expected_units[axis] and summary["fresh"] == 0, (axis, summary)
        assert summary["min"] > 0.9999, (axis, summary)
        assert twins["weight"][axis]["min"] > 0.999999, (axis, twins["weight"][axis])
    for kind in ("gradient", "weight"):
        for axis, summary in locked[kind].items():
            assert summary["min"] > 0.9999, (kind, axis, summary)


def test_zero_hidden_growth_shows_the_disruption(narrow, corpus_prefix):
    """Hidden 64 -> 256 with every new element zero, mid-training: the residual stream's RMS
    falls to 1/2 at the embedding, every norm scales its input by 2, the loss jumps."""
    with megatron_run(tiny_moe_flags(corpus_prefix, **dict(NARROW, hidden_size=256,
                                                           kv_channels=16))) as run:
        spec = GrowthSpec(narrow["shape"], ModelShape.from_args(run.args), "zero-new")
        grower = Grower(spec, ZeroNew())
        load_model_global_tensors(run.model, grown_tensors(grower, narrow["tensors"]))
        report = dg.compare(_model_of(narrow["args"], narrow["tensors"]), run.model,
                            _batches(run), plan=grower.plan)
    residual = report.residual()
    assert _close(residual[0]["in_ratio"], 0.5, 1e-6), residual[0]  # embedding: 1/4 of units live
    assert residual[0]["out_ratio"] > 1.3 and residual[1]["out_ratio"] > 1.2, residual
    qkv0 = next(r for r in report.linears() if r["site"] == "qkv" and r["layer"] == 0)
    assert 1.9 < qkv0["r_ratio"] < 2.05, qkv0   # the norm multiplies old units by sqrt(4)
    out = next(r for r in report.linears() if r["site"] == "output_layer")
    assert out["y_ratio"] > 1.5, out
    assert report.loss["delta"] > 0.2, report.loss
    assert report.logits["max_abs_diff"] > 1.0, report.logits
    assert report.twins["weight"]["hidden"] == {"units": 0, "fresh": 192, "undefined": 0,
                                                "mean": None, "min": None, "max": None}


def test_twin_symmetry_breaks_with_a_perturbation(narrow, corpus_prefix):
    """Copy growth, then new elements perturbed (0.2 x the tensor's std) and trained 10 steps from
    zero optimizer state: new units drift away from their twins."""
    with megatron_run(tiny_moe_flags(corpus_prefix, **WIDE)) as run:
        spec = GrowthSpec(narrow["shape"], ModelShape.from_args(run.args), "element-copy", seed=5)
        grower = Grower(spec, ElementCopy())
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for key, value in grown_tensors(grower, narrow["tensors"]).items():
            mask = grower.plan.new_mask(grower.layout(key))
            if mask is not None:
                noise = torch.randn(value.shape, generator=g) * 0.2 * value.std()
                value = value + noise * mask
            tensors[key] = value
        load_model_global_tensors(run.model, tensors)
        batches = _batches(run)
        start = dg.twin_similarity(run.model, grower.plan, batches)
        for _ in range(10):
            run.train_step()
        trained = dg.twin_similarity(run.model, grower.plan, batches)
    for axis in ("hidden", "expert_ffn", "dense_ffn", "shared_ffn", "heads", "qkv_groups"):
        # the copy-grown model without the perturbation stays at 1 (previous test)
        assert trained["weight"][axis]["mean"] < 0.999, (axis, trained["weight"][axis])
        assert trained["gradient"][axis]["mean"] < 0.99, (axis, trained["gradient"][axis])
        assert trained["gradient"][axis]["mean"] < start["gradient"][axis]["mean"], axis


def test_twin_cosines_on_global_tensors_every_axis(narrow):
    """Pure tensor check on the checkpoint keys of a real model: experts 4 -> 8, hidden 1.5x
    (uneven copy counts), expert FFN 1.5x, heads 4 -> 8 at once."""
    target = narrow["shape"].replace(num_experts=8, hidden_size=96, moe_ffn_hidden_size=192,
                                     num_attention_heads=8, num_query_groups=8)
    grower = Grower(GrowthSpec(narrow["shape"], target, "element-copy", seed=1), ElementCopy())
    grown = grown_tensors(grower, narrow["tensors"])
    figures = dg.twin_cosines(grown, grower.plan)
    units = {axis: f.units for axis, f in figures.items()}
    assert units == {"hidden": 32, "expert": 4, "expert_ffn": 8 * 64, "heads": 2 * 4,
                     "qkv_groups": 2 * 4}
    for f in figures.values():
        assert f.fresh == 0 and float(f.cosines.min()) > 1 - 1e-9
    g = torch.Generator().manual_seed(0)
    noisy = {}
    for key, value in grown.items():
        mask = grower.plan.new_mask(grower.layout(key))
        noisy[key] = value if mask is None else (
            value + 0.5 * value.std() * torch.randn(value.shape, generator=g) * mask)
    for axis, f in dg.twin_cosines(noisy, grower.plan).items():
        assert float(f.cosines.max()) < 0.999, axis
    with pytest.raises(ValueError, match="the plan is not this model's"):
        dg.twin_cosines(narrow["tensors"], grower.plan)


def _inject_growth_record(checkpoint_dir, record):
    """What the converter does: store Grower.record() in the common state under `sparkling`."""
    edit_common_state(checkpoint_dir, lambda common: common.update({dg.RECORD_KEY: record}))


def _verify(argv):
    from megatron_sparkling import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["verify", *argv])
    return rc, out.getvalue()


def test_verify_command_on_pretrainer_checkpoints(narrow, corpus_prefix, tmp_path, capsys):
    after_root = str(tmp_path / "grown")
    with megatron_run(tiny_moe_flags(corpus_prefix, save=after_root, **WIDE)) as run:
        spec = GrowthSpec(narrow["shape"], ModelShape.from_args(run.args), "element-copy", seed=5)
        grower = Grower(spec, ElementCopy())
        load_model_global_tensors(run.model, grown_tensors(grower, narrow["tensors"]))
        run.iteration = narrow["iteration"]
        checkpoint = run.save()
    _inject_growth_record(checkpoint, grower.record())

    rc, out = _verify(["--before", narrow["root"], "--after", after_root, "--json",
                       "--batches", "2"])
    assert rc == 0
    report = json.loads(out)
    assert set(report) == {"meta", "loss", "logits", "residual", "norms", "linears", "experts",
                           "twins"}
    assert report["meta"]["before_iteration"] == report["meta"]["after_iteration"] == 30
    assert report["meta"]["growth"]["method"] == "element-copy"
    assert report["meta"]["batches"] == 2 and report["loss"]["tokens"] > 0
    assert abs(report["loss"]["delta"]) < 1e-5 and report["logits"]["max_abs_diff"] < 1e-4
    assert [r["layer"] for r in report["residual"]] == [0, 1]
    assert all(abs(r["out_ratio"] - 1) < 1e-5 for r in report["residual"])
    assert {r["site"] for r in report["linears"]} >= {"qkv", "router", "expert_fc1", "fc2",
                                                      "output_layer"}
    assert len(report["experts"]) == 2 * 4
    assert report["twins"]["gradient"]["hidden"]["min"] > 0.9999

    rc, text = _verify(["--before", narrow["root"], "--after", after_root, "--batches", "1"])
    assert rc == 0
    assert "residual stream RMS" in text and "twin symmetry" in text
    assert "growth record: element-copy (seed 5" in text
    header = next(line for line in text.splitlines() if line.startswith("linear "))
    assert header.split() == ["linear", "layer", "r", "before", "r", "after", "r", "ratio", "x",
                              "ratio", "y", "ratio"]
    assert any(line.split()[:2] == ["qkv", "0"] for line in text.splitlines())

    # bad input: one clear line, exit status 2
    capsys.readouterr()
    rc, _ = _verify(["--before", str(tmp_path / "nothing"), "--after", after_root])
    assert rc == 2
    assert "no such directory" in capsys.readouterr().err
    rc, _ = _verify(["--before", narrow["root"], "--after", after_root, "--data-path",
                     str(tmp_path / "no_corpus")])
    assert rc == 2
    assert "no_corpus: no " in capsys.readouterr().err


@pytest.mark.slow
def test_verify_loads_a_tensor_parallel_checkpoint_at_one_rank(corpus_prefix, tmp_path):
    """A TP=2 checkpoint (torchrun, distributed optimizer) against the same training at 1 rank:
    verify reshards the TP=2 weights into a 1-rank model; both runs agree to rounding."""
    from conftest import PRETRAIN, torchrun

    flags = tiny_moe_flags(corpus_prefix, train_iters=4, lr_warmup_iters=1, hidden_dropout=0,
                           attention_dropout=0, use_distributed_optimizer=True)
    tp2, single = tmp_path / "tp2", tmp_path / "single"
    torchrun(2, PRETRAIN, flags + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                   "--save", str(tp2)])
    with megatron_run(flags + ["--save", str(single)]) as run:
        run.train()
        run.save()
    rc, out = _verify(["--before", str(single), "--after", str(tp2), "--json", "--batches", "2"])
    assert rc == 0
    report = json.loads(out)
    assert report["twins"] is None and report["meta"]["growth"] is None
    assert abs(report["loss"]["delta"]) < 1e-4, report["loss"]
    assert report["logits"]["max_abs_diff"] < 1e-3, report["logits"]
    for row in report["residual"]:
        assert abs(row["out_ratio"] - 1) < 1e-4, row
