"""The CPU bridge: megatron-core's CUDA RNG tracker keeps separate, reproducible CPU streams."""
import pytest
import torch

from conftest import megatron_run, tiny_moe_flags


def test_rng_tracker_streams_are_seeded_and_distinct(corpus_prefix):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron_sparkling.compat import cpu

    if not cpu.needed():
        pytest.skip("a GPU is present: the bridge is not applied")
    with megatron_run(tiny_moe_flags(corpus_prefix)):
        assert any("TorchFunctionMode" in a for a in cpu.APPLIED)
        tracker = get_cuda_rng_tracker()
        states = tracker.get_states()
        assert {"model-parallel-rng", "expert-parallel-rng", "data-parallel-rng"} <= set(states)
        outside = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        with tracker.fork("expert-parallel-rng"):
            b = torch.rand(4)
        assert not torch.equal(a, b)
        assert torch.equal(torch.get_rng_state(), outside)  # forks leave the default stream alone
        tracker.set_states(states)
        with tracker.fork():
            assert torch.equal(torch.rand(4), a)  # restoring saved states replays the stream
        # device='cuda' requests land on the CPU
        assert torch.zeros(2, device="cuda").device.type == "cpu"
