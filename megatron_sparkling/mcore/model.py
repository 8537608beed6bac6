"""Build megatron-core's GPTModel (MoE or dense) from Megatron-LM-style args, as pretrain_gpt.py does."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from megatron_sparkling.mcore.norms import replace_torch_norm


def padded_vocab_size(vocab_size: int, args) -> int:
    """Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config_from_args(args):
    """TransformerConfig from args by field name (as Megatron-LM's core_transformer_config_from_args)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TransformerConfig)
          if f.init and hasattr(args, f.name)}
    kw["persist_layer_norm"] = not args.no_persist_layer_norm
    kw["deallocate_pipeline_outputs"] = True
    kw["pipeline_dtype"] = args.params_dtype
    kw["batch_p2p_comm"] = not args.overlap_p2p_comm
    kw["num_moe_experts"] = args.num_experts
    if args.swiglu:
        kw["activation_func"] = F.silu
        kw["gated_linear_unit"] = True
        kw["bias_activation_fusion"] = args.bias_swiglu_fusion
    else:
        kw["bias_activation_fusion"] = args.bias_gelu_fusion
    if args.squared_relu:
        from megatron.core.activations import squared_relu

        kw["activation_func"] = squared_relu
    kw["num_query_groups"] = args.num_query_groups if args.group_query_attention else None
    if not args.num_layers:
        # A zero-layer model (progressive training's start) has no output projection to scale;
        # megatron-core's default scaled init would divide by num_layers = 0.
        from megatron.core.utils import init_method_normal

        kw["output_layer_init_method"] = init_method_normal(args.init_method_std)
    return TransformerConfig(**kw)


def layer_spec(args, config, vp_stage=None):
    """The layer spec Megatron-LM's gpt_builder picks, with a sequence-parallel-capable torch
    norm where apex is absent (the stock WrappedTorchNorm refuses sequence parallelism)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    use_te = args.transformer_impl == "transformer_engine"
    needs_sp_norm = not use_te and not specs.HAVE_APEX
    # A dense local model gets the block spec too, so that its final norm is replaced as well
    # (the same layers and keys as Megatron-LM's layer spec).
    if args.num_experts or needs_sp_norm:
        spec = specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization=args.normalization,
            qk_l2_norm=False, vp_stage=vp_stage)
    elif use_te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(
            None, False, args.qk_layernorm, False)
    else:
        spec = specs.get_gpt_layer_local_spec(
            None, False, args.qk_layernorm, False, normalization=args.normalization)
    if needs_sp_norm:
        spec = replace_torch_norm(spec)
    return spec


def model_provider(args, pre_process=True, post_process=True, vp_stage=None, config=None):
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config_from_args(args)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(args, config, vp_stage),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
    )


def ddp_config_from_args(args, num_parameters: int):
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallelConfig

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistributedDataParallelConfig)
          if hasattr(args, f.name)}
    kw["grad_reduce_in_fp32"] = args.accumulate_allreduce_grads_in_fp32
    kw["check_for_nan_in_grad"] = args.check_for_nan_in_loss_and_grad
    kw["check_for_large_grads"] = args.check_for_large_grads
    kw["bucket_size"] = (num_parameters // args.ddp_num_buckets if args.ddp_num_buckets
                         else args.ddp_bucket_size)
    kw["average_in_collective"] = args.ddp_average_in_collective
    cfg = DistributedDataParallelConfig(**kw)
    if cfg.bucket_size is None:
        cfg.bucket_size = max(40000000, 1000000 * mpu.get_data_parallel_world_size(
            with_context_parallel=True))
    if not cfg.overlap_grad_reduce:
        cfg.bucket_size = None  # one bucket: no overlap to gain from more
    return cfg


def build_model(args, wrap_with_ddp: bool = True, meta_device: bool = False):
    """List of model chunks (one without virtual pipelining), DDP-wrapped like Megatron-LM's get_model."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.enums import ModelType

    pre = mpu.is_pipeline_first_stage()
    post = mpu.is_pipeline_last_stage()
    if meta_device:
        with torch.device("meta"):
            model = model_provider(args, pre, post)
    else:
        model = model_provider(args, pre, post)
    model.model_type = ModelType.encoder_or_decoder
    model = [model]
    for chunk in model:
        for p in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    num_parameters = sum(p.nelement() for chunk in model for p in chunk.parameters())
    if not meta_device and torch.cuda.is_available():
        for chunk in model:
            chunk.cuda(torch.cuda.current_device())
    if args.fp16 or args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = [Float16Module(chunk.config, chunk) for chunk in model]
    if not wrap_with_ddp:
        return model
    ddp_cfg = ddp_config_from_args(args, num_parameters)
    return [DDP(config=chunk.config, ddp_config=ddp_cfg, module=chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(model)]


def optimizer_config_from_args(args):
    from megatron.core.optimizer import OptimizerConfig

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(OptimizerConfig)
          if f.init and hasattr(args, f.name)}
    return OptimizerConfig(**kw)


def build_optimizer(args, model, **kwargs):
    """megatron-core's optimizer for `model` as Megatron-LM builds it (`kwargs`: more options of
    get_megatron_optimizer)."""
    from megatron.core.optimizer import get_megatron_optimizer

    config = optimizer_config_from_args(args)
    return get_megatron_optimizer(config, model, **_standard_overrides(config), **kwargs)


def _standard_overrides(config) -> dict:
    """No weight decay on biases and norms: megatron-core 0.16+ takes these param-group overrides
    explicitly, 0.15 applies them by itself."""
    try:
        from megatron.core.optimizer import get_standard_config_overrides
    except ImportError:
        return {}
    return {"config_overrides": get_standard_config_overrides(config)}


def build_scheduler(args, optimizer):
    """OptimizerParamScheduler in samples, as Megatron-LM's get_optimizer_param_scheduler."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    decay_steps = args.lr_decay_iters * gbs
    warmup_steps = (args.lr_warmup_fraction * decay_steps if args.lr_warmup_fraction is not None
                    else args.lr_warmup_iters * gbs)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=(args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters else None),
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


def unwrap(model_chunks):
    """The bare GPTModel of each chunk (DDP and Float16Module removed)."""
    out = []
    for chunk in model_chunks:
        while hasattr(chunk, "module"):
            chunk = chunk.module
        out.append(chunk)
    return out


def drop_autograd_leftovers(model_chunks) -> None:
    """Drop the tensors modules keep from their last forward that still carry its autograd graph.

    megatron-core's token dispatchers keep the routing probabilities of the last micro-batch; their
    graph holds the parameters' grad accumulators, whose DDP hooks hold the model: a cycle through
    C++ that the garbage collector cannot see. A finished run would keep its model and its gloo
    process groups' threads alive (each in-process run of a test session added ~50 threads)."""
    for chunk in model_chunks:
        for module in chunk.modules():
            holders = [module, getattr(module, "token_dispatcher", None)]
            for holder in filter(None, holders):
                for name, value in list(vars(holder).items()):
                    if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                        setattr(holder, name, None)
