"""A Transformer Engine MoE checkpoint on a machine without Transformer Engine (issue 16, item 3).

The TE-layout source is made from a REAL CPU checkpoint by megatron-core's own key mapping: the
local spec saves `pre_mlp_layernorm.` under the fused name `mlp.linear_fc1.layer_norm_` (its
`sharded_state_dict_keys_map`), where the TE spec's MoE layer keeps a separate TENorm saved under
its module name; TE's norms and core attention carry `_extra_state` objects (TE 2.x: pickled
bytes in a uint8 tensor). `expand` converts it without TE, and the result loads into the
local-spec model (which asks for the fused name) with the next-iteration loss kept."""
import contextlib
import importlib.util
import inspect
import io
import json
import pickle

import pytest
import torch

from conftest import megatron_run, saved_and_continued, tiny_moe_flags
from megatron_sparkling.cli import main

SAVE_AT, TOTAL = 4, 6
NARROW = dict(train_iters=TOTAL, lr_warmup_iters=2, hidden_dropout=0, attention_dropout=0,
              use_distributed_optimizer=True, dist_ckpt_optim_fully_reshardable=True)
WIDE = dict(NARROW, hidden_size=128, kv_channels=16, moe_ffn_hidden_size=256)
PRE_MLP = "decoder.layers.pre_mlp_layernorm.weight"


