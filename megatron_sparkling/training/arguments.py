"""Command-line arguments with Megatron-LM's flag names, defaults and meanings.

Megatron-LM's `megatron.training.arguments` is not part of the megatron-core wheel, so the
pre-training script parses its own. Two sources of flags:
- every field of megatron-core's `TransformerConfig` (which includes `ModelParallelConfig`) becomes
  a flag the way Megatron-LM derives it (`--field-name`; booleans that default to True get
  `--no-field-name`), so model flags match Megatron-LM's exactly and flow into the config by name;
- the training, data, optimizer, scheduler and checkpoint flags are declared here by hand, with
  Megatron-LM's names and defaults.
`parse_args(extra_args_provider=...)` takes a function that adds flags, as Megatron-LM's does.
The parsed namespace is stored in every checkpoint as `args`, as Megatron-LM stores its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import typing
from types import UnionType
from typing import Callable, Optional

import torch

from megatron_sparkling.compat.megatron_lm import BIASED_MOE

# TransformerConfig fields that get no generated flag: callables, fields Megatron-LM spells or
# defaults differently (declared by hand below), and fields derived from other flags.
_NOT_GENERATED = {
    "timers", "finalize_model_grads_func", "grad_scale_func", "no_sync_func", "grad_sync_func",
    "param_sync_func", "_cpu_offloading_context", "init_method", "output_layer_init_method",
    "embedding_init_method", "activation_func", "pipeline_model_parallel_layout", "window_size",
    "window_attn_skip_freq", "no_rope_freq", "moe_layer_freq", "linear_attention_freq",
    "moe_router_load_balancing_type", "moe_aux_loss_coeff", "cp_comm_type", "cuda_graph_scope",
    "virtual_pipeline_model_parallel_size", "params_dtype", "enable_autocast", "autocast_dtype",
    "pipeline_dtype", "variable_seq_lengths", "batch_p2p_comm", "batch_p2p_sync",
    "deallocate_pipeline_outputs", "num_layers_in_first_pipeline_stage",
    "num_layers_in_last_pipeline_stage", "softmax_scale", "gated_linear_unit",
    "bias_activation_fusion", "num_moe_experts", "fp8_param", "gradient_accumulation_fusion",
    "overlap_p2p_comm", "attention_softmax_in_fp32", "masked_softmax_fusion",
    "persist_layer_norm", "bias_dropout_fusion", "apply_rope_fusion", "heterogeneous_block_specs",
    "hetereogenous_dist_checkpoint", "quant_recipe", "inference_sampling_seed", "test_mode",
    "use_kitchen", "moe_token_dropping",
}


def _flag(name: str, prefix: str = "") -> str:
    return "--" + (prefix + "_" + name if prefix else name).replace("_", "-")


def flags_to_argv(flags: dict) -> list:
    """Megatron-LM command-line flags from {args field: value}: True is a bare flag, None and
    False leave the flag out."""
    argv = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(_flag(name))
        if value is not True:
            argv.append(str(value))
    return argv


def _argparse_type(tp) -> Optional[dict]:
    """argparse kwargs for a dataclass field type, or None where argparse cannot express it."""
    origin, inner = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": lambda s, e=tp: e[s], "choices": list(tp)}
    if origin is None:
        return {"type": tp} if tp in (int, float, str, bool) else None
    if origin in (typing.Union, UnionType):
        if len(inner) == 2 and inner[1] is type(None):
            return _argparse_type(inner[0])
        return None
    if origin is list and len(inner) == 1:
        kw = _argparse_type(inner[0])
        return None if kw is None else {**kw, "nargs": "+"}
    if origin is typing.Literal:
        return {"type": type(inner[0]), "choices": inner}
    return None


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: set, title: str) -> None:
    group = parser.add_argument_group(title)
    taken = {a.dest for a in parser._actions}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or f.name in taken:
            continue
        kw = _argparse_type(f.type)
        if kw is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kw.get("type") is bool:
            if default:
                group.add_argument(_flag(f.name, "no"), _flag(f.name, "disable"),
                                   dest=f.name, action="store_false")
            else:
                group.add_argument(_flag(f.name), dest=f.name, action="store_true")
            continue
        group.add_argument(_flag(f.name), dest=f.name, default=default, **kw)


def _int_or_list(text: str):
    """`--moe-layer-freq 2` or `--moe-layer-freq "[1,0,1,0]"` (Megatron-LM's moe_freq_type)."""
    text = text.strip()
    if text.startswith("["):
        value = eval(text, {"__builtins__": {}})  # a literal list pattern such as "[1,0]*2"
        return [int(v) for v in value]
    return int(text)


def _add_model_flags(parser):
    g = parser.add_argument_group("network size (not in TransformerConfig)")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "none"])
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--rotary-seq-len-interpolation-factor", type=int, default=None)
    g.add_argument("--use-rope-scaling", action="store_true")
    g.add_argument("--no-position-embedding", action="store_false", dest="add_position_embedding")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--squared-relu", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-layer-freq", type=_int_or_list, default=1)
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"])
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--transformer-impl", default=None, choices=["local", "transformer_engine"],
                   help="Megatron-LM's default is transformer_engine; here it is transformer_engine "
                        "when Transformer Engine is importable and a GPU is present, else local.")
    g.add_argument("--spec", default=None, help="Unsupported here (a custom layer spec module).")
    # Flags whose Megatron-LM default differs from TransformerConfig's (fusions need CUDA).
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false",
                   dest="gradient_accumulation_fusion")
    g.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion")
    g.add_argument("--no-bias-dropout-fusion", action="store_false", dest="bias_dropout_fusion")
    g.add_argument("--no-bias-swiglu-fusion", action="store_false", dest="bias_swiglu_fusion")
    g.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion")
    g.add_argument("--no-persist-layer-norm", action="store_true")
    g.add_argument("--apply-rope-fusion", action="store_true")
    g.add_argument("--no-rope-fusion", action="store_false", dest="apply_rope_fusion")
    g.add_argument("--attention-softmax-in-fp32", action="store_true")
    g.add_argument("--overlap-p2p-comm", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, dest="layernorm_epsilon")


