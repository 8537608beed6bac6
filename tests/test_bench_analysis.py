"""The benchmark's curve analysis (pure functions)."""
import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_analysis", os.path.join(os.path.dirname(__file__), "..", "bench", "analysis.py"))
analysis = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(analysis)

SCRATCH = [{"flops": 0, "loss": 5.0}, {"flops": 10, "loss": 3.0}, {"flops": 20, "loss": 2.0}]
GROWN = [{"flops": 0, "loss": 5.0}, {"flops": 4, "loss": 3.5},
         {"flops": 4, "loss": 3.6, "after_growth": True}, {"flops": 12, "loss": 1.9}]


def test_compute_to_reach_interpolates_the_crossing():
    assert analysis.compute_to_reach(SCRATCH, 2.0) == 20
    assert analysis.compute_to_reach(GROWN, 2.0) == pytest.approx(4 + 8 * (1.6 / 1.7))
    assert analysis.compute_to_reach(SCRATCH, 1.0) is None


def test_summary_reports_saving_and_jump():
    rows = analysis.summarize({"scratch": {"curve": SCRATCH},
                               "grown": {"curve": GROWN,
                                         "loss_jump": analysis.growth_jump(GROWN, 4)}}, "scratch")
    grown = next(r for r in rows if r["run"] == "grown")
    assert grown["saving"] == pytest.approx(1 - (4 + 8 * 1.6 / 1.7) / 20)
    assert grown["loss jump"] == pytest.approx(0.1)
    # scratch reaches the grown run's final 1.9 never (its best is 2.0): no equal-loss figure;
    # a grown run ending at 2.5 for 12 FLOPs saves 1 - 12/15 against scratch's 15 to get there
    assert grown["saving at equal loss"] is None
    above = GROWN[:-1] + [{"flops": 12, "loss": 2.5}]
    assert analysis.matched_saving(above, SCRATCH) == pytest.approx(1 - 12 / 15)
    # a run going on past the budget: its final loss and compute are the budget's, its compute to
    # reach the target counts the extension
    extended = GROWN + [{"flops": 16, "loss": 1.8, "extended": True}]
    assert analysis.at_budget(extended)["loss"] == 1.9
    assert analysis.compute_to_reach(extended, 1.85) == pytest.approx(14)
    table = analysis.markdown_table(rows)
    assert table.count("\n") == 3 and "| grown |" in table
