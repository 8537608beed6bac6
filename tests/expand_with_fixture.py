"""torchrun entry for tests: `megatron-sparkling expand` with the test-only copy method
registered (tests/growth_fixture.py), so a parallel conversion can grow too."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from growth_fixture import IndexCopyGrowth  # noqa: E402

from megatron_sparkling.cli import main  # noqa: E402
from megatron_sparkling.methods.base import REGISTRY  # noqa: E402

if __name__ == "__main__":
    REGISTRY[IndexCopyGrowth.name] = IndexCopyGrowth
    sys.exit(main(sys.argv[1:]))
