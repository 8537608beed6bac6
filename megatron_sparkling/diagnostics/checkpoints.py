"""Models and batches for `megatron-sparkling verify`, from two torch_dist checkpoint roots.

Each model is built from the args stored in its checkpoint, at 1 rank in this process (tensor,
pipeline, expert and context parallel sizes 1; the local layer spec on CPU, Transformer Engine's
where a GPU and TE are present), and its weights are loaded strictly through the pre-training
script's own `load_checkpoint` (any saved TP/PP/EP layout is resharded by dist_checkpointing;
optimizer and RNG state are not read). On CPU the model runs in fp32 whatever --bf16/--fp16 the
run used.

The batches are the first N micro-batches of the validation split (the training split where the
run has no validation split), built with megatron-core's GPTDataset from the before-checkpoint's
args (`--data-path` can point elsewhere). The after-checkpoint's growth record, stored under the
common-state key `sparkling` by the converter (Grower.record()), gives the growth plan for the
twin section.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import os
import socket
from typing import Optional

import torch

from megatron_sparkling.checkpoint import integrity, paths
from megatron_sparkling.checkpoint.source import open_checkpoint
from megatron_sparkling.compat.cpu import have_gpu, have_transformer_engine
from megatron_sparkling.core.record import RECORD_KEY, RecordError, growth_record, plan_of
from megatron_sparkling.core.sizes import SIZES
from megatron_sparkling.core.spec import ModelShape
from megatron_sparkling.diagnostics.report import compare
from megatron_sparkling.mcore import model as model_lib
from megatron_sparkling.training import arguments, checkpointing, data
from megatron_sparkling.training import initialize as init


class VerifyError(ValueError):
    """Inputs `verify` cannot use; the message names the problem and the fix."""


class BoundError(VerifyError):
    """The grown checkpoint breaks a bound of `verify` (--max-loss-change, --max-logit-diff)."""


def checkpoint_dir(root: str, iteration: Optional[int] = None) -> tuple[str, int]:
    """(iter_XXXXXXX directory, iteration) of a checkpoint root: `iteration`, or the tracker's."""
    from megatron.core import dist_checkpointing

    if os.path.exists(root) and not os.path.isdir(root):
        raise VerifyError(f"{root} is a file, not a directory; give a checkpoint root (the "
                          "--save directory of a pre-training run)")
    if not os.path.isdir(root):
        raise VerifyError(f"{root}: no such directory; give a checkpoint root (the --save "
                          "directory of a pre-training run)")
    release = False
    if iteration is None:
        iteration, release = paths.read_tracker(root)
        if iteration < 0:
            raise VerifyError(f"{root}: no {paths.TRACKER}; give a checkpoint root "
                              "written by pre-training, or pick one with --iteration")
    path = paths.iteration_dir(root, iteration, release)
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise VerifyError(f"{path}: not a torch_dist checkpoint (no metadata.json); check "
                          "the root and --iteration")
    return path, iteration


def checked_source(root: str, iteration: int, side: str):
    """The checkpoint at `root` opened and checked as `expand` checks its source (files present
    and whole, the manifest, args describing the tensors) and every value read once
    (integrity.check_all): a damaged checkpoint is refused in one line before a model is built."""
    try:
        src = open_checkpoint(root, iteration)
        src.check_args_match_tensors()
        integrity.check_all(src)
    except paths.CheckpointError as e:
        raise VerifyError(f"--{side}: {e}") from None
    return src


def check_not_swapped(before_args, after_args) -> None:
    """--before must be the narrow model: refuse a pair whose sizes only shrink from before to
    after, or whose growth record sits in the before-checkpoint."""
    before, after = ModelShape.from_args(before_args), ModelShape.from_args(after_args)
    pairs = [(s.field, getattr(before, s.field), getattr(after, s.field)) for s in SIZES]
    larger = [(f, b, a) for f, b, a in pairs if b and a and b > a]
    smaller = [(f, b, a) for f, b, a in pairs if b and a and b < a]
    if larger and not smaller:
        f, b, a = larger[0]
        raise VerifyError(f"--before is the larger model ({f} {b} > {a} of --after): --before "
                          "and --after look swapped; pass the checkpoint before growth as "
                          "--before")


def _same_sizes(shape: dict, args) -> bool:
    model = ModelShape.from_args(args)
    return all(shape.get(s.field) == getattr(model, s.field) for s in SIZES if s.field in shape)


def check_bounds(report, max_loss_change: float, max_logit_diff: float) -> None:
    """The grown model keeps the function within the bounds (VerifyError naming the bound)."""
    delta = report.loss["delta"]
    if not abs(delta) <= max_loss_change:
        raise BoundError(f"loss change {delta:+.3g} exceeds --max-loss-change {max_loss_change:g}"
                         "; the grown checkpoint does not preserve the model's function (a "
                         "function-preserving method changes it by rounding only)")
    diff = report.logits["max_abs_diff"]
    if not diff <= max_logit_diff:
        raise BoundError(f"max logit change {diff:.3g} exceeds --max-logit-diff "
                         f"{max_logit_diff:g}; the grown checkpoint does not preserve the "
                         "model's function (a function-preserving method changes it by "
                         "rounding only)")


def common_state(path: str) -> dict:
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(path)
    if common.get("args") is None:
        raise VerifyError(f"{path}: the checkpoint stores no args; verify builds each model "
                          "from its checkpoint's args (Megatron-LM and our pre-training store "
                          "them)")
    return common


def one_rank_args(stored_args, data_path: Optional[list] = None):
    """A copy of a checkpoint's args that builds the whole model in one process."""
    args = copy.copy(stored_args)
    args.tensor_model_parallel_size = 1
    args.pipeline_model_parallel_size = 1
    args.virtual_pipeline_model_parallel_size = None
    args.expert_model_parallel_size = 1
    args.expert_tensor_parallel_size = 1
    args.context_parallel_size = 1
    args.sequence_parallel = False
    args.use_distributed_optimizer = False
    args.transformer_impl = None          # chosen again for this machine
    args.distributed_backend = None
    args.use_cpu_initialization = None
    gpu = have_gpu()
    if not gpu:
        args.bf16 = args.fp16 = False
    if data_path:
        args.data_path = list(data_path)
        args.mock_data = False
    args.train_iters = 1                  # datasets sized for the check, not the whole run
    args.lr_decay_iters = max(getattr(args, "lr_decay_iters", 2) or 2, 2)
    args.lr_warmup_iters, args.lr_warmup_fraction = 0, None
    args.no_load_optim = args.no_load_rng = True
    args.finetune = False
    args.exit_on_missing_checkpoint = True
    args.load = None
    args.save = None
    return arguments.validate_args(args, 1, gpu, have_transformer_engine())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_process(args):
    """torch.distributed and megatron-core parallel state for 1 rank, set up here and torn down
    after (or reused, when this process already runs a 1-rank model-parallel state)."""
    from megatron.core import parallel_state as mpu
    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1 or not mpu.model_parallel_is_initialized():
            raise VerifyError("verify runs at 1 rank; launch it as a plain process, not under "
                              "torchrun")
        yield
        return
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise VerifyError("verify runs at 1 rank; launch it as a plain process, not under torchrun")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if saved[k] is None or k == "MASTER_PORT"})
    try:
        init.initialize(args)
        yield
    finally:
        init.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_model(root: str, iteration: int, args):
    """The model chunks of checkpoint `root` at `iteration`, loaded strictly (no DDP wrapper)."""
    model = model_lib.build_model(args, wrap_with_ddp=False)
    args = copy.copy(args)
    args.ckpt_step = iteration
    checkpointing.load_checkpoint(args, model, None, None, load_dir=root, strict=True)
    for chunk in model:
        chunk.eval()
    return model


