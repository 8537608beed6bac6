"""The optimizer step and LR as megatron-core's optimizers keep them, set by the plugin: one step
for every parameter (in the param groups for the distributed optimizer and fused Adam, in
`state.common_step` for torch's Adam without it), and an LR set as the scheduler sets it."""
import torch

from megatron_sparkling.live.rewarmup import set_group_lr
from megatron_sparkling.live.state import set_step, step_of


def test_a_fresh_distributed_optimizer_gets_the_step_in_every_group():
    # TE's FusedAdam keeps `step` per group and a never-stepped one has none yet: the step
    # must be set there (an int), not left in an ignored common_step
    osd = {"optimizer": {"param_groups": [{"lr": 1e-3}, {"lr": 1e-3, "wd_mult": 0.0}]},
           "param_state_sharding_type": "fully_reshardable"}
    set_step(osd, 40.0)
    groups = osd["optimizer"]["param_groups"]
    assert [g["step"] for g in groups] == [40, 40] and all(type(g["step"]) is int for g in groups)
    assert "state" not in osd["optimizer"]
    assert step_of(osd) == 40


def test_torch_adam_without_the_distributed_optimizer_reads_common_step():
    osd = {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-3}]}
    set_step(osd, torch.tensor(7.0))
    assert float(osd["state"]["common_step"]) == 7.0


def test_a_tensor_lr_is_filled_in_place_and_a_number_replaced():
    lr = torch.tensor(1e-3)
    tensor_group, float_group = {"lr": lr}, {"lr": 1e-3}
    set_group_lr(tensor_group, 2e-3)
    set_group_lr(float_group, 2e-3)
    assert tensor_group["lr"] is lr and abs(float(lr) - 2e-3) < 1e-9
    assert float_group["lr"] == 2e-3
