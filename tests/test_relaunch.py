"""Issue 11: one grown checkpoint relaunches at any TP/EP/PP/DP with only the flags `expand`
prints (no --target-* flag), for sparkling, copy and msg, with the re-warmup on, on a
vocabulary whose padded size changes with TP (256 tokens padded to a multiple of 96 x TP: 288
at TP=1, 384 at TP=2). Each relaunch's first loss equals the narrow model's on the same batch,
measured at the same padded vocabulary (rows the padding adds are zero in both, as Megatron's
own loader leaves them). Also: a plain checkpoint saved at EP=1 resumes through the hook at
EP=2 with the straight run's losses; msg's mask ramp travels in the checkpoint."""
import json
import os

import pytest

from conftest import REPO, megatron_run, saved_and_continued, tiny_moe_flags, torchrun
from megatron_sparkling.cli import main

SCRIPT = os.path.join(REPO, "tests", "relaunch_2rank.py")
SAVE_AT, TOTAL = 3, 6
DIVISIBLE = 96          # byte vocabulary 256 -> 288 at TP=1, 384 at TP=2
BASE = dict(train_iters=TOTAL, lr_warmup_iters=1, hidden_dropout=0, attention_dropout=0,
            use_distributed_optimizer=True, make_vocab_size_divisible_by=DIVISIBLE)
METHODS = ("sparkling", "copy", "msg")
RAMP = 4                # msg's ramp (iterations): the first steps after growth are inside it
TOLERANCE = {"sparkling": 5e-3, "copy": 1e-5, "msg": 1e-5}   # relative, first loss
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "ep2": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}


def expand(*argv) -> int:
    return main(["expand", "--no-progress", *map(str, argv)])


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, corpus_prefix):
    """A TP=1, EP=1 checkpoint at iteration 3 (Megatron's default dp_reshardable optimizer
    state) and the straight run's losses of iterations 4..6."""
    root = str(tmp_path_factory.mktemp("narrow") / "ckpt")
    return root, saved_and_continued(tiny_moe_flags(corpus_prefix, **BASE), root, SAVE_AT, TOTAL)


@pytest.fixture(scope="module")
def grown(tmp_path_factory, narrow):
    """The narrow checkpoint grown 2x (hidden, expert FFN) by each method, no target flag;
    method -> (checkpoint, the relaunch flags `expand` printed)."""
    from megatron_sparkling.checkpoint.expand import ExpandRequest, expand as run_expand

    out = {}
    for method in METHODS:
        dst = str(tmp_path_factory.mktemp(method) / "ckpt")
        options = {"ramp_steps": RAMP} if method == "msg" else {}
        result = run_expand(ExpandRequest(
            load=narrow[0], save=dst, sizes=dict(hidden_size=128, moe_ffn_hidden_size=256),
            method=method, seed=5, options=options, rewarmup_iters=2, progress=False))
        out[method] = (dst, result.relaunch_flags)
    return out


def narrow_loss_at(corpus_prefix, root, divisible) -> float:
    """The narrow model's loss on the first batch after the save, at a padded vocabulary of a
    multiple of `divisible` (weights only: the loss of a batch does not depend on the optimizer)."""
    flags = tiny_moe_flags(corpus_prefix, load=root, no_load_optim=True,
                           **dict(BASE, make_vocab_size_divisible_by=divisible))
    with megatron_run(flags) as trainer:
        assert trainer.iteration == SAVE_AT
        return trainer.train_step()["lm loss"]


def relaunch_argv(corpus_prefix, printed, **overrides) -> list:
    """The run's own flags (data, schedule, the narrow model's other flags) + what `expand`
    printed: the printed flags come last, so they win."""
    return tiny_moe_flags(corpus_prefix, **dict(BASE, **overrides)) + printed


def _close(a, b, rel):
    return abs(a - b) <= rel * abs(b)


@pytest.fixture(scope="module")
def narrow_losses(corpus_prefix, narrow):
    """The narrow model's loss on the first batch after the save, at TP=1's padded vocabulary
    (288, the checkpoint's) and at TP=2's (384: the extra rows zero, as Megatron loads them)."""
    root, continued = narrow
    at_384 = narrow_loss_at(corpus_prefix, root, 2 * DIVISIBLE)
    return {288: continued[0], 384: at_384}


def test_expand_prints_no_layout_and_msg_is_accepted(grown):
    for method, (dst, printed) in grown.items():
        assert printed[:2] == ["--load", dst]
        assert not any(f.endswith("-parallel-size") for f in printed), printed
        assert "--sparkling-rewarmup-iters" in printed


