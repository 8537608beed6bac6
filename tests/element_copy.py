"""Test oracle: Net2Net copy along a growth plan's element maps, written independently of the
growth methods, so tests of the plan (and of what depends on it) do not test a method with itself.

Every element is copied from its source along every dimension; fan-in columns are divided by
their source's copy count (function-preserving at integer factors)."""
from megatron_sparkling.core import layout


def element_copy(plan, lay: layout.TensorLayout, tensor):
    for d, (dim, m) in enumerate(zip(lay.dims, plan.tensor_maps(lay))):
        tensor = tensor.index_select(d, m.source.clamp(min=0))
        if dim.role is layout.Role.IN:
            shape = [1] * tensor.dim()
            shape[d] = m.new
            tensor = tensor / m.copies().float()[m.source.clamp(min=0)].view(shape)
    return tensor
