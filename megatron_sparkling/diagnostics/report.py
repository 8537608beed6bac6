"""Before/after comparison of a growth on the same batches, as a report (text table and JSON).

`compare(before, after, batches, plan=None)` runs both live models on every batch and reports:
- loss before, after, and the change;
- logits: max and mean absolute difference (same batch, same positions), RMS before and after;
- the residual stream RMS at every layer's input and output, before, after and after/before;
- every norm's output RMS, before, after, ratio;
- every linear's r = RMS(y)/RMS(x) before and after and their ratio, with the ratios of x and y:
  routed experts pooled per layer (expert None) and per expert (JSON: `experts`);
- with a growth plan: twin symmetry of the after model (cosine of every new unit's weights and
  gradient with its twin's; see twins.py), per grown axis.
A ratio is after/before; 1 means unchanged.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

from megatron_sparkling.diagnostics.activations import ActivationProbe, ModelFigures
from megatron_sparkling.diagnostics.sites import LINEAR_SITES, NORM_SITES, sort_key
from megatron_sparkling.diagnostics.twins import twin_similarity


def _ratio(after: Optional[float], before: Optional[float]) -> Optional[float]:
    if after is None or before is None or before == 0:
        return None
    return after / before


@dataclass
class GrowthReport:
    before: ModelFigures
    after: ModelFigures
    logits: dict
    twins: Optional[dict] = None          # {"weight": {axis: summary}, "gradient": {...}}
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ sections
    @property
    def loss(self) -> dict:
        return {"before": self.before.loss, "after": self.after.loss,
                "delta": self.after.loss - self.before.loss, "tokens": self.after.tokens}

    def _pairs(self, names):
        sites = sorted((set(self.before.sites) | set(self.after.sites)), key=sort_key)
        for s in sites:
            if s.name in names:
                yield s, self.before.sites.get(s), self.after.sites.get(s)

    def residual(self) -> list:
        rows = []
        for s, b, a in self._pairs(("layer",)):
            row = {"layer": s.layer}
            for side, key in (("in", "rms_in"), ("out", "rms_out")):
                vb, va = getattr(b, key, None), getattr(a, key, None)
                row.update({f"{side}_before": vb, f"{side}_after": va,
                            f"{side}_ratio": _ratio(va, vb)})
            rows.append(row)
        return rows

    def norms(self) -> list:
        rows = []
        for s, b, a in self._pairs(NORM_SITES):
            vb, va = getattr(b, "rms_out", None), getattr(a, "rms_out", None)
            xb, xa = getattr(b, "rms_in", None), getattr(a, "rms_in", None)
            rows.append({"site": s.name, "layer": s.layer, "out_before": vb, "out_after": va,
                         "out_ratio": _ratio(va, vb), "in_ratio": _ratio(xa, xb)})
        return rows

    def _linear_rows(self, per_expert: bool) -> list:
        rows = []
        for s, b, a in self._pairs(LINEAR_SITES):
            if (s.expert is not None) != per_expert:
                continue
            rb, ra = getattr(b, "r", None), getattr(a, "r", None)
            rows.append({
                "site": s.name, "layer": s.layer, "expert": s.expert, "r_before": rb,
                "r_after": ra, "r_ratio": _ratio(ra, rb),
                "x_ratio": _ratio(getattr(a, "rms_in", None), getattr(b, "rms_in", None)),
                "y_ratio": _ratio(getattr(a, "rms_out", None), getattr(b, "rms_out", None)),
            })
        return rows

    def linears(self) -> list:
        """Every linear; routed experts pooled per layer (expert None)."""
        return self._linear_rows(per_expert=False)

    def experts(self) -> list:
        """Routed experts' fc1/fc2, one row per expert (None figures: no token reached it)."""
        return self._linear_rows(per_expert=True)

    def to_dict(self) -> dict:
        return {
            "meta": self.meta,
            "loss": self.loss,
            "logits": self.logits,
            "residual": self.residual(),
            "norms": self.norms(),
            "linears": self.linears(),
            "experts": self.experts(),
            "twins": self.twins,
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(_finite(self.to_dict()), indent=indent)

    # ------------------------------------------------------------------ text
    def to_text(self) -> str:
        lines = []
        m = self.meta
        if m.get("before") or m.get("after"):
            lines.append(f"before: {m.get('before')}  (iteration {m.get('before_iteration')})")
            lines.append(f"after:  {m.get('after')}  (iteration {m.get('after_iteration')})")
        if "growth" in m:
            g = m["growth"]
            lines.append(f"growth record: {g.get('method')} (seed {g.get('seed')}, options "
                         f"{g.get('options') or {}})" if g else
                         "growth record: none in the after-checkpoint (no twin section)")
        if m.get("batches") is not None:
            lines.append(f"batches: {m['batches']} micro-batches, {self.after.tokens} tokens"
                         + (f", {m['split']} split" if m.get("split") else ""))
        loss = self.loss
        lines.append(f"loss: before {_f(loss['before'])}  after {_f(loss['after'])}  "
                     f"change {_f(loss['delta'], signed=True)}")
        lg = self.logits
        lines.append(f"logits: max |after - before| {_f(lg['max_abs_diff'])}  mean "
                     f"{_f(lg['mean_abs_diff'])}  RMS before {_f(lg['rms_before'])}  after "
                     f"{_f(lg['rms_after'])}")
        lines.append("")
        lines.append("residual stream RMS (ratio = after/before)")
        lines += _table(["layer", "in before", "in after", "in ratio", "out before",
                         "out after", "out ratio"],
                        [[r["layer"], r["in_before"], r["in_after"], r["in_ratio"],
                          r["out_before"], r["out_after"], r["out_ratio"]]
                         for r in self.residual()])
        lines.append("")
        lines.append("norm output RMS")
        lines += _table(["norm", "layer", "before", "after", "ratio", "input ratio"],
                        [[r["site"], r["layer"], r["out_before"], r["out_after"], r["out_ratio"],
                          r["in_ratio"]] for r in self.norms()])
        lines.append("")
        lines.append("linears: r = RMS(y)/RMS(x) (routed experts pooled per layer; per expert "
                     "in the JSON)")
        lines += _table(["linear", "layer", "r before", "r after", "r ratio", "x ratio",
                         "y ratio"],
                        [[r["site"], r["layer"], r["r_before"], r["r_after"], r["r_ratio"],
                          r["x_ratio"], r["y_ratio"]] for r in self.linears()])
        if self.twins:
            lines.append("")
            lines.append("twin symmetry: cosine of each new unit with its twin (1 = still a copy)")
            rows = []
            grads = self.twins.get("gradient", {})
            for axis, w in self.twins.get("weight", {}).items():
                g = grads.get(axis, {})
                rows.append([axis, w["units"], w["fresh"], g.get("mean"), g.get("min"),
                             g.get("max"), w["mean"], w["min"], w["max"]])
            lines += _table(["axis", "units", "fresh", "grad mean", "grad min", "grad max",
                             "weight mean", "weight min", "weight max"], rows)
        return "\n".join(lines)


def _f(v, signed=False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:+.3e}" if signed else f"{v:.3e}"
    return f"{v:+.5f}" if signed else f"{v:.5f}"


def _table(header, rows) -> list:
    cells = [header] + [[_f(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _finite(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def compare(before, after, batches: Iterable[dict], plan=None, meta: Optional[dict] = None,
            twin_batches: Optional[Iterable[dict]] = None) -> GrowthReport:
    """Run `before` and `after` (live 1-rank models; chunk lists or modules) on the same
    micro-batches and report the change. With a growth plan (plan.GrowthPlan of this growth), the
    twin section measures the after model's weights and its gradients on `twin_batches`
    (default: the same batches)."""
    batches = list(batches)
    if not batches:
        raise ValueError("compare needs at least one batch")
    max_diff, sum_diff, count = 0.0, 0.0, 0
    probe_b, probe_a = ActivationProbe(before), ActivationProbe(after)
    for batch in batches:
        lb = probe_b.run(batch).float()
        la = probe_a.run(batch).float()
        if la.shape != lb.shape:
            raise ValueError(f"logits of shape {tuple(lb.shape)} before and "
                             f"{tuple(la.shape)} after: the models do not share a vocabulary")
        d = (la - lb.to(la.device)).abs()
        max_diff = max(max_diff, float(d.max()))
        sum_diff += float(d.double().sum())
        count += d.numel()
    fb, fa = probe_b.figures(), probe_a.figures()
    logits = {"max_abs_diff": max_diff, "mean_abs_diff": sum_diff / count,
              "rms_before": fb.logits_rms, "rms_after": fa.logits_rms}
    twins = None
    if plan is not None:
        twins = twin_similarity(after, plan, batches if twin_batches is None else twin_batches)
    meta = dict(meta or {})
    meta.setdefault("batches", len(batches))
    return GrowthReport(fb, fa, logits, twins, meta)
