"""When to grow, and to what: staged training's scaling law fitted to a measured loss curve.

The law (Kaplan et al., as staged training uses it, at the critical batch size):

    L(N, S) = (N_c / N)^a_N + (2 S_c / S)^a_S

N: non-embedding parameters, S: optimizer steps. Published constants (a starting point):
N_c = 8.8e13, S_c = 2.1e3, a_N = 0.076, a_S = 0.76. `fit` fits it to curves; `growth_point`
says when to grow (slope matching) and what that saves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


class StageTimingError(ValueError):
    """A curve or a request the law cannot answer; the message says what to change."""


@dataclass(frozen=True)
class ScalingLaw:
    n_c: float
    s_c: float
    a_n: float
    a_s: float

    def floor(self, n: float) -> float:
        """The loss N parameters reach with unlimited steps."""
        return (self.n_c / n) ** self.a_n

    def loss(self, n: float, s):
        return self.floor(n) + (2.0 * self.s_c / np.asarray(s, dtype=float)) ** self.a_s

    def steps_to(self, n: float, loss: float) -> float:
        """Steps N parameters need to reach `loss` (inf at or below its floor)."""
        gap = loss - self.floor(n)
        return math.inf if gap <= 0 else 2.0 * self.s_c * gap ** (-1.0 / self.a_s)

    def slope_per_step(self, n: float, s: float) -> float:
        """dL/dS (negative)."""
        return -self.a_s * (2.0 * self.s_c) ** self.a_s * s ** (-self.a_s - 1.0)


PUBLISHED = ScalingLaw(n_c=8.8e13, s_c=2.1e3, a_n=0.076, a_s=0.76)


@dataclass(frozen=True)
class Curve:
    """A measured loss curve of one model size."""
    params: float
    steps: Sequence[float]
    losses: Sequence[float]


@dataclass(frozen=True)
class Fit:
    law: ScalingLaw
    floors: tuple          # fitted A_j per curve
    rmse: float            # root-mean-square residual of the loss


def _solve_linear(curves, a_s):
    """Least squares of L = A_j + B s^-a_s: (A_j..., B, sse)."""
    rows, ys = [], []
    for j, c in enumerate(curves):
        s = np.asarray(c.steps, dtype=float)
        onehot = np.zeros((len(s), len(curves)))
        onehot[:, j] = 1.0
        rows.append(np.column_stack([onehot, s ** -a_s]))
        ys.append(np.asarray(c.losses, dtype=float))
    X, y = np.vstack(rows), np.concatenate(ys)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    sse = float(np.sum((X @ coef - y) ** 2))
    return coef[:-1], float(coef[-1]), sse


def fit(curves: Sequence[Curve], a_n: Optional[float] = None,
        a_s_range=(0.05, 3.0)) -> Fit:
    """Fit the law to one or more curves (same batch size). With one model size `a_n` is
    fixed (default: the published 0.076); with two or more it is fitted unless given.

    For a fixed a_S the law is linear in the floors A_j = (N_c/N_j)^a_N (one per curve) and
    B = (2 S_c)^a_S (shared), so each a_S is solved by least squares and a_S itself by a
    bracketing search; N_c and a_N come from the floors (a log-linear fit over two or more model
    sizes; with one size a_N is given, the published value by default)."""
    curves = [c for c in curves]
    for c in curves:
        if len(c.steps) < 4 or len(c.steps) != len(c.losses):
            raise StageTimingError("a loss curve needs at least 4 (step, loss) points; train "
                                   "longer or log more often")
        if min(c.steps) <= 0:
            raise StageTimingError("steps must be positive (iteration numbers from 1)")
    sizes = sorted({c.params for c in curves})

    def sse_of(a_s):
        floors, b, sse = _solve_linear(curves, a_s)
        ok = b > 0 and all(f > 0 for f in floors)
        return sse if ok else math.inf

    # coarse grid in log space, then golden-section refinement around the best point
    grid = np.exp(np.linspace(math.log(a_s_range[0]), math.log(a_s_range[1]), 200))
    errors = [sse_of(a) for a in grid]
    best = int(np.argmin(errors))
    if not math.isfinite(errors[best]):
        raise StageTimingError("the loss curve does not flatten like L = A + B S^-a with A > 0; "
                               "train longer (the fit needs the curve to bend) or drop early "
                               "iterations (--skip-fraction)")
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        m1, m2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if sse_of(m1) <= sse_of(m2):
            hi = m2
        else:
            lo = m1
    a_s = (lo + hi) / 2
    if sse_of(a_s) > errors[best]:
        a_s = float(grid[best])
    floors, b, sse = _solve_linear(curves, a_s)
    s_c = b ** (1.0 / a_s) / 2.0
    if len(sizes) >= 2 and a_n is None:
        logs_n = np.log([c.params for c in curves])
        slope, intercept = np.polyfit(logs_n, np.log(floors), 1)
        a_n_fit = -float(slope)
        if a_n_fit <= 0:
            raise StageTimingError("the larger model's fitted floor is not lower than the "
                                   "smaller's; give --a-n or longer curves")
        n_c = math.exp(float(intercept) / a_n_fit)
        a_n = a_n_fit
    else:
        a_n = PUBLISHED.a_n if a_n is None else a_n
        # one N_c per curve from its floor; their geometric mean
        n_c = math.exp(float(np.mean([math.log(c.params) + math.log(f) / a_n
                                      for c, f in zip(curves, floors)])))
    count = sum(len(c.steps) for c in curves)
    return Fit(ScalingLaw(n_c, s_c, a_n, a_s), tuple(float(f) for f in floors),
               math.sqrt(sse / count))


@dataclass(frozen=True)
class GrowthAdvice:
    grow_step: float          # steps of the small model before growing
    grow_loss: float          # loss at growth (both models' slopes per FLOP equal there)
    effective_step: float     # where the grown model's curve has that loss (S_eff)
    budget_steps: float       # steps the budget buys the grown model from scratch
    final_loss: float         # the from-scratch grown model's loss at the budget
    staged_flops: float       # small until growth, then grown until final_loss
    budget_flops: float
    saving: float             # 1 - staged / budget (at equal loss); <= 0 when not worth it
    worth_growing: bool


def slope_per_flop(law: ScalingLaw, n: float, loss: float, flops_per_step: float) -> float:
    """dL/dC of an N-parameter model at the step where it has `loss`."""
    return law.slope_per_step(n, law.steps_to(n, loss)) / flops_per_step


def growth_point(law: ScalingLaw, params: float, target_params: float, budget_flops: float,
                 flops_per_step: float, target_flops_per_step: float) -> GrowthAdvice:
    """When to grow an N-parameter model to N' (slope matching), and the compute it saves
    against training N' from scratch on the same budget (at equal final loss).

    A model of N parameters costs c = 6 N T FLOPs a step (T tokens a step). Grow to N' when the
    small model's loss-per-FLOP slope falls to the grown model's slope at the same loss. At
    loss l, with x = l - A and x' = l - A', the slope magnitudes are
    a_S x^(1+1/a_S) B^(-1/a_S) / c, so they are equal when x / x' = (N/N')^(a_S/(1+a_S)) = r,
    i.e. at l* = (A - r A') / (1 - r). The grown model continues from S_eff, where its own curve
    has l*. Saving at equal loss: a budget C trains the big model from scratch for
    S_tot = C / c' steps to L(N', S_tot); staged reaches the same loss with
    S_grow c + (S_tot - S_eff) c'."""
    if target_params <= params:
        raise StageTimingError(f"target parameters {target_params:.4g} must exceed the current "
                               f"{params:.4g}")
    a, a_t = law.floor(params), law.floor(target_params)
    r = (params / target_params) ** (law.a_s / (1.0 + law.a_s))
    grow_loss = (a - r * a_t) / (1.0 - r)
    s_grow = law.steps_to(params, grow_loss)
    s_eff = law.steps_to(target_params, grow_loss)
    s_tot = budget_flops / target_flops_per_step
    final = float(law.loss(target_params, s_tot))
    staged = s_grow * flops_per_step + max(s_tot - s_eff, 0.0) * target_flops_per_step
    worth = s_tot > s_eff
    if not worth:
        staged = budget_flops  # the budget ends before the grown model would reach grow_loss
    return GrowthAdvice(float(s_grow), float(grow_loss), float(s_eff), float(s_tot), final,
                        float(staged), float(budget_flops), float(1.0 - staged / budget_flops),
                        bool(worth))
