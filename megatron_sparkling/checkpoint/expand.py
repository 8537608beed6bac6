"""Read a Megatron checkpoint, grow it tensor by tensor, write a torch_dist checkpoint.

The pipeline behind `megatron-sparkling expand`:
1. open the source (any format `source` knows) and check that its args describe its tensors;
2. validate the growth and the target parallel layout and rebuild the target run on the meta
   device (`shadow`), all BEFORE a byte is written (`Conversion`);
3. stream: every model and optimizer-state tensor is read as ONE global tensor, grown and
   written (`writer`) into a staging folder beside the target (`Conversion.produce`);
4. publish atomically (`commit`): rename into `iter_N`, then the tracker file.
The written format is described on `expand`.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_sparkling.checkpoint import integrity, optimizer_common, resources, shadow
from megatron_sparkling.checkpoint.base import expected_shape, object_bytes
from megatron_sparkling.checkpoint.commit import StagedIteration, check_target
from megatron_sparkling.checkpoint.dcp import TensorSpec
from megatron_sparkling.checkpoint.grown import DepthStream, GrownTensors, make_grower
from megatron_sparkling.checkpoint.paths import CheckpointError
from megatron_sparkling.checkpoint.source import open_checkpoint
from megatron_sparkling.checkpoint.writer import write_torch_dist
from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.core import plan as plan_lib
from megatron_sparkling.core.record import RECORD_KEY
from megatron_sparkling.core.sizes import SIZES
from megatron_sparkling.core.spec import (
    DepthOptions,
    GrowthSpec,
    GrowthSpecError,
    ModelShape,
    ParallelLayout,
    validate,
)
from megatron_sparkling.methods.base import copied_new_state, get_method
from megatron_sparkling.operators import depth as depth_lib


@dataclass
class ExpandRequest:
    load: str
    save: str
    iteration: Optional[int] = None
    sizes: dict = field(default_factory=dict)          # ModelShape field -> target value
    depth: Optional[DepthOptions] = None               # how the layer axis grows (default stack)
    method: str = "sparkling"
    method_instance: object = None                     # a GrowthMethod (else by name)
    seed: int = 1234
    options: dict = field(default_factory=dict)
    tensor_parallel: Optional[int] = None              # target layout (default: the source's)
    pipeline_parallel: Optional[int] = None
    expert_parallel: Optional[int] = None
    expert_tensor_parallel: Optional[int] = None
    rewarmup_iters: Optional[int] = None
    rewarmup_peak_ratio: Optional[float] = None
    new_state_bias_correction: Optional[str] = None    # core/record.py BIAS_CORRECTIONS
    keep_rng: bool = False
    drop_optimizer: bool = False
    overwrite: bool = False
    progress: bool = True
    checks: bool = True            # integrity.ValueChecks on every value read (off: bench only)


@dataclass
class ExpandResult:
    path: str
    iteration: int
    grown: bool
    source_format: str
    optimizer_format: Optional[str]
    tensors: int
    bytes_written: int
    seconds: float
    rng_kept: bool
    relaunch_flags: list


class Conversion:
    """Everything decided and checked before writing (the module docstring's steps 1-2):
    open the source and check that its args describe its tensors; validate the growth
    (spec.validate, the method's own checks, every key in the layout table) and the target
    parallel layout, rebuild the target run's model and optimizer on the meta device (`shadow`)
    for the global shapes and param groups Megatron will ask for."""

    def __init__(self, req: ExpandRequest):
        self.req = req
        check_target(req.save, req.load, req.overwrite)
        resources.check_writable(req.save)
        self.src = open_checkpoint(req.load, req.iteration)
        self.src.check_args_match_tensors()
        args = self.src.args
        self.source_shape = ModelShape.from_args(args)
        self.target_shape = self._grown_layer_pattern(self.source_shape.replace(**req.sizes))
        tensor = req.tensor_parallel or args.tensor_model_parallel_size
        self.parallel = ParallelLayout(
            tensor=tensor, pipeline=req.pipeline_parallel or args.pipeline_model_parallel_size,
            expert=req.expert_parallel or (getattr(args, "expert_model_parallel_size", 1) or 1),
            expert_tensor=req.expert_tensor_parallel or self._default_expert_tensor(tensor))
        self.spec = GrowthSpec(self.source_shape, self.target_shape, req.method, req.seed,
                               dict(req.options), req.depth or DepthOptions())
        if req.depth is not None and self.target_shape.num_layers == self.source_shape.num_layers:
            raise GrowthSpecError(f"--depth-method {req.depth.method}: the layer count stays "
                                  f"{self.source_shape.num_layers}; give --num-layers above it "
                                  "(or drop the depth options)")
        self.grown = bool(self.spec.grown_axes())
        self.deeper = layout_lib.Axis.LAYER in self.spec.grown_axes()
        if self.grown:   # the Grower validates the growth (spec, target layout, method)
            self.grower = self._grower()
            copied = (req.new_state_bias_correction == "per-element"
                      and copied_new_state(req.method, self.spec.depth.new_state))
            if copied:
                raise GrowthSpecError(f"--new-state-bias-correction per-element is for new "
                                      f"elements that start with zero Adam moments, but "
                                      f"{copied}; leave it out (global)")
        else:            # a format conversion: the target layout is still checked
            validate(self.spec, self.parallel)
            self.grower = None
        self._check_memory()
        self.keep_rng = req.keep_rng and self._rng_loadable()
        self.optimizer = None if req.drop_optimizer else self.src.optimizer
        self.target_args = self._target_args()
        target_run = shadow.run_args(self.target_args)
        self._target = shadow.build_layouts(target_run, shadow.stage_ranks(target_run),
                                            with_optimizer=True, exact=False)
        self.sources = self._source_keys()
        self.specs = self._tensor_specs()
        self.stream = GrownTensors(self.src, self.grower, self.optimizer, self._depth_stream(),
                                   checks=req.checks)
        self.objects = self._objects()
        self.common = self._common()
        sizes = [s.nbytes for s in self.specs.values()] + [len(b) for b in self.objects.values()]
        resources.check_space(req.save, sum(sizes) + 2 ** 20, max(sizes, default=0))

    # ------------------------------------------------------------------ resources
    def _default_expert_tensor(self, tensor: int) -> int:
        """The expert TP of the relaunch when not given: Megatron's default (= TP), unless the
        source ran with its own expert TP (then kept, and printed in the relaunch flags)."""
        args = self.src.args
        stored = getattr(args, "expert_tensor_parallel_size", None)
        if stored and stored != args.tensor_model_parallel_size:
            return stored
        return tensor

    def _check_memory(self) -> None:
        """Refuse, before allocating, a conversion whose largest grown piece (one layer of a
        stacked tensor, fp32) times resources.PEAK_FACTOR does not fit in memory."""
        largest, what = 0, ""
        for key in self.src.model_tensors:
            shape = expected_shape(key, self.target_shape) or self.src.model_tensors[key].shape
            n = 4
            for size in shape[1:] if layout_lib.is_stacked(key) else shape:
                n *= size
            if n > largest:
                largest, what = n, key
        resources.check_memory(largest, what)

    # ------------------------------------------------------------------ decisions
    def _grown_layer_pattern(self, target: ModelShape) -> ModelShape:
        """A deeper target whose MoE layers are not all layers gets the --moe-layer-freq list
        that keeps every copied layer's type (dense or MoE), as depth.validate asks."""
        src, depth = self.source_shape, self.req.depth or DepthOptions()
        if (target.num_layers <= src.num_layers or not src.num_experts
                or src.moe_layer_freq == 1 or "moe_layer_freq" in self.req.sizes):
            return target
        try:
            lmap = plan_lib.plan_layer_map(GrowthSpec(src, target, depth=depth))
        except (ValueError, GrowthSpecError):
            return target  # a bad depth option: validate() names it
        pattern = plan_lib.grown_moe_pattern(src, lmap)
        if isinstance(target.moe_layer_freq, int) and all(
                target.is_moe_layer(i) == bool(p) for i, p in enumerate(pattern)):
            return target
        return target.replace(moe_layer_freq=pattern)

    def _grower(self):
        try:
            method = self.req.method_instance or get_method(self.spec.method, **self.spec.options)
        except ValueError as e:  # unknown method or option
            raise CheckpointError(str(e)) from None
        if self.deeper and hasattr(method, "fresh_layer_rule"):
            # a width method growing a whole stacked tensor fills fresh layers as depth draws them
            method.fresh_layer_rule = depth_lib.fresh_layer_rule(self.spec, self._fresh_init())
        grower = make_grower(self.spec, self.src.model_tensors, method, self.parallel)
        if self.deeper:
            planned = grower.plan.units[layout_lib.Axis.LAYER]
            if not torch.equal(planned.source, plan_lib.plan_layer_map(self.spec).source):
                raise CheckpointError(f"growth method {method.name} places layers its own way; "
                                      "grow depth with a method that follows --depth-method")
        return grower

    @property
    def layer_map(self):
        """Which source layer each target layer copies (the growth plan's layer axis)."""
        return self.grower.plan.units[layout_lib.Axis.LAYER]

    def _fresh_init(self) -> depth_lib.FreshInit:
        """How fresh layers are drawn: the grown run's init settings and the growth seed."""
        return depth_lib.FreshInit.from_args(self.target_shape.apply_to_args(self.src.args),
                                             self.req.seed)

    def _depth_stream(self) -> Optional[DepthStream]:
        """How the target's layers come from the source's (None when the depth stays)."""
        if not self.deeper:
            return None
        return DepthStream(self.layer_map, self.spec.depth, self._fresh_init(),
                           self.source_shape.swiglu, self.sources,
                           {k: s.shape for k, s in self.specs.items()})

    def _rng_loadable(self) -> bool:
        args, p = self.src.args, self.parallel
        same = (args.tensor_model_parallel_size == p.tensor
                and args.pipeline_model_parallel_size == p.pipeline
                and (getattr(args, "expert_model_parallel_size", 1) or 1) == p.expert)
        if not same:
            raise CheckpointError("--keep-rng needs the source's TP/PP/EP sizes (Megatron loads "
                                  "the RNG state only at the same layout); drop --keep-rng")
        return True

    def _target_args(self):
        args = self.target_shape.apply_to_args(self.src.args)
        p = self.parallel
        args.tensor_model_parallel_size = p.tensor
        args.pipeline_model_parallel_size = p.pipeline
        args.expert_model_parallel_size = p.expert
        if p.expert_tensor is not None:
            args.expert_tensor_parallel_size = p.expert_tensor
        args = shadow.run_args(args)  # consistent derived sizes (world, DP, sequence parallel)
        if not self.keep_rng:
            args.no_save_rng = True
        if self.optimizer is None:
            args.no_save_optim = True
        return args

    def _source_keys(self) -> dict:
        """{target model key: the source key it grows from, None for a fresh per-layer tensor},
        checked against the keys of the target model (built on the meta device)."""
        keys = list(self.src.model_tensors)
        if self.deeper:
            try:
                derived = depth_lib.target_keys(keys, self.layer_map, self.source_shape,
                                                self.target_shape)
            except GrowthSpecError as e:
                raise CheckpointError(str(e)) from None
        else:
            derived = {k: k for k in keys}
        # the target is rebuilt with the local spec where TE is missing: the source's names
        self._target = shadow.spelled_like(self._target, derived)
        target = {k for lay in self._target for k in lay.global_shapes}
        if set(target) != set(derived):
            extra = sorted(target - set(derived))[:3]
            lacking = sorted(set(derived) - target)[:3]
            raise CheckpointError(f"the target model's tensors differ from the source's (target "
                                  f"only: {extra}, source only: {lacking}); the growth would "
                                  "change the architecture, keep the other flags as in the source")
        return derived

    def _like(self, key: str) -> str:
        """A source key of the same tensor as target key `key` (a fresh layer's: another layer)."""
        if self.sources[key] is not None:
            return self.sources[key]
        for j in range(self.source_shape.num_layers):
            like = layout_lib.with_layer(key, j)
            if like in self.src.model_tensors:
                return like
        raise CheckpointError(f"{key}: no source layer holds this tensor")

    def _tensor_specs(self) -> dict:
        target_shapes: dict = {}
        for lay in self._target:
            target_shapes.update(lay.global_shapes)
        specs = {k: TensorSpec(tuple(target_shapes[k]), self.src.model_tensors[self._like(k)].dtype)
                 for k in sorted(self.sources)}
        if self.optimizer is not None:
            params = {name: t for lay in self._target for name, t in lay.tensors.items()}
            param_keys = {p.key for t in params.values() if t.is_param for p in t.pieces}
            stored = set(self.optimizer.keys)
            missing = sorted(k for k in param_keys if self._like(k) not in stored)
            if missing:
                raise CheckpointError(f"the checkpoint has no optimizer state for {missing[:3]}; "
                                      "pass --no-optimizer to convert without it")
            for key in stored:
                if key not in self.src.model_tensors:
                    raise CheckpointError(f"optimizer state for {key}, which is no model tensor; "
                                          "the checkpoint is inconsistent, re-save it")
            for key in sorted(k for k in self.sources if self._like(k) in stored):
                carried = self.optimizer.kinds_of(self._like(key))
                for kind in layout_lib.STATE_KINDS:
                    if kind.required or kind.name in carried:
                        specs[kind.prefix_for(self.target_args) + key] = TensorSpec(
                            specs[key].shape, torch.float32)
        return specs

    def _objects(self) -> dict:
        """unique key -> bytes of the ShardedObjects to write."""
        out = {}
        extra: dict[str, dict] = {}
        counts_grow = self.grown and any(a in (layout_lib.Axis.EXPERT, layout_lib.Axis.LAYER)
                                         for a in self.spec.grown_axes())
        for unique in self.src.objects:
            key = unique.split("/shard_")[0]
            if key == "rng_state":
                if self.keep_rng:
                    out[unique] = self.src.read_object_bytes(unique)
            elif key.startswith(("optimizer.", "chained_")):
                continue  # bucket-space bookkeeping; the written optimizer state is model space
            elif layout_lib.is_extra_state(key) and counts_grow:
                extra.setdefault(key, {})[unique] = None
            else:  # object keys depend only on layer and expert counts
                out[unique] = self.src.read_object_bytes(unique)
        if extra:
            out.update(self._grown_extra_state(extra))
        return out

    def _grown_extra_state(self, extra: dict) -> dict:
        """`_extra_state` objects (TE FP8 metadata; None with the local spec) of a model whose
        expert or layer count grew: one per grown unit, copied from its source unit."""
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        out = {}
        if hasattr(self.grower, "grow_objects"):
            grown = {key: self.grower.grow_objects(key, {u: self.src.read_object(u)
                                                          for u in uniques})
                     for key, uniques in extra.items()}
            if self.deeper:
                grown = self._per_layer_objects(grown)
            for objects in grown.values():
                for unique, value in objects.items():
                    out[unique] = object_bytes(value)
            return out
        # a Grower without object growth: the target model's objects (every rank of its layout),
        # each taking the source object at its position modulo the source's counts
        target_run = shadow.run_args(self.target_args)
        layouts = shadow.build_layouts(target_run, shadow.representative_ranks(target_run),
                                       with_optimizer=False, exact=False)
        for unique in dict.fromkeys(u for lay in layouts for u in lay.objects):
            obj = ShardedObject.empty_from_unique_key(unique)
            if obj.key not in extra:
                continue
            source = ShardedObject.empty_from_unique_key(next(iter(extra[obj.key])))
            offset = tuple(o % s for o, s in zip(obj.global_offset, source.global_shape))
            src_unique = ShardedObject(obj.key, None, source.global_shape, offset).unique_key
            out[unique] = self.src.read_object_bytes(src_unique)
        return out

    def _per_layer_objects(self, grown: dict) -> dict:
        """Objects of per-layer keys (`decoder.layers.<i>.<module>._extra_state`, mixed
        dense/MoE stacks) under the deeper model's layer numbers: a copied layer's are its
        source layer's, a fresh layer's another source layer's (as Grower.grow_objects gives
        fresh units: TE refuses a None beside real FP8 state)."""
        per_layer = [k for k in grown if layout_lib.layer_of_key(k) is not None]
        out = {k: v for k, v in grown.items() if k not in per_layer}
        try:
            renamed = depth_lib.target_keys(per_layer, self.layer_map, self.source_shape,
                                            self.target_shape)
        except GrowthSpecError as e:
            raise CheckpointError(str(e)) from None
        for key, source in renamed.items():
            like = source or next(layout_lib.with_layer(key, j) for j in range(
                self.source_shape.num_layers) if layout_lib.with_layer(key, j) in grown)
            out[key] = {key + unique[len(like):]: value for unique, value in grown[like].items()}
        return out

    def _common(self) -> dict:
        src = self.src
        common = {k: v for k, v in src.common.items()
                  if k not in ("args", "optimizer", "opt_param_scheduler", "rng_state",
                               "content_metadata", "sparkling", "model",
                               "rerun_state_machine")}  # tied to the source run's layout
        common["args"] = self.target_args
        common.setdefault("checkpoint_version", 3.0)
        common["iteration"] = src.common.get("iteration", src.iteration)
        common.setdefault("num_floating_point_operations_so_far", 0)
        metadata = {k: v for k, v in src.content_metadata.items()
                    if not k.startswith("distrib_optim")}
        if self.optimizer is not None:
            groups = optimizer_groups(self._target)
            common["optimizer"] = optimizer_common.build(
                groups, self.optimizer.param_groups, self.optimizer.step,
                optimizer_common.find_grad_scaler(src.common.get("optimizer")))
            if "opt_param_scheduler" in src.common:
                common["opt_param_scheduler"] = src.common["opt_param_scheduler"]
            metadata.update(optimizer_common.CONTENT_METADATA)
        else:
            metadata.update({k: v for k, v in optimizer_common.CONTENT_METADATA.items()
                             if not k.startswith("distrib_optim")})
        common["content_metadata"] = metadata
        record = {"source": {"path": src.path, "format": src.format, "iteration": src.iteration,
                             "optimizer_format": getattr(self.optimizer, "format", None)},
                  "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if self.grown:
            record["growth"] = self.grower.record()
            record["rewarmup"] = {"iters": self.req.rewarmup_iters,
                                  "peak_ratio": self.req.rewarmup_peak_ratio,
                                  "start_iteration": common["iteration"]}
            if self.req.new_state_bias_correction is not None:
                record["rewarmup"]["bias_correction"] = self.req.new_state_bias_correction
        common[RECORD_KEY] = record
        return common

    # ------------------------------------------------------------------ streaming
    def layered(self) -> dict:
        """Keys streamed one (target) layer at a time: every stacked key."""
        return {k: True for k in self.specs if layout_lib.is_stacked(k)}

    def produce(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """One target tensor, or one target layer of a stacked one (checkpoint/grown.py).

        Every model tensor and every optimizer-state tensor is read as ONE global tensor, passed
        through `Grower.grow(key, tensor, kind)` (skipped when no size changes: a plain format
        conversion). Tensors stacked over layers (`decoder.layers.<name>`, shape (L, ...)) are
        streamed one layer at a time, grown under their per-layer keys
        (`decoder.layers.<i>.<name>`), so memory is bounded by one layer's slice, not by the
        model's depth. When the layer count grows (`--num-layers`, the depth options of
        operators/depth.py), every TARGET layer i is made from the slice of its source layer
        (the plan's layer map), width-grown under the target key, then finished by the depth
        method (identity's zero projections, fresh layers drawn, new layers' optimizer state
        reset or kept); per-layer keys of new layers are derived from their source layer's."""
        return self.stream.read(key, layer).to(self.specs[key].dtype)

    def read_record(self, share: tuple = (0, 1)) -> dict:
        """What the conversion read (the manifest's `read`): the source and its file checksums
        (checked against its own manifest when it had one); `share` (rank, ranks): only that
        rank's part of the files to checksum (integrity.checksums)."""
        src = self.src
        sums = getattr(src, "checksums", None)
        if sums is None:
            sums = integrity.checksums(src.path, share)
        elif share[0] != 0:
            sums = {}
        return {"path": os.path.abspath(src.path), "iteration": src.iteration,
                "format": src.format, "files": sums}

    def write(self, staging: str, progress: bool = False, manifest: bool = True):
        """Stream every tensor into `staging` (collective under torchrun: each rank writes its
        share); returns the seal that writes the manifest at commit (rank 0), or None. The
        source is checksummed in a background thread while the tensors stream (each rank its
        share of the files), the written files as they are written; the ranks' parts are merged."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        share = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        pool = ThreadPoolExecutor(1) if manifest else None
        read = pool.submit(self.read_record, share) if manifest else None
        try:
            stats = write_torch_dist(staging, self.specs, self.produce, self.objects, self.common,
                                     layered=self.layered(), progress=progress,
                                     desc="growing" if self.grown else "converting",
                                     finish=self.stream.finish,
                                     digest=integrity.Crc32 if manifest else None)
            parts = [(read.result(), stats.digests)] if manifest else None
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        self.stats = stats
        if not manifest:
            return None
        if distributed:
            gathered = [None] * share[1]
            dist.all_gather_object(gathered, parts[0])
            parts = gathered
        record, written = dict(parts[0][0]), {}
        record["files"] = dict(sorted(kv for r, _ in parts for kv in r["files"].items()))
        for _, digests in parts:
            written.update(digests)
        return lambda directory: integrity.write_manifest(directory, record, known=written)

    def relaunch_flags(self) -> list:
        t = self.target_shape
        gqa = t.num_query_groups != t.num_attention_heads or getattr(
            self.src.args, "group_query_attention", False)
        flags = ["--load", self.req.save]
        for size in SIZES:   # every growable size the target has (groups count only under GQA)
            value = getattr(t, size.field)
            if value and (size.field != "num_query_groups" or gqa):
                flags += [size.flag, value]
        flags += ["--kv-channels", t.kv_channels]
        if gqa:
            flags.append("--group-query-attention")
        if t.num_experts:
            flags += ["--moe-router-topk", t.moe_router_topk]
        if t.num_experts and t.moe_layer_freq != self.source_shape.moe_layer_freq:
            flags += ["--moe-layer-freq", str(t.moe_layer_freq).replace(" ", "")]
        # The layout is the relaunch's choice: the optimizer's param groups are regrouped at
        # load by the hook (live/load_hook.py) and the padded vocabulary is fitted, so only the
        # sizes a --target-* flag checked are echoed.
        for flag, name in (("--tensor-model-parallel-size", "tensor_parallel"),
                           ("--pipeline-model-parallel-size", "pipeline_parallel"),
                           ("--expert-model-parallel-size", "expert_parallel"),
                           ("--expert-tensor-parallel-size", "expert_tensor_parallel")):
            if getattr(self.req, name, None):
                flags += [flag, getattr(self.req, name)]
        if not self.keep_rng:
            flags.append("--no-load-rng")
        if self.optimizer is None:
            flags.append("--no-load-optim")
        if self.grown and self.req.rewarmup_iters:
            flags += ["--sparkling-rewarmup-iters", self.req.rewarmup_iters]
            if self.req.rewarmup_peak_ratio is not None:
                flags += ["--sparkling-rewarmup-peak-ratio", self.req.rewarmup_peak_ratio]
        if self.grown and self.req.new_state_bias_correction is not None:
            flags += ["--sparkling-new-state-bias-correction", self.req.new_state_bias_correction]
        return [str(f) for f in flags]


def _remove_if_unused(root: str, created: bool) -> None:
    """Remove --save again when this run created it and it is still empty."""
    if created and os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)


def optimizer_groups(target_layouts) -> list:
    """Param-group options per chained optimizer of the target run, unioned over its stages."""
    per_optimizer: list[list] = []
    for lay in target_layouts:
        for i, opt in enumerate(lay.optimizers):
            while len(per_optimizer) <= i:
                per_optimizer.append([])
            for g in opt.groups:
                ident = tuple(optimizer_common._get(g, k) for k in optimizer_common.IDENTITY)
                if all(tuple(optimizer_common._get(h, k) for k in optimizer_common.IDENTITY)
                       != ident for h in per_optimizer[i]):
                    per_optimizer[i].append(g)
    return per_optimizer


def expand(req: ExpandRequest) -> ExpandResult:
    """Run one conversion (collective under torchrun: every rank calls it).

    Written format: optimizer state in MODEL SPACE as `fully_reshardable` (`optimizer.state.param
    / exp_avg / exp_avg_sq.<key>`, and `momentum_buffer` where the source has it: the kinds of
    core/layout.py's STATE_KINDS; fp32, global shapes), so Megatron loads it at any TP/EP/PP/DP
    with or without the distributed optimizer; the param groups are shaped for the target's
    expert-parallel size (`optimizer_common`). The RNG state is dropped unless asked to keep it
    (it only loads at the same TP/PP, and a grown model draws different dropout masks anyway);
    the stored args then say `no_save_rng`, so Megatron skips it by itself."""
    import torch.distributed as dist

    start = time.time()
    created = not os.path.exists(req.save)   # removed again if nothing gets published
    try:
        conv = Conversion(req)
    except BaseException:
        _remove_if_unused(req.save, created)
        raise
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    stage = StagedIteration(req.save, conv.common["iteration"], conv.src.release, req.overwrite,
                            source=req.load)
    box = [None]
    if rank == 0:
        try:
            box[0] = stage.prepare()
        except CheckpointError as e:
            box[0] = e
        except OSError as e:
            box[0] = resources.io_failure(e, req.save)
    if distributed:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], CheckpointError):
        if rank == 0:
            _remove_if_unused(req.save, created)
        raise box[0]
    stage.staging = box[0]
    try:
        try:
            seal = conv.write(stage.staging, progress=req.progress)
            if rank == 0:
                stage.commit(seal=seal)
        except (OSError, RuntimeError) as e:
            failure = resources.io_failure(e, req.save)
            if failure is None:
                raise
            raise failure from None
        if distributed:
            dist.barrier()
    except BaseException:
        if rank == 0:
            stage.abort()
            _remove_if_unused(req.save, created)
        raise
    return ExpandResult(
        path=stage.final, iteration=conv.common["iteration"], grown=conv.grown,
        source_format=conv.src.format,
        optimizer_format=None if conv.optimizer is None else conv.optimizer.format,
        tensors=len(conv.specs), bytes_written=sum(s.nbytes for s in conv.specs.values()),
        seconds=time.time() - start, rng_kept=conv.keep_rng,
        relaunch_flags=conv.relaunch_flags())

