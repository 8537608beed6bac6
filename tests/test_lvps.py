"""Apollo's LVPS: the depth sampler follows its formula; a block runs its layers by an index
list (equal to the interpolation-grown model); a short LVPS run with a stage trains."""
import collections
import copy

import pytest
import torch

from conftest import megatron_run, tiny_moe_flags
from megatron_sparkling.operators import depth
from megatron_sparkling.core.spec import DepthOptions, GrowthSpec, ModelShape
from megatron_sparkling.training import data, growth, lvps
from megatron_sparkling.mcore import model as model_lib


def test_lvps_sampler_follows_the_formula():
    # the formula by hand at N = 2, L_max = 8: ratio 4, begin 4.4, end 0.6
    n = (4.4 * 1e-6 - 0.6) / (0.6 - 4.4)
    m = 0.6 * (n + 1)
    assert m / (1e-6 + n) == pytest.approx(4.4) and m / (1 + n) == pytest.approx(0.6)
    probs = lvps.lvps_probabilities(2, 8)
    assert probs.sum().item() == pytest.approx(1.0)
    assert probs[:2].sum() == 0 and (probs[2:] > 0).all()
    # P(L >= k) = P(x <= m N / k - n): check one point against the formula directly
    assert probs[6:].sum().item() == pytest.approx((m * 2 / 6 - n - 1e-6) / (1 - 1e-6))
    # low values first: L = N is the most likely depth, L_max gets the clipped tail
    assert probs[2] == probs[2:].max()
    g = torch.Generator().manual_seed(0)
    draws = collections.Counter(lvps.lvps_depth(2, 8, g) for _ in range(20000))
    assert set(draws) <= set(range(2, 9))
    for k in range(2, 9):
        assert draws[k] / 20000 == pytest.approx(probs[k].item(), abs=0.012), (k, draws)
    print("\nLVPS N=2 L_max=8: P(L=k) " + ", ".join(f"{k}:{probs[k]:.3f}" for k in range(2, 9))
          + "; sampled " + ", ".join(f"{k}:{draws[k] / 20000:.3f}" for k in range(2, 9)))
    assert all(lvps.lvps_depth(4, 4, g) == 4 for _ in range(100))   # N = L_max: no sampling
    assert lvps.interpolation_indices(12, 3) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_a_block_run_by_index_list_equals_the_interpolated_deeper_model(corpus_prefix):
    with megatron_run(tiny_moe_flags(corpus_prefix, train_iters=3, lr_warmup_iters=1,
                                     hidden_dropout=0, attention_dropout=0)) as t:
        t.train()
        batch = data.to_device(next(data.microbatches(t.valid_ds, 0, 1, t.args)))
        chunk = model_lib.unwrap(t.model)[0]
        schedule = lvps.LayerSchedule(chunk.decoder)
        schedule.eval_indices = lvps.interpolation_indices(5, 2)     # [0, 0, 0, 1, 1]
        chunk.eval()
        with torch.no_grad():
            shared = chunk(batch["tokens"], batch["position_ids"], None)
        assert len(chunk.decoder.layers) == 2                          # restored after forward
        deep = copy.copy(t.args)
        deep.num_layers = 5
        spec = GrowthSpec(ModelShape.from_args(t.args), ModelShape.from_args(deep),
                          depth=DepthOptions("interpolate"))
        sources, step = growth.global_state(t.args, t.model, t.optimizer)
        grown, grown_optimizer = growth.build_grown(deep, sources, step, depth.LayerGrowth.from_spec(
            spec, depth.FreshInit.from_args(deep)))
        grown_chunk = model_lib.unwrap(grown)[0]
        grown_chunk.eval()
        with torch.no_grad():
            interpolated = grown_chunk(batch["tokens"], batch["position_ids"], None)
        torch.testing.assert_close(shared, interpolated, rtol=0, atol=1e-5)
        # a layer used three times gets the sum of the three copies' gradients
        for model, optimizer in ((t.model, t.optimizer), (grown, grown_optimizer)):
            model[0].zero_grad_buffer()
            optimizer.zero_grad()    # after a step, fp32 .grad aliases main_grad: drop it
        chunk.train()
        grown_chunk.train()
        schedule.train_indices = [0, 0, 0, 1, 1]
        for model in (chunk, grown_chunk):
            growth.reset_moe_loss_tracker()      # sized by the depth it first sees
            model(batch["tokens"], batch["position_ids"], None,
                  labels=batch["labels"]).float().mean().backward()
        shared_grad = chunk.decoder.layers[0].self_attention.linear_qkv.weight.main_grad
        copies_grad = sum(grown_chunk.decoder.layers[i].self_attention.linear_qkv.weight.main_grad
                          for i in range(3))
        assert shared_grad.abs().sum() > 0
        torch.testing.assert_close(shared_grad, copies_grad, rtol=1e-4, atol=1e-6)
        schedule.remove()


def test_a_short_lvps_run_with_two_stages_trains(corpus_prefix):
    """1 unique layer, then 2 (grown by interpolation in process, distributed optimizer), every
    step at a sampled depth up to 4; evaluation at depth 4."""
    flags = tiny_moe_flags(corpus_prefix, num_layers=4, train_iters=24, lr=3e-3, min_lr=3e-4,
                           lr_warmup_iters=2, sparkling_lvps_unique_layers="1 2",
                           sparkling_lvps_stage_starts=0.5, use_distributed_optimizer=True)
    with megatron_run(_split(flags)) as t:
        hook = t.hooks[0]
        assert t.args.num_layers == 1
        depths = []
        start = t.evaluate()
        for _ in range(24):
            t.train(until_iteration=t.iteration + 1)
            depths.append((t.args.num_layers, hook.last_depth, t.history[-1]["flops"]))
        end = t.evaluate()
    assert [n for n, _, _ in depths] == [1] * 12 + [2] * 12
    assert all(n <= d <= 4 for n, d, _ in depths)
    assert len({d for n, d, _ in depths if n == 1}) > 1                # depth varies per step
    per_iter = [b[2] - a[2] for a, b in zip(depths, depths[1:])]
    by_depth = {d: f for (_, d, _), f in zip(depths[1:12], per_iter[:11])}
    assert all(by_depth[a] < by_depth[b] for a in by_depth for b in by_depth if a < b)
    print(f"\nLVPS run: N 1 -> 2 at iteration 12, sampled depths {[d for _, d, _ in depths]}; "
          f"held-out loss (at depth 4) {start:.4f} -> {end:.4f}")
    assert end < start - 0.5


def _split(flags):
    out = []
    for f in flags:
        out += f.split(" ") if not f.startswith("--") and " " in f else [f]
    return out
