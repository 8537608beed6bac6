"""The re-warmup at 2 ranks under torchrun, with the distributed optimizer, one step checked on
every local main-param shard, then saved inside the ramp and resumed:
- ep2: EP=2 (experts split by EP), dense parameters DP-sharded over both ranks;
- tp2: TP=2 with sequence parallelism (expert and dense weights split by TP, norms replicated);
- ep2-per-element: ep2 with per-element bias correction of new elements (dense + expert parts of
  the ChainedOptimizer)."""
import json
import os

import pytest

from conftest import REPO, tiny_moe_flags, torchrun
from rewarmup_checks import GBS, RUN, T_E, WIDE, base_lr, new_lr

SCRIPT = os.path.join(REPO, "tests", "rewarmup_2rank.py")
LAYOUTS = {
    "ep2": dict(expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall"),
    "tp2": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "ep2-per-element": dict(expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall",
                            sparkling_new_state_bias_correction="per-element"),
}
# Layer-0 fc2 (hidden x expert FFN) of each local expert: all new? Growth added experts 2 and 3
# and expert-FFN columns 64..127. EP rank r holds global experts 2r, 2r+1; TP rank 1 holds the
# second half of the FFN columns of every expert.
EXPERTS_ALL_NEW = {"ep2": ([False, False], [True, True]),
                   "tp2": ([False, False, True, True], [True, True, True, True])}
EXPERTS_ALL_NEW["ep2-per-element"] = EXPERTS_ALL_NEW["ep2"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_step_and_resume(tmp_path, corpus_prefix, layout):
    # 3 layers: at EP2 the DP-shard boundary then falls inside a parameter (with 2, between two)
    flags = tiny_moe_flags(corpus_prefix, **WIDE, **RUN, num_layers=3,
                           use_distributed_optimizer=True, **LAYOUTS[layout])
    torchrun(2, SCRIPT, [str(tmp_path), "grow"] + flags)
    torchrun(2, SCRIPT, [str(tmp_path), "resume"] + flags)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    resumed = [json.loads((tmp_path / f"rank{r}_resumed.json").read_text()) for r in (0, 1)]
    for r in ranks:
        print(f"[{layout}] rank {r['rank']}: {r['new_elements']} new elements in its shards; one "
              f"step: max deviation {r['dev_abs']:.3e} (new {r['dev_new_ulp']:.2f} ulp, old "
              f"{r['dev_old_ulp']:.2f} ulp); hidden-pattern shards checked "
              f"{len(r['hidden_shards'][0])}, partial {r['hidden_shards'][1]}")
        assert r["dev_new_ulp"] <= 4.0 and r["dev_old_ulp"] <= 4.0
        assert r["new_elements"] == r["rewarmup_new_elements"] > 0
        for it, lr_new, lr_old in r["lrs"]:
            assert abs(lr_new - new_lr(it)) < 1e-12 and abs(lr_old - base_lr(it)) < 1e-12
        assert [it for it, _, _ in r["lrs"]] == [T_E + 1, T_E + 2, T_E + 3]
    assert tuple(r["experts_all_new"] for r in ranks) == EXPERTS_ALL_NEW[layout]
    assert ranks[0]["lm_loss"] == ranks[1]["lm_loss"]
    checked = [set(r["hidden_shards"][0]) for r in ranks]
    total = ranks[0]["new_elements"] + ranks[1]["new_elements"]
    if layout.startswith("ep2"):
        # the DP shards of the hidden-pattern parameters were checked on both ranks, split ones too
        assert len(checked[0] | checked[1]) == 3 + 3 * 3 and checked[0] and checked[1]
        assert any(r["hidden_shards"][1] for r in ranks)
        # each new element of the model lives in exactly one rank's main-param shard
        assert total == ranks[0]["global_new_elements"]
    else:
        # every rank checks its TP shard of each hidden-pattern parameter; norms and routers are
        # replicated over TP (their new elements count twice): 3 x (2 x 32 + 192) + 32
        assert checked[0] == checked[1] and len(checked[0]) == 3 + 3 * 3
        assert total == ranks[0]["global_new_elements"] + 3 * (2 * 32 + 192) + 32
    # saved inside the ramp and resumed: the re-warmup and the losses continue exactly
    if layout.startswith("ep2"):   # dense and expert parts of the ChainedOptimizer, both masked
        assert all(r["parts"] == r["masked_parts"] == 2 for r in ranks)
    bias = LAYOUTS[layout].get("sparkling_new_state_bias_correction", "global")
    for r, again in zip(ranks, resumed):
        assert again["bias_correction"] == bias
        assert again["growth_step"] == r["growth_step"] == T_E * GBS
        assert again["new_elements"] == r["new_elements"]
        assert again["step"][0] == r["after_save"][0] == T_E + 4
        assert max(abs(a - b) for a, b in zip(again["step"][1:], r["after_save"][1:])) < 1e-5
