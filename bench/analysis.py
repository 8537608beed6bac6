"""Pure analysis of progressive-training curves: savings, equal-compute gaps, seed statistics,
tables, and the README blocks rendered from committed result files.

A curve is a list of evaluation points {"flops": F, "loss": L} in training order (those marked
"extended" lie past the token budget; the one marked "after_growth" is the grown model's first
evaluation), validation loss on the same held-out batches at every point. Compute to reach a
target is the first point where the loss is at or below it, linearly interpolated in FLOPs
between the two evaluations around the crossing.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from typing import Optional

# The two savings and the noise rule, one sentence each: printed under every table.
DEFINITIONS = {
    "saving": "saving to reach = 1 - the grown run's FLOPs to reach scratch's final validation "
              "loss / scratch's total FLOPs (interpolated between evaluations; * = reached only "
              "in the extension at min LR after the budget; — = not reached); of it, 'built in' "
              "= 1 - the grown run's FLOPs at the end of the budget / scratch's total FLOPs is "
              "what a run ending exactly at scratch's final loss would show.",
    "gap": "loss gap at equal compute = the mean over FLOPs, from growth to the end of the grown "
           "run's budget, of the grown run's validation loss minus scratch's at the same FLOPs "
           "(linear interpolation, trapezoid rule; negative = the grown run is better; no "
           "built-in part); 'gap at end' is that difference at the grown run's last point of "
           "the budget.",
    "noise": "a gap between two runs counts as beyond noise when the mean of its per-seed "
             "paired differences is larger than two standard errors (sample std of the "
             "differences / sqrt(seeds)); with one seed nothing is called beyond noise, and a "
             "difference of pure noise passes this rule 30% of the time with 2 seeds, 18% with "
             "3, 12% with 5 (Student's t).",
}


# ---------------------------------------------------------------------- one curve
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
    """Validation loss at a compute (linear interpolation; None outside the curve). At a FLOPs
    value evaluated twice (growth: before and after), the later point."""
    for a, b in zip(curve, curve[1:]):
        if a["flops"] <= flops <= b["flops"]:
            if b["flops"] == a["flops"] or flops == b["flops"]:
                return b["loss"]
            t = (flops - a["flops"]) / (b["flops"] - a["flops"])
            return a["loss"] + t * (b["loss"] - a["loss"])
    if len(curve) == 1 and curve[0]["flops"] == flops:
        return curve[0]["loss"]
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
    (None when scratch never got that low): the saving at equal final loss."""
    end = at_budget(run_curve)
    scratch_compute = compute_to_reach(scratch, end["loss"])
    return saving(end["flops"], scratch_compute) if scratch_compute else None


def saving_to_reach(run_curve: list[dict], scratch: list[dict]) -> dict:
    """Saving (a): compute to reach scratch's final loss against scratch's total compute;
    whether it was reached only in the extension; the built-in part (budget compute alone)."""
    end, scratch_end = at_budget(run_curve), at_budget(scratch)
    reach = compute_to_reach(run_curve, scratch_end["loss"])
    return {"flops to reach": reach,
            "saving": saving(reach, scratch_end["flops"]),
            "in extension": reach is not None and reach > end["flops"],
            "built in": saving(end["flops"], scratch_end["flops"])}


def equal_compute_gap(run_curve: list[dict], scratch: list[dict],
                      growth_flops: float) -> dict:
    """Saving (b): the grown run's loss minus scratch's at the same FLOPs, FLOPs-averaged from
    growth to the end of the grown run's budget (trapezoid over the grown run's evaluations),
    and at that end."""
    end = at_budget(run_curve)
    after = [p for p in run_curve
             if p["flops"] >= growth_flops and not p.get("extended")
             and (p.get("after_growth") or p["flops"] > growth_flops)]
    gaps = [(p["flops"], p["loss"] - loss_at(scratch, p["flops"])) for p in after
            if loss_at(scratch, p["flops"]) is not None]
    if not gaps:
        return {"gap": None, "gap at end": None}
    if len(gaps) == 1 or gaps[-1][0] == gaps[0][0]:
        mean = gaps[-1][1]
    else:
        area = sum((f1 - f0) * (g0 + g1) / 2 for (f0, g0), (f1, g1) in zip(gaps, gaps[1:]))
        mean = area / (gaps[-1][0] - gaps[0][0])
    last = loss_at(scratch, end["flops"])
    return {"gap": mean, "gap at end": None if last is None else end["loss"] - last}


