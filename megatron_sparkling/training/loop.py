"""The pre-training loop: Megatron-LM's pretrain() for a megatron-core GPT/MoE model.

`Pretrainer` owns one run: model chunks (DDP), megatron-core optimizer, OptimizerParamScheduler,
datasets, and the iteration counter. Its steps are public so tests and benchmarks can drive a
run in process; `pretrain(argv)` is the command-line entry used by examples/pretrain_moe.py.
Log lines follow Megatron-LM's (`iteration N/ M | ... | lm loss: X | ...`) and every logged
figure is also kept in `history` (and written as JSON lines with --log-metrics-path).
"""
from __future__ import annotations

import json
import math
import os
import time
import weakref
from datetime import datetime
from functools import partial

import torch

from megatron_sparkling import wandb_log
from megatron_sparkling.live import load_hook, rewarmup
from megatron_sparkling.live.state import carry_position
from megatron_sparkling.log import print_rank_0
from megatron_sparkling.mcore import model as model_lib
from megatron_sparkling.training import checkpointing, data, flops, growth, lvps, progressive
from megatron_sparkling.training.initialize import initialize, shutdown


def _training_modes():
    """Modules that add a training mode: each has add_flags(parser) and hook(args) -> a hook
    or None (see `Pretrainer` for what a hook may do)."""
    return (progressive, lvps)


def _add_run_flags(parser):
    g = parser.add_argument_group("megatron_sparkling run")
    g.add_argument("--log-metrics-path", default=None,
                   help="Append every training and validation figure as a JSON line here.")
    for mode in _training_modes():
        mode.add_flags(parser)
    return parser


def _hooks_from_args(args) -> list:
    return [h for h in (mode.hook(args) for mode in _training_modes()) if h is not None]


def _chain_providers(*providers):
    def provider(parser):
        for p in providers:
            if p is not None:
                parser = p(parser) or parser
        return parser
    return provider


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of token losses, token count, and the [sum, count] pair reported for logging."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1),
                                                    num_tokens.view(1).float()])}


