"""Work around megatron-core's handling of torch Adam's per-parameter `step` in distributed-optimizer
state (no apex / Transformer Engine, e.g. on CPU: each parameter's optimizer state holds a 0-dim
`step` tensor; Megatron keeps the step in the param groups).

- Load (0.16.1, `fully_reshardable`): `DistributedOptimizer._set_main_param_and_optimizer_states`
  copies every key of that state from the loaded tensors, but the loader strips `step`, so the
  load fails with KeyError 'step'. While `patched_fully_reshardable_load` is active, only the keys
  that were loaded are copied; `step` is restored from the param groups by
  `DistributedOptimizer.load_state_dict` as usual.
- Save (before 0.16, `dp_reshardable`): `sharded_param_state_dp_reshardable` maps every
  per-parameter state tensor onto its bucket and asserts a bucket-sized shape, which the 0-dim
  `step` fails. While `steps_out_of_buckets` is active, `step` is left out of the bucket state,
  as 0.16 does (it stores it nowhere but in the param groups).

Nothing in megatron-core's files is edited, and each method is restored on exit.
"""
from __future__ import annotations

import contextlib

import torch


def _distributed_optimizers(optimizer):
    from megatron.core.optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            yield opt


def _set_loaded_states_only(self, model_param, tensors):
    group_index, group_order = self.model_param_group_index_map[model_param]
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return type(self)._set_main_param_and_optimizer_states(self, model_param, tensors)
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    targets = {"param": main_param, **self.optimizer.state[main_param]}
    for key, target in targets.items():
        # `step` was already set from the param groups; a per-tensor copy would be stale.
        if key in tensors and key != "step":
            target.copy_(tensors[key])


def _bucket_state_without_step(self):
    state = type(self).get_parameter_state_dp_reshardable(self)
    for gbuf_idx in range(len(self.gbuf_ranges)):
        for buckets in state[gbuf_idx].values():
            for bucket in buckets:
                for tensors in bucket:
                    tensors.pop("step", None)
    return state


def _buckets_take_step() -> bool:
    """megatron-core before 0.16 maps `step` onto the dp_reshardable buckets (0.16 skips it)."""
    from megatron.core.package_info import VERSION

    return tuple(int(v) for v in VERSION[:2]) < (0, 16)


@contextlib.contextmanager
def _methods_replaced(opts, name: str, function):
    """`function` bound as method `name` of each optimizer in `opts` (the instance attribute
    shadows the class's), removed again on exit."""
    for opt in opts:
        setattr(opt, name, function.__get__(opt))
    try:
        yield
    finally:
        for opt in opts:
            delattr(opt, name)


@contextlib.contextmanager
def steps_out_of_buckets(optimizer):
    opts = (list(_distributed_optimizers(optimizer))
            if optimizer is not None and _buckets_take_step() else [])
    with _methods_replaced(opts, "get_parameter_state_dp_reshardable",
                           _bucket_state_without_step):
        yield


@contextlib.contextmanager
def patched_fully_reshardable_load(optimizer):
    opts = list(_distributed_optimizers(optimizer)) if optimizer is not None else []
    with _methods_replaced(opts, "_set_main_param_and_optimizer_states",
                           _set_loaded_states_only):
        yield
    for opt in opts:
        # load_state_dict gives every parameter the SAME `step` tensor; torch's Adam then
        # increments it once per parameter per step, breaking bias correction. Unshare it.
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def initialize_empty_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer its (dummy) Adam state before a load.

    With torch's Adam (no apex / TE) `DistributedOptimizer.state_dict()` reads `step` from the
    per-parameter state, which torch creates lazily at the first step; building the sharded
    state dict to load into a fresh optimizer then fails (`assert len(steps) == 1`). Megatron's
    own `_init_optimizer_states_with_dummy_values` creates it; every value it writes (params
    included, via a zero-gradient step) is overwritten by the load that follows.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE or optimizer is None:
        return
    for opt in _distributed_optimizers(optimizer):
        if len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()
