"""MSG's run-time mask: new units of a grown megatron-core model enter through m ramping 0 -> 1.

`MaskRamp(plan, start_iteration, ramp_steps).install(model_chunks, iteration_fn)` registers
forward hooks on a live model (nothing in Megatron is edited); m = clamp((iteration_fn() -
start_iteration) / ramp_steps, 0, 1) is read at every forward of each model chunk, so it works
with our Pretrainer (`iteration_fn=lambda: trainer.iteration`) and with Megatron-LM's loop
(`lambda: get_args().curr_iteration`). At m = 1 every hook is a no-op.
Needs standalone norm modules (Megatron's local spec: torch RMSNorm/LayerNorm, apex
FusedLayerNorm); Transformer Engine's fused LayerNormLinear has no separate norm to hook and is
refused at install.
Through a checkpoint: `install_mask_ramp` (a growth that happens now: a relaunch from `expand`,
growth on load) counts iterations with the scheduler and puts the ramp (record, start, length,
current value) into the scheduler's state dict under STATE_KEY, as the re-warmup does;
`mask_ramp_after_load` continues a saved ramp exactly or starts the one a grown checkpoint needs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.core.layout import Axis, Kind, Role
from megatron_sparkling.core.plan import GrowthPlan
from megatron_sparkling.core.record import growth_record, plan_of
from megatron_sparkling.live.rewarmup import carry_in_scheduler
from megatron_sparkling.log import print_rank_0
from megatron_sparkling.mcore.model import unwrap
from megatron_sparkling.methods import REGISTRY
from megatron_sparkling.operators import norms

MASKED_INPUT_AXES = (Axis.EXPERT_FFN, Axis.SHARED_FFN, Axis.DENSE_FFN, Axis.HEADS)
STATE_KEY = "sparkling_mask_ramp"     # the ramp's state inside opt_param_scheduler
DEFAULT_RAMP_STEPS = 100              # methods/msg.py's default ramp_steps


class MaskRamp:
    """What is masked (units new in the plan; each module's local TP/EP shard found through the
    model's own sharded_state_dict, so any parallel layout works):
    - new FFN units (dense, shared, expert) and new heads: the fc2 / linear_proj INPUT columns
      x m;
    - new hidden coordinates: every residual-stream writer's OUTPUT (word and position
      embeddings, linear_proj, every fc2) x m, and every hidden norm (input, pre-MLP, final)
      computed by operators.norms.masked_norm: statistics over old units plus m-weighted new
      ones, new outputs x m. At m = 0 the new coordinates are exactly zero and every old value
      is the small model's.
    """
    def __init__(self, plan: GrowthPlan, start_iteration: int, ramp_steps: int):
        if ramp_steps < 1:
            raise ValueError(f"ramp_steps must be at least 1 (got {ramp_steps})")
        self.plan = plan
        self.start_iteration = int(start_iteration)
        self.ramp_steps = int(ramp_steps)
        self.m = 1.0
        self.record: Optional[dict] = None     # the growth record, when built from one
        self._handles: list = []
        self._iteration_fn: Optional[Callable[[], int]] = None

    @classmethod
    def from_record(cls, record: dict, start_iteration: int) -> "MaskRamp":
        """From a growth record (`Grower.record()` of an msg growth)."""
        ramp = cls(plan_of(record), start_iteration,
                   int(record["options"].get("ramp_steps", DEFAULT_RAMP_STEPS)))
        ramp.record = record
        return ramp

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the ramp exactly (plain types)."""
        return {"version": 1, "record": self.record, "start_iteration": self.start_iteration,
                "ramp_steps": self.ramp_steps, "value": self.m}

    def load_state_dict(self, saved: dict) -> None:
        """Continue a saved ramp of the same growth (a load into a run that has one)."""
        self.start_iteration, self.ramp_steps = int(saved["start_iteration"]), int(saved["ramp_steps"])
        if self._iteration_fn is not None:
            self.m = self.value(self._iteration_fn())

    def value(self, iteration: int) -> float:
        return float(min(1.0, max(0.0, (iteration - self.start_iteration) / self.ramp_steps)))

    # ------------------------------------------------------------------ hooks
    def install(self, model_chunks, iteration_fn: Callable[[], int]) -> "MaskRamp":
        self._iteration_fn = iteration_fn
        self.m = self.value(iteration_fn())
        for chunk in unwrap(model_chunks):
            self._handles.append(chunk.register_forward_pre_hook(self._update))
            owners = _param_shards(chunk)
            for module in chunk.modules():
                for pname, param in module.named_parameters(recurse=False):
                    if id(param) in owners:
                        self._hook_module(module, pname, *owners[id(param)])
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _update(self, module, args):
        self.m = self.value(self._iteration_fn())

    def _keep(self, is_new: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(is_new.shape, dtype=like.dtype, device=like.device)
        return keep.masked_fill_(is_new.to(like.device), self.m)

    def _hook_module(self, module, pname, key, offset, local_shape) -> None:
        lay = layout_lib.resolve(key, self.plan.spec.source.swiglu)
        for d, dim in enumerate(lay.dims):
            umap = self.plan.element_map(dim)
            if not umap.is_new.any():
                continue
            local_new = umap.is_new[offset[d]:offset[d] + local_shape[d]]
            if lay.kind is Kind.NORM_WEIGHT and dim.axis is Axis.HIDDEN:
                if _norm_kind(module) is None:
                    self.remove()
                    raise TypeError(
                        f"msg: cannot mask the hidden norm inside {type(module).__name__} "
                        f"({key}); grow the hidden size with msg on Megatron's local spec "
                        "(standalone norm modules)")
                self._handles.append(module.register_forward_hook(self._norm_hook(local_new)))
            elif dim.role is Role.IN and dim.axis in MASKED_INPUT_AXES and pname != "bias":
                self._handles.append(module.register_forward_pre_hook(self._input_hook(local_new)))
            elif dim.role is Role.OUT and dim.axis is Axis.HIDDEN and pname != "bias":
                self._handles.append(module.register_forward_hook(self._output_hook(local_new)))

    def _input_hook(self, is_new):
        def hook(module, args):
            if self.m >= 1.0:
                return None
            return (args[0] * self._keep(is_new, args[0]),) + tuple(args[1:])
        return hook

    def _output_hook(self, is_new):
        def hook(module, args, output):
            if self.m >= 1.0:
                return None
            if isinstance(output, tuple):
                return tuple(o * self._keep(is_new, o) if torch.is_tensor(o) else o
                             for o in output)
            return output * self._keep(is_new, output)
        return hook

    def _norm_hook(self, is_new):
        def hook(module, args, output):
            if self.m >= 1.0:
                return None
            x = args[0]
            rms, zero_centered = _norm_kind(module)
            eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
            return norms.masked_norm(x, module.weight, getattr(module, "bias", None), eps,
                                     self._keep(is_new, x), rms, zero_centered)
        return hook


def _norm_kind(module):
    """(is RMSNorm, zero-centred gamma) of a norm module we can recompute; None otherwise."""
    if isinstance(module, torch.nn.RMSNorm):
        return True, False
    if isinstance(module, torch.nn.LayerNorm):
        return False, False
    try:  # apex-backed LayerNorm of Megatron's local spec
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    except ImportError:
        return None
    if isinstance(module, FusedLayerNorm):
        return False, bool(module.zero_centered_gamma)
    return None


def _param_shards(chunk) -> dict:
    """id(parameter) -> (global key, global offset, local shape) from the model's own sharded
    state dict (the one place that knows which global slice each local parameter is)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    # GLU fc1 weights come as ShardedTensorFactories: never masked here, so not needed.
    for item in nested_values(chunk.sharded_state_dict()):
        if isinstance(item, ShardedTensor) and item.data is not None:
            # prepended axes (stacked layers, experts) are size 1 locally
            local = (1,) * item.prepend_axis_num + tuple(item.local_shape)
            out.setdefault(id(item.data), (item.key, tuple(item.global_offset), local))
    return out


# ---------------------------------------------------------------------------- checkpoints
def needs_mask_ramp(record: Optional[dict]) -> bool:
    """Whether the growth a record describes preserves the function only behind a mask (msg)."""
    method = REGISTRY.get((record or {}).get("method"))
    return bool(getattr(method, "needs_runtime_mask", False))


def _scheduler_iteration(scheduler, samples_per_iteration: int) -> Callable[[], int]:
    """The iteration, counted by the scheduler (samples): it is saved and loaded with the
    checkpoint, so a resumed run reads the same value the straight run read."""
    return lambda: int(scheduler.num_steps) // samples_per_iteration


def _attach(model, scheduler, ramp: MaskRamp, samples_per_iteration: int) -> MaskRamp:
    existing = getattr(scheduler, "mask_ramp", None)
    if existing is not None:
        existing.remove()
    ramp.install(model, _scheduler_iteration(scheduler, samples_per_iteration))
    carry_in_scheduler(scheduler, "mask_ramp", ramp, STATE_KEY)
    return ramp


def install_mask_ramp(model, scheduler, record: dict, samples_per_iteration: int) -> MaskRamp:
    """Start MSG's ramp for a growth that happened now (m = 0 at the scheduler's step)."""
    start = int(scheduler.num_steps) // samples_per_iteration
    ramp = _attach(model, scheduler, MaskRamp.from_record(record, start), samples_per_iteration)
    print_rank_0(f"> MSG mask ramp: new units enter at iteration {start}, mask 0 -> 1 over "
                 f"{ramp.ramp_steps} iterations")
    return ramp


def restore_mask_ramp(model, scheduler, saved: dict, samples_per_iteration: int) -> MaskRamp:
    """Continue a ramp saved in a checkpoint's opt_param_scheduler[STATE_KEY]."""
    ramp = MaskRamp.from_record(saved["record"], saved["start_iteration"])
    ramp.load_state_dict(saved)
    ramp = _attach(model, scheduler, ramp, samples_per_iteration)
    print_rank_0(f"> MSG mask ramp resumed: started at iteration {ramp.start_iteration}, mask "
                 f"{ramp.m:.4f} now (saved {saved['value']:.4f}), 1 at iteration "
                 f"{ramp.start_iteration + ramp.ramp_steps}")
    return ramp


def mask_ramp_after_load(model, scheduler, common: dict, args) -> Optional[MaskRamp]:
    """After a checkpoint load: continue a saved ramp (when the scheduler state was loaded with
    it), or start the one a checkpoint grown by a masked method needs, or do nothing."""
    if getattr(scheduler, "mask_ramp", None) is not None or scheduler is None:
        return getattr(scheduler, "mask_ramp", None)
    stored = common.get("opt_param_scheduler") or {}
    saved = stored.get(STATE_KEY) if stored.get("num_steps") == scheduler.num_steps else None
    if saved is not None:
        return restore_mask_ramp(model, scheduler, saved, args.global_batch_size)
    record = growth_record(common)
    if needs_mask_ramp(record):
        return install_mask_ramp(model, scheduler, record, args.global_batch_size)
    return None
