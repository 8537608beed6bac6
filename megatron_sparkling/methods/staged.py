"""Staged training's width doubling (Shen et al. 2022, arXiv 2203.06211): two copies of the model
side by side, W -> [[W, 0], [0, W]].

Every grown width axis grows by the same integer factor k (experts: any integer multiple,
copied); the per-tensor rules are listed on `Staged`. The paper's learning-rate transform (restart
of the schedule with a short re-warmup) is an option (`restart_warmup_iters`,
`restart_iteration`), applied at run time by live/lr_restart.py. Off-diagonal blocks receive gradient once
training resumes (each copy's input is the sum of both copies' outputs through the shared
router and the residual), so the copies do not stay independent: tests/test_width.py measures
how fast the off-diagonal blocks fill in.
"""
from __future__ import annotations

from megatron_sparkling.core.layout import Role
from megatron_sparkling.methods.base import register
from megatron_sparkling.methods.elementwise import ElementwiseGrowth, integer_factor_or_refuse
from megatron_sparkling.methods.hypercloning import tiled_plan
from megatron_sparkling.operators import optimizer, width
from megatron_sparkling.core.sizes import WIDTH_FIELDS
from megatron_sparkling.core.spec import GrowthSpecError


def _out_in(lay):
    """(output dim, input dim) indices of a matrix, or None each."""
    out = next((d for d, dim in enumerate(lay.dims) if dim.role is Role.OUT), None)
    inp = next((d for d, dim in enumerate(lay.dims) if dim.role is Role.IN), None)
    return out, inp


@register
class Staged(ElementwiseGrowth):
    """Per tensor, with units tiled (copy c of unit u is unit u + c n) and every grown width
    axis at the same integer factor k:
    - output and input dimensions both grown: block-diagonal, copy c of an output reads only
      copy c of the input (each model copy reads its own copy of the residual stream);
    - only the output grown (embeddings, norm gains, biases, QKV rows when only heads grow):
      tiled;
    - only the input grown (router, shared-expert gate, output layer, fc2 when only the FFN
      grows): tiled and divided by k (the copies' contributions are averaged);
    - tied embeddings: the output's 1/k is folded into the final norm (the paper's "final norm
      halved" at k = 2).
    Experts (any integer multiple): copies, as for every copying method.
    Optimizer: moments laid out like the weights (off-diagonal blocks zero), then m * s and
    v * s^2 (momentum * s) with s each element's gradient scale, derived from the layout
    (operators.optimizer.copy_gradient_scale: 1/k on tensors whose output rows, gains or experts
    were copied, 1 on the output layer and on QKV/fc1/router when only their input grew), so
    that the first Adam update after growth equals the small model's, element for element
    (the paper's uniform m/2, v/4 is right only for the former). Off-diagonal blocks get a
    gradient (1/k of the diagonal's) but start from zero moments, as in the paper.
    """
    name = "staged"
    preserves_function = True
    state_rule = "staged"

    def __init__(self, restart_warmup_iters: int = 0, restart_iteration: int = -1):
        """The paper's LR schedule transform (live/lr_restart.py), applied by the relaunch:
        `restart_warmup_iters` W > 0 re-warms the LR from 0 over W iterations; the base
        schedule continues from `restart_iteration` (-1: the growth iteration). Both default
        off: the base schedule continues unchanged."""
        super().__init__()
        if int(restart_warmup_iters) < 0 or int(restart_iteration) < -1:
            raise ValueError(f"staged: restart_warmup_iters must be >= 0 and restart_iteration "
                             f">= 0 or -1 (got {restart_warmup_iters}, {restart_iteration})")
        self.restart_warmup_iters = int(restart_warmup_iters)
        self.restart_iteration = int(restart_iteration)

    def validate(self, spec):
        factors = integer_factor_or_refuse(spec, self.name)
        width_factors = {n: k for n, k in factors.items() if n != "num_experts"}
        if len(set(width_factors.values())) > 1:
            got = ", ".join(f"{WIDTH_FIELDS[n]} {k}x" for n, k in width_factors.items())
            raise GrowthSpecError(f"{self.name}: every grown width axis must grow by the same "
                                  f"factor (got {got}); use copy or sparkling for mixed factors")

    def make_plan(self, spec):
        return self.check_layers(tiled_plan(spec))

    def fan_in_factor(self, umap, out_grown):
        # Block-diagonal tensors read one copy of each input: no division.
        return None if out_grown else width.split_factors(umap)

    def _structure(self, lay, maps):
        out, inp = _out_in(lay)
        if out is None or inp is None or not (maps[out].grown and maps[inp].grown):
            return None
        block = width.block_diagonal_mask(maps[out], maps[inp])
        shape = [1] * len(maps)
        shape[out], shape[inp] = block.shape
        return block.view(shape).expand([m.new for m in maps])

    def finish_weight(self, key, grown, lay, maps, plan):
        structure = self._structure(lay, maps)
        return grown if structure is None else grown * structure.to(grown.dtype)

    def state_structure(self, lay, maps):
        return self._structure(lay, maps)

    def state_scale(self, lay, maps):
        return optimizer.copy_gradient_scale(lay.dims, maps)