def forward_step(data_iterator, model):
    batch = data.to_device(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"])


def print_rank_last(message: str) -> None:
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print(message, flush=True)


class Pretrainer:
    """One pre-training run. Build with `Pretrainer.from_argv([...])` or from parsed args.

    `hooks` change how a run trains (progressive depth, LVPS): each may define
    `configure(args)` (before the model is built; may change args), `attach(trainer)` (after the
    model is built or grown) and `before_step(trainer)` (before every training iteration; may call
    `grow_model`).
    """

    def __init__(self, args, hooks=()):
        self.hooks = list(hooks)
        for hook in self.hooks:
            if hasattr(hook, "configure"):
                hook.configure(args)
        self.args = args
        self.tokenizer = data.build_tokenizer(args)
        args.padded_vocab_size = model_lib.padded_vocab_size(self.tokenizer.vocab_size, args)
        self.model = model_lib.build_model(args)
        self.optimizer = model_lib.build_optimizer(args, self.model)
        self.scheduler = model_lib.build_scheduler(args, self.optimizer)
        self.iteration = 0
        self.last_saved_iteration = None
        self.exited = False
        self.num_floating_point_operations_so_far = 0.0
        self.history: list[dict] = []
        self.flops_per_iteration = flops.training_flops_per_iteration(args)
        if args.load:
            # With growth on load: a narrower checkpoint grows to this run's sizes in memory, and
            # a grown checkpoint (or one saved inside a re-warmup) re-warms new elements' LR
            # (live/load_hook.py). The loader is looked up now: install() may have wrapped it.
            load_hook.on_growth(wandb_log.log_hook_growth)
            load = load_hook.growing(checkpointing.load_checkpoint)
            self.iteration, self.num_floating_point_operations_so_far = (
                load(args, self.model, self.optimizer, self.scheduler))
            if args.finetune:
                args.consumed_train_samples = 0
        args.iteration = self.iteration
        self.train_ds, self.valid_ds, self.test_ds = data.build_datasets(args, self.tokenizer)
        self._train_iter = None
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.forward_backward = get_forward_backward_func()
        self._wire_config()
        if args.log_metrics_path and torch.distributed.get_rank() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.log_metrics_path)), exist_ok=True)
        self._attach_hooks()

    @classmethod
    def from_argv(cls, argv=None, extra_args_provider=None):
        args = initialize(argv, _chain_providers(_add_run_flags, load_hook.add_args,
                                                 extra_args_provider))
        wandb_log.check_available(args)
        return cls(args, _hooks_from_args(args))

    def _wire_config(self):
        """The model config's callbacks into this run, as Megatron-LM's setup sets them."""
        self.config = model_lib.unwrap(self.model)[0].config
        self.config.finalize_model_grads_func = _finalize_model_grads
        # Held weakly: config -> optimizer -> model -> config would be a cycle the garbage
        # collector never frees here, so every finished in-process run would keep its model and
        # its gloo process groups' threads (a test session slowed to a crawl).
        scale_loss = weakref.WeakMethod(self.optimizer.scale_loss)
        self.config.grad_scale_func = lambda loss: scale_loss()(loss)

    def _attach_hooks(self):
        for hook in self.hooks:
            if hasattr(hook, "attach"):
                hook.attach(self)

    def grow_model(self, new_args, make_tensor) -> None:
        """Continue this run with a model built from `new_args` (e.g. more layers): every weight
        and optimizer-state tensor made by `make_tensor(key, shape, old global tensors)` (see
        training/growth.py); iteration, data position, optimizer step and LR schedule go on."""
        sources, step = growth.global_state(self.args, self.model, self.optimizer)
        new_args.iteration = self.iteration
        carry_position(new_args, self.args)   # the data position goes on
        self.model, self.optimizer = growth.build_grown(new_args, sources, step, make_tensor)
        del sources
        self.scheduler = growth.carry_scheduler(new_args, self.optimizer, self.scheduler)
        self.args = new_args
        self._wire_config()
        self.flops_per_iteration = flops.training_flops_per_iteration(new_args)
        self._attach_hooks()

    # ------------------------------------------------------------------ steps
    @property
    def num_microbatches(self) -> int:
        a = self.args
        return a.global_batch_size // (a.micro_batch_size * a.data_parallel_size)

    def _train_batches(self):
        if self._train_iter is None:
            remaining = self.args.train_iters - self.iteration
            self._train_iter = data.microbatches(self.train_ds, self.args.consumed_train_samples,
                                                 max(remaining, 0), self.args)
        return self._train_iter

    def _reduce_lm_loss(self, reports) -> float:
        """Token-weighted loss over micro-batches and DP ranks; the same value on every rank."""
        from megatron.core import parallel_state as mpu

        pair = torch.zeros(2, dtype=torch.float64)
        if mpu.is_pipeline_last_stage():
            for r in reports:
                pair += r["lm loss"].double().cpu()
            torch.distributed.all_reduce(
                pair, group=mpu.get_data_parallel_group(with_context_parallel=True))
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            last = mpu.get_pipeline_model_parallel_last_rank()
            torch.distributed.broadcast(pair, src=last,
                                        group=mpu.get_pipeline_model_parallel_group())
        return (pair[0] / pair[1].clamp(min=1)).item()

    def train_step(self) -> dict:
        """One iteration; returns its logged figures."""
        for hook in self.hooks:
            if hasattr(hook, "before_step"):
                hook.before_step(self)
        args = self.args
        start = time.time()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self.forward_backward(
            forward_step_func=forward_step, data_iterator=self._train_batches(),
            model=self.model, num_microbatches=self.num_microbatches,
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
            decoder_seq_length=args.seq_length, forward_only=False)
        model_lib.drop_autograd_leftovers(self.model)
        update_successful, grad_norm, num_zeros = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=args.global_batch_size)
        else:
            args.skipped_train_samples += args.global_batch_size
        self.iteration += 1
        args.iteration = self.iteration
        args.consumed_train_samples += args.global_batch_size
        self.num_floating_point_operations_so_far += self.flops_per_iteration
        record = {
            "iteration": self.iteration,
            "lm loss": self._reduce_lm_loss(reports),
            "learning rate": float(self.optimizer.param_groups[0]["lr"]),
            "grad norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "skipped": not update_successful,
            "consumed samples": args.consumed_train_samples,
            "flops": self.num_floating_point_operations_so_far,
            "elapsed ms": (time.time() - start) * 1000.0,
        }
        record.update(rewarmup.lr_figures(self.scheduler))
        record.update(self._moe_metrics())
        self._record(record)
        return record

    def _moe_metrics(self) -> dict:
        args = self.args
        if not args.num_experts or not args.num_layers:
            return {}
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        names = ["load_balancing_loss"] if "aux_loss" in args.moe_router_load_balancing_type else []
        if args.moe_z_loss_coeff is not None:
            names.append("z_loss")
        totals = {}
        track_moe_metrics(loss_scale=1.0 / self.num_microbatches, iteration=self.iteration,
                          writer=None, total_loss_dict=totals, force_initialize=True,
                          track_names=names, num_layers=args.num_layers,
                          moe_layer_freq=args.moe_layer_freq)
        return {k: float(v) for k, v in totals.items()}

    @torch.no_grad()
    def evaluate(self, dataset=None, eval_iters=None, model=None) -> float:
        """Token-weighted lm loss over the first eval_iters global batches of `dataset`, of this
        run's model or of `model` (model chunks of the same run, e.g. a grown candidate)."""
        args = self.args
        dataset = self.valid_ds if dataset is None else dataset
        eval_iters = args.eval_iters if eval_iters is None else eval_iters
        model = self.model if model is None else model
        for chunk in model:
            chunk.eval()
        reports = []
        batches = data.microbatches(dataset, 0, eval_iters, args)
        for _ in range(eval_iters):
            reports += self.forward_backward(
                forward_step_func=forward_step, data_iterator=batches, model=model,
                num_microbatches=self.num_microbatches, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, decoder_seq_length=args.seq_length,
                forward_only=True)
        for chunk in model:
            chunk.train()
        if args.num_experts:
            from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

            clear_aux_losses_tracker()
        return self._reduce_lm_loss(reports)

    def validate(self) -> float:
        loss = self.evaluate()
        self._record({"iteration": self.iteration, "validation lm loss": loss,
                      "flops": self.num_floating_point_operations_so_far})
        print_rank_last("-" * 80)
        print_rank_last(f" validation loss at iteration {self.iteration} | lm loss value: "
                        f"{loss:.6E} | lm loss PPL: {math.exp(min(20, loss)):.6E} | ")
        print_rank_last("-" * 80)
        return loss

    def save(self, save_dir=None) -> str:
        path = checkpointing.save_checkpoint(
            self.args, self.iteration, self.model, self.optimizer, self.scheduler,
            self.num_floating_point_operations_so_far, save_dir=save_dir)
        if save_dir is None:
            self.last_saved_iteration = self.iteration
        print_rank_0(f"  successfully saved checkpoint at iteration {self.iteration:7d} to "
                     f"{save_dir or self.args.save}")
        return path

    # ------------------------------------------------------------------ logging
    def _record(self, record: dict) -> None:
        self.history.append(record)
        if self.args.wandb_project:
            wandb_log.log_record(self.args, record)
        path = self.args.log_metrics_path
        if path and torch.distributed.get_rank() == 0:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_line(self, record: dict) -> str:
        args = self.args
        line = f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
        line += f" iteration {record['iteration']:8d}/{args.train_iters:8d} |"
        line += f" consumed samples: {record['consumed samples']:12d} |"
        line += f" elapsed time per iteration (ms): {record['elapsed ms']:.1f} |"
        line += f" learning rate: {record['learning rate']:.6E} |"
        for key in (rewarmup.NEW_LR, rewarmup.OLD_LR):
            if key in record:
                line += f" {key}: {record[key]:.6E} |"
        line += f" global batch size: {args.global_batch_size:5d} |"
        line += f" lm loss: {record['lm loss']:.6E} |"
        for key in ("load_balancing_loss", "z_loss"):
            if key in record:
                line += f" {key}: {record[key]:.6E} |"
        line += f" loss scale: {self.optimizer.get_loss_scale().item():.1f} |"
        line += f" grad norm: {record['grad norm']:.3f} |"
        line += f" number of skipped iterations: {int(record['skipped']):3d} |"
        return line

    # ------------------------------------------------------------------ run
    def train(self, until_iteration=None) -> list[dict]:
        """Train to `until_iteration` (default --train-iters), evaluating, saving and exiting at
        Megatron-LM's intervals."""
        args = self.args
        stop = args.train_iters if until_iteration is None else until_iteration
        while self.iteration < stop:
            record = self.train_step()
            it = self.iteration
            if it % args.log_interval == 0 or it == 1:
                print_rank_last(self.log_line(record))
            if args.eval_interval and it % args.eval_interval == 0 and args.eval_iters > 0:
                self.validate()
            if args.save and args.save_interval and it % args.save_interval == 0:
                self.save()
            if args.exit_interval and it % args.exit_interval == 0:
                if args.save and self.last_saved_iteration != it:
                    self.save()
                print_rank_0(f"exiting program at iteration {it}")
                self.exited = True
                return self.history
        return self.history

    def run(self) -> list[dict]:
        args = self.args
        if not args.skip_train:
            self.train()
            if self.exited:
                return self.history
            if args.save and self.iteration > 0 and self.last_saved_iteration != self.iteration:
                self.save()
        if args.eval_iters > 0 and not (args.eval_interval
                                        and self.iteration % args.eval_interval == 0):
            self.validate()
        return self.history


def _finalize_model_grads(model, num_tokens=None, **kwargs):
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=num_tokens, **kwargs)


def pretrain(argv=None, extra_args_provider=None) -> list[dict]:
    """Command-line entry: parse, initialize, train, save, shut down."""
    trainer = Pretrainer.from_argv(argv, extra_args_provider)
    try:
        print_rank_0(f" > number of parameters: "
                     f"{sum(p.numel() for c in trainer.model for p in c.parameters())} on rank 0; "
                     f"training FLOPs per iteration: {trainer.flops_per_iteration:.3e}")
        return trainer.run()
    finally:
        wandb_log.finish()
        shutdown()
