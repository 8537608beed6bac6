"""Process groups, megatron-core parallel state and seeds, as Megatron-LM's initialize_megatron."""
from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch

from megatron_sparkling.compat import cpu as cpu_compat
from megatron_sparkling.compat.cpu import have_gpu, have_transformer_engine
from megatron_sparkling.live.state import reset_moe_loss_tracker
from megatron_sparkling.training import arguments


def init_distributed(backend: str, timeout_minutes: int = 10) -> None:
    """torch.distributed from torchrun's environment (or a 1-rank group when run directly)."""
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(
        backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def world_size_from_env() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_model_parallel(args) -> None:
    from megatron.core import parallel_state as mpu
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

    mpu.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    init_num_microbatches_calculator(
        torch.distributed.get_rank(), None, args.global_batch_size, args.micro_batch_size,
        args.data_parallel_size)


def set_random_seed(seed: int, data_parallel_random_init: bool = False) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage; TP/EP streams via the RNG tracker."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * mpu.get_pipeline_model_parallel_rank()
    if data_parallel_random_init:
        seed += 10 * mpu.get_data_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def initialize(args_or_argv=None, extra_args_provider=None, ignore_unknown_args=False):
    """Parse and validate flags, start process groups, seed. Returns the args namespace."""
    gpu = have_gpu()
    if not gpu:
        cpu_compat.apply()
    if args_or_argv is None or isinstance(args_or_argv, (list, tuple)):
        args = arguments.parse_args(args_or_argv, extra_args_provider, ignore_unknown_args)
    else:
        args = args_or_argv
    args = arguments.validate_args(args, world_size_from_env(), gpu, have_transformer_engine())
    init_distributed(args.distributed_backend, args.distributed_timeout_minutes)
    init_model_parallel(args)
    set_random_seed(args.seed, args.data_parallel_random_init)
    return args


def shutdown() -> None:
    """Tear down what initialize() built, so a process can train again (tests do)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    destroy_num_microbatches_calculator()
    # sized by the run's layer count: a later run in this process may have another
    reset_moe_loss_tracker()
    mpu.destroy_model_parallel()
    _forget_process_groups(mpu)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _forget_process_groups(mpu) -> None:
    """Drop what still holds this run's process groups after destroy_model_parallel(): a gloo
    group's threads live as long as the group, so a process that trains again would pile them up."""
    # megatron-core 0.16's destroy_model_parallel() leaves a few globals set
    for name, value in list(vars(mpu).items()):
        if isinstance(value, torch.distributed.ProcessGroup):
            setattr(mpu, name, None)
    # RotaryEmbedding.forward is an lru_cache keyed by the module (which holds the CP group)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    getattr(RotaryEmbedding.forward, "cache_clear", lambda: None)()
