"""Pure tensor operators: full (global) tensors in, full tensors out; no I/O, no torch.distributed."""
