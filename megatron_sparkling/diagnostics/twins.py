"""Twin symmetry: how alike each new unit is to the unit it was made from, after growth.

A growth plan (plan.GrowthPlan) says, for every grown axis, which source unit each new unit
copies (its twin). Copies of a unit receive identical gradients as long as they stay identical,
and with identical optimizer state they stay identical for ever ("symmetry lock"); a method that
breaks the symmetry makes the cosine between a new unit and its twin fall below 1 in training.

`twin_cosines` is pure tensor code on global tensors by checkpoint key (a model's weights, its
gradients, or a checkpoint's tensors; what a unit's vector is: its docstring); `model_gradients`
gives the gradient tensors of a live 1-rank model on a batch.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.core.layout import Axis, Kind, Packing
from megatron_sparkling.core.plan import GrowthPlan
from megatron_sparkling.diagnostics.activations import forward_loss
from megatron_sparkling.diagnostics.sites import bare_model, require_whole_model, swiglu_of
from megatron_sparkling.live.state import gather_global, model_global_tensors

HEADS = "heads"
QKV_GROUPS = "qkv_groups"

# Axes whose units are separate per layer (and per expert): their other indices along these axes
# make separate vectors rather than one long one.
_INSTANCE_AXES = {
    Axis.HIDDEN.value: (),
    Axis.LAYER.value: (),
    Axis.EXPERT.value: (Axis.LAYER,),
    Axis.EXPERT_FFN.value: (Axis.LAYER, Axis.EXPERT),
    Axis.DENSE_FFN.value: (Axis.LAYER,),
    Axis.SHARED_FFN.value: (Axis.LAYER,),
    HEADS: (Axis.LAYER,),
    QKV_GROUPS: (Axis.LAYER,),
}
_TENSOR_KINDS = (Kind.LINEAR_WEIGHT, Kind.LINEAR_BIAS, Kind.NORM_WEIGHT, Kind.NORM_BIAS,
                 Kind.EMBEDDING, Kind.ROUTER)


@dataclass
class TwinFigures:
    """Cosines of every new unit with its twin on one axis (one entry per unit and instance)."""
    axis: str
    cosines: torch.Tensor     # float64, one per measured (unit, layer, expert)
    fresh: int                # new units of the axis without a twin (counted once, not per layer)
    undefined: int            # pairs where a vector was all zero (e.g. an expert no token reached)

    @property
    def units(self) -> int:
        return int(self.cosines.numel())

    def summary(self) -> dict:
        c = self.cosines
        out = {"units": self.units, "fresh": self.fresh, "undefined": self.undefined}
        if c.numel():
            out.update(mean=float(c.mean()), min=float(c.min()), max=float(c.max()))
        else:
            out.update(mean=None, min=None, max=None)
        return out


def _unit_groups(plan: GrowthPlan, dim: layout_lib.Dim):
    """[(axis label, element index, unit index)] for one tensor dimension of the grown model."""
    tgt = plan.spec.target
    em = plan.element_map(dim)
    elements = torch.arange(em.new)
    if dim.packing is Packing.GLU:
        return [(dim.axis.value, elements, elements % (em.new // 2))]
    hn = tgt.kv_channels
    if dim.axis is Axis.QKV:
        qpg = tgt.num_attention_heads // tgt.num_query_groups
        rows_per_group = (qpg + 2) * hn
        group, slot = elements // rows_per_group, (elements % rows_per_group) // hn
        q = slot < qpg
        return [(HEADS, elements[q], (group * qpg + slot)[q]),
                (QKV_GROUPS, elements[~q], group[~q])]
    if dim.axis is Axis.HEADS:
        return [(HEADS, elements, elements // hn)]
    if dim.axis in (Axis.HIDDEN, Axis.EXPERT_FFN, Axis.DENSE_FFN, Axis.SHARED_FFN, Axis.EXPERT,
                    Axis.LAYER):
        return [(dim.axis.value, elements, elements)]
    return []


def _twin_positions(plan: GrowthPlan, dim) -> tuple[torch.Tensor, torch.Tensor]:
    """(new elements with a twin, their twins' positions in the grown tensor)."""
    em = plan.element_map(dim)
    old = (~em.is_new).nonzero().flatten()
    where_old = torch.full((em.old,), -1, dtype=torch.long)
    where_old[em.source[old]] = old
    new = em.is_new.nonzero().flatten()
    new = new[em.source[new] >= 0]
    twin = where_old[em.source[new]]
    keep = twin >= 0
    return new[keep], twin[keep]


class _Accumulator:
    """Per (axis label, instance): dot products and squared norms summed over tensors."""

    def __init__(self):
        self.parts: dict = {}
        self.fresh: dict = {}

    def add(self, label, instance, units, dot, na, nb, n_units):
        key = (label, instance)
        if key not in self.parts:
            z = torch.zeros(n_units, dtype=torch.float64)
            seen = torch.zeros(n_units, dtype=torch.bool)
            self.parts[key] = [z.clone(), z.clone(), z.clone(), seen]
        acc = self.parts[key]
        acc[0].index_add_(0, units, dot)
        acc[1].index_add_(0, units, na)
        acc[2].index_add_(0, units, nb)
        acc[3][units] = True

    def result(self) -> dict:
        labels = sorted({label for label, _ in self.parts} | set(self.fresh))
        out = {}
        for label in labels:
            cos, undefined = [], 0
            for (lab, _), (dot, na, nb, seen) in self.parts.items():
                if lab != label:
                    continue
                denom = (na[seen] * nb[seen]).sqrt()
                ok = denom > 0
                undefined += int((~ok).sum())
                cos.append((dot[seen][ok] / denom[ok]).clamp(-1.0, 1.0))
            cosines = torch.cat(cos) if cos else torch.zeros(0, dtype=torch.float64)
            out[label] = TwinFigures(label, cosines, self.fresh.get(label, 0), undefined)
        return out


def _instance_coords(lay: layout_lib.TensorLayout, inst_dims: list, shape) -> list:
    """One tuple of (axis, index) coordinates per row of the instance-major flattening."""
    ranges = [range(shape[d]) for d in inst_dims]
    coords = [()]
    for d, r in zip(inst_dims, ranges):
        coords = [c + ((lay.dims[d].axis, i),) for c in coords for i in r]
    return coords


def _unit_map(plan: GrowthPlan, label: str):
    if label == HEADS:
        return plan.head_map
    if label == QKV_GROUPS:
        return plan.group_map
    return plan.units[Axis(label)]


def twin_cosines(tensors: dict, plan: GrowthPlan, swiglu: Optional[bool] = None) -> dict:
    """Axis label -> TwinFigures, from global tensors of the GROWN model by checkpoint key.

    A unit's vector is the concatenation of its slices in every tensor that has the unit's axis:
        hidden      embedding columns, norm gains, fan-out rows (attention output, fc2 of the
                    dense MLP, of every expert and of the shared expert) and fan-in columns
                    (QKV, fc1, router, output layer) across all layers: one vector per hidden unit
        expert_ffn  one expert's fc1 rows (gate and up halves) and fc2 columns, per layer and
                    expert
        dense_ffn / shared_ffn
                    fc1 rows (gate and up) and fc2 columns, per layer
        heads       the head's q rows in the fused QKV and its attention-output columns, per layer
        qkv_groups  a query group's k and v rows in the fused QKV, per layer
        expert      the whole expert (fc1, fc2) and its router row, per layer
        layer       a whole stacked layer slice (depth growth; stacked checkpoint keys only)
    The twin's vector is built from the same elements of the twin unit, element by element along
    the plan's element maps (so GLU halves, grouped QKV rows and heads line up). Fresh new units
    (no twin) are counted and left out."""
    swiglu = plan.spec.source.swiglu if swiglu is None else swiglu
    acc = _Accumulator()
    labels = set()
    for key, tensor in tensors.items():
        if layout_lib.is_extra_state(key) or not isinstance(tensor, torch.Tensor):
            continue
        lay = layout_lib.resolve(layout_lib.split_state_key(key)[1], swiglu)
        if lay.kind not in _TENSOR_KINDS:
            continue
        for d, dim in enumerate(lay.dims):
            em = plan.element_map(dim)
            if not em.is_new.any():
                continue
            if em.new != tensor.shape[d]:
                raise ValueError(f"{key}: dimension {d} has {tensor.shape[d]} elements but the "
                                 f"growth plan makes {em.new}; the plan is not this model's")
            new, twin = _twin_positions(plan, dim)
            for label, elements, units in _unit_groups(plan, dim):
                labels.add(label)
                unit_of = torch.full((em.new,), -1, dtype=torch.long)
                unit_of[elements] = units
                _add_tensor(acc, label, lay, tensor, d, new, twin, unit_of,
                            _unit_map(plan, label).new)
    for label in labels:
        units = _unit_map(plan, label)
        acc.fresh[label] = int((units.is_new & (units.source < 0)).sum())
    return acc.result()


def _add_tensor(acc, label, lay, tensor, d, new, twin, unit_of, n_units):
    pair_units = unit_of[new]
    keep = pair_units >= 0
    new, twin, pair_units = new[keep], twin[keep], pair_units[keep]
    if not new.numel():
        return
    inst_axes = _INSTANCE_AXES[label]
    inst_dims = [i for i, dm in enumerate(lay.dims) if i != d and dm.axis in inst_axes]
    rest = [i for i in range(tensor.dim()) if i != d and i not in inst_dims]
    x = tensor.detach().double().permute(*inst_dims, d, *rest)
    n_inst = math.prod(tensor.shape[i] for i in inst_dims)
    x = x.reshape(n_inst, tensor.shape[d], -1)
    a, b = x[:, new, :], x[:, twin, :]
    dot, na, nb = (a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)
    base = ((Axis.LAYER, lay.layer),) if lay.layer is not None and Axis.LAYER in inst_axes else ()
    for row, coords in enumerate(_instance_coords(lay, inst_dims, tensor.shape)):
        acc.add(label, base + coords, pair_units, dot[row], na[row], nb[row], n_units)


def summarize(figures: dict) -> dict:
    return {label: f.summary() for label, f in sorted(figures.items())}


# ---------------------------------------------------------------------- live models
@contextmanager
def _params_holding(gpt, value_of):
    """Temporarily make every parameter's data `value_of(param)` (so the model's own sharded
    state dict lays those values out by checkpoint key), then restore the weights."""
    saved = []
    try:
        with torch.no_grad():
            for p in gpt.parameters():
                saved.append((p, p.data))
                p.data = value_of(p)
        yield
    finally:
        with torch.no_grad():
            for p, data in saved:
                p.data = data


def _gradient_of(p: torch.Tensor) -> torch.Tensor:
    g = getattr(p, "main_grad", None)   # DDP accumulates into main_grad and clears .grad
    if g is None:
        g = p.grad
    return torch.zeros_like(p) if g is None else g.detach().view(p.shape)


def _zero_grads(chunks) -> None:
    for chunk in chunks:
        if hasattr(chunk, "zero_grad_buffer"):
            chunk.zero_grad_buffer()
        for p in chunk.parameters():
            p.grad = None


def model_gradients(model, batches: Iterable[dict]) -> dict:
    """Global gradient tensors by checkpoint key: d(mean token loss over all batches)/d(weights),
    in eval mode (no dropout, no auxiliary MoE loss). The model's gradient buffers are zeroed
    before and after, so a training step that follows is not affected. 1 rank only."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    gpt = bare_model(chunks)
    require_whole_model(gpt)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # DDP's gradient hooks may start collectives the other ranks never join
        raise ValueError("model_gradients runs at 1 rank (world size "
                         f"{torch.distributed.get_world_size()}); measure gradients in a 1-rank "
                         "process, e.g. megatron-sparkling verify on the saved checkpoint")
    batches = list(batches)
    tokens = sum(float(b["loss_mask"].float().sum()) for b in batches)
    if not tokens:
        raise ValueError("the batches hold no loss-mask tokens; give batches with text in them")
    was_training = [c.training for c in chunks]
    _zero_grads(chunks)
    try:
        for c in chunks:
            c.eval()
        for batch in batches:
            losses, mask = forward_loss(chunks, batch)
            ((losses.float() * mask.float()).sum() / tokens).backward()
        with _params_holding(gpt, _gradient_of):
            grads = gather_global(gpt.sharded_state_dict())[0]
    finally:
        _zero_grads(chunks)
        for c, t in zip(chunks, was_training):
            c.train(t)
    return grads


def model_weights(model) -> dict:
    return model_global_tensors(model if isinstance(model, (list, tuple)) else [model])


def twin_similarity(model, plan: GrowthPlan, batches: Optional[Iterable[dict]] = None) -> dict:
    """{"weight": {axis: summary}, "gradient": {axis: summary}} for a live grown model; the
    gradient part needs `batches`. Summaries: units, fresh, undefined, mean, min, max."""
    swiglu = swiglu_of(bare_model(model))
    out = {"weight": summarize(twin_cosines(model_weights(model), plan, swiglu))}
    if batches is not None:
        out["gradient"] = summarize(twin_cosines(model_gradients(model, batches), plan, swiglu))
    return out