def _add_training_flags(parser):
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--skip-train", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--data-parallel-random-init", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true")
    g.add_argument("--calculate-per-token-loss", action="store_true")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false",
                   dest="check_for_nan_in_loss_and_grad")
    g.add_argument("--check-for-large-grads", action="store_true")
    g.add_argument("--log-throughput", action="store_true")
    g.add_argument("--log-params-norm", action="store_true")
    g.add_argument("--log-num-zeros-in-grad", action="store_true")
    g.add_argument("--timing-log-level", type=int, default=0, choices=range(0, 3))
    g.add_argument("--wandb-project", default="")
    g.add_argument("--wandb-exp-name", default="")
    g.add_argument("--wandb-save-dir", default="")
    g.add_argument("--tensorboard-dir", default=None)


def _add_optimizer_flags(parser):
    g = parser.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--decoupled-lr", type=float, default=None)
    g.add_argument("--decoupled-min-lr", type=float, default=None)
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=["exponential", "linear", "cosine", "minus_sqrt"])
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    # Megatron-LM spells these two "--...-opt_param-scheduler"; both spellings are accepted.
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                   action="store_true")
    g.add_argument("--use-checkpoint-opt-param-scheduler",
                   "--use-checkpoint-opt_param-scheduler", action="store_true")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", default="constant",
                   choices=["constant", "linear", "cosine"])
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--ddp-bucket-size", type=int, default=None)
    g.add_argument("--ddp-num-buckets", type=int, default=None)
    g.add_argument("--ddp-average-in-collective", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)


def _add_distributed_flags(parser):
    g = parser.add_argument_group("distributed")
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                   help="Megatron-LM's default is nccl; here nccl with a GPU, else gloo.")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--use-cpu-initialization", action="store_true", default=None)
    g.add_argument("--local-rank", type=int, default=int(os.getenv("LOCAL_RANK", "0")))


