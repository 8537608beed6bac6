"""wandb logging of a growth (offline mode, no network): the load hook and `expand` log the
growth event and the diagnostics summary; without wandb, --wandb-project is a one-line error."""
import glob
import os
import sys
import time

import pytest

from conftest import megatron_run, tiny_moe_flags

wandb = pytest.importorskip("wandb", reason="wandb not installed (pip install "
                                            "'megatron-sparkling[wandb]')")

NARROW = dict(train_iters=6, lr_warmup_iters=2, hidden_dropout=0, attention_dropout=0,
              use_distributed_optimizer=True)
WIDE = dict(NARROW, hidden_size=128, kv_channels=16, moe_ffn_hidden_size=256)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, corpus_prefix):
    root = tmp_path_factory.mktemp("narrow") / "ckpt"
    with megatron_run(tiny_moe_flags(corpus_prefix, **NARROW)) as trainer:
        trainer.train(until_iteration=2)
        trainer.save(str(root))
    return str(root)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    from megatron_sparkling import wandb_log

    wandb_log.finish()


def _logged(save_dir, keys, timeout=30.0) -> bytes:
    """The bytes of the offline run's record log (keys and JSON values appear verbatim), once
    every key is there: wandb's service writes the file after finish() returns."""
    deadline = time.time() + timeout
    while True:
        files = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb"))
        assert len(files) <= 1, files
        data = open(files[0], "rb").read() if files else b""
        missing = [k for k in keys if k.encode() not in data]
        if not missing or time.time() > deadline:
            assert not missing, missing
            return data
        time.sleep(0.5)


def test_load_hook_logs_growth_event_and_diagnostics(narrow, corpus_prefix, tmp_path, offline):
    from megatron_sparkling import wandb_log

    save_dir = str(tmp_path / "wb")
    flags = tiny_moe_flags(corpus_prefix, load=narrow, wandb_project="sparkling-test",
                           wandb_save_dir=save_dir, **WIDE)
    with megatron_run(flags) as trainer:
        trainer.train_step()
    wandb_log.finish()
    data = _logged(save_dir, ("sparkling/growth/iteration", "sparkling/growth/new_elements",
                              "sparkling/growth/hidden_size_after",
                              "sparkling/diagnostics/loss_change",
                              "sparkling/diagnostics/logit_max_abs_diff", "lm loss"))
    # new elements = stored elements after - before (the count the re-warmup masks too)
    assert str(trainer.scheduler.rewarmup.new_elements).encode() in data


def test_expand_logs_growth_event(narrow, tmp_path, offline, capsys):
    from megatron_sparkling.cli import main

    save_dir = str(tmp_path / "wb")
    assert main(["expand", "--no-progress", "--load", narrow, "--save", str(tmp_path / "g"),
                 "--hidden-size", "128", "--moe-ffn-hidden-size", "256", "--wandb-project",
                 "sparkling-test", "--wandb-save-dir", save_dir]) == 0
    _logged(save_dir, ("sparkling/growth/new_elements", "sparkling/growth/method",
                       "sparkling/diagnostics/loss_change",
                       "sparkling/diagnostics/logit_max_abs_diff"))


def test_wandb_flag_without_wandb_is_one_line(narrow, tmp_path, monkeypatch, capsys):
    from megatron_sparkling.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)   # as if not installed
    assert main(["expand", "--no-progress", "--load", narrow, "--save", str(tmp_path / "g"),
                 "--hidden-size", "128", "--wandb-project", "p"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "pip install 'megatron-sparkling[wandb]'" in err[0], err
    assert not (tmp_path / "g").exists()
