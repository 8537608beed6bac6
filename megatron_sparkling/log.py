"""One line to the log from rank 0 (every rank when torch.distributed is not initialised)."""
from __future__ import annotations

import torch


def print_rank_0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)
