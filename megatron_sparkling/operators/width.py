"""Grow one tensor along its dimensions from element unit maps: copy, fill, rescale.

Pure torch on whole (global) tensors: no files, no torch.distributed. A `UnitMap` per tensor
dimension (from `GrowthPlan.tensor_maps`) says, for every element index of the grown dimension,
which source index it copies (-1: a fresh element with no twin). Growing a tensor is:
1. `gather`: copy every element from its source along every dimension at once (old elements
   keep their values; twins copy them);
2. `fill_fresh`: give elements with a fresh coordinate (any dimension's source is -1) values by
   a rule (`FILL_RULES`; statistics per leading unit slice: per layer, per expert);
3. fan-in rescaling (`scale_along`) with the factors below: Net2Net's split among copies
   (`split_factors`), SPARKLING's RMS-consistent `sparkling_alpha`.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Union

import torch

from megatron_sparkling.core.plan import UnitMap

FILL_RULES = ("zeros", "constant", "normal", "empirical")
Factor = Union[float, torch.Tensor, None]


def gather(tensor: torch.Tensor, maps: Sequence[UnitMap]) -> torch.Tensor:
    """Every element copied from its source along every dimension (fresh elements get a copy
    of index 0, to be overwritten by `fill_fresh`)."""
    assert len(maps) == tensor.dim(), (tuple(tensor.shape), len(maps))
    out = tensor
    for d, m in enumerate(maps):
        assert m.old == tensor.shape[d], f"dim {d}: tensor has {tensor.shape[d]}, map {m.old}"
        if m.grown or not torch.equal(m.source, torch.arange(m.new)):
            out = select_along(out, d, m.source.clamp(min=0))
    return out.clone() if out is tensor else out  # never an alias of the input


# A run of consecutive sources at least this long is copied as one slice, not indexed.
_MIN_RUN = 8


def select_along(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """`tensor.index_select(dim, index)`, fast where index_select is slow: along a dimension
    whose elements are short (< 64 elements behind each index, e.g. the last one of
    contiguous CPU memory: there ~6x slower than advanced indexing), runs of consecutive
    sources (an appended map's old units) are copied as slices and the rest is indexed."""
    if math.prod(tensor.shape[dim + 1:]) >= 64:   # whole rows: index_select copies them fastest
        return tensor.index_select(dim, index)
    n = index.numel()
    shape = list(tensor.shape)
    shape[dim] = n
    out = torch.empty(shape, dtype=tensor.dtype)
    pending = None   # start of a stretch of short runs, indexed together
    for first, length, at in _runs(index):
        if length >= _MIN_RUN:
            if pending is not None:
                out.narrow(dim, pending, at - pending).copy_(_index(tensor, dim, index[pending:at]))
                pending = None
            out.narrow(dim, at, length).copy_(tensor.narrow(dim, first, length))
        elif pending is None:
            pending = at
    if pending is not None:
        out.narrow(dim, pending, n - pending).copy_(_index(tensor, dim, index[pending:]))
    return out


def _index(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return tensor[(slice(None),) * dim + (index,)]


def keep_old(tensor: torch.Tensor, maps: Sequence[UnitMap]) -> torch.Tensor:
    """`gather`, then zero wherever any coordinate is new (`axis_mask(maps, fresh=False)`),
    without copying what is zeroed: zeros, and each block of old elements copied in place."""
    old_positions = [(~m.is_new).nonzero().flatten() for m in maps]
    runs = [_runs(pos) for pos in old_positions]
    if math.prod(len(r) for r in runs) > 64:   # old elements scattered: mask instead
        grown = gather(tensor, maps)
        new = axis_mask(maps, fresh=False)
        return grown if new is None else grown.masked_fill_(new, 0.0)
    old = tensor
    for d, (m, pos) in enumerate(zip(maps, old_positions)):
        index = m.source[pos]
        if not torch.equal(index, torch.arange(m.old)):   # old elements moved (fused layouts)
            old = select_along(old, d, index)
    out = torch.zeros([m.new for m in maps], dtype=tensor.dtype)
    for block in itertools.product(*runs):
        dst, src = out, old
        for d, (start, length, offset) in enumerate(block):
            dst, src = dst.narrow(d, start, length), src.narrow(d, offset, length)
        dst.copy_(src)
    return out


def _runs(positions: torch.Tensor) -> list[tuple]:
    """(first value, length, offset in `positions`) of each run of consecutive values."""
    n = positions.numel()
    if n == 0:
        return []
    breaks = ((positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1).tolist()
    bounds = [0] + breaks + [n]
    return [(int(positions[lo]), hi - lo, lo) for lo, hi in zip(bounds[:-1], bounds[1:])]


def axis_mask(maps: Sequence[UnitMap], fresh: bool) -> Optional[torch.Tensor]:
    """Bool tensor of the grown shape: True where any coordinate is fresh (source -1,
    `fresh=True`) or new (`fresh=False`); None when no element is."""
    vecs = [(m.source < 0) if fresh else m.is_new for m in maps]
    if not any(v.any() for v in vecs):
        return None
    mask = None
    for i, v in enumerate(vecs):
        shape = [1] * len(vecs)
        shape[i] = v.numel()
        v = v.view(shape)
        mask = v if mask is None else (mask | v)
    return mask.expand([m.new for m in maps])


def unit_sources(maps: Sequence[UnitMap], unit_dims: int) -> torch.Tensor:
    """(prod of grown unit sizes,) flat index of the source unit slice of each grown unit slice
    over the leading `unit_dims` dimensions (fresh units take their slice's index 0 source)."""
    flat = torch.zeros(1, dtype=torch.long)
    for m in maps[:unit_dims]:
        flat = (flat.unsqueeze(1) * m.old + m.source.clamp(min=0).unsqueeze(0)).reshape(-1)
    return flat


def fill_fresh(grown: torch.Tensor, mask: torch.Tensor, rule: str, source: torch.Tensor,
               maps: Sequence[UnitMap], value: float = 0.0, std: Optional[float] = None,
               unit_dims: int = 0, generator: Optional[torch.Generator] = None) -> None:
    """Fill `grown` where `mask` is True, in place.

    rule: "zeros"; "constant" (`value`); "normal" (N(0, std^2); std None: the standard deviation
    of the source unit slice); "empirical" (values drawn with replacement from the source unit
    slice). Slices are over the leading `unit_dims` dimensions (layers, experts), so a new
    expert's or layer's values look like its own source's, not the average."""
    if rule not in FILL_RULES:
        raise ValueError(f"unknown fill rule {rule!r}; one of {FILL_RULES}")
    if rule in ("zeros", "constant"):
        grown.masked_fill_(mask, 0.0 if rule == "zeros" else value)
        return
    units = int(math.prod(grown.shape[:unit_dims]))
    g_rows = grown.view(units, -1)
    m_rows = mask.reshape(units, -1)
    src_rows = source.reshape(int(math.prod(source.shape[:unit_dims])), -1).to(grown.dtype)
    row_src = unit_sources(maps, unit_dims)
    rows, cols = m_rows.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return
    if rule == "normal":
        if std is None:
            stds = src_rows.std(dim=1, unbiased=False) if src_rows.shape[1] > 1 else (
                src_rows.abs().mean(dim=1))
            scale = stds[row_src[rows]]
        else:
            scale = torch.full((rows.numel(),), float(std), dtype=grown.dtype)
        draws = torch.randn(rows.numel(), generator=generator, dtype=grown.dtype) * scale
    else:
        n = src_rows.shape[1]
        pick = torch.randint(0, n, (rows.numel(),), generator=generator)
        draws = src_rows[row_src[rows], pick]
    g_rows[rows, cols] = draws


# ---------------------------------------------------------------------------------- fan-in
def split_factors(umap: UnitMap) -> torch.Tensor:
    """(new,) Net2Net's fan-in factor per element: 1 / (number of copies of its source), so a
    unit split among its copies sums to the original (fresh elements: 1)."""
    counts = umap.copies().to(torch.float64)
    f = 1.0 / counts.clamp(min=1)[umap.source.clamp(min=0)]
    return torch.where(umap.source >= 0, f, torch.ones_like(f))


def sparkling_alpha(umap: UnitMap, copy_copy: bool = True) -> float:
    """SPARKLING's fan-in factor, multiplying old and new columns alike, so that a linear's
    RMS ratio RMS(y)/RMS(x) is unchanged by growth, for iid weights, at any factor.

    Computed from the plan, not from c: with the grown input x' copying old unit i k_i times
    (itself included: `umap.copies()`) and new columns copying their twins' columns, the output
    is y' = alpha sum_i k_i w_i x_i, so E|y'|^2 = alpha^2 sigma^2 sum_i k_i^2 x_i^2 while
    RMS(x') = RMS(x); each fresh unit (source -1: random column, independent input of the same
    RMS) adds one more unit term. RMS consistency gives

        alpha = sqrt(n / (sum_i k_i^2 + n_fresh)).

    Copies only, 0 < c <= 1: sum k_i^2 = n (1 + 3c), alpha = 1/sqrt(1 + 3c); integer factor k:
    1/k, Net2Net's split (function preserved); fresh only: sqrt(n / n').
    `copy_copy` False: the new columns are NOT copies of their twins' columns although their
    inputs are (not used by any method here): every new unit counts as fresh."""
    if not umap.grown:
        return 1.0
    counts = umap.copies().to(torch.float64)
    fresh = int((umap.source < 0).sum())
    if not copy_copy:
        fresh += int(counts.sum()) - umap.old
        counts = counts.clamp(max=1)
    return math.sqrt(umap.old / float(counts.pow(2).sum() + fresh))


def scale_along(tensor: torch.Tensor, dim: int, factor: Factor) -> torch.Tensor:
    """tensor * factor along `dim` (a scalar, or a vector of that dimension's size)."""
    if factor is None:
        return tensor
    if not torch.is_tensor(factor):
        return tensor if factor == 1.0 else tensor * factor
    shape = [1] * tensor.dim()
    shape[dim] = factor.numel()
    return tensor * factor.to(tensor.dtype).view(shape)


# ---------------------------------------------------------------------------------- copies
def copy_index(umap: UnitMap) -> torch.Tensor:
    """(new,) which copy of its source each grown element is: 0 for the first occurrence of a
    source (the old element), 1 for the next, ...; fresh elements -1."""
    src = umap.source
    out = torch.full_like(src, -1)
    seen: dict[int, int] = {}
    for i, s in enumerate(src.tolist()):
        if s >= 0:
            out[i] = seen.get(s, 0)
            seen[s] = out[i].item() + 1
    return out


def integer_factor(umap: UnitMap) -> Optional[int]:
    """k when every source element is copied exactly k times (old kept), else None."""
    if (umap.source < 0).any():
        return None
    counts = umap.copies()
    k = int(counts[0]) if counts.numel() else 1
    return k if bool((counts == k).all()) else None


def block_diagonal_mask(out_map: UnitMap, in_map: UnitMap) -> torch.Tensor:
    """(out.new, in.new) bool: True where output copy c reads input copy c (staged training's
    [[W, 0], [0, W]]: each copy of the model reads its own copy of the input)."""
    return copy_index(out_map).unsqueeze(1) == copy_index(in_map).unsqueeze(0)


def cancelling_noise(shape, dim: int, umap: UnitMap, std: float,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """N(0, std^2) noise along a fan-in dimension whose sum over the copies of each source is
    zero (HyperCloning's +eta/-eta at 2x): inputs that are exact copies cancel it."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32) * std
    groups = umap.source.clamp(min=0)
    moved = noise.movedim(dim, -1)
    sums = torch.zeros(*moved.shape[:-1], umap.old, dtype=noise.dtype)
    sums.index_add_(moved.dim() - 1, groups, moved)
    counts = umap.copies().clamp(min=1).to(noise.dtype)
    mean = (sums / counts).index_select(moved.dim() - 1, groups)
    centred = torch.where((umap.source >= 0), moved - mean, torch.zeros_like(moved))
    return centred.movedim(-1, dim)
