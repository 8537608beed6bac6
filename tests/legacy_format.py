"""Write Megatron-LM's legacy per-rank `torch` checkpoint from a live run, as Megatron-LM does.

megatron.training is not installed here, so this mirrors what its save_checkpoint does for
--ckpt-format torch: each expert-data-parallel-rank-0 process torch.saves its LOCAL state
(`state_dict_for_save_checkpoint()`, `optimizer.state_dict()`, scheduler, RNG) into
iter_N/mp_rank_XX[_YYY][_ZZZ]/model_optim_rng.pt; with the distributed optimizer every rank
joins `save_parameter_state` into distrib_optim.pt; rank 0 writes the tracker last.
"""
import os
import random

import numpy as np
import torch


def save_legacy(trainer, root: str) -> str:
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from megatron_sparkling.checkpoint.legacy import rank_directory
    from megatron_sparkling.mcore.model import unwrap

    args = trainer.args
    coordinates = {"tp": mpu.get_tensor_model_parallel_rank(),
                   "pp": mpu.get_pipeline_model_parallel_rank(),
                   "ep": mpu.get_expert_model_parallel_rank()}
    directory = os.path.join(root, f"iter_{trainer.iteration:07d}", rank_directory(
        coordinates, mpu.get_pipeline_model_parallel_world_size() > 1,
        mpu.get_expert_model_parallel_world_size() > 1))
    os.makedirs(directory, exist_ok=True)
    if args.use_distributed_optimizer:
        trainer.optimizer.save_parameter_state(os.path.join(directory, "distrib_optim.pt"))
    if mpu.get_expert_data_parallel_rank() == 0:
        state = {
            "args": args, "checkpoint_version": 3.0, "iteration": trainer.iteration,
            "model": unwrap(trainer.model)[0].state_dict_for_save_checkpoint(),
            "optimizer": trainer.optimizer.state_dict(),
            "opt_param_scheduler": trainer.scheduler.state_dict(),
            "rng_state": [{"random_rng_state": random.getstate(),
                           "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state(),
                           "cuda_rng_state": torch.cuda.get_rng_state(),
                           "rng_tracker_states":
                               tensor_parallel.get_cuda_rng_tracker().get_states()}],
            "num_floating_point_operations_so_far": trainer.num_floating_point_operations_so_far,
        }
        torch.save(state, os.path.join(directory, "model_optim_rng.pt"))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(trainer.iteration))
    torch.distributed.barrier()
    return directory
