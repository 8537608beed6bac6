"""The layout table against real megatron-core models: every key known, every size right."""
import dataclasses

import pytest
import torch

from megatron.core.transformer.transformer_config import TransformerConfig

from conftest import megatron_run, tiny_moe_flags
from megatron_sparkling.core import layout
from megatron_sparkling.core.spec import ModelShape
from megatron_sparkling.live.state import load_model_global_tensors, model_global_tensors

# megatron-core 0.16+ (the shared expert's gate; 0.15 has none)
SHARED_EXPERT_GATE = ({"moe_shared_expert_gate": True} if "moe_shared_expert_gate" in {
    f.name for f in dataclasses.fields(TransformerConfig)} else {})

CONFIGS = {
    "moe": {},
    "mixed_dense_moe_shared_gqa": {"moe_layer_freq": "[1,0]", "ffn_hidden_size": 96,
                                   "moe_shared_expert_intermediate_size": 96,
                                   **SHARED_EXPERT_GATE, "qk_layernorm": True,
                                   "group_query_attention": True, "num_query_groups": 2,
                                   "position_embedding_type": "learned_absolute",
                                   "untie_embeddings_and_output_weights": False},
    "dense_gelu": {"num_experts": None, "moe_ffn_hidden_size": None, "moe_router_topk": None,
                   "moe_aux_loss_coeff": None, "swiglu": False, "ffn_hidden_size": 128,
                   "disable_bias_linear": False},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_key_resolves_with_the_model_sizes(corpus_prefix, name):
    with megatron_run(tiny_moe_flags(corpus_prefix, **CONFIGS[name])) as trainer:
        shape = ModelShape.from_args(trainer.args)
        tensors = model_global_tensors(trainer.model)
    assert tensors
    for key, tensor in tensors.items():
        lay = layout.resolve(key, swiglu=shape.swiglu)
        assert len(lay.dims) == tensor.dim(), (key, lay.dims, tensor.shape)
        for size, dim in zip(tensor.shape, lay.dims):
            expected = shape.axis_size(dim.axis)
            if dim.packing is layout.Packing.GLU:
                expected *= 2
            if lay.layer is not None and dim.axis is layout.Axis.LAYER:
                continue
            assert size == expected, (key, dim, size, expected)


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(layout.UnknownTensorError, match="mtp.layers.0.weight"):
        layout.resolve("mtp.layers.0.weight")


def test_optimizer_prefixes_split_off():
    assert layout.split_state_key("optimizer.state.exp_avg.decoder.final_layernorm.weight") == (
        "optimizer.state.exp_avg.", "decoder.final_layernorm.weight")
    assert layout.split_state_key("chained_1.optimizer.state.param.output_layer.weight") == (
        "chained_1.optimizer.state.param.", "output_layer.weight")


def test_global_tensors_round_trip_through_a_fresh_model(corpus_prefix):
    flags = tiny_moe_flags(corpus_prefix, train_iters=3, lr_warmup_iters=1)
    with megatron_run(flags) as trained:
        trained.train()
        tensors = model_global_tensors(trained.model)
        reference = trained.evaluate()
    with megatron_run(flags) as fresh:  # same data order, untrained weights
        assert abs(fresh.evaluate() - reference) > 1e-3
        load_model_global_tensors(fresh.model, tensors)
        assert fresh.evaluate() == pytest.approx(reference, abs=1e-6)
