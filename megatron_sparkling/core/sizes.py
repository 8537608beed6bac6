"""THE table of growable sizes: each size's ModelShape field, layout axis, label, Megatron-LM flag
and parallel divisor. Validation, the growth plan, `expand`'s size flags, the load hook's grown
sizes and the relaunch flags all derive from it: a new size is one row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sparkling.core.layout import Axis


@dataclass(frozen=True)
class Size:
    """One growable size; whatever names it, checks it or tracks it reads it from `SIZES`.

    grows: "width" (units inside tensors, which the width methods widen), "units" (whole
        experts) or "depth" (the layer count).
    draw: the order in which GrowthPlan.twins draws this axis's twins from the seed; it is part
        of what a seed means, so a new axis takes the next number. None for heads and query
        groups, which the plan draws last through its group and slot maps.
    """
    field: str               # the ModelShape field (and Megatron-LM's args attribute)
    axis: Axis               # the layout axis it sizes (heads: HEADS, query groups: QKV)
    label: str               # its name in messages
    flag: str                # Megatron-LM's command-line flag
    divisor: Optional[str]   # the ParallelLayout size that must divide it (None: no rule)
    grows: str
    draw: Optional[int]


# THE table of growable sizes, in the order messages and flags list them. A new size is one row.
#    field, axis, label, flag, divisor, grows, draw
SIZES = (
    Size("num_layers", Axis.LAYER, "number of layers (--num-layers)", "--num-layers",
         "pipeline", "depth", 5),
    Size("hidden_size", Axis.HIDDEN, "hidden size", "--hidden-size", None, "width", 0),
    Size("ffn_hidden_size", Axis.DENSE_FFN, "dense FFN size", "--ffn-hidden-size", "tensor",
         "width", 3),
    Size("moe_ffn_hidden_size", Axis.EXPERT_FFN, "expert FFN size", "--moe-ffn-hidden-size",
         "expert_tp", "width", 1),
    Size("moe_shared_expert_intermediate_size", Axis.SHARED_FFN, "shared-expert FFN size",
         "--moe-shared-expert-intermediate-size", "tensor", "width", 2),
    Size("num_attention_heads", Axis.HEADS, "attention heads", "--num-attention-heads",
         "tensor", "width", None),
    Size("num_query_groups", Axis.QKV, "query groups", "--num-query-groups", "tensor", "width",
         None),
    Size("num_experts", Axis.EXPERT, "number of experts", "--num-experts", "expert", "units", 4),
)

# Width sizes (every size but the layer count: what width growth widens): field -> label.
WIDTH_FIELDS = {s.field: s.label for s in SIZES if s.grows != "depth"}

# The ParallelLayout sizes of the divisor rules, as messages name them.
PARALLEL_NAMES = {"tensor": "tensor-parallel size", "expert_tp": "expert tensor-parallel size",
                  "expert": "expert-parallel size", "pipeline": "pipeline-parallel size"}
