"""spec.SIZES is the one table of growable sizes: every consumer follows it.

Each test walks the table, so a row added there and ignored by a consumer (a CLI flag, the load
hook, the relaunch flags, the parallel checks, the plan) fails here.
"""
import dataclasses
from types import SimpleNamespace

import pytest

from megatron_sparkling.checkpoint.expand import Conversion
from megatron_sparkling.cli import expand_parser, expand_request
from megatron_sparkling.core.layout import Axis
from megatron_sparkling.core.plan import GrowthPlan
from megatron_sparkling.core.sizes import PARALLEL_NAMES, SIZES, WIDTH_FIELDS
from megatron_sparkling.core.spec import (GrowthSpecError, ModelShape, ParallelLayout,
                                          _validate_parallel)
from megatron_sparkling.live.load_hook import GROWN_SIZES
from megatron_sparkling.methods.elementwise import WIDTH_PLAN_AXES
from megatron_sparkling.training.arguments import build_parser, parse_args, validate_args

# Every size divisible by 3 (and heads by groups), so one size at a time can be made indivisible.
SHAPE = ModelShape(num_layers=6, hidden_size=48, num_attention_heads=12, num_query_groups=6,
                   kv_channels=4, ffn_hidden_size=96, padded_vocab_size=128, num_experts=6,
                   moe_ffn_hidden_size=96, moe_shared_expert_intermediate_size=48)


def test_rows_name_model_shape_fields_and_megatron_flags():
    fields = {f.name for f in dataclasses.fields(ModelShape)}
    megatron = build_parser()._option_string_actions
    for size in SIZES:
        assert size.field in fields, size
        assert megatron[size.flag].dest == size.field, size   # Megatron-LM's spelling
        assert size.grows in ("width", "units", "depth"), size
    assert len({s.field for s in SIZES}) == len({s.axis for s in SIZES}) == len(SIZES)


def test_expand_takes_every_size_as_a_flag():
    argv = ["--load", "a", "--save", "b"]
    for i, size in enumerate(SIZES):
        argv += [size.flag, str(100 + i)]
    sizes = expand_request(expand_parser().parse_args(argv)).sizes
    assert {s.field: sizes[s.field] for s in SIZES} == {s.field: 100 + i
                                                        for i, s in enumerate(SIZES)}


def test_load_hook_and_width_methods_track_every_width_size():
    widths = [s for s in SIZES if s.grows != "depth"]
    assert GROWN_SIZES == tuple(WIDTH_FIELDS) == tuple(s.field for s in widths)
    assert WIDTH_FIELDS == {s.field: s.label for s in widths}
    assert set(WIDTH_PLAN_AXES) == {s.axis for s in SIZES if s.grows == "width"}


def test_plan_maps_every_plain_axis_in_draw_order():
    drawn = sorted((s for s in SIZES if s.draw is not None), key=lambda s: s.draw)
    assert [s.draw for s in drawn] == list(range(len(drawn)))   # one slot each, none skipped
    assert GrowthPlan.AXES == tuple(s.axis for s in drawn)
    # the rest are heads and query groups, which the plan maps through its group and slot maps
    assert {s.axis for s in SIZES if s.draw is None} == {Axis.HEADS, Axis.QKV}
    for size in drawn:   # a plain axis is stored at the size the field says
        assert SHAPE.axis_size(size.axis) == getattr(SHAPE, size.field), size


@pytest.mark.parametrize("size", [s for s in SIZES if s.divisor], ids=lambda s: s.field)
def test_each_divisor_rule_refuses_an_indivisible_size(size):
    _validate_parallel(SHAPE, ParallelLayout(tensor=3, pipeline=3, expert=3))
    parallel = (ParallelLayout(expert_tensor=3) if size.divisor == "expert_tp"
                else ParallelLayout(**{size.divisor: 3}))
    odd = SHAPE.replace(**{size.field: getattr(SHAPE, size.field) + 1})
    with pytest.raises(GrowthSpecError) as info:
        _validate_parallel(odd, parallel)
    assert str(info.value).startswith(
        f"{size.label}: {getattr(odd, size.field)} is not divisible by the "
        f"{PARALLEL_NAMES[size.divisor]} 3")


def test_relaunch_flags_give_megatron_every_target_size():
    conv = SimpleNamespace(target_shape=SHAPE, source_shape=SHAPE,
                           src=SimpleNamespace(args=SimpleNamespace(group_query_attention=True)),
                           req=SimpleNamespace(save="ckpt", rewarmup_iters=None),
                           parallel=ParallelLayout(), keep_rng=True, optimizer=object(),
                           grown=False)
    flags = Conversion.relaunch_flags(conv)
    assert flags[:2] == ["--load", "ckpt"]
    for size in SIZES:
        assert flags[flags.index(size.flag) + 1] == str(getattr(SHAPE, size.field)), size
    # and Megatron-LM reads them back as the same shape
    args = validate_args(parse_args(flags[2:] + [
        "--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
        "--mock-data", "--vocab-size", "128", "--swiglu", "--disable-bias-linear"]), world_size=1,
        gpu=False)
    back = ModelShape.from_args(args)
    assert {s.field: getattr(back, s.field) for s in SIZES} == {
        s.field: getattr(SHAPE, s.field) for s in SIZES}
