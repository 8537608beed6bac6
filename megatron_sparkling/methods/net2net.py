"""Net2Net: new units copy random twins, fan-in columns split among copies, state copied.

Every grown unit copies a twin (balanced: copy counts differ by at most one); fan-out rows are
copied; each fan-in column is divided by the number of copies of its source unit, so at any
factor where the norms see the same RMS (integer factors on the hidden axis; any factor on the
FFN, head and expert axes) the function is unchanged. Optimizer moments are copied to twins:
the growth is fully symmetric (copies get identical updates: "symmetry lock"). When copied
experts route exactly: see `Net2NetCopy`.
"""
from __future__ import annotations

from megatron_sparkling.methods.base import register
from megatron_sparkling.methods.elementwise import ElementwiseGrowth
from megatron_sparkling.operators import width


@register
class Net2NetCopy(ElementwiseGrowth):
    """Net2Net's copy growth. Experts (all methods that copy experts): a new expert copies a
    source expert's weights and its router row (and expert_bias). With megatron-core's top-k
    routing (moe_utils.topk_routing_with_score_function):
    - E' = kE and top-k multiplied by k: exact. Each source expert's k copies have equal logits,
      so the top-(k*topk) set is the k copies of the old top-k set; softmax after top-k gives
      each copy p/k, softmax before top-k (--moe-router-pre-softmax) divides every score by k,
      and sigmoid scores normalized over the top-k (topk > 1) also give p/k: the copies' outputs
      sum to the old expert's. --moe-router-topk-scaling-factor multiplies both sides alike.
    - top-k kept, or E' not a multiple of E: not exact. Ties between copies make torch.topk pick
      both copies of the best experts (post-softmax routing then sends a token to fewer distinct
      experts); pre-softmax routing halves the duplicated experts' probabilities. A logit shift
      (-log k on the copies) would need a router bias (only with --add-bias-linear) and still
      would not restore the top-k set. tests/test_width.py measures the change.
    - Not preserved either: sigmoid without normalization (top-1), group-limited routing
      (--moe-router-num-groups: copies change the groups), token dropping (capacity factor).
    """
    name = "copy"
    preserves_function = True
    state_rule = "copy"

    def fan_in_factor(self, umap, out_grown):
        return width.split_factors(umap)
