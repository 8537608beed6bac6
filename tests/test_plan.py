"""Unit maps and their element maps (GLU halves, grouped QKV, heads), on a real model."""
import torch

from conftest import megatron_run, tiny_moe_flags
from element_copy import element_copy
from megatron_sparkling.core import layout
from megatron_sparkling.live.state import load_model_global_tensors, model_global_tensors
from megatron_sparkling.core.plan import GrowthPlan, UnitMap, balanced_twins
from megatron_sparkling.core.spec import GrowthSpec, ModelShape, validate


def test_balanced_twins_copy_every_unit_equally_at_integer_factors():
    g = torch.Generator().manual_seed(0)
    m = UnitMap.append(6, 18, balanced_twins(6, 12, g))
    assert m.copies().tolist() == [3] * 6
    assert m.is_new.tolist() == [False] * 6 + [True] * 12
    uneven = UnitMap.append(4, 6, balanced_twins(4, 2, g)).copies()
    assert sorted(uneven.tolist()) == [1, 1, 2, 2]


def _index_copy_growth(plan, key, tensor, swiglu):
    return element_copy(plan, layout.resolve(key, swiglu), tensor)


def test_element_maps_reproduce_the_function_on_every_width_axis(corpus_prefix):
    """Hidden 2x, heads 4->8 with query groups 2->4, expert/dense/shared FFN 2x at once: copying
    along the plan's element maps gives the same loss, so GLU, QKV and head maps are right."""
    base = dict(group_query_attention=True, num_query_groups=2, moe_layer_freq="[1,0]",
                ffn_hidden_size=96, moe_shared_expert_intermediate_size=64, train_iters=4,
                lr_warmup_iters=1)
    wide = dict(base, hidden_size=128, kv_channels=16, num_attention_heads=8, num_query_groups=4,
                moe_ffn_hidden_size=256, ffn_hidden_size=192, moe_shared_expert_intermediate_size=128)
    with megatron_run(tiny_moe_flags(corpus_prefix, **base)) as narrow:
        narrow.train()
        tensors = model_global_tensors(narrow.model)
        source, before = ModelShape.from_args(narrow.args), narrow.evaluate()
    with megatron_run(tiny_moe_flags(corpus_prefix, **wide)) as grown:
        spec = GrowthSpec(source, ModelShape.from_args(grown.args), "copy", seed=3)
        validate(spec)
        plan = GrowthPlan.twins(spec)
        # 2 heads per group before and after: the two new groups hold the new heads
        assert plan.head_map.is_new.view(4, 2).tolist() == [[False, False]] * 2 + [[True, True]] * 2
        load_model_global_tensors(grown.model, {
            k: _index_copy_growth(plan, k, v, source.swiglu) for k, v in tensors.items()})
        after = grown.evaluate()
    assert abs(after - before) < 1e-5, (before, after)