def summarize(runs: dict, scratch_name: str, growth_flops: Optional[float] = None) -> list[dict]:
    """One row per run of one setting and seed: final loss, both savings, jump, twin cosine."""
    scratch = runs[scratch_name]["curve"]
    rows = []
    for name, run in runs.items():
        curve = run["curve"]
        reach = saving_to_reach(curve, scratch)
        row = {"run": name,
               "final loss": at_budget(curve)["loss"],
               "best loss": min(p["loss"] for p in curve),
               "total flops": at_budget(curve)["flops"],
               "flops to scratch final": reach["flops to reach"],
               "saving": reach["saving"],
               "in extension": reach["in extension"],
               "built in": reach["built in"],
               "saving at equal loss": matched_saving(curve, scratch),
               "loss jump": run.get("loss_jump"),
               "twin cosine": run.get("twin_cosine")}
        if growth_flops is not None:
            row.update(equal_compute_gap(curve, scratch, growth_flops))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- seeds
def mean_std(values: list) -> tuple:
    """(mean, sample std, count) of the values that are not None; std None below two values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def paired_difference(a: list, b: list) -> dict:
    """a - b over seeds (pairs where both exist): mean, standard error, and whether the mean is
    beyond two standard errors (the noise rule in DEFINITIONS)."""
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    n = len(diffs)
    if n == 0:
        return {"mean": None, "se": None, "n": 0, "beyond_noise": False}
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"mean": mean, "se": None, "n": n, "beyond_noise": False}
    se = statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "se": se, "n": n, "beyond_noise": abs(mean) > 2 * se}


# the metrics aggregated over seeds, and which direction is better
METRICS = {"final loss": "lower", "saving": "higher", "gap": "lower", "gap at end": "lower",
           "saving at equal loss": "higher", "loss jump": "lower", "twin cosine": None,
           "built in": None}


def aggregate(rows_by_seed: dict) -> dict:
    """{run: {metric: {"mean", "std", "n"}, "in extension": seeds reached only after the
    budget, "not reached": seeds never reaching it}} from {seed: rows of summarize()}."""
    by_run: dict = {}
    for rows in rows_by_seed.values():
        for row in rows:
            by_run.setdefault(row["run"], []).append(row)
    out = {}
    for run, rows in by_run.items():
        entry = {m: dict(zip(("mean", "std", "n"), mean_std([r.get(m) for r in rows])))
                 for m in METRICS}
        entry["seeds"] = len(rows)
        entry["in extension"] = sum(bool(r.get("in extension")) for r in rows)
        entry["not reached"] = sum(r.get("saving") is None for r in rows)
        out[run] = entry
    return out


def comparisons(rows_by_seed: dict, reference: str, metrics=("final loss", "gap")) -> dict:
    """{run: {metric: paired_difference(run, reference)}} over the seeds."""
    seeds = sorted(rows_by_seed)
    value = {s: {r["run"]: r for r in rows_by_seed[s]} for s in seeds}
    runs = [r["run"] for r in rows_by_seed[seeds[0]]]
    out = {}
    for run in runs:
        if run == reference:
            continue
        out[run] = {m: paired_difference([value[s].get(run, {}).get(m) for s in seeds],
                                         [value[s].get(reference, {}).get(m) for s in seeds])
                    for m in metrics}
    return out


# ---------------------------------------------------------------------- formatting
def _fmt(value, kind):
    if value is None:
        return "—"
    if kind == "pct":
        return f"{100 * value:+.1f}%"
    if kind == "flops":
        return f"{value:.3e}"
    if kind == "gap":
        return f"{value:+.4f}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _fmt_stat(stat: dict, kind: str) -> str:
    if stat["mean"] is None:
        return "—"
    text = _fmt(stat["mean"], kind)
    if stat["std"] is not None:
        text += " ± " + _fmt(stat["std"], "pct" if kind == "pct" else "f").lstrip("+")
    return text


def _fmt_diff(d: dict, kind: str) -> str:
    if d["mean"] is None:
        return "—"
    text = _fmt(d["mean"], kind)
    if d["se"] is not None:
        text += f" ({'beyond' if d['beyond_noise'] else 'within'} noise)"
    return text


def _fmt_reach(e: dict) -> str:
    """Saving to reach, mean ± std over the seeds that reached scratch's final loss."""
    text = _fmt_stat(e["saving"], "pct")
    if e["not reached"] and e["saving"]["n"]:
        text += f" (reached in {e['saving']['n']}/{e['seeds']} seeds)"
    elif e["not reached"]:
        text += " (not reached)"
    if e["in extension"]:
        text += f" ({e['in extension']}/{e['seeds']} in extension*)"
    return text


