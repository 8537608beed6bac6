"""The optimizer's non-tensor state for a checkpoint written in model space (`fully_reshardable`).

megatron-core takes the optimizer's param groups from the checkpoint's common state and merges
them with what the loading run's optimizer asks for, so their structure must match that
optimizer: one entry for a single optimizer, `{0: dense, 1: expert}` for the ChainedOptimizer
an expert-parallel run builds. The groups are those of the TARGET run's optimizer (rebuilt by
`shadow` at the target layout: with EP > 1 experts get their own `is_expert_parallel` groups),
with hyperparameters and step carried over from the source's matching group.
"""
from __future__ import annotations

import copy

import torch

from megatron_sparkling.checkpoint.paths import CheckpointError

# What a target group is matched to its source group on (the options a run sets per group).
IDENTITY = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")
CONTENT_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": False,
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def _get(group: dict, key: str):
    return group.get(key, group.get("pre_" + key))


def identifier_keys() -> tuple:
    """The keys the installed megatron-core matches param groups on when it loads them (0.16:
    IDENTITY; newer releases add max_lr, min_lr, start_wd, end_wd, optimizer): written from the
    TARGET run's groups, so they equal what the relaunched optimizer asks for."""
    try:
        from megatron.core.optimizer.optimizer import param_group_identifier_keys
    except ImportError:
        return IDENTITY
    return tuple(dict.fromkeys(tuple(param_group_identifier_keys) + IDENTITY))


def _step_value(step):
    """The group `step` as megatron-core writes it for fused Adam (an int: TE and apex pass it to
    a kernel taking `int`); torch's Adam takes it as a tensor from either."""
    step = float(step or 0)
    return int(step) if step.is_integer() else step


def _source_match(target_group: dict, source_groups: list) -> dict:
    """The source group with the target group's identity; is_expert_parallel may differ (it
    flips when the expert-parallel size crosses 1)."""
    loose = [g for g in source_groups
             if all(_get(g, k) == _get(target_group, k) for k in IDENTITY if k != "is_expert_parallel")]
    exact = [g for g in loose if bool(_get(g, "is_expert_parallel")) ==
             bool(_get(target_group, "is_expert_parallel"))]
    if not (exact or loose):
        ident = {k: _get(target_group, k) for k in IDENTITY}
        raise CheckpointError(f"the target run's param group {ident} has no counterpart in the "
                              "source's optimizer state; relaunch with the source's optimizer "
                              "flags (lr/wd multipliers) or pass --no-optimizer")
    return (exact or loose)[0]


def build(target_optimizers: list, source_groups: list, step, grad_scaler=None):
    """The common-state `optimizer` entry for the target run's optimizer(s).

    `target_optimizers`: per chained optimizer, its param-group options (shadow's
    OptimizerLayout.groups, unioned over pipeline stages).

    One entry serves both optimizer kinds megatron-core loads from model space:
    - DistributedOptimizer (`fully_reshardable`): `optimizer.param_groups` (with `step`) and
      `param_state_sharding_type`;
    - FP32Optimizer (no distributed optimizer): `param_groups` and `state.common_step`.
    (fp16/bf16 params without the distributed optimizer: Float16OptimizerWithFloat16Params, whose
    main params expand writes as `optimizer.state.fp32_param.*`: core/layout.StateKind.prefix_for.)"""
    step = _step_value(step)
    identifiers = identifier_keys()
    entries = []
    for groups in target_optimizers:
        written = []
        for tg in groups:
            merged = copy.deepcopy(_source_match(tg, source_groups))
            merged.pop("params", None)
            for key in identifiers:
                if key in tg or "pre_" + key in tg:
                    merged.pop("pre_" + key, None)
                    merged[key] = _get(tg, key)
            merged["is_expert_parallel"] = bool(_get(tg, "is_expert_parallel"))
            merged["step"] = step   # fused Adam keeps it per group (torch's Adam: common_step)
            written.append(merged)
        entry = {
            "optimizer": {"param_groups": written,
                          "state": {"common_step": torch.tensor(float(step))}},
            "param_state_sharding_type": "fully_reshardable",
            "param_groups": copy.deepcopy(written),
            "state": {"common_step": torch.tensor(float(step))},
        }
        if grad_scaler is not None:
            entry["grad_scaler"] = copy.deepcopy(grad_scaler)
        entries.append(entry)
    return entries[0] if len(entries) == 1 else dict(enumerate(entries))


def find_grad_scaler(node):
    if isinstance(node, dict):
        if "grad_scaler" in node:
            return node["grad_scaler"]
        for v in node.values():
            found = find_grad_scaler(v)
            if found is not None:
                return found
    return None
