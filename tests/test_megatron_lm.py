"""Megatron-LM's own pretrain_gpt.py, patched with patches/, driven through the CPU launcher
(`torchrun -m megatron_sparkling.megatron_lm`): growth on load, `expand` + a normal load, a resume
inside the re-warmup, 2 processes at EP=2, and checkpoints crossing between Megatron-LM and
examples/pretrain_moe.py. Each grown or loaded run's next-iteration loss must equal the narrow
run's (function-preserving growth). Needs $MEGATRON_LM_DIR: a Megatron-LM work tree at tag
core_v0.16.1 (copied to a temporary directory and patched there; never modified).

Megatron-LM prints losses with 7 significant digits, so equality is checked to 1e-6 relative.
Launches are few (each costs Megatron-LM's start-up): the narrow and grown checkpoints are shared.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import (MEGATRON_LM_DIR, PRETRAIN, REPO, free_port, megatron_lm_missing,
                      read_metrics, train_losses)
from megatron_sparkling.compat import megatron_lm as cpu_megatron_lm
from megatron_sparkling.planning.loss_log import megatron_lm_run_losses

REL = 1e-6
NARROW_ITERS, GROWN_AT = 24, 20
WIDE = ["--hidden-size", "128", "--kv-channels", "16", "--moe-ffn-hidden-size", "128"]
# A tiny fp32 MoE, Megatron-LM's flags (the CPU-only ones are added by the launcher).
TINY_MOE = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--num-experts", "4", "--moe-ffn-hidden-size", "64", "--moe-router-topk", "2",
    "--moe-aux-loss-coeff", "0.01", "--swiglu", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "4",
    "--global-batch-size", "8", "--train-iters", str(NARROW_ITERS), "--lr", "1e-3",
    "--min-lr", "1e-4", "--lr-warmup-iters", "5", "--lr-decay-style", "cosine",
    "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1", "--mock-data",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--seed", "1234",
    "--use-distributed-optimizer",
]


def needs_megatron_lm(test):
    """Slow, and skipped (saying why) without a Megatron-LM work tree in $MEGATRON_LM_DIR."""
    missing = megatron_lm_missing()
    return pytest.mark.slow(pytest.mark.skipif(missing is not None, reason=missing or "")(test))


def assert_close(got: float, want: float, case: str):
    rel = abs(got - want) / abs(want)
    print(f"{case}: {got:.6f} beside {want:.6f} (relative difference {rel:.1e})")
    assert rel <= REL, f"{case}: {got} != {want} (relative {rel:.2e})"


@pytest.fixture(scope="module")
def megatron_lm(tmp_path_factory) -> str:
    """A patched copy of $MEGATRON_LM_DIR; its pretrain_gpt.py."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed (needed to apply patches/)")
    tree = str(tmp_path_factory.mktemp("megatron-lm") / "Megatron-LM")
    shutil.copytree(MEGATRON_LM_DIR, tree, ignore=shutil.ignore_patterns(".git", "docs", "images"))
    for patch in sorted(os.listdir(os.path.join(REPO, "patches"))):
        if patch.endswith(".patch"):
            subprocess.run(["git", "apply", os.path.join(REPO, "patches", patch)], cwd=tree,
                           check=True)
    return os.path.join(tree, "pretrain_gpt.py")


