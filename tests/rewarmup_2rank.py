"""Under torchrun (2 ranks, EP=2, distributed optimizer): dense parameters are DP-sharded over the
two ranks, experts split by EP.

grow:   trains T_E iterations, installs the re-warmup of a growth record (hidden 32->64, expert
        FFN 64->128, experts 2->4; --sparkling-new-state-bias-correction as given), trains into
        the ramp, checks one step on every local
        main-param shard against AdamW by hand, saves <out>/ckpt, trains one more iteration;
        writes this rank's figures to <out>/rank<r>.json.
resume: loads <out>/ckpt (the re-warmup comes back from the checkpoint), trains one iteration;
        writes <out>/rank<r>_resumed.json.

    torchrun --nproc_per_node 2 tests/rewarmup_2rank.py <out dir> grow|resume <Megatron-LM flags...>
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rewarmup_checks import (GBS, NARROW, R, T_E, W, check_one_step, masks_of,  # noqa: E402
                             ramp_lrs)


def _known_hidden_masks(trainer, rewarmup):
    """Dense params whose new elements are exactly the hidden columns >= 32 of the last dim:
    each rank's shard mask must be that pattern cut at the shard's range (an independent check
    of the DP-shard slicing). Returns the names checked, and those this rank holds only part of."""
    from megatron_sparkling.live import element_lr

    names = {id(p): n for n, p in trainer.model[0].module.named_parameters()}
    hidden_only = ("embedding.word_embeddings.weight", "output_layer.weight",
                   "decoder.final_layernorm.weight", "input_layernorm.weight",
                   "pre_mlp_layernorm.weight", "linear_qkv.weight")  # heads do not grow here
    of = masks_of(rewarmup)
    checked, partial = [], []
    for opt in trainer.optimizer.chained_optimizers:
        for model_param, shard, rng in element_lr._main_param_pairs(opt):
            if not names[id(model_param)].endswith(hidden_only):
                continue
            flat = torch.arange(model_param.numel()) % model_param.shape[-1] >= NARROW["hidden_size"]
            assert rng is not None
            assert torch.equal(of(shard), flat[rng.start:rng.end]), names[id(model_param)]
            checked.append(names[id(model_param)])
            if (rng.start, rng.end) != (0, model_param.numel()):
                partial.append(names[id(model_param)])
    return checked, partial


def resume(out_dir, argv):
    from megatron_sparkling.live import rewarmup as schedule
    from megatron_sparkling.training.initialize import shutdown
    from megatron_sparkling.training.loop import Pretrainer

    trainer = Pretrainer.from_argv(argv + ["--load", os.path.join(out_dir, "ckpt")])
    try:
        rewarmup = trainer.scheduler.rewarmup
        record = trainer.train_step()
        result = dict(growth_step=rewarmup.state.growth_step, new_elements=rewarmup.new_elements,
                      bias_correction=rewarmup.state.bias_correction,
                      step=(record["iteration"], record["lm loss"], record[schedule.NEW_LR],
                            record[schedule.OLD_LR]))
        rank = torch.distributed.get_rank()
        with open(os.path.join(out_dir, f"rank{rank}_resumed.json"), "w") as f:
            json.dump(result, f)
    finally:
        shutdown()


def grow(out_dir, argv):
    from megatron_sparkling.live import element_lr
    from megatron_sparkling.live import rewarmup as schedule
    from megatron_sparkling.methods.base import Grower, GrowthMethod
    from megatron_sparkling.core.spec import GrowthSpec, ModelShape
    from megatron_sparkling.training.initialize import shutdown
    from megatron_sparkling.training.loop import Pretrainer

    trainer = Pretrainer.from_argv(argv)
    try:
        rank = torch.distributed.get_rank()
        for _ in range(T_E):
            trainer.train_step()
        target = ModelShape.from_args(trainer.args)
        source = target.replace(hidden_size=NARROW["hidden_size"],
                                moe_ffn_hidden_size=NARROW["moe_ffn_hidden_size"],
                                num_experts=NARROW["num_experts"])
        grower = Grower(GrowthSpec(source, target, "copy", seed=3), GrowthMethod())
        bias = trainer.args.sparkling_new_state_bias_correction or "global"
        config = schedule.RewarmupConfig(W, R, "new", GBS, bias_correction=bias)
        rewarmup = schedule.install_rewarmup(trainer.model, trainer.optimizer, trainer.scheduler,
                                             grower.record(), config)
        records = [trainer.train_step(), trainer.train_step()]
        dev_new, dev_old, dev_abs, n_new = check_one_step(  # the third step after growth: k = 3
            trainer, masks_of(rewarmup), ramp_lrs(T_E + 2),
            new_step=3 if bias == "per-element" else None)
        records.append(trainer.history[-1])
        trainer.save(os.path.join(out_dir, "ckpt"))
        after_save = trainer.train_step()
        model = trainer.model[0].module
        of = masks_of(rewarmup)
        shard_of = {id(model_param): shard for opt in trainer.optimizer.chained_optimizers
                    for model_param, shard, _ in element_lr._main_param_pairs(opt)}
        # local expert j of EP rank r is global expert 2r + j; growth added experts 2 and 3
        experts_all_new = [bool(of(shard_of[id(expert.linear_fc2.weight)]).all())
                           for expert in model.decoder.layers[0].mlp.experts.local_experts]
        global_new = 0
        if rank == 0:   # every global tensor's new elements, from the record alone
            plan, swiglu = schedule.plan_of(grower.record())
            keys = {item.key for item in model.sharded_state_dict().values() if hasattr(item, "key")
                    and not item.key.endswith("_extra_state")}
            global_new = sum(int(m.sum()) for m in (
                element_lr.global_new_mask(plan, k, swiglu) for k in keys) if m is not None)
        result = dict(rank=rank, dev_new_ulp=dev_new, dev_old_ulp=dev_old, dev_abs=dev_abs,
                      new_elements=n_new, rewarmup_new_elements=rewarmup.new_elements,
                      global_new_elements=global_new, experts_all_new=experts_all_new,
                      masked_parts=len(rewarmup.hooks.opt_masks),
                      parts=len(trainer.optimizer.chained_optimizers),
                      hidden_shards=_known_hidden_masks(trainer, rewarmup),
                      lrs=[(r["iteration"], r[schedule.NEW_LR], r[schedule.OLD_LR])
                           for r in records],
                      lm_loss=records[-1]["lm loss"], growth_step=rewarmup.state.growth_step,
                      after_save=(after_save["iteration"], after_save["lm loss"],
                                  after_save[schedule.NEW_LR], after_save[schedule.OLD_LR]))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        shutdown()


if __name__ == "__main__":  # the checkpoint writer spawns processes that re-import __main__
    {"grow": grow, "resume": resume}[sys.argv[2]](sys.argv[1], sys.argv[3:])
