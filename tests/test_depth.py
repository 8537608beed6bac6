"""Depth growth on real megatron-core MoE models: layer maps, fresh layers as megatron-core draws
them, every depth method grown in memory (weights and optimizer state), per-layer key stacks."""
import copy
import math

import pytest
import torch

from conftest import megatron_run, tiny_moe_flags
from element_copy import element_copy
from megatron_sparkling.core import layout
from megatron_sparkling.live.state import model_global_tensors
from megatron_sparkling.operators import depth
from megatron_sparkling.core import plan as plan_lib
from megatron_sparkling.core.plan import GrowthPlan
from megatron_sparkling.core.spec import DepthOptions, GrowthSpec, GrowthSpecError, ModelShape, validate
from megatron_sparkling.training import data, growth
from megatron_sparkling.mcore import model as model_lib


def test_layer_maps():
    apollo = plan_lib.interpolate_map(3, 12)
    assert apollo.source.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert apollo.is_new.tolist() == [False, True, True, True] * 3
    alt = plan_lib.alternate_map(2, 4)
    assert alt.source.tolist() == [0, 0, 1, 1] and alt.is_new.tolist() == [False, True] * 2
    assert plan_lib.interpolate_map(3, 5).source.tolist() == [0, 0, 1, 1, 2]
    on_top = plan_lib.stack_map(2, 4)
    assert on_top.source.tolist() == [0, 1, 0, 1] and on_top.is_new.tolist() == [0, 0, 1, 1]
    assert plan_lib.stack_map(3, 4).source.tolist() == [0, 1, 2, 2]       # duplicate the top layer
    inside = plan_lib.stack_map(3, 4, insert_at=1)                          # layer 0 repeated at 1
    assert inside.source.tolist() == [0, 0, 1, 2] and inside.is_new.tolist() == [0, 1, 0, 0]
    fresh = plan_lib.layer_map("alternate", 2, 4, fresh=True)
    assert fresh.source.tolist() == [0, -1, 1, -1]
    assert plan_lib.stack_map(0, 3).source.tolist() == [-1, -1, -1]


def _shape(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                kv_channels=16, ffn_hidden_size=128, padded_vocab_size=256, num_experts=4,
                moe_ffn_hidden_size=128)
    base.update(kw)
    return ModelShape(**base)


def test_plan_composes_depth_with_width_and_refuses_bad_depth():
    src, tgt = _shape(), _shape(num_layers=4, moe_ffn_hidden_size=256)
    plan = GrowthPlan.twins(GrowthSpec(src, tgt, depth=DepthOptions("alternate")))
    assert plan.units[layout.Axis.LAYER].source.tolist() == [0, 0, 1, 1]
    assert plan.units[layout.Axis.EXPERT_FFN].new == 256            # width unchanged by depth
    lay = layout.resolve("decoder.layers.mlp.experts.experts.linear_fc1.weight")
    assert plan.new_mask(lay)[1].all() and not plan.new_mask(lay)[0, :, :128].any()
    rnd = GrowthPlan.twins(GrowthSpec(src, tgt, depth=DepthOptions("random")))
    assert rnd.units[layout.Axis.LAYER].source.tolist() == [0, 1, -1, -1]
    bad = [
        (GrowthSpec(src, _shape(num_layers=3), depth=DepthOptions("alternate")), "whole growth"),
        (GrowthSpec(src, tgt, depth=DepthOptions("stack", insert_at=5)), "insert-at 5"),
        (GrowthSpec(_shape(num_layers=0), tgt), "no layer to copy"),
        (GrowthSpec(_shape(moe_layer_freq=[1, 0]), _shape(num_layers=4, moe_layer_freq=[1, 0] * 2),
                    depth=DepthOptions("alternate")), "[1, 1, 0, 0]"),
        (GrowthSpec(src, tgt, depth=DepthOptions("deeper")), "unknown"),
    ]
    for spec, words in bad:
        with pytest.raises(GrowthSpecError, match=r".*" + words.replace("[", r"\[")):
            validate(spec)


