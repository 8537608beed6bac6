"""CPU bridges for megatron-core and megatron.training; optimizer workarounds."""
