"""Pure analysis of progressive-training curves: compute to reach a loss, savings, jumps, tables.

A curve is a list of evaluation points {"flops": F, "loss": L} in training order (those marked
"extended" lie past the token budget) (validation
loss on the same held-out batches at every point). Compute to reach a target is the first point
where the loss is at or below it, linearly interpolated in FLOPs between the two evaluations
around the crossing.
"""
from __future__ import annotations

import math
from typing import Optional


def compute_to_reach(curve: list[dict], target: float) -> Optional[float]:
    """FLOPs at which the validation loss first reaches `target` (None if it never does)."""
    prev = None
    for point in curve:
        if point["loss"] <= target:
            if prev is None or prev["loss"] <= target:
                return point["flops"]
            # interpolate between prev (above target) and point (at/below target)
            frac = (prev["loss"] - target) / (prev["loss"] - point["loss"])
            return prev["flops"] + frac * (point["flops"] - prev["flops"])
        prev = point
    return None


def loss_at(curve: list[dict], flops: float) -> Optional[float]:
    """Validation loss at a compute (linear interpolation; None outside the curve)."""
    for a, b in zip(curve, curve[1:]):
        if a["flops"] <= flops <= b["flops"]:
            if b["flops"] == a["flops"]:
                return b["loss"]
            t = (flops - a["flops"]) / (b["flops"] - a["flops"])
            return a["loss"] + t * (b["loss"] - a["loss"])
    return None


def saving(compute: Optional[float], reference: float) -> Optional[float]:
    """Fraction of the reference compute saved (negative: more compute was needed)."""
    if compute is None:
        return None
    return 1.0 - compute / reference


def growth_jump(curve: list[dict], growth_flops: float) -> Optional[float]:
    """Validation loss just after growth minus just before (points evaluated at the growth)."""
    before = [p for p in curve if p["flops"] <= growth_flops and not p.get("after_growth")]
    after = [p for p in curve if p.get("after_growth")]
    if not before or not after:
        return None
    return after[0]["loss"] - before[-1]["loss"]


def at_budget(curve: list[dict]) -> dict:
    """The last evaluation inside the token budget (points marked `extended` lie beyond it: a
    grown run going on until it reaches scratch's final loss)."""
    return [p for p in curve if not p.get("extended")][-1]


def matched_saving(run_curve: list[dict], scratch: list[dict]) -> Optional[float]:
    """1 - this run's total FLOPs / the FLOPs scratch needed to reach this run's final loss
    (None when scratch never got that low): the saving at equal final loss, the paper's view
    when a grown run ends slightly above scratch."""
    end = at_budget(run_curve)
    scratch_compute = compute_to_reach(scratch, end["loss"])
    return saving(end["flops"], scratch_compute) if scratch_compute else None


def summarize(runs: dict, scratch_name: str) -> list[dict]:
    """One row per run: compute to reach the scratch run's final (or best) validation loss; and
    the saving at equal final loss."""
    scratch = runs[scratch_name]["curve"]
    target = min(p["loss"] for p in scratch)
    reference = compute_to_reach(scratch, target)
    rows = []
    for name, run in runs.items():
        curve = run["curve"]
        reach = compute_to_reach(curve, target)
        rows.append({
            "run": name,
            "final loss": at_budget(curve)["loss"],
            "best loss": min(p["loss"] for p in curve),
            "total flops": at_budget(curve)["flops"],
            "flops to scratch best": reach,
            "saving": saving(reach, reference),
            "saving at equal loss": matched_saving(curve, scratch),
            "loss jump": run.get("loss_jump"),
            "twin cosine": run.get("twin_cosine"),
        })
    return rows


def _fmt(value, kind):
    if value is None:
        return "—"
    if kind == "pct":
        return f"{100 * value:+.1f}%"
    if kind == "flops":
        return f"{value:.3e}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    cols = [("run", "s"), ("final loss", "f"), ("best loss", "f"), ("total flops", "flops"),
            ("flops to scratch best", "flops"), ("saving", "pct"), ("saving at equal loss", "pct"),
            ("loss jump", "f"),
            ("twin cosine", "f")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), k) for c, k in cols) + " |")
    return "\n".join(lines)
