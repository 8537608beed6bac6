"""Adam's step with its bias correction counted from growth, for new elements.

A new element starts with zero Adam moments but, by default (the paper), the optimizer's global
step t: its first update is m_hat/sqrt(v_hat) with m_hat = (1-b1) g / (1-b1^t),
v_hat = (1-b2) g^2 / (1-b2^t), about 3.16 times a normal step at b2 = 0.999 and large t.
Per-element bias correction gives it Adam's update at k = steps since growth instead:
    p <- p (1 - lr wd) - lr/(1-b1^k) * m / (sqrt(v)/sqrt(1-b2^k) + eps)
(decoupled weight decay untouched; with L2 decay the decay is inside m and v). `adam_step`
computes that from the moments the optimizer has just updated, with the operations of torch's
single-tensor Adam, so eps sits where Adam puts it: exact, not a factor on the update.
Formats: torch's Adam/AdamW (step per parameter in its state), Transformer Engine's and Apex's
FusedAdam (step per group, `adam_w_mode`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class AdamBiasError(ValueError):
    """An optimizer whose Adam bias correction cannot be counted from growth; says what to do."""


@dataclass(frozen=True)
class AdamForm:
    decoupled: bool       # AdamW: weight decay applied to the weights, outside m and v
    step_in_group: bool   # FusedAdam keeps one step count per param group


def adam_form(inner, group: dict) -> AdamForm:
    """How `inner` (a torch optimizer megatron-core steps) runs Adam on this param group."""
    fix = "use Adam, or --sparkling-new-state-bias-correction global"
    if "betas" not in group or "eps" not in group:
        raise AdamBiasError(f"per-element bias correction needs Adam, not "
                            f"{type(inner).__name__}; {fix}")
    if group.get("amsgrad") or group.get("maximize"):
        raise AdamBiasError(f"per-element bias correction needs plain Adam (no amsgrad/maximize); "
                            f"{fix}")
    if group.get("bias_correction") is False:
        raise AdamBiasError(f"{type(inner).__name__} runs without bias correction; {fix}")
    if "decoupled_weight_decay" in group:                      # torch.optim.Adam / AdamW
        return AdamForm(bool(group["decoupled_weight_decay"]), step_in_group=False)
    if isinstance(inner, torch.optim.AdamW):
        return AdamForm(True, step_in_group=False)
    if isinstance(inner, torch.optim.Adam):
        return AdamForm(False, step_in_group=False)
    if hasattr(inner, "adam_w_mode"):                          # TE / Apex FusedAdam
        return AdamForm(bool(inner.adam_w_mode), step_in_group=True)
    raise AdamBiasError(f"per-element bias correction does not know {type(inner).__name__}; "
                        f"{fix}")


def step_count(inner, group: dict, param, form: AdamForm) -> int:
    """The step count t the optimizer's bias correction used in its last step (0 before any)."""
    step = group.get("step") if form.step_in_group else inner.state.get(param, {}).get("step")
    return 0 if step is None else int(step)


def adam_step(before: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              group: dict, step: int, form: AdamForm) -> torch.Tensor:
    """The elements `before` after one Adam step at bias-correction step `step`, given the moments
    that step produced (torch's single-tensor Adam, operation for operation)."""
    lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
    beta1, beta2 = (float(b) for b in group["betas"])
    out = before.clone()
    if wd != 0 and form.decoupled:
        out.mul_(1 - lr * wd)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return out.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
