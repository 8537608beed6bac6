"""Megatron-LM flag names, defaults and derived values; one-line refusals of what cannot run."""
import pytest

from megatron_sparkling.training.arguments import ArgumentError, parse_args, validate_args

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3",
        "--mock-data", "--vocab-size", "100"]


def _args(*extra, world=1):
    return validate_args(parse_args(BASE + list(extra)), world_size=world, gpu=False)


def test_transformer_config_fields_are_flags_with_megatron_names():
    args = parse_args(BASE + ["--moe-router-topk", "4", "--num-experts", "8",
                              "--moe-token-dispatcher-type", "alltoall", "--kv-channels", "32",
                              "--moe-shared-expert-intermediate-size", "96", "--qk-layernorm",
                              "--hidden-dropout", "0.0", "--normalization", "RMSNorm"])
    assert (args.moe_router_topk, args.num_experts, args.moe_token_dispatcher_type) == (
        4, 8, "alltoall")
    assert (args.kv_channels, args.moe_shared_expert_intermediate_size) == (32, 96)
    assert args.qk_layernorm and args.hidden_dropout == 0.0 and args.normalization == "RMSNorm"
    # Megatron-LM's defaults
    fresh = parse_args(BASE)
    assert (fresh.attention_dropout, fresh.init_method_std, fresh.clip_grad, fresh.weight_decay,
            fresh.make_vocab_size_divisible_by, fresh.lr_decay_style, fresh.seed) == (
        0.1, 0.02, 1.0, 0.01, 128, "linear", 1234)


def test_derived_values_follow_megatron_lm():
    args = _args("--swiglu", "--num-experts", "4", "--global-batch-size", "8",
                 "--disable-bias-linear")
    assert args.ffn_hidden_size == int((4 * 64 * 2 / 3) / 64) * 64
    assert args.moe_ffn_hidden_size == args.ffn_hidden_size
    assert args.kv_channels == 16 and args.data_parallel_size == 1
    assert args.lr_decay_iters == 10 and args.transformer_impl == "local"
    assert args.distributed_backend == "gloo" and args.use_cpu_initialization


@pytest.mark.parametrize("extra,world,message", [
    (["--tensor-model-parallel-size", "2", "--num-experts", "4"], 2, "needs --sequence-parallel"),
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], 2, "must be a multiple of"),
    (["--group-query-attention", "--num-query-groups", "3"], 1, "must be divisible by"),
    (["--global-batch-size", "3"], 1, "must be a multiple of"),
    (["--tensor-model-parallel-size", "3"], 2, r"not divisible by TP\*PP\*CP"),
    (["--bf16"], 1, "need a GPU"),
    (["--lr-warmup-iters", "10"], 1, "must be shorter than"),
    (["--num-experts", "4"], 1, "biased linears.*add --disable-bias-linear"),
])
def test_refusals_are_one_line_and_name_the_fix(extra, world, message):
    with pytest.raises(ArgumentError, match=message) as err:
        _args(*extra, world=world)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spelling", ["opt-param", "opt_param"])
def test_megatron_lm_spellings_of_the_scheduler_flags_are_accepted(spelling):
    args = parse_args(BASE + [f"--override-{spelling}-scheduler",
                              f"--use-checkpoint-{spelling}-scheduler"])
    assert args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler
