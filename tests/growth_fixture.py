"""TEST FIXTURE, not a product feature: a growth method that copies along the plan's element
maps (like test_plan.py's _index_copy_growth), registered only while a test runs. The real width
methods (sparkling, copy, ...) are written on another branch; this one lets the converter's
growth path be tested end to end meanwhile."""
import pytest

from megatron_sparkling import layout
from megatron_sparkling.methods.base import REGISTRY, GrowthMethod


class IndexCopyGrowth(GrowthMethod):
    """TEST FIXTURE, not a product method: every grown element copies its plan source; fan-in
    columns are divided by their copy count (Net2Net), so the function is preserved."""

    name = "test-index-copy"

    def grow_tensor(self, key, tensor, kind, lay, plan):
        for d, (dim, m) in enumerate(zip(lay.dims, plan.tensor_maps(lay))):
            tensor = tensor.index_select(d, m.source.clamp(min=0))
            if dim.role is layout.Role.IN:
                counts = m.copies().float()[m.source.clamp(min=0)]
                shape = [1] * tensor.dim()
                shape[d] = m.new
                tensor = tensor / counts.view(shape) ** (2 if kind == "exp_avg_sq" else 1)
        return tensor


@pytest.fixture(autouse=True)
def copy_method():
    """Registers the fixture method for the test (autouse where imported)."""
    REGISTRY[IndexCopyGrowth.name] = IndexCopyGrowth
    yield
    REGISTRY.pop(IndexCopyGrowth.name, None)
