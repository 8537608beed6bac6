"""Symmetry breaking after growth, on a real megatron-core MoE run (1 rank, dropout 0).

Copy growth with copied optimizer state is fully symmetric: each new unit and its twin see the
same gradient and the same Adam update, so they stay copies ("symmetry lock") and the wider model
is no better than the narrow one. SPARKLING's asymmetric reset (S' = [S, 0]) with the LR
re-warmup of new elements must break that lock while training goes on improving.
"""
import dataclasses

from conftest import megatron_run, tiny_moe_flags
from megatron_sparkling.live import rewarmup as schedule
from megatron_sparkling.diagnostics import twin_similarity
from megatron_sparkling.methods import Grower
from megatron_sparkling.core.spec import GrowthSpec, ModelShape
from megatron_sparkling.training import data

NARROW = dict(train_iters=140, lr=3e-3, min_lr=3e-4, lr_warmup_iters=4, hidden_dropout=0,
              attention_dropout=0, use_distributed_optimizer=True, clip_grad=1.0,
              weight_decay=0.1, micro_batch_size=8)
GROW_AT = 20
AXES = ("hidden", "expert_ffn")


def _grow_and_train(corpus_prefix, method, scope, steps, probe_every):
    """Train narrow to GROW_AT, grow in process, train `steps` more; twin gradient cosine (mean
    per axis) on fixed validation batches every `probe_every` steps, and the training losses."""
    with megatron_run(tiny_moe_flags(corpus_prefix, **NARROW)) as run:
        run.train(until_iteration=GROW_AT)
        wide = ModelShape.from_args(run.args).replace(hidden_size=128, moe_ffn_hidden_size=256)
        wide_args = wide.apply_to_args(run.args)
        grower = Grower(GrowthSpec(ModelShape.from_args(run.args), wide, method, seed=3))
        run.grow_model(wide_args, lambda key, shape, sources: grower.grow(key, sources[key]))
        config = dataclasses.replace(schedule.RewarmupConfig.from_args(wide_args), scope=scope,
                                     warmup_iters=20)
        schedule.install_rewarmup(run.model, run.optimizer, run.scheduler, grower.record(), config)
        batches = list(data.microbatches(run.valid_ds, 0, 1, run.args))[:2]
        cosines, losses = [], []
        for step in range(1, steps + 1):
            losses.append(run.train_step()["lm loss"])
            if step % probe_every == 0:
                sims = twin_similarity(run.model, grower.plan, batches)["gradient"]
                cosines.append((step, {a: sims[a]["mean"] for a in AXES}))
    return cosines, losses


def _mean(values):
    return sum(values) / len(values)


def test_copy_with_copied_state_stays_locked(corpus_prefix):
    cosines, losses = _grow_and_train(corpus_prefix, "copy", "none", steps=50, probe_every=50)
    (step, last), = cosines
    print(f"copy: twin gradient cosine after {step} steps {last}")
    for axis in AXES:
        assert last[axis] > 0.99, (axis, last)


def test_sparkling_breaks_the_lock_while_loss_falls(corpus_prefix):
    cosines, losses = _grow_and_train(corpus_prefix, "sparkling", "new", steps=100,
                                      probe_every=25)
    print(f"sparkling: twin gradient cosine {cosines}; loss first 10 {_mean(losses[:10]):.4f}, "
          f"last 10 {_mean(losses[-10:]):.4f}")
    below = [step for step, c in cosines if all(c[a] < 0.9 for a in AXES)]
    assert below and below[0] <= 100, cosines
    assert _mean(losses[-10:]) < _mean(losses[:10]) - 0.05, losses
