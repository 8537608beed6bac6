"""bench/progressive.py: one seed, one result (whatever --jobs, the variants' order or a reused
narrow/scratch run), seeds that differ, cache keys that see every input, variant parsing."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BENCH = os.path.join(ROOT, "bench", "progressive.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))
_spec = importlib.util.spec_from_file_location("bench_progressive", BENCH)
progressive = sys.modules["bench_progressive"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(progressive)   # registered first: its dataclass looks itself up

TINY = ["--quick", "--train-iters", "16", "--lr-warmup-iters", "2", "--eval-interval", "4",
        "--eval-iters", "1", "--extend", "0.25", "--rewarmup-iters", "4", "--msg-ramp", "4",
        "--settings", "expert-ffn-2x", "--seeds", "2"]


def test_cache_key_sees_every_input():
    cfg = dict(progressive.QUICK)
    argv = progressive.base_flags(cfg, "data/x", seed=1)
    base = dict(grow_iteration=160, threads=1, code="c", data="d")
    key = progressive.cache_key("narrow", argv, **base)
    assert key == progressive.cache_key("narrow", list(argv), **dict(base))
    changed = [progressive.cache_key("scratch", argv, **base),
               progressive.cache_key("narrow", progressive.base_flags(cfg, "data/x", seed=2),
                                     **base),
               progressive.cache_key("narrow", progressive.base_flags(
                   dict(cfg, lr=1e-3), "data/x", seed=1), **base)]
    for name, value in [("grow_iteration", 80), ("threads", 2), ("code", "c2"), ("data", "d2")]:
        changed.append(progressive.cache_key("narrow", argv, **dict(base, **{name: value})))
    assert key not in changed and len(set(changed)) == len(changed)


def test_variant_flag_parses_method_options_scope_and_run_flags():
    name, v = progressive.parse_variant(
        "sp96=sparkling,new_units=random,rewarmup=all,args.sparkling_rewarmup_iters=96")
    assert name == "sp96" and v == progressive.Variant(
        "sparkling", {"new_units": "random"}, "all", {"sparkling_rewarmup_iters": 96})
    with pytest.raises(ValueError, match="NAME=METHOD"):
        progressive.parse_variant("sparkling")


@pytest.mark.parametrize("variant,words", [
    ("x=nosuch", "unknown growth method"), ("x=sparkling,colour=red", "has no option colour"),
    ("x=sparkling,rewarmup=some", "rewarmup must be one of"),
    ("x=sparkling,args.no_such_flag=1", "no run flag no_such_flag")])
def test_bad_variant_is_one_line_before_any_run(tmp_path, variant, words):
    with pytest.raises(SystemExit, match=words) as e:
        progressive.main(["--quick", "--variant", variant, "--out", str(tmp_path)])
    assert "\n" not in str(e.value) and not (tmp_path / "logs").exists()


def _run(out, *flags):
    proc = subprocess.run([sys.executable, BENCH, *TINY, "--out", str(out), *flags],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / "results.json") as f:
        return json.load(f), proc.stdout


def _curves(results):
    return {(seed, setting, name): run["curve"]
            for seed, s in results["seeds"].items()
            for setting, runs in s["settings"].items()
            for name, run in [("scratch", runs["scratch"]), *runs["grown"].items()]}


@pytest.mark.slow
def test_same_command_gives_the_same_figures(tmp_path):
    """Two seeds, two variants: one process at a time vs two at once with the variants in the
    other order give bit-identical curves; a rerun reusing the narrow and scratch runs too."""
    a, _ = _run(tmp_path / "a", "--jobs", "1", "--variants", "sparkling", "random")
    b, _ = _run(tmp_path / "b", "--jobs", "2", "--variants", "random", "sparkling")
    ca, cb = _curves(a), _curves(b)
    assert ca.keys() == cb.keys() and len(ca) == 6
    for key in ca:
        assert ca[key] == cb[key], key          # exact: every loss and FLOPs value
    for seed in a["seeds"]:
        assert a["seeds"][seed]["narrow"] == b["seeds"][seed]["narrow"]
    # the seed changes init and data order: the two seeds' scratch curves differ
    assert ca[("1234", "expert-ffn-2x", "scratch")] != ca[("1235", "expert-ffn-2x", "scratch")]
    c, log = _run(tmp_path / "a", "--jobs", "1", "--variants", "random")
    assert log.count("narrow run reused") == 2
    for key, curve in _curves(c).items():
        assert curve == ca[key], key
    # the command is in the JSON, the table and the plot's metadata
    from PIL import Image

    command = c["command"]
    assert "--variants random" in command
    assert Image.open(tmp_path / "a" / "progressive.png").text["Description"] == command
    assert command in (tmp_path / "a" / "results.md").read_text()