def te_renames() -> dict:
    """{local-spec stored name: TE-spec stored name} of a layer's tensors, from megatron-core."""
    from megatron.core.models.gpt import gpt_layer_specs

    keys_map = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=4, normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    specs = inspect.getsource(gpt_layer_specs)   # the TE spec's builders (0.16 and newer)
    # TE fuses the input norm into linear_qkv (TELayerNormColumnParallelLinear): the same name
    # the local spec saves it under; an MoE layer's pre-MLP norm is its own TENorm module
    assert "linear_qkv=backend.column_parallel_layer_norm_linear()" in specs
    assert "pre_mlp_layernorm=backend.layer_norm() if num_experts else IdentityOp" in specs
    assert keys_map["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"
    return {keys_map["pre_mlp_layernorm."]: "pre_mlp_layernorm."}


def te_payload(unique_key: str) -> torch.Tensor:
    """Extra state as TE 2.x stores it: pickled bytes in a uint8 tensor (here naming its unit)."""
    return torch.frombuffer(bytearray(pickle.dumps({"unit": unique_key})), dtype=torch.uint8)


def unit_of(payload) -> str:
    return pickle.loads(payload.numpy().tobytes())["unit"]


def write_te_copy(local_root: str, te_root: str) -> None:
    """The checkpoint a TE-spec run of the same model would have saved (same values)."""
    import copy
    import os

    from megatron_sparkling.checkpoint.base import object_bytes
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.checkpoint.writer import write_torch_dist
    from megatron_sparkling.core import layout

    src = open_checkpoint(local_root)
    renames = te_renames()

    def te_key(key):
        prefix, model_key = layout.split_state_key(key)
        for local, te in renames.items():
            model_key = model_key.replace("decoder.layers." + local, "decoder.layers." + te)
        return prefix + model_key

    names = {te_key(k): k for k in src.dcp.tensors}
    objects = {}
    for unique in src.objects:
        key = unique.split("/shard_")[0]
        objects[unique] = (object_bytes(te_payload(unique)) if layout.is_extra_state(key)
                           else src.read_object_bytes(unique))
    layers = src.args.num_layers
    for module in ("pre_mlp_layernorm", "self_attention.core_attention"):   # TE modules only
        for i in range(layers):
            unique = layout.object_unique_key(f"decoder.layers.{module}._extra_state", (i,),
                                              (layers,))
            objects[unique] = object_bytes(te_payload(unique))
    final = layout.object_unique_key("decoder.final_layernorm._extra_state", (0,), (1,))
    objects[final] = object_bytes(te_payload(final))
    common = dict(src.common, args=copy.copy(src.args))
    common["args"].transformer_impl = "transformer_engine"
    target = os.path.join(te_root, f"iter_{SAVE_AT:07d}")
    os.makedirs(target)
    write_torch_dist(target, {k: src.dcp.tensors[v] for k, v in names.items()},
                     lambda key, layer: src.dcp.read(names[key]), objects, common,
                     progress=False)
    with open(os.path.join(te_root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(SAVE_AT))


@pytest.fixture(scope="module")
def te_source(tmp_path_factory, corpus_prefix):
    """A TE-layout checkpoint at iteration 4 and the losses of iterations 5..6 of the same run."""
    local = str(tmp_path_factory.mktemp("local") / "ckpt")
    continued = saved_and_continued(tiny_moe_flags(corpus_prefix, **NARROW), local, SAVE_AT,
                                    TOTAL)
    te_root = str(tmp_path_factory.mktemp("te") / "ckpt")
    write_te_copy(local, te_root)
    return te_root, continued


@pytest.fixture
def no_transformer_engine(monkeypatch):
    """This machine has none; where one does, the converter is made to act as here."""
    from megatron_sparkling.compat import cpu

    if importlib.util.find_spec("transformer_engine") is not None:
        monkeypatch.setattr(cpu, "have_transformer_engine", lambda: False)
    assert not cpu.have_transformer_engine()


def test_te_copy_has_the_te_names(te_source):
    from megatron_sparkling.checkpoint.source import open_checkpoint

    src = open_checkpoint(te_source[0])
    assert PRE_MLP in src.model_tensors
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" not in src.model_tensors
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in src.model_tensors
    assert f"optimizer.state.exp_avg.{PRE_MLP}" in src.dcp.tensors
    assert "decoder.layers.pre_mlp_layernorm._extra_state/shard_1_2" in src.objects
    assert src.args.transformer_impl == "transformer_engine"


def test_expand_of_a_te_checkpoint_without_te_loads_into_the_local_spec(
        te_source, no_transformer_engine, tmp_path, corpus_prefix):
    """Hidden 2x and expert FFN 2x with `copy` (function preserving) from the TE-layout
    checkpoint: the grown checkpoint keeps TE's names and objects, and a local-spec run loads
    it (asking for the fused name) with the next loss the narrow run's on the same batch."""
    from megatron_sparkling.checkpoint.source import open_checkpoint

    te_root, continued = te_source
    dst = tmp_path / "grown"
    assert main(["expand", "--no-progress", "--load", te_root, "--save", str(dst),
                 "--hidden-size", "128", "--moe-ffn-hidden-size", "256", "--method", "copy"]) == 0
    grown = open_checkpoint(str(dst))
    assert grown.model_tensors[PRE_MLP].shape == (2, 128)
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" not in grown.model_tensors
    assert grown.optimizer.read(PRE_MLP, "exp_avg").shape == (2, 128)
    te_objects = [o for o in grown.objects if "pre_mlp_layernorm" in o or "core_attention" in o
                  or "final_layernorm" in o]
    assert len(te_objects) == 5
    for unique in te_objects:   # TE's own state travels with the checkpoint
        assert unit_of(grown.read_object(unique)) == unique
    with megatron_run(tiny_moe_flags(corpus_prefix, load=str(dst), **WIDE)) as trainer:
        assert trainer.args.transformer_impl == "local" and trainer.iteration == SAVE_AT
        model_keys = set(layout_keys(trainer))
        assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in model_keys
        assert PRE_MLP not in model_keys
        first = trainer.train_step()["lm loss"]
    print(f"\nTE-layout source, expand (copy, 2x hidden and expert FFN) without TE, loaded by "
          f"the local spec: first loss {first:.7f}, narrow run on the same batch "
          f"{continued[0]:.7f}, relative {(first - continued[0]) / continued[0]:+.2e}")
    assert abs(first - continued[0]) / continued[0] < 1e-5
    # `verify` builds both models with the local spec on CPU and loads the TE names into them
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["verify", "--before", te_root, "--after", str(dst), "--json", "--batches",
                     "1", "--data-path", corpus_prefix]) == 0
    report = json.loads(out.getvalue())
    print(f"verify on the TE-layout pair: loss delta {report['loss']['delta']:+.2e}")
    assert abs(report["loss"]["delta"]) < 1e-5


def layout_keys(trainer):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_sparkling.mcore import model as model_lib

    chunk = model_lib.unwrap(trainer.model)[0]
    return [s.key for s in nested_values(chunk.sharded_state_dict())
            if isinstance(s, ShardedTensor)]


def test_expert_count_growth_carries_te_extra_state(te_source, no_transformer_engine, tmp_path):
    """4 -> 8 experts: every new expert's `_extra_state` is its source expert's (TE's FP8
    metadata: TEGroupedMLP's merge refuses a None beside gemm 0's data), and every layer's
    TE norm state is carried."""
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.core import layout
    from megatron_sparkling.core.record import plan_of

    te_root, _ = te_source
    dst = tmp_path / "experts"
    assert main(["expand", "--no-progress", "--load", te_root, "--save", str(dst),
                 "--num-experts", "8", "--moe-router-topk", "4", "--method", "copy"]) == 0
    grown = open_checkpoint(str(dst))
    plan = plan_of(grown.common["sparkling"]["growth"])
    experts = plan.units[layout.Axis.EXPERT]
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1._extra_state"
    for layer in range(2):
        for e in range(8):
            data = grown.read_object(layout.object_unique_key(fc1, (layer, e), (2, 8)))
            assert unit_of(data) == layout.object_unique_key(
                fc1, (layer, int(experts.source[e])), (2, 4))
    norm = "decoder.layers.pre_mlp_layernorm._extra_state"
    assert unit_of(grown.read_object(layout.object_unique_key(norm, (1,), (2,)))) == \
        layout.object_unique_key(norm, (1,), (2,))


def test_fresh_experts_extra_state_in_expand_and_on_load(te_source, no_transformer_engine,
                                                         tmp_path, corpus_prefix, monkeypatch):
    """4 -> 8 experts with `zero` (fresh experts, no source unit): the `_extra_state` of every
    new expert is expert 0's of its layer, written by `expand` and handed to the live model by
    growth on load (which used to keep the live model's own, dropping TE's FP8 history)."""
    from megatron_sparkling.checkpoint.source import open_checkpoint
    from megatron_sparkling.core import layout
    from megatron_sparkling.live import state

    te_root, _ = te_source
    dst = tmp_path / "zero"
    assert main(["expand", "--no-progress", "--load", te_root, "--save", str(dst),
                 "--num-experts", "8", "--method", "zero"]) == 0
    grown = open_checkpoint(str(dst))
    fc2 = "decoder.layers.mlp.experts.experts.linear_fc2._extra_state"
    written = {}
    for layer in range(2):
        for e in range(8):
            unit = unit_of(grown.read_object(layout.object_unique_key(fc2, (layer, e), (2, 8))))
            assert unit == layout.object_unique_key(fc2, (layer, e if e < 4 else 0), (2, 4))
            written[layer, e] = unit

    loaded = []
    fill = state.load_live

    def load_live(args, model, optimizer, filled, **kwargs):   # what growth on load hands over
        loaded.append(filled["model"])
        return fill(args, model, optimizer, filled, **kwargs)

    monkeypatch.setattr(state, "load_live", load_live)
    flags = tiny_moe_flags(corpus_prefix, load=te_root, sparkling_method="zero",
                           **dict(NARROW, num_experts=8))
    with megatron_run(flags) as trainer:
        assert trainer.iteration == SAVE_AT
    (model_state,) = loaded
    for layer in range(2):
        for e in range(8):
            data = model_state[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}."
                               "linear_fc2._extra_state"]
            assert unit_of(data) == written[layer, e]
