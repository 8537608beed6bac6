"""Data-calibrated RMS-scale consistency on a trained real model: SPARKLING at 1.5x with random
new units keeps every linear's r within 2% and the held-out loss within 0.5%."""
import pytest

from megatron_sparkling.diagnostics import calibration
from megatron_sparkling.live.state import load_model_global_tensors
from megatron_sparkling.training import data
from test_width import AXES_1_5X, FIGURES, grow_all, heldout_loss, logits_of, narrow  # noqa: F401


def _ratio_changes(narrow, wide, plan, batches):
    before = calibration.reference_ratios(narrow.trainer.model, batches)
    after = calibration.reference_ratios(wide, batches)
    return {site: after[site] / before[calibration._source_site(site, plan)] - 1
            for site in after if calibration._source_site(site, plan) in before}


HELD_OUT_ITERS = 8


@pytest.fixture(scope="module")
def held_out(narrow):
    """More validation text than the width tests use (4096 tokens): per-expert r is measured on
    the tokens the router sends each expert, which a small batch makes noisy."""
    import copy

    args = copy.copy(narrow.args)
    args.eval_iters = HELD_OUT_ITERS
    _, valid, _ = data.build_datasets(args, narrow.trainer.tokenizer)
    return list(data.microbatches(valid, 0, HELD_OUT_ITERS, args))


@pytest.mark.parametrize("axis", sorted(AXES_1_5X))
def test_calibrated_sparkling_1_5x_random_units(narrow, held_out, axis):
    change = AXES_1_5X[axis]
    grower = narrow.grower(change, "sparkling", seed=11, new_units="random")
    wide = narrow.wide(change)
    load_model_global_tensors(wide, grow_all(grower, narrow.tensors))
    uncalibrated = _ratio_changes(narrow, wide, grower.plan, held_out)
    # calibrate on TRAINING batches; judge on the held-out (validation) batches
    train = list(data.microbatches(narrow.trainer.train_ds, 0, 12, narrow.args))
    reference = calibration.reference_ratios(narrow.trainer.model, train)
    corrections = calibration.calibrate(wide, grower.plan, reference, train)
    assert corrections
    changes = _ratio_changes(narrow, wide, grower.plan, held_out)
    worst = max(changes, key=lambda s: abs(changes[s]))
    worst_before = max(abs(v) for v in uncalibrated.values())
    before = heldout_loss(logits_of(narrow.trainer.model, held_out), held_out)
    loss = heldout_loss(logits_of(wide, held_out), held_out) / before - 1
    FIGURES[f"calibrated sparkling 1.5x random {axis}"] = (
        f"worst r change {100 * changes[worst]:+.2f}% ({worst.label()}), uncalibrated worst "
        f"{100 * worst_before:.1f}%; held-out loss {100 * loss:+.3f}%")
    assert abs(changes[worst]) < 0.02, (worst, changes[worst])
    assert abs(loss) < 0.005


def test_corrections_apply_to_stored_tensors(narrow):
    """The same scaling reaches the fp32 main params: applying the corrections to the grown
    global tensors reproduces the calibrated model's weights."""
    from megatron_sparkling.live.state import model_global_tensors

    change = AXES_1_5X["expert_ffn"]
    grower = narrow.grower(change, "sparkling", seed=5, new_units="random")
    grown = grow_all(grower, narrow.tensors)
    wide = narrow.wide(change)
    load_model_global_tensors(wide, grown)
    train = list(data.microbatches(narrow.trainer.train_ds, 0, 1, narrow.args))
    corrections = calibration.calibrate(
        wide, grower.plan, calibration.reference_ratios(narrow.trainer.model, train), train)
    calibrated = model_global_tensors(wide)
    keys = {c.key for c in corrections}
    assert any("experts" in k for k in keys)
    for key in keys:
        applied = calibration.apply_corrections(key, grown[key], corrections)
        assert (applied - calibrated[key]).abs().max() < 1e-6, key
