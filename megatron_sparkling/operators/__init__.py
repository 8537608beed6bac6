"""Pure tensor operators of growth (no I/O, no torch.distributed): width, norms, optimizer state."""
