"""`megatron-sparkling` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys


def _pretrain(argv):
    from megatron_sparkling.training.loop import pretrain

    pretrain(argv)
    return 0


def _verify(argv):
    parser = argparse.ArgumentParser(
        prog="megatron-sparkling verify",
        description="Compare a model before and after growth on the same batches: loss and "
                    "logit change, residual-stream and norm RMS per layer, r = RMS(y)/RMS(x) of "
                    "every linear, and (when the after-checkpoint carries a growth record) the "
                    "cosine of each new unit's weights and gradient with its twin's. Each model "
                    "is built from its checkpoint's stored args at 1 rank in this process.")
    parser.add_argument("--before", required=True, metavar="DIR",
                        help="checkpoint root of the model before growth (torch_dist)")
    parser.add_argument("--after", required=True, metavar="DIR",
                        help="checkpoint root of the grown model (torch_dist)")
    parser.add_argument("--iteration", type=int, default=None,
                        help="iteration to read in both roots (default: each root's "
                             "latest_checkpointed_iteration.txt)")
    parser.add_argument("--before-iteration", type=int, default=None,
                        help="iteration of --before (overrides --iteration)")
    parser.add_argument("--after-iteration", type=int, default=None,
                        help="iteration of --after (overrides --iteration)")
    parser.add_argument("--data-path", nargs="+", default=None,
                        help="tokenized corpus prefix(es) (default: the before-run's --data-path)")
    parser.add_argument("--batches", type=int, default=2,
                        help="validation micro-batches to run both models on (default 2)")
    parser.add_argument("--no-twins", action="store_true",
                        help="skip the twin-symmetry section (a backward pass of the grown model)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--max-loss-change", type=float, default=1e-2, metavar="NATS",
                        help="fail (exit 1) when |loss after - loss before| exceeds this "
                             "(default 0.01: function-preserving growth changes it by rounding)")
    parser.add_argument("--max-logit-diff", type=float, default=0.1, metavar="X",
                        help="fail (exit 1) when the largest |logit after - logit before| "
                             "exceeds this (default 0.1: rounding, bf16 included)")
    ns = parser.parse_args(argv)

    from megatron_sparkling.diagnostics.checkpoints import (
        BoundError,
        VerifyError,
        check_bounds,
        verify_checkpoints,
    )
    from megatron_sparkling.training.arguments import ArgumentError
    from megatron_sparkling.checkpoint.paths import CheckpointError

    def pick(specific):
        return ns.iteration if specific is None else specific

    try:
        # stdout carries the report alone (--json is parsed by tools); progress goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            report = verify_checkpoints(ns.before, ns.after, pick(ns.before_iteration),
                                        pick(ns.after_iteration), ns.data_path, ns.batches,
                                        twins=not ns.no_twins)
    except (VerifyError, ArgumentError, CheckpointError, FileNotFoundError) as e:
        print(f"megatron-sparkling verify: {e}", file=sys.stderr)
        return 2
    print(report.to_json() if ns.json else report.to_text(), flush=True)
    try:
        check_bounds(report, ns.max_loss_change, ns.max_logit_diff)
    except BoundError as e:
        print(f"megatron-sparkling verify: failed: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def _plan(argv):
    import json

    from megatron_sparkling.planning import loss_log
    from megatron_sparkling.planning import stage_timing

    p = argparse.ArgumentParser(
        prog="megatron-sparkling plan",
        description="Fit staged training's scaling law L(N, S) = (N_c/N)^a_N + (2 S_c/S)^a_S to "
                    "the loss curve so far and say when to grow to the target size.")
    p.add_argument("--log", required=True, help="--log-metrics-path JSON lines or a Megatron-LM "
                   "log with 'iteration N/ M | ... | lm loss: X |' lines")
    p.add_argument("--params", type=float, required=True,
                   help="non-embedding parameters of the model being trained")
    p.add_argument("--target-params", type=float, required=True,
                   help="non-embedding parameters after growth")
    p.add_argument("--tokens-per-iteration", type=float, required=True,
                   help="global batch size x sequence length")
    p.add_argument("--budget-flops", type=float, required=True,
                   help="training compute budget (FLOPs) of the whole run")
    p.add_argument("--curve", action="append", default=[], metavar="PATH:PARAMS",
                   help="a loss curve of another model size (same batch), to fit a_N too")
    p.add_argument("--a-n", type=float, default=None,
                   help=f"fix a_N (default: fitted with --curve, else {stage_timing.PUBLISHED.a_n})")
    p.add_argument("--skip-fraction", type=float, default=0.1,
                   help="leave out this early fraction of each curve (warm-up; default 0.1)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a = p.parse_args(argv)
    try:
        curves = [_curve(a.log, a.params, a.skip_fraction)]
        for item in a.curve:
            path, _, params = item.rpartition(":")
            if not path:
                p.error(f"--curve {item}: expected PATH:PARAMS")
            curves.append(_curve(path, float(params), a.skip_fraction))
        fitted = stage_timing.fit(curves, a_n=a.a_n)
        advice = stage_timing.growth_point(
            fitted.law, a.params, a.target_params, a.budget_flops,
            6 * a.params * a.tokens_per_iteration, 6 * a.target_params * a.tokens_per_iteration)
    except (stage_timing.StageTimingError, loss_log.LossLogError) as e:
        print(f"megatron-sparkling plan: {e}", file=sys.stderr)
        return 2
    now = int(curves[0].steps[-1])
    if a.json:
        import dataclasses

        print(json.dumps({"law": dataclasses.asdict(fitted.law), "rmse": fitted.rmse,
                          "iteration": now, **dataclasses.asdict(advice)}))
        return 0
    law = fitted.law
    print(f"fit: N_c {law.n_c:.4g}, S_c {law.s_c:.4g}, a_N {law.a_n:.4g}, a_S {law.a_s:.4g} "
          f"(rmse {fitted.rmse:.4f} over {sum(len(c.steps) for c in curves)} points)")
    when = ("now" if advice.grow_step <= now else
            f"in {advice.grow_step - now:.0f} iterations")
    print(f"grow {a.params:.4g} -> {a.target_params:.4g} parameters at iteration "
          f"{advice.grow_step:.0f} ({when}; iteration {now} so far), loss {advice.grow_loss:.4f}; "
          f"the grown model continues as if at its step {advice.effective_step:.0f}")
    if advice.worth_growing:
        print(f"budget {a.budget_flops:.4g} FLOPs: from scratch the grown model reaches "
              f"{advice.final_loss:.4f} in {advice.budget_steps:.0f} steps; growing reaches it "
              f"with {advice.staged_flops:.4g} FLOPs: {advice.saving:.1%} compute saved")
    else:
        print(f"budget {a.budget_flops:.4g} FLOPs: too small to gain from growing at that point "
              f"(the grown model would need step {advice.effective_step:.0f}, the budget buys "
              f"{advice.budget_steps:.0f}); train the small model, or grow with a larger budget")
    return 0


def _curve(path, params, skip_fraction):
    from megatron_sparkling.planning import loss_log
    from megatron_sparkling.planning import stage_timing

    steps, losses, _ = loss_log.read_loss_curve(path)
    first = steps[0] + skip_fraction * (steps[-1] - steps[0])
    kept = [(s, l) for s, l in zip(steps, losses) if s >= first]
    return stage_timing.Curve(params, [s for s, _ in kept], [l for _, l in kept])


def _target_sizes() -> tuple:
    """(flag, ModelShape field) of expand's target sizes: every growable size of spec.SIZES,
    and the router top-k (not grown, but a target may change it)."""
    from megatron_sparkling.core.sizes import SIZES

    return tuple((s.flag, s.field) for s in SIZES) + (("--moe-router-topk", "moe_router_topk"),)


def expand_parser() -> argparse.ArgumentParser:
    from megatron_sparkling.core.record import BIAS_CORRECTIONS
    from megatron_sparkling.methods import REGISTRY

    p = argparse.ArgumentParser(
        prog="megatron-sparkling expand",
        description="Grow a Megatron checkpoint (or, with no size changed, convert its format) "
                    "into a torch_dist checkpoint that Megatron loads at the new sizes and any "
                    "TP/EP/PP/DP layout. Run it plain, with --nproc-per-node N, or under "
                    "torchrun --nproc_per_node N.")
    p.add_argument("--load", required=True, help="source checkpoint root (never written)")
    p.add_argument("--save", required=True, help="target checkpoint root")
    p.add_argument("--iteration", type=int, default=None,
                   help="source iteration (default: the tracker file's)")
    sizes = p.add_argument_group("target sizes (default: the source's)")
    for flag, name in _target_sizes():
        sizes.add_argument(flag, dest=name, type=int, default=None)
    g = p.add_argument_group("growth")
    g.add_argument("--method", default="sparkling",
                   help=f"growth method: {', '.join(REGISTRY)} (default sparkling)")
    g.add_argument("--seed", type=int, default=1234, help="seed of the growth plan")
    g.add_argument("--method-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the growth method (repeatable)")
    g.add_argument("--rewarmup-iters", type=int, default=None,
                   help="learning-rate re-warmup length after growth (stored in the record)")
    g.add_argument("--rewarmup-peak-ratio", type=float, default=None,
                   help="re-warmup peak relative to the scheduled learning rate")
    g.add_argument("--new-state-bias-correction", choices=BIAS_CORRECTIONS, default=None,
                   help="Adam bias correction of new elements after growth: global (the "
                        "optimizer's step, default) or per-element (counted from growth); "
                        "stored in the record")
    from megatron_sparkling.core.spec import DEPTH_METHODS, DEPTH_PLACEMENTS, NEW_LAYER_STATES

    d = p.add_argument_group("depth growth (with --num-layers above the source's; combines with "
                             "the width sizes in one conversion)")
    d.add_argument("--depth-method", choices=DEPTH_METHODS, default=None,
                   help="stack (default): append copies of the layers below --insert-at; "
                        "alternate: layer i -> 2i, 2i+1; interpolate (Apollo): layer i takes "
                        "int(i L/L'); identity: copies with zero output projections (exact); "
                        "random: fresh layers as megatron-core initialises them")
    d.add_argument("--insert-at", type=int, default=None, metavar="I",
                   help="stack (and identity / random placed like it): insert the new layers "
                        "before source layer I, 0 .. L (default: on top)")
    d.add_argument("--depth-placement", choices=DEPTH_PLACEMENTS, default=None,
                   help="layer order of identity / random layers (default stack)")
    d.add_argument("--depth-new-state", choices=NEW_LAYER_STATES, default=None,
                   help="optimizer state of new layers: reset to zero (default) or copied from "
                        "the source layer")
    t = p.add_argument_group("target layout (validated; the checkpoint loads at any layout, the "
                             "optimizer param groups are shaped for the expert-parallel size)")
    t.add_argument("--target-tensor-model-parallel-size", type=int, default=None)
    t.add_argument("--target-pipeline-model-parallel-size", type=int, default=None)
    t.add_argument("--target-expert-model-parallel-size", type=int, default=None)
    t.add_argument("--target-expert-tensor-parallel-size", type=int, default=None)
    o = p.add_argument_group("output")
    o.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already at --save")
    o.add_argument("--keep-rng", action="store_true",
                   help="carry the RNG state over (only for a relaunch at the source's TP/PP/EP)")
    o.add_argument("--no-optimizer", action="store_true",
                   help="drop the optimizer state (relaunch with --no-load-optim)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, metavar="N",
                   help="split the tensors over N local processes, as torchrun --nproc_per_node "
                        "N would (a failure is then the ranks' one line, without torchrun's "
                        "launcher traceback)")
    w = p.add_argument_group("wandb (Megatron-LM's flag names; pip install "
                             "'megatron-sparkling[wandb]'; WANDB_MODE=offline works offline)")
    w.add_argument("--wandb-project", default="",
                   help="log the growth event and the diagnostics summary to this project")
    w.add_argument("--wandb-exp-name", default="")
    w.add_argument("--wandb-save-dir", default="")
    return p


def expand_request(ns):
    from megatron_sparkling.checkpoint.expand import ExpandRequest
    from megatron_sparkling.methods.base import parse_method_options

    sizes = {n: getattr(ns, n) for _, n in _target_sizes() if getattr(ns, n) is not None}
    try:
        options = parse_method_options(ns.method_option)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    depth = None
    if any(v is not None for v in (ns.depth_method, ns.insert_at, ns.depth_placement,
                                   ns.depth_new_state)):
        from megatron_sparkling.core.spec import DepthOptions

        depth = DepthOptions(ns.depth_method or "stack", ns.insert_at, ns.depth_placement,
                             ns.depth_new_state or "reset")
    return ExpandRequest(
        load=ns.load, save=ns.save, iteration=ns.iteration, sizes=sizes, depth=depth,
        method=ns.method,
        seed=ns.seed, options=options, tensor_parallel=ns.target_tensor_model_parallel_size,
        pipeline_parallel=ns.target_pipeline_model_parallel_size,
        expert_parallel=ns.target_expert_model_parallel_size,
        expert_tensor_parallel=ns.target_expert_tensor_parallel_size,
        rewarmup_iters=ns.rewarmup_iters, rewarmup_peak_ratio=ns.rewarmup_peak_ratio,
        new_state_bias_correction=ns.new_state_bias_correction,
        keep_rng=ns.keep_rng, drop_optimizer=ns.no_optimizer, overwrite=ns.overwrite,
        progress=not ns.no_progress)


def _init_distributed() -> bool:
    """A gloo process group under torchrun (tensors are split among the ranks)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def _expand(argv, request_hook=None):
    """`expand`; `request_hook(request)` lets tests pass a GrowthMethod instance."""
    from megatron_sparkling.checkpoint.expand import expand

    from megatron_sparkling import wandb_log

    ns = expand_parser().parse_args(argv)
    try:
        wandb_log.check_available(ns)
    except wandb_log.WandbError as e:
        print(f"megatron-sparkling expand: error: {e}", file=sys.stderr, flush=True)
        return 1
    if ns.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_local_ranks(argv, ns.nproc_per_node)
    req = expand_request(ns)
    if request_hook is not None:
        request_hook(req)
    started = _init_distributed()
    try:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        try:
            result = expand(req)
        except BaseException as e:
            line = error_line(e, ns.save)
            if line is None:
                raise
            if rank == 0:   # the other ranks raised the same error: one line in all
                print(f"megatron-sparkling expand: error: {line}", file=sys.stderr, flush=True)
            _report_to_torchrun(line)
            return 1
        if rank == 0:
            _report(result)
            wandb_log.log_expand(ns, result)
        return 0
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _launch_local_ranks(argv, nproc: int) -> int:
    """`expand --nproc-per-node N`: start N local ranks through torch's elastic launcher (what
    torchrun --standalone does). A refusal is printed once by rank 0; torchrun would add its own
    ChildFailedError traceback, which this keeps out."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # torchrun's default for several ranks
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"sparkling-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "megatron_sparkling.cli", "expand", *argv)
    except ChildFailedError:
        return 1
    return 0


def _report_to_torchrun(line: str) -> None:
    """Under torchrun: give the launcher the one line as this rank's error (its failure summary
    shows it instead of a pointer to tracebacks), and let rank 0 finish its clean-up and print
    before any rank exits (torchrun kills the others when the first exits)."""
    import json
    import time
    from datetime import timedelta

    import torch.distributed as dist

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=120))
        except RuntimeError:
            pass   # a rank that is gone: nothing to wait for


def error_line(exc: BaseException, where: str):
    """The one line for an error the user can act on (a refusal, an I/O or resource failure,
    also when DCP wrapped it for a rank); None for a bug (the traceback is then the report)."""
    from megatron_sparkling.checkpoint import resources
    from megatron_sparkling.checkpoint.paths import CheckpointError
    from megatron_sparkling.checkpoint.writer import first_failure
    from megatron_sparkling.core.spec import GrowthSpecError

    exc = first_failure(exc)
    if isinstance(exc, (CheckpointError, GrowthSpecError)):
        return str(exc)
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
        return ("out of memory while converting; run it on a machine with more memory, or "
                "check the target sizes")
    if isinstance(exc, (OSError, RuntimeError)):
        failure = resources.io_failure(exc, where)
        return None if failure is None else str(failure)
    return None


def _report(result) -> None:
    what = "grown" if result.grown else "converted"
    optimizer = ("optimizer state " + result.optimizer_format + " -> fully_reshardable (model "
                 "space)") if result.optimizer_format else "no optimizer state"
    print(f"{what} iteration {result.iteration} ({result.source_format}; {optimizer}) -> "
          f"{result.path}: {result.tensors} tensors, {result.bytes_written / 2**30:.3f} GiB in "
          f"{result.seconds:.1f} s", flush=True)
    if not result.rng_kept:
        print("the RNG state was not carried over: relaunch with --no-load-rng (the stored args "
              "say no_save_rng, so Megatron-LM skips it by itself)", flush=True)
    print("relaunch Megatron (at any TP/EP/PP/DP, with megatron_sparkling installed) with:\n  "
          + " ".join(result.relaunch_flags), flush=True)


COMMANDS = {
    "pretrain": (_pretrain, "pre-train with Megatron-LM's flags (same as examples/pretrain_moe.py)"),
    "verify": (_verify, "compare a checkpoint before and after growth (RMS per layer, r of every "
                        "linear, loss and logit change, twin symmetry)"),
    "plan": (_plan, "fit the scaling law to a loss log and say when to grow (staged training)"),
    "expand": (_expand, "grow (or convert) a Megatron checkpoint into a torch_dist checkpoint"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="megatron-sparkling", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(COMMANDS.items())))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    ns = parser.parse_args(argv[:1])
    return COMMANDS[ns.command][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
