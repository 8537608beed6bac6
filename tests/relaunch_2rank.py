"""Under torchrun: several relaunches in one launch (one process pair, runs one after another).

    torchrun --nproc_per_node 2 tests/relaunch_2rank.py <cases.json> <out.json>

cases.json: [{"name": ..., "argv": [Megatron-LM flags], "steps": N}, ...]. Each case builds a
Pretrainer from its flags (its --load goes through the load hook), trains N iterations and
records per case: the losses, the iteration it resumed at, whether a re-warmup and a mask ramp
came back with the load (and the mask's value at the first step). Rank 0 writes out.json.
"""
import json
import sys

import torch


def end_case() -> None:
    """initialize.shutdown() but for the default process group, which the next case reuses
    (a second rendezvous through torchrun's store would hang)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron_sparkling.live.state import reset_moe_loss_tracker

    torch.distributed.barrier()
    destroy_num_microbatches_calculator()
    reset_moe_loss_tracker()
    mpu.destroy_model_parallel()


def run_case(case) -> dict:
    from megatron_sparkling.training.loop import Pretrainer

    trainer = Pretrainer.from_argv(case["argv"])
    try:
        resumed_at = trainer.iteration
        ramp = getattr(trainer.scheduler, "mask_ramp", None)
        rewarmup = getattr(trainer.scheduler, "rewarmup", None)
        losses, masks = {}, []
        for _ in range(case["steps"]):
            record = trainer.train_step()
            losses[record["iteration"]] = record["lm loss"]
            masks.append(None if ramp is None else ramp.m)
        return {"resumed_at": resumed_at, "losses": losses, "masks": masks,
                "rewarmup_new_elements": None if rewarmup is None else rewarmup.new_elements}
    finally:
        end_case()


def main(cases_path, out_path):
    with open(cases_path) as f:
        cases = json.load(f)
    results = {case["name"]: run_case(case) for case in cases}
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # the checkpoint writer spawns processes that re-import __main__
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
