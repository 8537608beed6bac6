"""`megatron-sparkling` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import os
import sys


def _pretrain(argv):
    from megatron_sparkling.training.loop import pretrain

    pretrain(argv)
    return 0


def expand_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-sparkling expand",
        description="Grow a Megatron checkpoint (or, with no size changed, convert its format) "
                    "into a torch_dist checkpoint that Megatron loads at the new sizes and any "
                    "TP/EP/PP/DP layout. Run it plain or under torchrun --nproc_per_node N.")
    p.add_argument("--load", required=True, help="source checkpoint root (never written)")
    p.add_argument("--save", required=True, help="target checkpoint root")
    p.add_argument("--iteration", type=int, default=None,
                   help="source iteration (default: the tracker file's)")
    sizes = p.add_argument_group("target sizes (default: the source's)")
    for flag in ("hidden-size", "ffn-hidden-size", "moe-ffn-hidden-size",
                 "moe-shared-expert-intermediate-size", "num-attention-heads",
                 "num-query-groups", "num-experts", "moe-router-topk"):
        sizes.add_argument("--" + flag, type=int, default=None)
    g = p.add_argument_group("growth")
    g.add_argument("--method", default="sparkling", help="growth method (registry name)")
    g.add_argument("--seed", type=int, default=1234, help="seed of the growth plan")
    g.add_argument("--method-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the growth method (repeatable)")
    g.add_argument("--rewarmup-iters", type=int, default=None,
                   help="learning-rate re-warmup length after growth (stored in the record)")
    g.add_argument("--rewarmup-peak-ratio", type=float, default=None,
                   help="re-warmup peak relative to the scheduled learning rate")
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
    return p


def _option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def expand_request(ns):
    from megatron_sparkling.checkpoint.convert import ExpandRequest

    names = ("hidden_size", "ffn_hidden_size", "moe_ffn_hidden_size",
             "moe_shared_expert_intermediate_size", "num_attention_heads", "num_query_groups",
             "num_experts", "moe_router_topk")
    sizes = {n: getattr(ns, n) for n in names if getattr(ns, n) is not None}
    options = {}
    for item in ns.method_option:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--method-option {item!r}: write NAME=VALUE")
        options[name.replace("-", "_")] = _option_value(value)
    return ExpandRequest(
        load=ns.load, save=ns.save, iteration=ns.iteration, sizes=sizes, method=ns.method,
        seed=ns.seed, options=options, tensor_parallel=ns.target_tensor_model_parallel_size,
        pipeline_parallel=ns.target_pipeline_model_parallel_size,
        expert_parallel=ns.target_expert_model_parallel_size,
        expert_tensor_parallel=ns.target_expert_tensor_parallel_size,
        rewarmup_iters=ns.rewarmup_iters, rewarmup_peak_ratio=ns.rewarmup_peak_ratio,
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
    from megatron_sparkling.checkpoint.convert import expand
    from megatron_sparkling.spec import GrowthSpecError
    from megatron_sparkling.training.checkpointing import CheckpointError

    ns = expand_parser().parse_args(argv)
    req = expand_request(ns)
    if request_hook is not None:
        request_hook(req)
    started = _init_distributed()
    try:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        try:
            result = expand(req)
        except (CheckpointError, GrowthSpecError) as e:
            if rank == 0:
                print(f"megatron-sparkling expand: error: {e}", file=sys.stderr, flush=True)
            return 1
        if rank == 0:
            _report(result)
        return 0
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


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
    print("relaunch Megatron with:\n  " + " ".join(result.relaunch_flags), flush=True)


COMMANDS = {
    "pretrain": (_pretrain, "pre-train with Megatron-LM's flags (same as examples/pretrain_moe.py)"),
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