def _add_checkpoint_flags(parser):
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", "--persistent-save-interval", type=int, default=None)
    g.add_argument("--no-save-optim", action="store_true", default=None)
    g.add_argument("--no-save-rng", action="store_true", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--no-load-optim", action="store_true", default=None)
    g.add_argument("--no-load-rng", action="store_true", default=None)
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--pretrained-checkpoint", default=None)
    g.add_argument("--ckpt-step", type=int, default=None)
    g.add_argument("--exit-on-missing-checkpoint", action="store_true")
    g.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist"],
                   help="Only torch_dist is written (Megatron-LM's default).")
    g.add_argument("--auto-detect-ckpt-format", action="store_true")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="Store distributed-optimizer state in model space (loads at any TP/PP/DP).")
    g.add_argument("--ckpt-fully-parallel-save", action="store_true")
    g.add_argument("--ckpt-fully-parallel-load", action="store_true")
    g.add_argument("--dist-ckpt-strictness", default="assume_ok_unexpected",
                   choices=["assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected",
                            "raise_all", "return_unexpected", "return_all", "ignore_all"])


def _add_data_flags(parser):
    g = parser.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None)
    g.add_argument("--split", default=None)
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--no-mmap-bin-files", action="store_false", dest="mmap_bin_files")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--no-create-attention-mask-in-dataloader", action="store_false",
                   dest="create_attention_mask_in_dataloader")
    g.add_argument("--tokenizer-type", default=None,
                   choices=["ByteLevelTokenizer", "NullTokenizer"],
                   help="ByteLevelTokenizer: megatron-core's byte-level tokenizer (no files).")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None)


def build_parser(extra_args_provider: Optional[Callable] = None) -> argparse.ArgumentParser:
    from megatron.core.transformer.transformer_config import TransformerConfig

    parser = argparse.ArgumentParser(description="megatron_sparkling pre-training (Megatron-LM flags)",
                                     allow_abbrev=False)
    _add_model_flags(parser)
    _add_training_flags(parser)
    _add_optimizer_flags(parser)
    _add_distributed_flags(parser)
    _add_checkpoint_flags(parser)
    _add_data_flags(parser)
    _add_dataclass_flags(parser, TransformerConfig, _NOT_GENERATED, "transformer configuration")
    if extra_args_provider is not None:
        parser = extra_args_provider(parser) or parser
    return parser


def query_groups(args) -> int:
    """Query groups the model really has (Megatron-LM keeps --num-query-groups only with GQA)."""
    return args.num_query_groups if args.group_query_attention else args.num_attention_heads


