"""A running megatron-core model: global tensors in and out of a live model and optimizer,
growth on load, the re-warmup of new elements, element-wise learning rates, the MSG mask ramp.
"""
