"""The pure width operators (no model): fan-in factors, fills, copies, norms, optimizer rules."""
import math

import pytest
import torch

from megatron_sparkling.core import layout
from megatron_sparkling.methods import Grower
from megatron_sparkling.operators import norms, optimizer, width
from megatron_sparkling.core.plan import UnitMap
from megatron_sparkling.core.spec import GrowthSpec, ModelShape


def twins(old, new, sources):
    return UnitMap.append(old, new, torch.tensor(sources))


@pytest.mark.parametrize("old,new,copy_copy,alpha", [
    (4, 8, True, 0.5),                      # 2x: Net2Net's split
    (4, 6, True, 1 / math.sqrt(2.5)),       # c = 0.5: 1/sqrt(1 + 3c)
    (4, 12, True, 1 / 3),                   # 3x: every unit 3 times
    (4, 10, True, math.sqrt(4 / 26)),       # 2.5x: copies [3, 3, 2, 2], sum k^2 = 26
    (4, 8, False, 1 / math.sqrt(2)),        # random new columns: sqrt(n/n')
    (4, 6, False, math.sqrt(4 / 6)),
    (4, 4, True, 1.0),
])
def test_sparkling_alpha(old, new, copy_copy, alpha):
    umap = UnitMap.append(old, new, torch.arange(new - old) % old) if new > old else (
        UnitMap.identity(old))
    assert width.sparkling_alpha(umap, copy_copy) == pytest.approx(alpha)


def test_alpha_is_the_rms_consistent_factor_for_independent_terms():
    """y = sum_j w_j x_j with iid terms: duplicating half the units and scaling by alpha keeps
    RMS(y) (what the 1 + 3c count assumes)."""
    g = torch.Generator().manual_seed(0)
    n, t = 512, 4000
    w, x = torch.randn(64, n, generator=g), torch.randn(n, t, generator=g)
    umap = twins(n, n + n // 2, torch.randperm(n, generator=g)[: n // 2].tolist())
    w2 = width.scale_along(width.gather(w, [UnitMap.identity(64), umap]), 1,
                           width.sparkling_alpha(umap, True))
    x2 = width.gather(x, [umap, UnitMap.identity(t)])
    ratio = (w2 @ x2).pow(2).mean().sqrt() / (w @ x).pow(2).mean().sqrt()
    assert float(ratio) == pytest.approx(1.0, abs=0.03)


def test_split_factors_and_copies_at_uneven_factors():
    umap = twins(4, 6, [2, 2])
    assert umap.copies().tolist() == [1, 1, 3, 1]
    assert width.split_factors(umap).tolist() == pytest.approx([1, 1, 1 / 3, 1, 1 / 3, 1 / 3])
    assert width.copy_index(umap).tolist() == [0, 0, 0, 0, 1, 2]
    assert width.integer_factor(umap) is None
    assert width.integer_factor(twins(2, 6, [1, 0, 0, 1])) == 3


def test_gather_keeps_old_copies_twins_and_fills_fresh():
    w = torch.arange(12.0).view(3, 4)
    rows, cols = twins(3, 4, [1]), UnitMap.append(4, 6)  # one twin row, two fresh columns
    grown = width.gather(w, [rows, cols])
    assert torch.equal(grown[:3, :4], w) and torch.equal(grown[3, :4], w[1])
    fresh = width.axis_mask([rows, cols], fresh=True)
    assert fresh.sum() == 2 * 4 and not fresh[:, :4].any()
    width.fill_fresh(grown, fresh, "zeros", w, [rows, cols])
    assert not grown[:, 4:].any()
    # the input is never aliased
    same = width.gather(w, [UnitMap.identity(3), UnitMap.identity(4)])
    same += 1
    assert w[0, 0] == 0


@pytest.mark.parametrize("shape,dim", [((3, 5, 40), 2), ((3, 40, 5), 1), ((40, 70), 1),
                                       ((40, 70), 0), ((40,), 0), ((2, 40, 3, 2), 1)])
def test_select_along_is_index_select_whatever_the_runs(shape, dim):
    """The fast gather (runs copied as slices, the rest indexed) against index_select itself,
    on every kind of source map: appended twins, tiled, interleaved, reversed, random, long
    and short runs mixed, and no growth at all."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g)
    n = shape[dim]
    maps = {"appended": torch.cat([torch.arange(n), torch.randint(0, n, (n,), generator=g)]),
            "tiled": torch.arange(3 * n) % n, "interleaved": torch.arange(2 * n) // 2,
            "reversed": torch.arange(n).flip(0), "random": torch.randint(0, n, (n,), generator=g),
            "runs mixed": torch.cat([torch.arange(5, 17), torch.tensor([3, 0, 9]),
                                     torch.arange(20, 40), torch.tensor([1])]) % n,
            "identity": torch.arange(n)}
    for name, index in maps.items():
        got = width.select_along(t, dim, index)
        assert got.is_contiguous() and torch.equal(got, t.index_select(dim, index)), name


def test_empirical_and_normal_fills_follow_each_unit_slice():
    g = torch.Generator().manual_seed(1)
    w = torch.stack([torch.randn(8, 16, generator=g) * 0.01, torch.randn(8, 16, generator=g) * 5])
    maps = [UnitMap.identity(2), UnitMap.identity(8), UnitMap.append(16, 32)]
    fresh = width.axis_mask(maps, fresh=True)
    emp = width.gather(w, maps)
    width.fill_fresh(emp, fresh, "empirical", w, maps, unit_dims=1, generator=g)
    assert set(emp[0, :, 16:].flatten().tolist()) <= set(w[0].flatten().tolist())
    assert set(emp[1, :, 16:].flatten().tolist()) <= set(w[1].flatten().tolist())
    nrm = width.gather(w, maps)
    width.fill_fresh(nrm, fresh, "normal", w, maps, unit_dims=1, generator=g)
    assert float(nrm[0, :, 16:].std()) == pytest.approx(float(w[0].std()), rel=0.3)
    assert float(nrm[1, :, 16:].std()) == pytest.approx(float(w[1].std()), rel=0.3)


def test_cancelling_noise_vanishes_on_copied_inputs():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(5, 4, generator=g), torch.randn(4, 7, generator=g)
    umap = UnitMap.append(4, 8, torch.arange(4))
    split = width.scale_along(width.gather(w, [UnitMap.identity(5), umap]), 1,
                              width.split_factors(umap))
    noisy = split + width.cancelling_noise(split.shape, 1, umap, 0.3, g)
    assert not torch.allclose(noisy, split)
    x2 = width.gather(x, [umap, UnitMap.identity(7)])
    assert torch.allclose(noisy @ x2, w @ x, atol=1e-5)


def test_block_diagonal_mask_pairs_copies():
    out, inp = UnitMap.append(2, 4, torch.arange(2)), UnitMap.append(3, 6, torch.arange(3))
    block = width.block_diagonal_mask(out, inp)
    assert block.int().tolist() == [[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 0, 1, 1, 1]] * 2


def test_fold_scale_and_zero_centred_gains():
    g = torch.tensor([1.0, 2.0])
    assert norms.fold_scale(g, 0.5).tolist() == [0.5, 1.0]
    stored = g - 1  # --apply-layernorm-1p stores gain - 1
    assert (norms.fold_scale(stored, 0.5, zero_centered=True) + 1).tolist() == [0.5, 1.0]
    assert norms.fold_scale(torch.tensor([0.2]), torch.tensor([0.5]), True, is_bias=True) == 0.1
    grown = norms.grow_gain(g, [UnitMap.append(2, 3)], "identity", zero_centered=True)
    assert grown.tolist() == [1.0, 2.0, 0.0]


@pytest.mark.parametrize("rms", [True, False])
def test_masked_norm_is_the_norm_at_1_and_the_small_norm_at_0(rms):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=g)
    weight, bias = torch.randn(8, generator=g), torch.randn(8, generator=g)
    is_new = torch.arange(8) >= 6
    norm = torch.nn.RMSNorm(8, eps=1e-5) if rms else torch.nn.LayerNorm(8, eps=1e-5)
    small = torch.nn.RMSNorm(6, eps=1e-5) if rms else torch.nn.LayerNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        small.weight.copy_(weight[:6])
        if not rms:
            norm.bias.copy_(bias)
            small.bias.copy_(bias[:6])
    b = None if rms else bias
    full = norms.masked_norm(x, weight, b, 1e-5, torch.ones(8), rms)
    assert torch.allclose(full, norm(x), atol=1e-6)
    x0 = x.clone()
    x0[:, 6:] = 0  # new coordinates are zero at mask 0
    zero = norms.masked_norm(x0, weight, b, 1e-5, (~is_new).float(), rms)
    assert torch.allclose(zero[:, :6], small(x[:, :6]), atol=1e-6)
    assert not zero[:, 6:].any()


def test_optimizer_rules():
    s = torch.arange(1.0, 7.0).view(2, 3)
    maps = [UnitMap.append(2, 4, torch.tensor([1, 0])), UnitMap.identity(3)]
    reset = optimizer.grow_state(s, maps, "exp_avg", "reset_new")
    assert torch.equal(reset[:2], s) and not reset[2:].any()
    copied = optimizer.grow_state(s, maps, "exp_avg_sq", "copy")
    assert torch.equal(copied[2], s[1]) and torch.equal(copied[3], s[0])
    assert not optimizer.grow_state(s, maps, "momentum", "zero_all").any()
    m = optimizer.grow_state(s, maps, "exp_avg", "staged", scale=0.5)
    v = optimizer.grow_state(s, maps, "exp_avg_sq", "staged", scale=0.5)
    assert torch.equal(m, copied / 2) and torch.equal(v, copied / 4)
    with pytest.raises(ValueError, match="fp32 main params follow the weight rule"):
        optimizer.grow_state(s, maps, "param", "copy")


RMS_SHAPE = ModelShape(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=4,
                       kv_channels=4, ffn_hidden_size=16, padded_vocab_size=24, num_experts=2,
                       moe_ffn_hidden_size=8, moe_shared_expert_intermediate_size=8,
                       tied_embeddings=False)
RMS_LINEARS = [f"decoder.layers.{k}.weight" for k in (
    "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
    "mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2", "mlp.router",
    "mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")] + [
    "decoder.layers.mlp.shared_experts.gate_weight", "output_layer.weight"]


def _balanced_signs(shape, generator) -> torch.Tensor:
    """+-1 with every column (dim -2) half + and half -: every W_ri^2 equals its iid expectation
    (so a function of the squares IS its expectation over iid weights) and each slice has mean 0
    and std 1 exactly."""
    rows = shape[-2]
    signs = torch.ones(rows)
    signs[rows // 2:] = -1
    flat = torch.stack([signs[torch.randperm(rows, generator=generator)]
                        for _ in range(math.prod(shape) // rows)])
    return flat.view(*shape[:-2], shape[-1], rows).transpose(-1, -2).contiguous()


def expected_rms_ratio(w, grown, in_dim, in_map, fresh_mask):
    """E[RMS(y')/RMS(x')] / E[RMS(y)/RMS(x)] over iid unit inputs (fresh inputs independent,
    same RMS) and iid weights, computed exactly: E|W'x'|^2 = |W'C|_F^2 with C the input copy
    matrix (copies of one old input add up), fresh elements by their expectation
    alpha^2 std(W)^2 (the random fill's N(0, std^2), std 1 here); W is +-1 (`_balanced_signs`)."""
    old_cols = in_map.source >= 0
    alpha = float(grown.movedim(in_dim, -1)[..., : in_map.old].reshape(-1)[0]
                  / w.movedim(in_dim, -1).reshape(-1)[0])
    g = grown.masked_fill(fresh_mask, 0.0).movedim(in_dim, -1)
    copy = torch.zeros(in_map.new, in_map.old)
    copy[old_cols.nonzero().flatten(), in_map.source[old_cols]] = 1.0
    collapsed = (g @ copy).pow(2).sum() + alpha ** 2 * fresh_mask.sum()
    rows_new, rows_old = grown.numel() // in_map.new, w.numel() // in_map.old
    return math.sqrt((collapsed / rows_new) / (w.pow(2).sum() / rows_old))


@pytest.mark.parametrize("new_units", ["copy", "random"])
@pytest.mark.parametrize("factor", [1.25, 1.5, 2, 2.5, 3])
def test_sparkling_keeps_every_linear_rms_ratio_exactly_at_any_factor(factor, new_units):
    """Every width axis grown by `factor` at once: the expected RMS(y)/RMS(x) of every linear
    over iid weights and inputs, computed exactly (`expected_rms_ratio`), is kept to 1e-6."""
    s = RMS_SHAPE
    heads = int(s.num_attention_heads * factor)
    target = s.replace(hidden_size=int(s.hidden_size * factor), num_attention_heads=heads,
                       num_query_groups=heads, ffn_hidden_size=int(s.ffn_hidden_size * factor),
                       moe_ffn_hidden_size=int(s.moe_ffn_hidden_size * factor),
                       moe_shared_expert_intermediate_size=int(
                           s.moe_shared_expert_intermediate_size * factor))
    grower = Grower(GrowthSpec(s, target, "sparkling", 3, {"new_units": new_units}))
    gen = torch.Generator().manual_seed(0)
    for key in RMS_LINEARS:
        lay = grower.layout(key)
        maps = grower.plan.tensor_maps(lay)
        in_dim = next(d for d, dim in enumerate(lay.dims) if dim.role is layout.Role.IN)
        w = _balanced_signs([m.old for m in maps], gen)
        grown = grower.grow(key, w)
        fresh = width.axis_mask(maps, fresh=True)
        fresh = torch.zeros_like(grown, dtype=torch.bool) if fresh is None else fresh
        ratio = expected_rms_ratio(w, grown, in_dim, maps[in_dim], fresh)
        assert ratio == pytest.approx(1.0, abs=1e-6), (key, factor, new_units, ratio)


SHAPE = ModelShape(num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=2,
                   kv_channels=4, ffn_hidden_size=16, padded_vocab_size=32, num_experts=2,
                   moe_ffn_hidden_size=8, tied_embeddings=False)


def test_weights_and_fp32_main_params_draw_the_same_fresh_values():
    grower = Grower(GrowthSpec(SHAPE, SHAPE.replace(hidden_size=12), "sparkling", 5,
                               {"new_units": "random"}))
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    w = torch.randn(2, 2, 16, 8)
    a = grower.grow(key, w)
    b = grower.grow("optimizer.state.param." + key, w)
    assert torch.equal(a, b) and a.shape == (2, 2, 16, 12)
    with pytest.raises(ValueError, match="holds 'exp_avg' state, not 'param'"):
        grower.grow("optimizer.state.exp_avg." + key, w, "param")


def test_state_kinds_and_object_keys():
    assert layout.state_kind("chained_1.optimizer.state.exp_avg_sq.output_layer.weight") == (
        "exp_avg_sq")
    assert layout.state_kind("optimizer.state.fp32_param.output_layer.weight") == "param"
    assert layout.state_kind("optimizer.state.momentum_buffer.output_layer.weight") == "momentum"
    assert layout.state_kind("output_layer.weight") == "param"
    key = "decoder.layers.mlp.experts.experts.linear_fc2._extra_state"
    assert layout.object_axes(key) == (layout.Axis.LAYER, layout.Axis.EXPERT)
    assert layout.split_object_key(key + "/shard_1.3_2.4") == (key, (1, 3), (2, 4))
    assert layout.object_axes("decoder.layers.0.self_attention.linear_qkv._extra_state") == (
        layout.Axis.ONE,)


def test_stacked_extra_state_grows_along_layers_and_experts():
    grower = Grower(GrowthSpec(SHAPE, SHAPE.replace(num_experts=4, moe_router_topk=4), "copy"))
    key = "decoder.layers.mlp.experts.experts.linear_fc1._extra_state"
    objects = {layout.object_unique_key(key, (l, e), (2, 2)): f"{l}{e}"
               for l in range(2) for e in range(2)}
    grown = grower.grow_objects(key, objects)
    experts = grower.plan.units[layout.Axis.EXPERT]
    assert len(grown) == 8
    for l in range(2):
        for e in range(4):
            assert grown[layout.object_unique_key(key, (l, e), (2, 4))] == (
                f"{l}{int(experts.source[e])}")


def test_fresh_units_extra_state_is_a_copy_of_unit_0():
    """`zero` grows experts with no source unit; each still gets real `_extra_state` bytes (unit
    0's of its layer, deep-copied): TE's grouped-linear load refuses a None beside gemm 0's FP8
    state. Payloads as TE stores them: io.BytesIO (TE 1.x) and a uint8 byte tensor (TE 2.x)."""
    import io
    import pickle

    grower = Grower(GrowthSpec(SHAPE, SHAPE.replace(num_experts=4), "zero"))
    experts = grower.plan.units[layout.Axis.EXPERT]
    assert experts.source.tolist() == [0, 1, -1, -1]
    key = "decoder.layers.mlp.experts.experts.linear_fc1._extra_state"
    for make, read in ((lambda b: io.BytesIO(b), lambda o: o.getvalue()),
                       (lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8),
                        lambda o: o.numpy().tobytes())):
        objects = {layout.object_unique_key(key, (l, e), (2, 2)): make(pickle.dumps((l, e)))
                   for l in range(2) for e in range(2)}
        grown = grower.grow_objects(key, objects)
        for l in range(2):
            for e in range(4):
                data = grown[layout.object_unique_key(key, (l, e), (2, 4))]
                assert pickle.loads(read(data)) == (l, e if e < 2 else 0)
                assert all(data is not o for o in objects.values())


def test_fresh_layers_need_a_depth_rule_and_get_it():
    from megatron_sparkling.methods import get_method
    from megatron_sparkling.core.spec import GrowthSpecError

    spec = GrowthSpec(SHAPE, SHAPE.replace(num_layers=3), "sparkling")
    method = get_method("sparkling")
    method.layer_map = UnitMap.append(2, 3)          # layer 2 has no source
    with pytest.raises(GrowthSpecError, match="number of layers: sparkling copies layers but "
                                              r"layers \[2\] have no source"):
        Grower(spec, method)
    calls = []

    def identity_layer(key, kind, lay, grown, dim, fresh):
        calls.append((key, kind, fresh.tolist()))
        grown.select(dim, int(fresh[0])).zero_()

    method.fresh_layer_rule = identity_layer
    grower = Grower(spec, method)
    key = "decoder.layers.self_attention.linear_proj.weight"
    w = torch.randn(2, 8, 8)
    grown = grower.grow(key, w)
    assert torch.equal(grown[:2], w) and not grown[2].any()
    assert calls == [(key, "param", [2])]
    assert grower.plan.new_mask(grower.layout(key))[2].all() and not grower.plan.new_mask(grower.layout(key))[:2].any()


@pytest.mark.parametrize("tied", [False, True])
def test_zero_draws_incoming_weights_as_megatron_inits_and_zeroes_outgoing(tied):
    """zero, hidden and FFN grown: a new unit's incoming rows are N(0, sigma^2) (sigma 0.02;
    sigma / sqrt(2 L) for fc2, as megatron-core's output_layer_init_method), its outgoing
    columns zero; tied embeddings: the final norm's new gains are the outgoing side (zero)."""
    shape = RMS_SHAPE.replace(num_layers=4, hidden_size=64, moe_ffn_hidden_size=64,
                              tied_embeddings=tied)
    target = shape.replace(hidden_size=128, moe_ffn_hidden_size=128)
    grower = Grower(GrowthSpec(shape, target, "zero", 2))
    fc1, fc2 = ("decoder.layers.mlp.experts.experts.linear_fc1.weight",
                "decoder.layers.mlp.experts.experts.linear_fc2.weight")
    w1 = grower.grow(fc1, torch.ones(4, 2, 128, 64))       # (L, E, 2f, h)
    w2 = grower.grow(fc2, torch.ones(4, 2, 64, 64))        # (L, E, h, f)
    assert not w1[..., 64:].any() and not w2[..., 64:].any()   # outgoing: zero
    assert torch.equal(w1[:, :, :64, :64], torch.ones(4, 2, 64, 64))   # old kept
    for drawn, std in ((w1[:, :, 64:128, :64], 0.02), (w2[:, :, 64:, :64], 0.02 / math.sqrt(8))):
        # sampling error of a std over n draws: about std / sqrt(2n) (n = 16384 here: 0.6%)
        assert float(drawn.std()) == pytest.approx(std, rel=0.03)
    gains = grower.grow("decoder.final_layernorm.weight", torch.ones(64))
    assert torch.equal(gains[64:], torch.zeros(64) if tied else torch.ones(64))


def test_keep_old_is_gather_with_every_new_element_zeroed():
    """SPARKLING's moment reset without copying what it zeroes, against its definition; the
    old elements in one block, in two (moved, as in a fused layout), twins and fresh units."""
    g = torch.Generator().manual_seed(0)
    moved = UnitMap(4, 8, torch.tensor([0, 1, -1, 3, 2, 0, 1, 2]),
                    torch.tensor([False, False, True, False, False, True, True, True]))
    for maps in ([twins(3, 6, [0, 2, 1]), UnitMap.identity(4)],
                 [UnitMap.identity(5), UnitMap.append(4, 8)],
                 [twins(3, 5, [1, 1]), twins(4, 6, [3, -1])],
                 [moved, twins(2, 3, [1])],
                 [UnitMap.identity(3), UnitMap.identity(2)]):
        t = torch.randn([m.old for m in maps], generator=g)
        expected = width.gather(t, maps)
        new = width.axis_mask(maps, fresh=False)
        if new is not None:
            expected.masked_fill_(new, 0.0)
        assert torch.equal(width.keep_old(t, maps), expected)