class ArgumentError(ValueError):
    """A flag combination that cannot run; the message names the flag and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


def parse_args(argv=None, extra_args_provider: Optional[Callable] = None,
               ignore_unknown_args: bool = False) -> argparse.Namespace:
    parser = build_parser(extra_args_provider)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    return args


# megatron-core's Float16 optimizer runs on CPU through compat/cpu.py's bridges (tests load
# bf16 checkpoints with it), but CPU bf16/fp16 is slow and no user's aim: refused unless set
CPU_HALF_PRECISION = False


def validate_args(args: argparse.Namespace, world_size: int, gpu: bool,
                  have_te: bool = False) -> argparse.Namespace:
    """Fill the derived values Megatron-LM's validate_args fills, and refuse what cannot run."""
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "micro_batch_size", "train_iters", "lr"):
        _require(getattr(args, name) not in (None, 0), f"--{name.replace('_', '-')} is required")
    args.world_size = world_size
    args.rank = int(os.getenv("RANK", "0"))
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    _require(args.max_position_embeddings >= args.seq_length,
             "--max-position-embeddings must be at least --seq-length")
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if (gpu and have_te) else "local"
    _require(args.transformer_impl == "local" or have_te,
             "--transformer-impl transformer_engine needs Transformer Engine installed "
             "(pip install megatron-sparkling[gpu]); use --transformer-impl local")
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if gpu else "gloo"
    if args.use_cpu_initialization is None:
        args.use_cpu_initialization = not gpu
    if not gpu:
        _require(CPU_HALF_PRECISION or not (args.bf16 or args.fp16),
                 "--bf16/--fp16 need a GPU here (CPU runs are fp32); drop the flag")
        # Fused kernels are CUDA (apex / TE) only.
        args.gradient_accumulation_fusion = False
        args.masked_softmax_fusion = False
        args.bias_dropout_fusion = False
        args.bias_swiglu_fusion = False
        args.bias_gelu_fusion = False
        args.apply_rope_fusion = False
        args.no_persist_layer_norm = True
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.half if args.fp16 else torch.float
    if args.bf16:
        args.accumulate_allreduce_grads_in_fp32 = True

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    model_parallel = tp * pp * cp
    _require(world_size % model_parallel == 0,
             f"world size {world_size} is not divisible by TP*PP*CP = {model_parallel}; "
             "launch a multiple of that many processes")
    args.data_parallel_size = world_size // model_parallel
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    per_step = args.micro_batch_size * args.data_parallel_size
    _require(args.global_batch_size % per_step == 0,
             f"--global-batch-size {args.global_batch_size} must be a multiple of "
             f"--micro-batch-size x data-parallel size = {per_step}")
    _require(args.num_layers % pp == 0,
             f"--num-layers {args.num_layers} must be divisible by "
             f"--pipeline-model-parallel-size {pp}")

    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = (int((4 * args.hidden_size * 2 / 3) / 64) * 64 if args.swiglu
                                else 4 * args.hidden_size)
    if args.kv_channels is None:
        _require(args.hidden_size % args.num_attention_heads == 0,
                 "--hidden-size must be divisible by --num-attention-heads, "
                 "or set --kv-channels (the head dim) explicitly")
        args.kv_channels = args.hidden_size // args.num_attention_heads
    _require(not args.group_query_attention or args.num_query_groups,
             "--group-query-attention needs --num-query-groups")
    groups = query_groups(args)
    _require(args.num_attention_heads % groups == 0,
             f"--num-attention-heads {args.num_attention_heads} must be divisible by "
             f"--num-query-groups {groups}")
    _require(args.num_attention_heads % tp == 0 and groups % tp == 0,
             f"--num-attention-heads and --num-query-groups must be divisible by "
             f"--tensor-model-parallel-size {tp}")
    if args.num_experts == 0:
        args.num_experts = None
    if args.num_experts is not None:
        if args.moe_ffn_hidden_size is None:
            args.moe_ffn_hidden_size = args.ffn_hidden_size
        ep = args.expert_model_parallel_size
        _require(args.num_experts % ep == 0,
                 f"--num-experts {args.num_experts} must be a multiple of "
                 f"--expert-model-parallel-size {ep}")
        _require(not (tp > 1 and not args.sequence_parallel),
                 "MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel")
        _require(not (args.add_bias_linear and args.transformer_impl == "local"), BIASED_MOE)
    else:
        _require(args.expert_model_parallel_size == 1,
                 "--expert-model-parallel-size > 1 needs --num-experts")
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = tp
    if tp == 1:
        args.sequence_parallel = False

    _require(args.mock_data or args.data_path, "give --data-path PREFIX (or --mock-data)")
    if args.tokenizer_type is None:
        args.tokenizer_type = "ByteLevelTokenizer" if not args.mock_data else "NullTokenizer"
    if args.tokenizer_type == "NullTokenizer":
        _require(args.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    if args.split is None:
        args.split = "969,30,1"

    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.start_weight_decay is None:
        args.start_weight_decay = args.weight_decay
    if args.end_weight_decay is None:
        args.end_weight_decay = args.weight_decay
    warmup = (args.lr_warmup_fraction * args.lr_decay_iters if args.lr_warmup_fraction is not None
              else args.lr_warmup_iters)
    _require(warmup < args.lr_decay_iters,
             f"the warm-up ({warmup} iterations) must be shorter than --lr-decay-iters "
             f"({args.lr_decay_iters}, default --train-iters)")
    _require(args.lr_decay_style != "WSD" or args.lr_wsd_decay_iters is not None,
             "--lr-decay-style WSD needs --lr-wsd-decay-iters")
    for flag in ("no_save_optim", "no_save_rng", "no_load_optim", "no_load_rng"):
        if getattr(args, flag) is None:
            setattr(args, flag, False)
    args.use_dist_ckpt = True
    args.consumed_train_samples = 0
    args.skipped_train_samples = 0
    args.consumed_valid_samples = 0
    args.iteration = 0
    return args