def markdown_table(rows: list[dict]) -> str:
    """One seed's table (summarize() rows)."""
    cols = [("run", "s"), ("final loss", "f"), ("best loss", "f"), ("total flops", "flops"),
            ("flops to scratch final", "flops"), ("saving", "pct"), ("built in", "pct"),
            ("gap", "gap"), ("gap at end", "gap"), ("loss jump", "f"), ("twin cosine", "f")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for c, k in cols:
            cell = _fmt(r.get(c), k)
            if c == "saving" and r.get("in extension"):
                cell += "*"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(agg: dict, comp: dict, reference: str) -> str:
    """Mean ± std over seeds per run, with the paired differences to `reference`."""
    head = ["run", "final loss", "saving to reach", "built in", "gap at equal compute",
            "gap at end", "loss jump", "twin cosine",
            f"final loss − {reference}", f"gap − {reference}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for run, e in agg.items():
        reach = _fmt_reach(e)
        c = comp.get(run, {})
        lines.append("| " + " | ".join([
            run, _fmt_stat(e["final loss"], "f"), reach, _fmt_stat(e["built in"], "pct"),
            _fmt_stat(e["gap"], "gap"), _fmt_stat(e["gap at end"], "gap"),
            _fmt_stat(e["loss jump"], "gap"), _fmt_stat(e["twin cosine"], "f"),
            _fmt_diff(c["final loss"], "gap") if c else "—",
            _fmt_diff(c["gap"], "gap") if c else "—"]) + " |")
    return "\n".join(lines)


def beyond_noise_lines(rows_by_seed: dict, metric: str = "final loss") -> list[str]:
    """Every ordered pair of runs whose paired gap in `metric` is beyond noise (lower first)."""
    seeds = sorted(rows_by_seed)
    runs = [r["run"] for r in rows_by_seed[seeds[0]]]
    value = {s: {r["run"]: r.get(metric) for r in rows_by_seed[s]} for s in seeds}
    lines = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            d = paired_difference([value[s].get(a) for s in seeds],
                                  [value[s].get(b) for s in seeds])
            if d["beyond_noise"]:
                lo, hi = (a, b) if d["mean"] < 0 else (b, a)
                lines.append(f"{lo} < {hi} by {abs(d['mean']):.4f} (2 SE {2 * d['se']:.4f})")
    return lines


def identical_runs(runs: dict) -> list[tuple]:
    """Pairs of differently named runs of one seed and setting whose curves are identical after
    growth: two variants that are one and the same run (or one run written twice)."""
    names = list(runs)
    tails = {n: [(p["flops"], p["loss"]) for p in runs[n]["curve"] if p.get("after_growth")
                 or p.get("extended") or p["flops"] > runs[n].get("growth_flops", 0)]
             for n in names}
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if tails[a] == tails[b]]


# ---------------------------------------------------------------------- results files
def setting_rows(results: dict, setting: str) -> dict:
    """{seed: summarize() rows} of one setting of a progressive.py results.json."""
    out = {}
    for seed, per_seed in results["seeds"].items():
        runs = per_seed["settings"][setting]
        table_runs = {"scratch": runs["scratch"], **runs["grown"]}
        out[seed] = summarize(table_runs, "scratch", per_seed["growth_flops"])
    return out


def summary_table(results: dict, reference: str = "sparkling") -> str:
    """The README's one-line-per-setting summary: scratch and `reference`, mean ± std."""
    head = ["setting", "seeds", "scratch final", f"{reference} final", "saving to reach",
            "built in", "gap at equal compute", "lowest other final loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for setting in results["settings"]:
        rows = setting_rows(results, setting)
        agg = aggregate(rows)
        if reference not in agg:
            continue
        ref = agg[reference]
        others = {r: e for r, e in agg.items() if r not in ("scratch", reference)}
        best = min(others, key=lambda r: others[r]["final loss"]["mean"]) if others else None
        reach = _fmt_reach(ref)
        best_text = "—"
        if best:
            d = comparisons(rows, reference, ("final loss",))[best]["final loss"]
            best_text = (f"{best} {_fmt_stat(others[best]['final loss'], 'f')}, "
                         f"{best} − {reference} {_fmt_diff(d, 'gap')}")
        lines.append("| " + " | ".join([
            setting, str(ref["seeds"]), _fmt_stat(agg["scratch"]["final loss"], "f"),
            _fmt_stat(ref["final loss"], "f"), reach, _fmt_stat(ref["built in"], "pct"),
            _fmt_stat(ref["gap"], "gap"), best_text]) + " |")
    return "\n".join(lines)


def report(results: dict, reference: str = "sparkling") -> str:
    """The results.md text of a progressive.py results.json."""
    seeds = list(results["seeds"])
    lines = [f"# Progressive MoE pre-training vs from scratch ({results['mode']} mode)", "",
             f"Command: `{results['command']}`", "",
             f"Seeds: {', '.join(seeds)} (each seed sets the initialization, the data order, the "
             f"validation samples and the growth plan). Growth at iteration "
             f"{results['grow_iteration']} of {results['train_iters']} "
             f"({results['grow_at']:.0%} of the token budget); a grown run short of scratch's "
             f"final loss at the end of the budget goes on at the schedule's min LR for up to "
             f"{results['config'].get('extend', 0):.0%} more iterations. "
             f"{results.get('determinism', '')}", ""]
    lines += [f"- {DEFINITIONS[k]}" for k in ("saving", "gap", "noise")] + [""]
    for setting in results["settings"]:
        rows = setting_rows(results, setting)
        agg = aggregate(rows)
        ref = reference if reference in agg else next(r for r in agg if r != "scratch")
        paper = results.get("paper_saving", {}).get(setting)
        lines += [f"## {setting}" + (f" (paper: {paper:.0%} saved)" if paper else ""), "",
                  seeds_table(agg, comparisons(rows, ref), ref), ""]
        same: dict = {}
        for seed, per_seed in results["seeds"].items():
            for pair in identical_runs(per_seed["settings"][setting]["grown"]):
                same.setdefault(pair, []).append(seed)
        for (a, b), in_seeds in same.items():
            lines += [f"Note: {a} and {b} have identical curves after growth (seeds "
                      f"{', '.join(in_seeds)}): the two grow the same model here (copy and "
                      f"hypercloning at 2x do), or one run was written under two names.", ""]
        beyond = beyond_noise_lines(rows)
        lines += ["Final-loss gaps beyond noise: " + ("; ".join(beyond) if beyond else
                  "none" if len(seeds) > 1 else "not judged (one seed)") + ".", ""]
        if len(seeds) > 1:
            continue
        lines += ["Per seed:", ""]
        for seed, seed_rows in rows.items():
            lines += [f"Seed {seed}:", "", markdown_table(seed_rows), ""]
    return "\n".join(lines)


OUTPUT_FLAGS = ("--out", "--cache")


def portable_command(words: list) -> str:
    """A benchmark's command as its results record it: without the folders it wrote to (no
    figure depends on them, and they name one machine's paths)."""
    kept = []
    for i, word in enumerate(words):
        if word in OUTPUT_FLAGS or (i and words[i - 1] in OUTPUT_FLAGS):
            continue
        kept.append(word)
    return " ".join(kept)


def run_line(results: dict) -> str:
    """The command and its measured duration, as the README quotes them."""
    minutes, seconds = divmod(int(round(results["seconds"])), 60)
    return (f"    {portable_command(results['command'].split())}    # {minutes} min "
            f"{seconds:02d} s, {results['jobs']} process(es) x {results['threads']} thread(s)")


# ---------------------------------------------------------------------- progressive depth
def depth_table(results: dict) -> str:
    """bench/depth.py's table: each run's final loss against the fixed-depth run's, its total
    FLOPs, the saving, and the saving at equal loss (matched_saving)."""
    runs = results["runs"]
    fixed = runs["fixed"]["curve"]
    rows = ["| run | final loss | vs fixed | total FLOPs | saving | saving at equal loss |",
            "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        curve = run["curve"]
        diff = curve[-1]["loss"] / fixed[-1]["loss"] - 1
        total = 1 - curve[-1]["flops"] / fixed[-1]["flops"]
        equal = matched_saving(curve, fixed)
        rows.append(f"| {name} | {curve[-1]['loss']:.4f} | {diff:+.2%} | {curve[-1]['flops']:.3e}"
                    f" | {total:+.1%} | {'—' if equal is None else f'{equal:+.1%}'} |")
    return "\n".join(rows)


def depth_block(results: dict) -> str:
    """The README's block for one bench/depth.py run: its command and time, then its table."""
    minutes, seconds = divmod(int(round(results["seconds"])), 60)
    return "\n".join([
        f"Growth at {results['grow_at']:.0%} (iteration {results['grow_iteration']} of "
        f"{results['train_iters']}): `{results['command']}`, {minutes} min {seconds:02d} s", "",
        depth_table(results)])


# ---------------------------------------------------------------------- conversion speed
CONVERT_HEADER = (f"{'model':>5} {'conversion':>10} {'ranks':>5} {'checkpoint':>11} "
                  f"{'peak RSS/rank':>14} {'time':>7} {'MiB/s r+w':>9} {'cores':>5} "
                  f"{'copy cold':>9} {'copy warm':>9} {'ratio':>6}")


def convert_row(model: str, name: str, row: dict, checkpoint_bytes: int, copy: dict) -> str:
    """One line of bench/convert.py's table: `name` is "<conversion>/<ranks or process>";
    cores: the CPU seconds of all its ranks' threads per second of wall time."""
    kind, ranks = name.split("/")
    rss = "/".join(f"{b / 2 ** 20:.0f}" for b in row["peak_rss_bytes_per_rank"])
    cores = f"{row['cpu_seconds'] / row['seconds']:.2f}" if "cpu_seconds" in row else "-"
    return (f"{model:>5} {kind:>10} {'-' if ranks == 'process' else ranks:>5} "
            f"{checkpoint_bytes / 2 ** 20:>7.0f} MiB {rss:>10} MiB {row['seconds']:>6.1f}s "
            f"{row['mib_per_s']:>9.1f} {cores:>5} {copy['cold']['mib_per_s']:>9.1f} "
            f"{copy['warm']['mib_per_s']:>9.1f} {row['ratio_to_cold_copy']:>6.2f}")


def convert_summary(result: dict) -> list[str]:
    """The figures bench/convert.py derives from its table (RSS growth, 2-rank speed-up)."""
    lines = []
    m = result["models"]
    if "small" in m and "large" in m:
        growth = result["peak_rss_growth_small_to_large"]
        grew = m["large"]["checkpoint_bytes"] / m["small"]["checkpoint_bytes"]
        lines.append(f"checkpoint grew {grew:.2f}x "
                     "small -> large; converter peak RSS grew "
                     + ", ".join(f"{g:.2f}x ({k.split('/')[0]})" for k, g in growth.items()))
    for kind, speedup in result.get("speedup_2_ranks", {}).items():
        lines.append(f"xl {kind}: 2 ranks {speedup:.2f}x the speed of 1 rank (torchrun); ratio "
                     f"to the cold copy at 2 ranks "
                     f"{m['xl']['conversions'][f'{kind}/2']['ratio_to_cold_copy']:.2f}")
    return lines


def convert_table(result: dict) -> str:
    """bench/convert.py's table and summary from its JSON (the README's conversion block)."""
    minutes, seconds = divmod(int(round(result["wall_seconds"])), 60)
    lines = [f"    {result['command']}    # {minutes} min {seconds:02d} s", "",
             "    " + CONVERT_HEADER]
    for model, m in result["models"].items():
        lines += ["    " + convert_row(model, name, row, m["checkpoint_bytes"], m["copy"])
                  for name, row in m["conversions"].items()]
    lines += [""] + ["    " + line for line in convert_summary(result)]
    return "\n".join(lines)


# ---------------------------------------------------------------------- README blocks
# <!-- generated: RENDERER FILE.json --> ... <!-- end generated -->: the text between is
# RENDERERS[RENDERER](json of FILE) exactly (FILE relative to the README's folder).
RENDERERS = {"progressive-summary": summary_table, "progressive-run": run_line,
             "convert": convert_table, "depth": depth_block}
BLOCK = re.compile(r"<!-- generated: (\S+) (\S+) -->\n(.*?)<!-- end generated -->", re.S)


def render_block(renderer: str, path: str, root: str) -> str:
    if renderer not in RENDERERS:
        raise ValueError(f"unknown renderer {renderer!r}; one of {sorted(RENDERERS)}")
    with open(os.path.join(root, path)) as f:
        return RENDERERS[renderer](json.load(f)).rstrip("\n") + "\n"


def generated_blocks(text: str) -> list:
    """[(renderer, file, text between the markers, start, end)] of a README's text."""
    return [(m.group(1), m.group(2), m.group(3), m.start(3), m.end(3))
            for m in BLOCK.finditer(text)]


def check_blocks(text: str, root: str) -> list[str]:
    """One line per generated block whose text differs from a fresh rendering of its file."""
    problems = []
    for renderer, path, body, _, _ in generated_blocks(text):
        if not os.path.exists(os.path.join(root, path)):
            problems.append(f"{path}: no such result file (block {renderer})")
        elif render_block(renderer, path, root) != body:
            problems.append(f"{path}: the README's {renderer} block differs from its rendering "
                            f"(python bench/analysis.py render README.md)")
    return problems


def rerender(text: str, root: str) -> str:
    """The text with every generated block replaced by a fresh rendering."""
    out, last = [], 0
    for renderer, path, _, start, end in generated_blocks(text):
        out += [text[last:start], render_block(renderer, path, root)]
        last = end
    return "".join(out + [text[last:]])


def tables_outside_blocks(text: str, section: str = "## Results") -> list[str]:
    """Markdown table rows of `section` (to the next '## ') not inside a generated block."""
    start = text.find("\n" + section + "\n")
    if start < 0:
        return []
    end = text.find("\n## ", start + len(section) + 2)
    end = len(text) if end < 0 else end
    inside = [(s, e) for *_, s, e in generated_blocks(text)]
    rows, pos = [], start
    for line in text[start:end].splitlines(keepends=True):
        if line.startswith("|") and not any(s <= pos < e for s, e in inside):
            rows.append(line.rstrip("\n"))
        pos += len(line)
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Render or check the README's generated blocks.")
    p.add_argument("action", choices=["render", "check"])
    p.add_argument("readme")
    a = p.parse_args(argv)
    root = os.path.dirname(os.path.abspath(a.readme))
    with open(a.readme) as f:
        text = f.read()
    if a.action == "render":
        with open(a.readme, "w") as f:
            f.write(rerender(text, root))
        return 0
    problems = check_blocks(text, root)
    print("\n".join(problems) or "every generated block matches its result file")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