def _logits(trainer, model):
    batch = data.to_device(next(data.microbatches(trainer.valid_ds, 0, 1, trainer.args)))
    chunk = model_lib.unwrap(model)[0]
    chunk.eval()
    with torch.no_grad():
        out = chunk(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    chunk.train()
    return out


def _grown_args(args, spec_source, method, layers, insert_at=None, new_state="reset"):
    new = copy.copy(args)
    new.num_layers = layers
    opts = DepthOptions(method, insert_at=insert_at, new_state=new_state)
    if isinstance(args.moe_layer_freq, list):
        probe = GrowthSpec(spec_source, spec_source.replace(num_layers=layers), depth=opts)
        new.moe_layer_freq = plan_lib.grown_moe_pattern(spec_source, plan_lib.plan_layer_map(probe))
    return new, GrowthSpec(spec_source, ModelShape.from_args(new), depth=opts)


def _optimizer_tensors(args, model, optimizer):
    return growth.global_state(args, model, optimizer)


@pytest.mark.parametrize("stack_kind", ["stacked", "per_layer"])
def test_every_depth_method_grows_a_trained_moe_model(corpus_prefix, stack_kind):
    """2 -> 4 layers with every method (MoE layers with router, experts and shared expert; a
    mixed dense/MoE stack stored per layer in the second case): identity keeps the logits,
    the others change the held-out loss by a measured, finite amount; optimizer state grows."""
    flags = dict(moe_shared_expert_intermediate_size=64, train_iters=20, lr_warmup_iters=2)
    if stack_kind == "per_layer":
        flags.update(moe_layer_freq="[1,0]", ffn_hidden_size=96)
    with megatron_run(tiny_moe_flags(corpus_prefix, **flags)) as t:
        t.train()
        src = ModelShape.from_args(t.args)
        sources, step = growth.global_state(t.args, t.model, t.optimizer)
        keys = [k for k in sources if not k.startswith("optimizer.")]
        assert any(layout.layer_of_key(k) is not None for k in keys) == (stack_kind == "per_layer")
        before, logits_before = t.evaluate(), _logits(t, t.model)
        changes = {}
        for method, insert_at, state in [
                ("identity", None, "reset"), ("identity", 1, "reset"), ("stack", None, "reset"),
                ("stack", None, "copy"), ("alternate", None, "reset"),
                ("interpolate", None, "reset"), ("random", None, "reset")]:
            new, spec = _grown_args(t.args, src, method, 4, insert_at, state)
            grow = depth.LayerGrowth.from_spec(spec, depth.FreshInit.from_args(new))
            model, optimizer = growth.build_grown(new, sources, step, grow)
            after = t.evaluate(model=model)
            if state == "reset":
                changes[(method, insert_at)] = after - before
            if method == "identity":
                diff = (_logits(t, model) - logits_before).abs().max().item()
                assert diff < 1e-5, (method, insert_at, diff)
                assert abs(after - before) < 1e-5
            assert math.isfinite(after)
            if method == "stack":
                grown, new_step = _optimizer_tensors(new, model, optimizer)
                assert float(new_step) == float(step) == 20
                _check_state_grown(sources, grown, spec)
        print(f"\n[{stack_kind}] held-out loss {before:.4f} before growth 2 -> 4 layers; change: "
              + ", ".join(f"{m}{'@' + str(i) if i is not None else ''} {d:+.4f}"
                          for (m, i), d in changes.items()))
        # no method may wreck the model: none keeps the function (identity aside), so the bound is
        # a tenth of what training gained over chance (ln 256, an untrained model's loss)
        assert all(abs(d) < 0.1 * (math.log(256) - before) for d in changes.values()), changes


def _check_state_grown(sources, grown, spec):
    """Old layers keep weights and Adam moments; new layers copy their twin's weights and start
    at zero moments (reset) or the twin's (copy), exactly as the layer map says."""
    lmap = plan_lib.plan_layer_map(spec)
    checked = 0
    for key, value in grown.items():
        skey = depth.source_key(key, lmap)
        kind = layout.state_kind(key)
        lay = layout.resolve(layout.split_state_key(key)[1])
        if lay.stacked:
            src = sources[key]
            for i, (s, new) in enumerate(zip(lmap.source.tolist(), lmap.is_new.tolist())):
                reset = new and kind != "param" and spec.depth.new_state == "reset"
                want = torch.zeros_like(src[s]) if reset else src[s]
                torch.testing.assert_close(value[i], want, rtol=0, atol=0)
                checked += 1
        elif lay.layer is not None:
            reset = bool(lmap.is_new[lay.layer]) and kind != "param" and (
                spec.depth.new_state == "reset")
            want = torch.zeros_like(value) if reset else sources[skey]
            torch.testing.assert_close(value, want, rtol=0, atol=0)
            checked += 1
    assert checked > 20


def test_fresh_layers_are_drawn_as_megatron_core_initialises_them(corpus_prefix):
    with megatron_run(tiny_moe_flags(corpus_prefix, num_layers=4, train_iters=2,
                                     lr_warmup_iters=1, moe_shared_expert_intermediate_size=64,
                                     init_method_std=0.05)) as t:
        built = model_global_tensors(model_lib.build_model(t.args, wrap_with_ddp=False))
        fresh = depth.FreshInit.from_args(t.args)
        layer_keys = [k for k in built if layout.resolve(k).stacked]
        assert len(layer_keys) >= 9
        for key in layer_keys:
            lay = layout.resolve(key)
            ours = fresh(key, lay, built[key].shape)
            if lay.kind is layout.Kind.NORM_WEIGHT:
                assert torch.equal(ours, built[key]), key
                continue
            assert abs(ours.mean().item()) < 0.1 * built[key].std().item() + 1e-3, key
            ratio = ours.std().item() / built[key].std().item()
            assert 0.9 < ratio < 1.1, (key, ratio)
            expected = 0.05 / math.sqrt(2 * 4) if depth.writes_residual(lay) else 0.05
            assert abs(ours.std().item() / expected - 1) < 0.1, (key, ours.std().item())
        # the same values for a weight and its fp32 main param (same model key)
        k = "decoder.layers.self_attention.linear_proj.weight"
        assert torch.equal(fresh(k, layout.resolve(k), (2, 64, 64)),
                           fresh("optimizer.state.param." + k, layout.resolve(k), (2, 64, 64)))


def _copy_along_plan(plan, key, tensor, swiglu):
    """Net2Net copy along every element map of the plan (layer axis included)."""
    return element_copy(plan, layout.resolve(key, swiglu), tensor)


@pytest.mark.parametrize("stack_kind", ["stacked", "per_layer"])
def test_width_and_depth_compose_in_one_plan(corpus_prefix, stack_kind):
    """Hidden 2x, expert FFN 2x and 2 -> 4 identity layers in ONE GrowthPlan: copying along the
    plan's element maps (width) then `finish_new_layers` (depth) keeps the logits; with random
    layers the fresh-layer hook fills them."""
    base = dict(train_iters=6, lr_warmup_iters=1, moe_shared_expert_intermediate_size=64)
    if stack_kind == "per_layer":
        base.update(moe_layer_freq="[1,0]", ffn_hidden_size=96)
    with megatron_run(tiny_moe_flags(corpus_prefix, **base)) as t:
        t.train()
        tensors = model_global_tensors(t.model)
        source, before = ModelShape.from_args(t.args), _logits(t, t.model)
        for method in ("identity", "random"):
            wide = copy.copy(t.args)
            wide.hidden_size, wide.kv_channels, wide.num_layers = 128, 16, 4
            wide.moe_ffn_hidden_size, wide.ffn_hidden_size = 256, 2 * t.args.ffn_hidden_size
            wide.moe_shared_expert_intermediate_size = 128
            opts = DepthOptions(method)
            if stack_kind == "per_layer":
                wide.moe_layer_freq = plan_lib.grown_moe_pattern(source, plan_lib.plan_layer_map(
                    GrowthSpec(source, source.replace(num_layers=4), depth=opts)))
            spec = GrowthSpec(source, ModelShape.from_args(wide), "copy", seed=5, depth=opts)
            validate(spec)
            plan = GrowthPlan.twins(spec)
            lmap = plan.units[layout.Axis.LAYER]
            fresh = depth.FreshInit.from_args(wide)
            model = model_lib.build_model(wide)
            targets = model_global_tensors(model)
            # the keys a streaming converter derives without the target model are the model's
            derived = depth.target_keys(tensors, lmap, source, ModelShape.from_args(wide))
            assert set(derived) == set(targets)
            assert all(derived[k] == depth.source_key(k, lmap) for k in derived)
            grown = {}
            for key, like in targets.items():
                skey = depth.source_key(key, lmap)
                if skey is None:                         # a fresh per-layer tensor
                    value = torch.zeros_like(like)
                else:
                    value = _copy_along_plan(plan, skey, tensors[skey], source.swiglu)
                grown[key] = depth.finish_new_layers(key, value, "param", lmap, opts, fresh)
                assert grown[key].shape == like.shape, key
            from megatron_sparkling.live.state import load_model_global_tensors

            load_model_global_tensors(model, grown)
            after = _logits(t, model)
            diff = (after - before).abs().max().item()
            print(f"\n[{stack_kind}] width 2x + depth 2 -> 4 ({method}): max logit change {diff:.2e}")
            if method == "identity":
                assert diff < 1e-4, diff
            else:
                assert math.isfinite(diff) and diff > 1e-4
