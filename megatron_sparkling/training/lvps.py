"""Apollo's low-value-prioritized sampling (LVPS): N unique layers, each step run at a sampled
depth L in [N, L_max] that shares them by interpolation; stages grow N by interpolation.

Flags: `add_flags` (--num-layers is L_max, the depth every step samples up to). Depths near N
are drawn most often (`lvps_depth`; the curve is described above X_MIN). The depth-L network
runs unique layer int(i / (L/N)) at position i (`interpolation_indices`, run by
`LayerSchedule`). Evaluation runs L_max.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from megatron_sparkling.checkpoint.paths import checkpoint_to_load
from megatron_sparkling.core.spec import DepthOptions, GrowthSpec, ModelShape
from megatron_sparkling.mcore.model import unwrap
from megatron_sparkling.operators.depth import FreshInit, LayerGrowth
from megatron_sparkling.training import flops
from megatron_sparkling.training.arguments import ArgumentError

# Sampling (methods.md): ratio = L_max/N, begin = ratio + 0.4, end = 0.6, x_min = 1e-6,
# n = (begin x_min - end)/(end - begin), m = end (n + 1), x ~ U(x_min, 1),
# y = clip(m / (x + n), 1, ratio), L = int(y N): depths near N are drawn most often.
X_MIN = 1e-6
END = 0.6
BEGIN_OFFSET = 0.4


# ---------------------------------------------------------------------------- sampling
def _curve(n_unique: int, max_depth: int):
    ratio = max_depth / n_unique
    begin = ratio + BEGIN_OFFSET
    n = (begin * X_MIN - END) / (END - begin)
    m = END * (n + 1)
    return ratio, n, m


def lvps_depth(n_unique: int, max_depth: int, generator: torch.Generator) -> int:
    """One LVPS draw of the depth L (n_unique <= L <= max_depth)."""
    ratio, n, m = _curve(n_unique, max_depth)
    x = X_MIN + (1.0 - X_MIN) * torch.rand((), generator=generator, dtype=torch.float64).item()
    y = min(max(m / (x + n), 1.0), ratio)
    return min(max_depth, int(y * n_unique + 1e-9))  # 1e-9: y = ratio must give L_max exactly


def lvps_probabilities(n_unique: int, max_depth: int) -> torch.Tensor:
    """P(L = k) for k = 0 .. max_depth, in closed form: L >= k exactly when
    x <= m N / k - n (k > N), since y falls with x."""
    ratio, n, m = _curve(n_unique, max_depth)
    at_least = torch.zeros(max_depth + 2, dtype=torch.float64)
    at_least[:n_unique + 1] = 1.0
    for k in range(n_unique + 1, max_depth + 1):
        x_k = m * n_unique / k - n
        at_least[k] = min(max((x_k - X_MIN) / (1.0 - X_MIN), 0.0), 1.0)
    return at_least[:-1] - at_least[1:]


def interpolation_indices(depth: int, n_unique: int) -> list:
    """The unique layer at each of `depth` positions: int(i / (depth / n_unique))."""
    return [i * n_unique // depth for i in range(depth)]


# ---------------------------------------------------------------------------- variable depth
class LayerSchedule:
    """Runs a TransformerBlock's layers by an index list (repeats allowed), without editing it.

    `train_indices` applies while the block is in training mode, `eval_indices` in eval mode;
    None runs the block's own layers. Through forward hooks on megatron-core's TransformerBlock,
    the block's `layers` ModuleList is swapped for the scheduled one for the duration of its
    forward, so a layer used twice gets the sum of both gradients."""

    def __init__(self, block):
        self.block = block
        self.train_indices: Optional[Sequence[int]] = None
        self.eval_indices: Optional[Sequence[int]] = None
        self._saved = None
        self._handles = [block.register_forward_pre_hook(self._swap_in),
                         block.register_forward_hook(self._swap_out, always_call=True)]

    def _swap_in(self, block, inputs):
        indices = self.train_indices if block.training else self.eval_indices
        if indices is None:
            return
        layers = block.layers
        self._saved = (layers, block.num_layers_per_pipeline_rank)
        block.layers = torch.nn.ModuleList([layers[i] for i in indices])
        block.num_layers_per_pipeline_rank = len(indices)

    def _swap_out(self, block, inputs, output):
        if self._saved is not None:
            block.layers, block.num_layers_per_pipeline_rank = self._saved
            self._saved = None

    def remove(self):
        for h in self._handles:
            h.remove()


def decoder_block(model_chunks):
    return unwrap(model_chunks)[0].decoder


def executed_flops_per_iteration(args, indices: Sequence[int]) -> float:
    """Training FLOPs of one iteration running these unique layers (by the flops module's
    per-layer costs)."""
    per_layer = [flops.training_flops_per_iteration(args, i + 1)
                 - flops.training_flops_per_iteration(args, i) for i in range(args.num_layers)]
    return float(flops.training_flops_per_iteration(args, 0) + sum(per_layer[i] for i in indices))


# ---------------------------------------------------------------------------- training mode
def add_flags(parser):
    """--sparkling-lvps-unique-layers 1 2 4      N of each stage (LVPS on when given); --num-layers
                                              is L_max, the depth every step samples up to
    --sparkling-lvps-stage-starts 0.3 0.6     where stages 2.. begin, as fractions of
                                              --train-iters (default: equal stages)
    --sparkling-lvps-new-state reset|copy     optimizer state of the layers a stage adds
    """
    g = parser.add_argument_group("megatron_sparkling LVPS (Apollo)")
    g.add_argument("--sparkling-lvps-unique-layers", type=int, nargs="+", default=None,
                   help="Unique layers N of each stage (increasing); every step runs a depth "
                        "sampled by LVPS between N and --num-layers. Off when unset.")
    g.add_argument("--sparkling-lvps-stage-starts", type=float, nargs="+", default=None,
                   help="Start of stages 2.. as fractions of --train-iters (default equal).")
    g.add_argument("--sparkling-lvps-new-state", choices=["reset", "copy"], default="reset",
                   help="Optimizer state of the layers a stage adds: zero, or the twin's.")
    return parser


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ArgumentError(message)


class LVPSTraining:
    """The hook: N unique layers, a sampled depth per step, stages that grow N."""

    def __init__(self, args):
        self.stages = list(args.sparkling_lvps_unique_layers)
        self.max_depth = args.num_layers
        T = args.train_iters
        fractions = args.sparkling_lvps_stage_starts
        if fractions is None:
            fractions = [i / len(self.stages) for i in range(1, len(self.stages))]
        flag = "--sparkling-lvps-unique-layers"
        _require(len(fractions) == len(self.stages) - 1,
                 f"--sparkling-lvps-stage-starts needs {len(self.stages) - 1} fractions (one per "
                 f"stage after the first of {flag} {self.stages}), got {len(fractions)}")
        _require(all(0 < a < b for a, b in zip(self.stages, self.stages[1:])) and
                 self.stages[0] > 0 and self.stages[-1] <= self.max_depth,
                 f"{flag} {self.stages} must increase from 1 or more up to --num-layers "
                 f"{self.max_depth}")
        self.starts = [0] + [int(round(f * T)) for f in fractions]
        _require(all(a < b for a, b in zip(self.starts, self.starts[1:])) and
                 self.starts[-1] < T,
                 f"--sparkling-lvps-stage-starts {fractions} must increase inside (0, 1)")
        freq = args.moe_layer_freq
        _require(not isinstance(freq, list) and freq == 1,
                 "LVPS shares unique layers by interpolation and needs one layer type; use "
                 "--moe-layer-freq 1 (all MoE) or no --num-experts (all dense)")
        _require(args.pipeline_model_parallel_size == 1,
                 "LVPS runs a sampled depth per step at pipeline-parallel size 1; drop "
                 "--pipeline-model-parallel-size")
        _require(len(self.stages) == 1 or args.world_size == 1,
                 "LVPS stages grow in process on one rank for now; launch 1 process, or give "
                 "one --sparkling-lvps-unique-layers value")
        _require(args.recompute_granularity != "full",
                 "LVPS does not support --recompute-granularity full")
        _require(getattr(args, "sparkling_progressive_start_layers", None) is None,
                 "LVPS and progressive depth both set the depth; use one of "
                 "--sparkling-lvps-unique-layers and --sparkling-progressive-start-layers")
        self.new_state = args.sparkling_lvps_new_state
        self.seed = args.seed
        self.schedule: Optional[LayerSchedule] = None
        self.last_depth: Optional[int] = None

    def stage_at(self, iteration: int) -> int:
        return max(i for i, s in enumerate(self.starts) if iteration >= s)

    def configure(self, args):
        resumed, _ = checkpoint_to_load(args.load, args.ckpt_step)
        if args.ckpt_step is not None:
            resumed = args.ckpt_step
        # a checkpoint at iteration r holds the layers its last step (r - 1) ran with
        last_step = 0 if args.finetune or resumed <= 0 else resumed - 1
        args.num_layers = self.stages[self.stage_at(last_step)]

    def attach(self, trainer):
        if self.schedule is not None:
            self.schedule.remove()
        n = trainer.args.num_layers
        self.schedule = LayerSchedule(decoder_block(trainer.model))
        self.schedule.eval_indices = interpolation_indices(self.max_depth, n)

    def before_step(self, trainer):
        n = self.stages[self.stage_at(trainer.iteration)]
        if n != trainer.args.num_layers:
            self.grow(trainer, n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.iteration)
        depth = lvps_depth(n, self.max_depth, g)
        indices = interpolation_indices(depth, n)
        self.schedule.train_indices = indices
        self.last_depth = depth
        trainer.flops_per_iteration = executed_flops_per_iteration(trainer.args, indices)

    def grow(self, trainer, n: int):
        """Grow the unique layers to `n` by interpolation (Apollo)."""
        new = copy.copy(trainer.args)
        new.num_layers = n
        spec = GrowthSpec(ModelShape.from_args(trainer.args), ModelShape.from_args(new),
                          seed=new.seed, depth=DepthOptions("interpolate",
                                                            new_state=self.new_state))
        trainer.grow_model(new, LayerGrowth.from_spec(spec, FreshInit.from_args(new)))


def hook(args):
    if not getattr(args, "sparkling_lvps_unique_layers", None):
        return None
    return LVPSTraining(args)