def diagnostic_batches(args, count: int) -> tuple[list, str]:
    """(the first `count` micro-batches of the validation split, or of the training split where
    there is none; the split's name)."""
    tokenizer = data.build_tokenizer(args)
    sized = copy.copy(args)
    sized.eval_iters = max(1, -(-count * args.micro_batch_size // args.global_batch_size))
    train, valid, _ = data.build_datasets(sized, tokenizer)
    dataset, split = (valid, "validation") if valid is not None and len(valid) else (train, "train")
    if dataset is None or not len(dataset):
        raise VerifyError("the data has no samples for the check; give --data-path PREFIX of "
                          "a tokenized corpus")
    per_iteration = args.global_batch_size // args.micro_batch_size
    iterations = -(-count // per_iteration)
    return list(itertools.islice(data.microbatches(dataset, 0, iterations, args), count)), split


def plan_from_record(record: dict):
    """The GrowthPlan of a growth record (Grower.record())."""
    try:
        return plan_of(record)
    except RecordError as e:
        raise VerifyError(f"the growth record under {RECORD_KEY!r}: {e}") from None


def _check_plan_fits(plan, before_args, after_args) -> None:
    for side, shape, args in (("source", plan.spec.source, before_args),
                              ("target", plan.spec.target, after_args)):
        model = ModelShape.from_args(args)
        differ = [s.field for s in SIZES if getattr(model, s.field) != getattr(shape, s.field)]
        if differ:
            which = "before" if side == "source" else "after"
            raise VerifyError(f"the growth record's {side} shape differs from the {which} "
                              f"checkpoint's model in {', '.join(differ)}; compare the checkpoints "
                              "the growth was made from and to")


def verify_checkpoints(before: str, after: str, before_iteration: Optional[int] = None,
                       after_iteration: Optional[int] = None, data_path: Optional[list] = None,
                       batches: int = 2, twins: bool = True):
    """The growth report of two checkpoint roots (see report.compare)."""
    if batches < 1:
        raise VerifyError(f"--batches must be at least 1 (got {batches})")
    checkpoint_dir(before, before_iteration), checkpoint_dir(after, after_iteration)
    checked_source(before, before_iteration, "before")
    checked_source(after, after_iteration, "after")
    before_dir, before_iteration = checkpoint_dir(before, before_iteration)
    after_dir, after_iteration = checkpoint_dir(after, after_iteration)
    before_common, after_common = common_state(before_dir), common_state(after_dir)
    record = growth_record(after_common)
    check_not_swapped(before_common["args"], after_common["args"])
    swapped = growth_record(before_common)
    if swapped and not record and _same_sizes(swapped.get("source") or {}, after_common["args"]):
        raise VerifyError("--before carries the growth record that made it from --after: "
                          "--before and --after look swapped; pass the checkpoint before "
                          "growth as --before")
    before_args = one_rank_args(before_common["args"], data_path)
    after_args = one_rank_args(after_common["args"], data_path)
    if before_args.seq_length != after_args.seq_length:
        raise VerifyError(f"sequence length {before_args.seq_length} before but "
                          f"{after_args.seq_length} after; the check runs both on the same batches")
    if before_args.padded_vocab_size != after_args.padded_vocab_size:
        raise VerifyError(f"vocabulary {before_args.padded_vocab_size} before but "
                          f"{after_args.padded_vocab_size} after; growth keeps the tokenizer")
    plan = plan_from_record(record) if (record and twins) else None
    if plan is not None:
        _check_plan_fits(plan, before_args, after_args)
    with one_rank_process(before_args):
        batch_list, split = diagnostic_batches(before_args, batches)
        model_before = load_model(before, before_iteration, before_args)
        model_after = load_model(after, after_iteration, after_args)
        meta = {"before": os.path.abspath(before), "before_iteration": before_iteration,
                "after": os.path.abspath(after), "after_iteration": after_iteration,
                "batches": len(batch_list), "split": split,
                "growth": ({k: record.get(k) for k in ("method", "seed", "options")}
                           if record else None)}
        return compare(model_before, model_after, batch_list, plan=plan, meta=meta)
