"""Shared test set-up: a real tokenized corpus, tiny real MoE models, in-process and torchrun runs.

Nothing of Megatron is faked: every test builds megatron-core models, optimizers and
dist_checkpointing checkpoints on CPU with gloo, in this process (1 rank) or under torchrun.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_sparkling.training.arguments import flags_to_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "examples", "pretrain_moe.py")
CORPUS_TOKENS = 1_500_000
# A Megatron-LM work tree at tag core_v0.16.1 (the tag patches/ targets), for the tests that run
# Megatron-LM itself (tests/test_megatron_lm.py, tests/test_patches.py); no default path.
MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")


def megatron_lm_missing():
    """Why the Megatron-LM tests cannot run here, or None when $MEGATRON_LM_DIR is usable."""
    if not MEGATRON_LM_DIR:
        return ("MEGATRON_LM_DIR is not set (a Megatron-LM work tree at tag core_v0.16.1: "
                "git clone https://github.com/NVIDIA/Megatron-LM && git checkout core_v0.16.1)")
    for rel in ("pretrain_gpt.py", os.path.join("megatron", "training")):
        if not os.path.exists(os.path.join(MEGATRON_LM_DIR, rel)):
            return f"MEGATRON_LM_DIR={MEGATRON_LM_DIR} holds no {rel}: not a Megatron-LM work tree"
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (torchrun, benchmarks); "
                                       "deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def collect_finished_runs():
    """After each test, free the runs it left (a run's gloo groups keep threads until then)."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def corpus_prefix(tmp_path_factory) -> str:
    """A real corpus (standard-library source, byte tokens) in megatron-core's indexed format."""
    from megatron_sparkling.training import corpus

    prefix = str(tmp_path_factory.mktemp("corpus") / "stdlib_text_document")
    corpus.build(corpus.stdlib_files(corpus.default_source_dir()), prefix, CORPUS_TOKENS)
    return prefix


def tiny_moe_flags(data_path: str, **overrides) -> list[str]:
    """Flags of a tiny MoE GPT (SwiGLU, RMSNorm, RoPE, GQA-capable) in Megatron-LM's names.

    Keyword overrides replace a flag's value (`train_iters=20`); True adds a bare flag, None or
    False removes it.
    """
    flags = {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "num_experts": 4, "moe_ffn_hidden_size": 128, "moe_router_topk": 2,
        "moe_aux_loss_coeff": 0.01, "swiglu": True, "normalization": "RMSNorm",
        "position_embedding_type": "rope", "disable_bias_linear": True,
        "untie_embeddings_and_output_weights": True, "seq_length": 64,
        "max_position_embeddings": 64, "micro_batch_size": 4, "global_batch_size": 8,
        "train_iters": 20, "lr": 1e-3, "min_lr": 1e-4, "lr_warmup_iters": 5,
        "lr_decay_style": "cosine", "log_interval": 1000, "eval_interval": 0, "eval_iters": 2,
        "data_path": data_path, "split": "90,10,0", "seed": 1234,
    }
    flags.update(overrides)
    return flags_to_argv(flags)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_rank():
    """torch.distributed's environment for 1 rank in this process (a free port); parallel state
    and process group torn down after, the environment restored."""
    from megatron_sparkling.training.initialize import shutdown

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def megatron_run(argv, extra_args_provider=None):
    """A 1-rank Pretrainer in this process; parallel state and process group torn down after."""
    from megatron_sparkling.training.loop import Pretrainer

    with single_rank():
        yield Pretrainer.from_argv(argv, extra_args_provider)


def saved_and_continued(flags: list, root: str, save_at: int, total: int) -> list:
    """Train a 1-rank run to `save_at`, save it at `root`, go on to `total`: the losses after
    the save (what a resumed run must reproduce)."""
    with megatron_run(flags) as trainer:
        trainer.train(until_iteration=save_at)
        trainer.save(root)
        return [trainer.train_step()["lm loss"] for _ in range(total - save_at)]


def torchrun(nproc: int, script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Launch `script` under torchrun on CPU; raises with the output if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", script, *args]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(records) -> dict[int, float]:
    return {r["iteration"]: r["lm loss"] for r in records if "lm loss" in r}


def edit_common_state(checkpoint_dir, edit) -> None:
    """Change a saved checkpoint's common state (args, growth record, ...) with `edit(common)`:
    read as megatron-core reads it (common.pt, or the `common_state` object newer releases
    write) and written back as common.pt, which megatron-core and the project read first."""
    import torch
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    edit(common)
    torch.save(common, os.path.join(str(checkpoint_dir), "common.pt"))


def tree_hashes(root) -> dict:
    """{relative path: sha256} of every file under `root` (a source must stay byte-identical)."""
    import hashlib

    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out
