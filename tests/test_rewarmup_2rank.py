"""The re-warmup at 2 ranks under torchrun: EP=2 with the distributed optimizer (dense parameters
DP-sharded over both ranks, experts split by EP), one step checked on every local shard."""
import json
import os

import pytest

from conftest import REPO, tiny_moe_flags, torchrun
from rewarmup_checks import GBS, RUN, T_E, WIDE, base_lr, new_lr

SCRIPT = os.path.join(REPO, "tests", "rewarmup_2rank.py")


@pytest.mark.slow
def test_two_rank_expert_parallel_distributed_optimizer_step_and_resume(tmp_path, corpus_prefix):
    # 3 layers: the DP-shard boundary then falls inside a parameter (with 2 it falls between)
    flags = tiny_moe_flags(corpus_prefix, **WIDE, **RUN, num_layers=3, use_distributed_optimizer=True,
                           expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall")
    torchrun(2, SCRIPT, [str(tmp_path), "grow"] + flags)
    torchrun(2, SCRIPT, [str(tmp_path), "resume"] + flags)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    resumed = [json.loads((tmp_path / f"rank{r}_resumed.json").read_text()) for r in (0, 1)]
    for r in ranks:
        print(f"rank {r['rank']}: {r['new_elements']} new elements in its shards; one step: max "
              f"deviation {r['dev_abs']:.3e} (new {r['dev_new_ulp']:.2f} ulp, old "
              f"{r['dev_old_ulp']:.2f} ulp)")
        assert r["dev_new_ulp"] <= 4.0 and r["dev_old_ulp"] <= 4.0
        assert r["new_elements"] == r["rewarmup_new_elements"] > 0
        print(f"rank {r['rank']}: hidden-pattern shards checked {r['hidden_shards'][0]}, "
              f"partial {r['hidden_shards'][1]}")
        for it, lr_new, lr_old in r["lrs"]:
            assert abs(lr_new - new_lr(it)) < 1e-12 and abs(lr_old - base_lr(it)) < 1e-12
        assert [it for it, _, _ in r["lrs"]] == [T_E + 1, T_E + 2, T_E + 3]
    # EP rank 1 holds global experts 2 and 3, the ones growth added; rank 0 holds mixed ones
    assert ranks[0]["experts_all_new"] == [False, False]
    assert ranks[1]["experts_all_new"] == [True, True]
    # the DP shards of the hidden-pattern parameters were checked on both ranks, split ones too
    checked = [set(r["hidden_shards"][0]) for r in ranks]
    assert len(checked[0] | checked[1]) == 3 + 3 * 3 and checked[0] and checked[1]
    assert any(r["hidden_shards"][1] for r in ranks)
    # each new element of the model lives in exactly one rank's main-param shard
    assert ranks[0]["new_elements"] + ranks[1]["new_elements"] == ranks[0]["global_new_elements"]
    assert ranks[0]["lm_loss"] == ranks[1]["lm_loss"]
    # saved inside the ramp and resumed: the re-warmup and the losses continue exactly
    for r, again in zip(ranks, resumed):
        assert again["growth_step"] == r["growth_step"] == T_E * GBS
        assert again["new_elements"] == r["new_elements"]
        assert again["step"][0] == r["after_save"][0] == T_E + 4
        assert max(abs(a - b) for a, b in zip(again["step"][1:], r["after_save"][1:])) < 1e-5
