"""Training loss curves from logs: our --log-metrics-path JSON lines, or Megatron-LM's stdout
lines `iteration N/ M | ... | lm loss: X | ...` (either file, detected line by line)."""
from __future__ import annotations

import json
import re

_MEGATRON_LINE = re.compile(r"iteration\s+(\d+)\s*/\s*(\d+)\s*\|.*?\blm loss:\s*([-+0-9.eEnaNinf]+)")


class LossLogError(ValueError):
    """A log without a usable loss curve."""


def read_loss_curve(path: str) -> tuple[list, list, dict]:
    """(iterations, training losses, info) from a log; info holds `train_iters` (Megatron-LM
    lines) and `flops_per_iteration` (JSON lines with cumulative `flops`) when present."""
    curve, info, flops = {}, {}, {}
    try:
        f = open(path)
    except OSError as e:
        raise LossLogError(f"cannot read the loss log {path}: {e.strerror}") from None
    with f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "lm loss" in record and "iteration" in record:
                    curve[int(record["iteration"])] = float(record["lm loss"])
                    if "flops" in record:
                        flops[int(record["iteration"])] = float(record["flops"])
                continue
            m = _MEGATRON_LINE.search(line)
            if m:
                curve[int(m.group(1))] = float(m.group(3))
                info["train_iters"] = int(m.group(2))
    if not curve:
        raise LossLogError(f"{path} has no training loss: expected JSON lines with 'iteration' "
                           "and 'lm loss' (--log-metrics-path) or Megatron-LM lines "
                           "'iteration N/ M | ... | lm loss: X |'")
    its = sorted(i for i in curve if curve[i] == curve[i])  # drop NaN losses
    if len(flops) >= 2:
        a, b = min(flops), max(flops)
        info["flops_per_iteration"] = (flops[b] - flops[a]) / (b - a)
    return its, [curve[i] for i in its], info


def megatron_lm_run_losses(output: str) -> dict[int, float]:
    """{iteration: lm loss} of ONE Megatron-LM launch's stdout (--log-interval 1). Megatron-LM
    logs a launch's first iteration without resetting its running sums (training.py,
    `should_reset`), so the second line shows the mean of the first two iterations: undone here.
    Figures keep the log's 7 significant digits."""
    found = [(int(m.group(1)), float(m.group(3))) for m in map(_MEGATRON_LINE.search,
                                                                output.splitlines()) if m]
    losses = dict(found)
    if len(found) >= 2 and found[1][0] == found[0][0] + 1:
        (_, first), (second, mean) = found[:2]
        losses[second] = 2 * mean - first
    return losses
