"""What the re-warmup tests expect, written independently of megatron_sparkling.live.rewarmup: the
schedules in closed form (cosine base) and torch's AdamW update by hand. Shared by
test_rewarmup.py (1 rank, in process) and rewarmup_2rank.py (torchrun)."""
import math

import torch

GBS, T_E, W, R, TOTAL, WARMUP, LR, MIN_LR = 8, 4, 4, 1.5, 16, 2, 1e-3, 1e-4
NARROW = dict(hidden_size=32, kv_channels=16, moe_ffn_hidden_size=64, num_experts=2)
WIDE = dict(kv_channels=16)  # tiny_moe_flags: hidden 64, expert FFN 128, 4 experts
RUN = dict(train_iters=TOTAL, lr_warmup_iters=WARMUP, lr=LR, min_lr=MIN_LR)
REWARMUP = ["--sparkling-rewarmup-iters", str(W), "--sparkling-rewarmup-peak-ratio", str(R)]


def base_lr(it: float, lr: float = LR, min_lr: float = MIN_LR) -> float:
    """The base schedule's LR after `it` iterations: linear warmup, then cosine to min_lr."""
    if it <= WARMUP:
        return lr * it / WARMUP
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (it - WARMUP) / (TOTAL - WARMUP)))


def new_lr(it: float, lr: float = LR, min_lr: float = MIN_LR) -> float:
    """New elements: eta_e -> R eta_e over W iterations after T_E, then cosine to min_lr."""
    eta_e = base_lr(T_E, lr, min_lr)
    if it - T_E <= W:
        return eta_e * (1 + (R - 1) * (it - T_E) / W)
    ratio = (it - T_E - W) / (TOTAL - T_E - W)
    return min_lr + (R * eta_e - min_lr) * 0.5 * (1 + math.cos(math.pi * ratio))


def ramp_lrs(it: float, groups=((LR, MIN_LR),)):
    """For check_one_step: the (old, new) element LRs of the step at iteration `it`, told apart by
    the group LR the optimizer sees (each group has its own max/min LR)."""
    def lrs(c):
        for lr, min_lr in groups:
            if abs(c["lr"] - base_lr(it, lr, min_lr)) < 1e-12:
                return base_lr(it, lr, min_lr), new_lr(it, lr, min_lr)
        raise AssertionError(f"group LR {c['lr']} is on none of the base schedules {groups}")
    return lrs


def inner_optimizers(optimizer):
    """The torch optimizers inside a megatron-core optimizer (ChainedOptimizer parts included)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p.optimizer for p in parts if getattr(p, "optimizer", None) is not None]


def capture_next_step(optimizer):
    """Before the next step of each inner optimizer: lr, wd, betas, eps and each main param, its
    grad, Adam moments and step count (float64 copies)."""
    seen = []

    def keep(inner, args, kwargs):
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                seen.append(dict(
                    param=p, before=p.detach().double().clone(), grad=p.grad.double().clone(),
                    m=state["exp_avg"].double().clone(), v=state["exp_avg_sq"].double().clone(),
                    step=float(state["step"]), lr=group["lr"], wd=group["weight_decay"],
                    betas=group["betas"], eps=group["eps"]))

    handles = [inner.register_step_pre_hook(keep) for inner in inner_optimizers(optimizer)]
    return seen, handles


def adamw(c, lr, step=None):
    """torch.optim.AdamW's update, by hand, in float64: (new param, the magnitude of what its
    fp32 computation adds up, which bounds fp32 rounding: |p| + lr |b1 m| + lr |(1-b1) g| ...).
    `step`: the step count of the bias correction (default: the optimizer's, its next step)."""
    b1, b2 = c["betas"]
    step = c["step"] + 1 if step is None else step
    m = b1 * c["m"] + (1 - b1) * c["grad"]
    v = b2 * c["v"] + (1 - b2) * c["grad"] ** 2
    denom = (v.sqrt() / math.sqrt(1 - b2 ** step)) + c["eps"]
    step_size = lr / (1 - b1 ** step)
    magnitude = (c["before"].abs() * (1 + lr * c["wd"])
                 + step_size * (b1 * c["m"].abs() + (1 - b1) * c["grad"].abs()) / denom)
    return c["before"] * (1 - lr * c["wd"]) - step_size * m / denom, magnitude


def check_one_step(trainer, masks_of, lrs, new_step=None):
    """Run one training step; every element must move as AdamW with the new-element LR where
    masked and the old one elsewhere (`lrs(captured) -> (old LR, new LR)`); masked elements with
    the bias correction of step `new_step` if given. Returns the max deviations (masked, unmasked) in units of fp32
    rounding (2^-23 of the magnitudes the step adds up: a cancelling Adam moment makes a small
    update carry the rounding of large terms), the max absolute deviation and the masked count."""
    seen, handles = capture_next_step(trainer.optimizer)
    trainer.train_step()
    for h in handles:
        h.remove()
    dev_new = dev_old = dev_abs = gap = 0.0
    n_new = 0
    for c in seen:
        after = c["param"].detach().double()
        mask = masks_of(c["param"])
        lr_unmasked, lr_masked = lrs(c)
        (plain, mag_plain) = adamw(c, lr_unmasked)
        (rewarmed, mag_rewarmed) = adamw(c, lr_masked, new_step)
        expected = torch.where(mask, rewarmed, plain)
        dev_abs = max(dev_abs, float((after - expected).abs().max()))
        ulp = torch.maximum(mag_plain, mag_rewarmed) * 2.0 ** -23 + 1e-30
        dev = (after - expected).abs() / ulp
        dev_new = max(dev_new, float(dev[mask].max()) if mask.any() else 0.0)
        dev_old = max(dev_old, float(dev[~mask].max()) if (~mask).any() else 0.0)
        n_new += int(mask.sum())
        if mask.any():
            gap = max(gap, float(((rewarmed - plain).abs() / ulp)[mask].max()))
    # the re-warmed updates really differ from the plain ones (by far more than the rounding)
    assert n_new == 0 or gap > 1000, gap
    return dev_new, dev_old, dev_abs, n_new


def masks_of(rewarmup):
    """param -> bool mask of its new elements, as the installed step hooks hold them."""
    masks = {}
    for _, m in rewarmup.hooks.opt_masks:
        masks.update(m)

    def of(p):
        entry = masks.get(id(p))
        if entry is None:
            return torch.zeros(p.shape, dtype=torch.bool)
        return torch.ones(p.shape, dtype=torch.bool) if entry[1] is None else entry[1]
    return of