def _env():
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run_megatron_lm(script: str, flags: list, nproc: int = 1) -> tuple[dict, str]:
    """pretrain_gpt.py through the launcher under torchrun: ({iteration: loss}, its output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "megatron_sparkling.megatron_lm", script, *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-8000:]}"
    return megatron_lm_run_losses(proc.stdout), out


def run_pretrain_moe(flags: list, metrics: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           f"--master_port={free_port()}", PRETRAIN, *flags, "--log-metrics-path", metrics]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-8000:]}"
    return train_losses(read_metrics(metrics))


@pytest.fixture(scope="module")
def narrow(megatron_lm, tmp_path_factory):
    """Megatron-LM, narrow: 24 iterations, saved at 20 (and at the end)."""
    save = str(tmp_path_factory.mktemp("narrow"))
    losses, out = run_megatron_lm(megatron_lm, TINY_MOE + ["--save", save, "--save-interval",
                                                           str(GROWN_AT)])
    return save, losses, out


@pytest.fixture(scope="module")
def grown(megatron_lm, narrow, tmp_path_factory):
    """Growth on load (sparkling) from the narrow run's iteration 20, a 4-iteration re-warmup,
    saved every 2 iterations in model space (fully_reshardable)."""
    save = str(tmp_path_factory.mktemp("grown"))
    losses, out = run_megatron_lm(megatron_lm, TINY_MOE + WIDE + [
        "--load", narrow[0], "--ckpt-step", str(GROWN_AT), "--no-load-rng", "--save", save,
        "--save-interval", "2", "--dist-ckpt-optim-fully-reshardable",
        "--sparkling-method", "sparkling", "--sparkling-rewarmup-iters", "4"])
    return save, losses, out


@needs_megatron_lm
def test_narrow_run_trains_and_saves_through_the_launcher(narrow):
    save, losses, out = narrow
    assert sorted(losses) == list(range(1, NARROW_ITERS + 1))
    assert losses[GROWN_AT] < losses[1] - 0.5       # it learns
    assert os.path.isdir(os.path.join(save, f"iter_{GROWN_AT:07d}"))
    added = [line for line in out.splitlines() if "megatron_sparkling.megatron_lm: no GPU" in line]
    assert len(added) == 1
    for flag, _, _ in cpu_megatron_lm.CPU_FLAGS:
        assert flag in added[0]


@needs_megatron_lm
def test_growth_on_load_with_sparkling_keeps_the_next_loss(narrow, grown):
    _, narrow_losses, _ = narrow
    _, losses, out = grown
    assert "SPARKLING: growing" in out and "hidden_size 64 -> 128" in out
    assert_close(losses[GROWN_AT + 1], narrow_losses[GROWN_AT + 1],
                 "growth on load, sparkling, 1 process: iteration 21")


@needs_megatron_lm
def test_a_grown_run_resumed_inside_the_rewarmup_equals_the_straight_run(megatron_lm, grown):
    save, straight, _ = grown
    losses, out = run_megatron_lm(megatron_lm, TINY_MOE + WIDE + [
        "--load", save, "--ckpt-step", "22", "--sparkling-rewarmup-iters", "4"])
    assert "re-warmup (resumed" in out       # the normal-load path: no growth, the ramp goes on
    assert sorted(losses) == list(range(23, NARROW_ITERS + 1))
    for it in losses:
        assert_close(losses[it], straight[it],
                     f"resumed inside the re-warmup: iteration {it}")


@needs_megatron_lm
def test_growth_on_load_with_copy_at_two_processes_ep2(megatron_lm, narrow):
    _, narrow_losses, _ = narrow
    losses, out = run_megatron_lm(megatron_lm, TINY_MOE + WIDE + [
        "--expert-model-parallel-size", "2", "--load", narrow[0], "--ckpt-step", str(GROWN_AT),
        "--no-load-rng", "--sparkling-method", "copy"], nproc=2)
    assert "method copy" in out
    assert_close(losses[GROWN_AT + 1], narrow_losses[GROWN_AT + 1],
                 "growth on load, copy, 2 processes EP=2: iteration 21")


@needs_megatron_lm
def test_expand_then_a_normal_load(megatron_lm, narrow, tmp_path):
    _, narrow_losses, _ = narrow
    expanded = str(tmp_path / "expanded")
    proc = subprocess.run([sys.executable, "-m", "megatron_sparkling.cli", "expand",
                           "--load", narrow[0], "--iteration", str(GROWN_AT), "--save", expanded,
                           "--hidden-size", "128", "--moe-ffn-hidden-size", "128",
                           "--method", "sparkling", "--seed", "1", "--rewarmup-iters", "4"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses, out = run_megatron_lm(megatron_lm, TINY_MOE + WIDE + [
        "--load", expanded, "--no-load-rng", "--sparkling-rewarmup-iters", "4"])
    assert "SPARKLING: growing" not in out and "SPARKLING re-warmup" in out
    assert_close(losses[GROWN_AT + 1], narrow_losses[GROWN_AT + 1],
                 "expand + normal load: iteration 21")


@pytest.fixture(scope="module")
def pretrain_moe_narrow(megatron_lm, tmp_path_factory):
    """examples/pretrain_moe.py with the same flags, saved at 20."""
    root = tmp_path_factory.mktemp("pretrain_moe")
    losses = run_pretrain_moe(TINY_MOE + ["--save", str(root / "ckpt"), "--save-interval",
                                          str(GROWN_AT)], str(root / "metrics.jsonl"))
    return str(root / "ckpt"), losses


@needs_megatron_lm
def test_a_pretrain_moe_checkpoint_loads_in_megatron_lm(megatron_lm, pretrain_moe_narrow):
    save, theirs = pretrain_moe_narrow
    losses, _ = run_megatron_lm(megatron_lm, TINY_MOE + ["--load", save, "--ckpt-step",
                                                         str(GROWN_AT)])
    assert_close(losses[GROWN_AT + 1], theirs[GROWN_AT + 1],
                 "pretrain_moe checkpoint loaded by Megatron-LM: iteration 21")


@needs_megatron_lm
def test_a_megatron_lm_checkpoint_loads_in_pretrain_moe(narrow, tmp_path):
    save, theirs, _ = narrow
    losses = run_pretrain_moe(TINY_MOE + ["--load", save, "--ckpt-step", str(GROWN_AT)],
                              str(tmp_path / "metrics.jsonl"))
    assert_close(losses[GROWN_AT + 1], theirs[GROWN_AT + 1],
                 "Megatron-LM checkpoint loaded by pretrain_moe: iteration 21")


# ------------------------------------------------------------ the launcher, no Megatron-LM needed
def test_cpu_flags_are_added_only_where_not_given():
    argv, added = cpu_megatron_lm.with_cpu_flags(["--num-layers", "2", "--no-rope-fusion",
                                                  "--distributed-backend=gloo"])
    assert added == ["--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
                     "--transformer-impl", "local"]
    assert argv[:4] == ["--num-layers", "2", "--no-rope-fusion", "--distributed-backend=gloo"]


def test_biased_moe_on_the_local_path_is_refused_naming_the_flag():
    flags, _ = cpu_megatron_lm.with_cpu_flags(["--num-experts", "4"])
    assert "--disable-bias-linear" in cpu_megatron_lm.refusal(flags)
    assert cpu_megatron_lm.refusal(flags + ["--disable-bias-linear"]) is None
    assert cpu_megatron_lm.refusal(["--num-layers", "2"] + flags[2:]) is None   # dense: fine


@pytest.mark.parametrize("script,message", [
    (None, "usage: torchrun"),
    ("missing.py", "not a Python file"),
    ("here.py", "cannot import Megatron-LM next to"),
])
def test_bad_launcher_input_is_one_line(tmp_path, script, message):
    if script == "here.py":
        (tmp_path / script).write_text("raise SystemExit('must not run')\n")
    argv = [] if script is None else [str(tmp_path / script), "--num-layers", "2"]
    proc = subprocess.run([sys.executable, "-m", "megatron_sparkling.megatron_lm", *argv],
                          cwd=tmp_path, env=dict(_env(), MEGATRON_SPARKLING_FORCE_CPU="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr and "must not run" not in proc.stderr


def test_megatron_lm_losses_undo_the_first_iteration_running_sum():
    line = (" [2026-11-30 11:36:41] iteration {:8d}/      24 | consumed samples: 168 | "
            "learning rate: 1.5E-04 | global batch size:     8 | lm loss: {:.6E} | "
            "loss scale: 1.0 |")
    log = "\n".join(line.format(i, v) for i, v in [(21, 5.5), (22, (5.5 + 5.25) / 2), (23, 5.0)])
    assert megatron_lm_run_losses(log) == {21: 5.5, 22: 5.25, 23: 5.0}