@pytest.mark.parametrize("method", METHODS)
def test_relaunch_at_one_rank_keeps_the_loss(corpus_prefix, grown, narrow_losses, method):
    """Back at 1 rank with the printed flags, at the checkpoint's padded vocabulary (288) and at
    a larger one (384: what TP=2 gives; the re-warmup's masks follow the model's rows): the first
    loss is the narrow model's on the same batch at that vocabulary, and training goes on."""
    dst, printed = grown[method]
    for padded in (288, 384):
        argv = relaunch_argv(corpus_prefix, printed, make_vocab_size_divisible_by=padded)
        with megatron_run(argv) as trainer:
            assert trainer.args.padded_vocab_size == padded
            assert trainer.iteration == SAVE_AT
            assert trainer.scheduler.rewarmup.new_elements > 0
            ramp = getattr(trainer.scheduler, "mask_ramp", None)
            assert (ramp is not None) == (method == "msg")
            losses = [trainer.train_step()["lm loss"] for _ in range(2)]
            if ramp is not None:
                assert ramp.m == 1 / RAMP   # the second step: one iteration into the ramp
        print(f"\n[{method}, 1 rank, padded vocabulary {padded}] first loss {losses[0]:.6f}; "
              f"narrow on the same batch {narrow_losses[padded]:.6f} "
              f"({losses[0] / narrow_losses[padded] - 1:+.2e}); next {losses[1]:.6f}")
        assert _close(losses[0], narrow_losses[padded], TOLERANCE[method])
    assert narrow_losses[384] != narrow_losses[288]   # the padding does change the loss


def test_msg_saved_inside_the_ramp_resumes_exactly(tmp_path, corpus_prefix, grown):
    """The relaunched msg run saved 1 iteration into its 4-iteration ramp and resumed in a fresh
    run: the ramp (start, length) comes back from the checkpoint, the mask takes the straight
    run's values (0.25, 0.5) and the losses equal the straight run's."""
    dst, printed = grown["msg"]
    saved = str(tmp_path / "inside")

    def steps(trainer):
        out = []
        for _ in range(TOTAL - SAVE_AT - 1):
            loss = trainer.train_step()["lm loss"]
            out.append((trainer.scheduler.mask_ramp.m, loss))
        return out

    with megatron_run(relaunch_argv(corpus_prefix, printed)) as trainer:
        trainer.train(until_iteration=SAVE_AT + 1)
        trainer.save(saved)
        straight = steps(trainer)
    argv = relaunch_argv(corpus_prefix, ["--load", saved], hidden_size=128, kv_channels=16,
                         moe_ffn_hidden_size=256)
    with megatron_run(argv) as trainer:
        ramp = trainer.scheduler.mask_ramp
        assert (ramp.start_iteration, ramp.ramp_steps) == (SAVE_AT, RAMP)
        assert trainer.scheduler.rewarmup.state.growth_step == SAVE_AT * 8
        resumed = steps(trainer)
    print(f"\n[msg ramp] (mask, loss) straight {straight}; resumed {resumed}")
    assert [m for m, _ in straight] == [m for m, _ in resumed] == [0.25, 0.5]
    assert max(abs(a - b) / b for (_, a), (_, b) in zip(resumed, straight)) < 1e-5


PADDED = {"tp2": 384, "ep2": 288, "pp2": 288}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "ep2", "pp2"])
def test_relaunch_at_two_ranks(tmp_path, corpus_prefix, narrow, grown, narrow_losses, layout):
    """One launch per layout relaunches the three grown checkpoints (the printed flags + the
    layout; TP=2 pads the vocabulary to 384): each first loss is the narrow model's on the same
    batch at that padding, and the re-warmup (and msg's ramp) came back with the load. At EP=2
    the same launch resumes the plain EP=1 checkpoint through the hook (its optimizer state was
    written for one optimizer, EP=2 has two) with the straight run's losses."""
    root, continued = narrow
    cases = [{"name": m, "steps": 2, "argv": relaunch_argv(corpus_prefix, grown[m][1])
              + LAYOUTS[layout]} for m in METHODS]
    if layout == "ep2":
        cases.append({"name": "plain", "steps": TOTAL - SAVE_AT,
                      "argv": tiny_moe_flags(corpus_prefix, load=root, **BASE) + LAYOUTS[layout]})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    torchrun(2, SCRIPT, [str(tmp_path / "cases.json"), str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    reference = narrow_losses[PADDED[layout]]
    for method in METHODS:
        r = out[method]
        first = r["losses"][str(SAVE_AT + 1)]
        print(f"\n[{method}, {layout}, padded vocabulary {PADDED[layout]}] first loss "
              f"{first:.6f}; narrow on the same batch {reference:.6f} "
              f"({first / reference - 1:+.2e}); next {r['losses'][str(SAVE_AT + 2)]:.6f}")
        assert r["resumed_at"] == SAVE_AT and r["rewarmup_new_elements"] > 0
        assert r["masks"] == ([0.0, 1 / RAMP] if method == "msg" else [None, None])
        assert _close(first, reference, TOLERANCE[method]), (method, first, reference)
    if layout == "ep2":
        resumed = [out["plain"]["losses"][str(i)] for i in range(SAVE_AT + 1, TOTAL + 1)]
        print(f"\n[plain EP=1 checkpoint resumed at EP=2] {resumed}; straight {continued}")
        assert max(abs(a - b) / b for a, b in zip(resumed, continued)) < 1e-5
