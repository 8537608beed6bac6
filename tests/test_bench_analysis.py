"""The benchmark's curve analysis (pure functions), seed statistics and the README's generated
blocks; expected values are worked out by hand in the comments."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
_spec = importlib.util.spec_from_file_location(
    "bench_analysis", os.path.join(ROOT, "bench", "analysis.py"))
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


def test_saving_to_reach_marks_the_extension_and_the_built_in_part():
    # at the budget (12 FLOPs) the run is at 2.2, above scratch's final 2.0; the extension's
    # point (16, 1.96) crosses it at 12 + 4 * 0.2 / 0.24 = 15.333 FLOPs: saving 1 - 15.333/20
    run = GROWN[:-1] + [{"flops": 12, "loss": 2.2}, {"flops": 16, "loss": 1.96, "extended": True}]
    out = analysis.saving_to_reach(run, SCRATCH)
    assert out["flops to reach"] == pytest.approx(12 + 4 * 0.2 / 0.24)
    assert out["saving"] == pytest.approx(1 - (12 + 4 * 0.2 / 0.24) / 20)
    assert out["in extension"] is True
    assert out["built in"] == pytest.approx(1 - 12 / 20)   # 0.4 from the budget alone
    inside = analysis.saving_to_reach(GROWN, SCRATCH)
    assert inside["in extension"] is False
    assert analysis.saving_to_reach(GROWN[:-1] + [{"flops": 12, "loss": 2.2}],
                                    SCRATCH)["saving"] is None
    row = analysis.summarize({"scratch": {"curve": SCRATCH}, "g": {"curve": run}}, "scratch")[1]
    assert "| g | 2.2000 | 1.9600 |" in analysis.markdown_table([row])
    assert "+23.3%*" in analysis.markdown_table([row])   # reached only in the extension


def test_equal_compute_gap_by_hand():
    # after growth the grown run is at (4, 3.6) and (12, 1.9); scratch there: 5 - 0.4 * 2 = 4.2
    # and 3 - 0.2 * 1 = 2.8, gaps -0.6 and -0.9; FLOPs-mean (trapezoid) -0.75, at the end -0.9
    out = analysis.equal_compute_gap(GROWN, SCRATCH, growth_flops=4)
    assert out["gap"] == pytest.approx(-0.75)
    assert out["gap at end"] == pytest.approx(-0.9)
    # unequal spacing: points at 4, 6, 12 with gaps -0.6, g6, -0.9: (2 * (-0.6 + g6) / 2
    # + 6 * (g6 - 0.9) / 2) / 8, scratch at 6 is 5 - 0.6 * 2 = 3.8, a loss of 3.0 there: g6 -0.8
    run = GROWN[:-1] + [{"flops": 6, "loss": 3.0}, {"flops": 12, "loss": 1.9},
                        {"flops": 16, "loss": 1.5, "extended": True}]
    expected = (2 * (-0.6 - 0.8) / 2 + 6 * (-0.8 - 0.9) / 2) / 8
    assert analysis.equal_compute_gap(run, SCRATCH, 4)["gap"] == pytest.approx(expected)


def test_paired_difference_two_standard_errors_by_hand():
    # differences -0.05, -0.04, -0.06: mean -0.05, sample std 0.01, SE 0.01/sqrt(3) = 0.00577
    d = analysis.paired_difference([2.10, 2.12, 2.08], [2.15, 2.16, 2.14])
    assert d["mean"] == pytest.approx(-0.05)
    assert d["se"] == pytest.approx(0.01 / 3 ** 0.5)
    assert d["beyond_noise"] is True
    # differences 0.01, -0.02, 0.04: mean 0.01, sample std 0.03, 2 SE = 0.0346 > 0.01
    d = analysis.paired_difference([1.01, 0.98, 1.04], [1.0, 1.0, 1.0])
    assert d["se"] == pytest.approx(0.03 / 3 ** 0.5)
    assert d["beyond_noise"] is False
    # two seeds: 0.1, 0.35: mean 0.225, std 0.1768, SE 0.125: 2 SE 0.25 > 0.225, within;
    # 0.15, 0.25: mean 0.2, std 0.0707, SE 0.05: 2 SE 0.1 < 0.2, beyond
    assert analysis.paired_difference([0.1, 0.35], [0, 0])["beyond_noise"] is False
    assert analysis.paired_difference([0.15, 0.25], [0, 0])["beyond_noise"] is True
    one = analysis.paired_difference([1.0], [2.0])
    assert one["mean"] == -1.0 and one["beyond_noise"] is False   # one seed: not judged
    assert analysis.paired_difference([1.0, None], [2.0, 3.0])["n"] == 1


def _fake_results(finals: dict, seeds=("1", "2", "3")) -> dict:
    """A progressive.py results.json whose runs end at finals[run][seed index] (scratch at 20
    FLOPs, grown at 12 after growth at 4)."""
    per_seed = {}
    for i, seed in enumerate(seeds):
        scratch = [{"flops": 0, "loss": 5.0}, {"flops": 10, "loss": 3.0},
                   {"flops": 20, "loss": finals["scratch"][i]}]
        grown = {name: {"curve": GROWN[:-1] + [{"flops": 12, "loss": v[i]}],
                        "loss_jump": 0.1, "twin_cosine": 0.5}
                 for name, v in finals.items() if name != "scratch"}
        per_seed[seed] = {"growth_flops": 4,
                          "settings": {"hidden-2x": {"scratch": {"curve": scratch},
                                                     "grown": grown}}}
    return {"mode": "quick", "command": "python bench/progressive.py --quick --seeds 3",
            "grow_iteration": 160, "train_iters": 320, "grow_at": 0.5, "config": {"extend": 0.25},
            "settings": ["hidden-2x"], "seeds": per_seed, "seconds": 1390.4, "jobs": 2,
            "threads": 1}


FINALS = {"scratch": [2.0, 2.02, 1.98], "sparkling": [1.95, 1.96, 1.94],
          "copy": [2.30, 2.28, 2.32], "random": [1.96, 1.94, 1.97]}


def test_seed_tables_mean_std_and_noise_by_hand():
    results = _fake_results(FINALS)
    rows = analysis.setting_rows(results, "hidden-2x")
    agg = analysis.aggregate(rows)
    # sparkling: 1.95, 1.96, 1.94: mean 1.95, sample std 0.01
    assert agg["sparkling"]["final loss"]["mean"] == pytest.approx(1.95)
    assert agg["sparkling"]["final loss"]["std"] == pytest.approx(0.01)
    assert agg["copy"]["not reached"] == 3   # 2.28-2.32 never reach scratch's 1.98-2.02
    comp = analysis.comparisons(rows, "sparkling")
    # copy - sparkling: 0.35, 0.32, 0.38: far beyond noise; random - sparkling: 0.01, -0.02,
    # 0.03: mean 0.00667, sample std 0.02517, 2 SE 0.0291: within
    assert comp["copy"]["final loss"]["beyond_noise"] is True
    assert comp["random"]["final loss"]["mean"] == pytest.approx(0.02 / 3)
    assert comp["random"]["final loss"]["beyond_noise"] is False
    lines = analysis.beyond_noise_lines(rows)
    assert "sparkling < copy by 0.3500" in " ".join(lines)
    assert not any("random" in l and "sparkling" in l for l in lines)
    text = analysis.report(results)
    assert "1.9500 ± 0.0100" in text and "(within noise)" in text and "(beyond noise)" in text
    for sentence in analysis.DEFINITIONS.values():
        assert sentence in text


def test_readme_blocks_render_check_and_rerender(tmp_path):
    (tmp_path / "docs").mkdir()
    with open(tmp_path / "docs" / "r.json", "w") as f:
        json.dump(_fake_results(FINALS), f)
    table = analysis.render_block("progressive-summary", "docs/r.json", str(tmp_path))
    assert "| hidden-2x | 3 | 2.0000 ± 0.0200 | 1.9500 ± 0.0100 |" in table
    # random - sparkling: 0.01, -0.02, 0.03 (see above): within noise
    assert "random 1.9567 ± 0.0153, random − sparkling +0.0067 (within noise)" in table
    assert analysis.render_block("progressive-run", "docs/r.json", str(tmp_path)) == (
        "    python bench/progressive.py --quick --seeds 3    # 23 min 10 s, 2 process(es) x 1 "
        "thread(s)\n")
    good = ("# x\n\n## Results\n\n<!-- generated: progressive-summary docs/r.json -->\n"
            + table + "<!-- end generated -->\n\n## Layout\n| not | results |\n")
    assert analysis.check_blocks(good, str(tmp_path)) == []
    assert analysis.tables_outside_blocks(good) == []
    stale = good.replace("1.9500 ± 0.0100", "1.9400 ± 0.0100")
    assert len(analysis.check_blocks(stale, str(tmp_path))) == 1
    assert analysis.rerender(stale, str(tmp_path)) == good
    hand = good.replace("\n## Layout", "\n| hand | 2.0782 |\n\n## Layout")
    assert analysis.tables_outside_blocks(hand) == ["| hand | 2.0782 |"]
    missing = good.replace("docs/r.json", "docs/none.json")
    assert "no such result file" in analysis.check_blocks(missing, str(tmp_path))[0]


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_generated_blocks_match_their_result_files():
    assert analysis.check_blocks(_readme(), ROOT) == []


def test_every_readme_results_table_is_generated():
    assert analysis.tables_outside_blocks(_readme()) == []


def test_identical_curves_under_two_names_are_flagged():
    # the issue 17 coincidence: two variants with the same curve after growth
    results = _fake_results(dict(FINALS, **{"copy-opt": FINALS["random"]}))
    grown = results["seeds"]["1"]["settings"]["hidden-2x"]["grown"]
    assert analysis.identical_runs(grown) == [("random", "copy-opt")]
    assert "random and copy-opt have identical curves after growth" in analysis.report(results)
    assert "identical curves" not in analysis.report(_fake_results(FINALS))


def test_the_quoted_command_leaves_out_the_folders_it_wrote_to():
    results = {"command": "python bench/progressive.py --quick --out /x/runs --seeds 3 --cache /c",
               "seconds": 125.4, "jobs": 2, "threads": 1}
    assert analysis.run_line(results) == ("    python bench/progressive.py --quick --seeds 3    "
                                          "# 2 min 05 s, 2 process(es) x 1 thread(s)")
