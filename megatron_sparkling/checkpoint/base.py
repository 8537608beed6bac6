"""What every reader of a stored checkpoint offers (torch_dist in source.py, legacy in legacy.py),
and the global shape the layout table gives a model key.
"""
from __future__ import annotations

import io
import os
from typing import Optional

import torch

from megatron_sparkling.checkpoint import optimizer_state
from megatron_sparkling.checkpoint.dcp import TensorSpec
from megatron_sparkling.checkpoint.paths import CheckpointError
from megatron_sparkling.core import layout as layout_lib
from megatron_sparkling.core.spec import ModelShape


class SourceCheckpoint:
    """One stored checkpoint, read one global tensor at a time (see checkpoint/source.py)."""

    format = ""

    def __init__(self, path: str, iteration: int, release: bool):
        self.path = path
        self.iteration = iteration
        self.release = release
        self.common: dict = {}
        self.model_tensors: dict[str, TensorSpec] = {}
        self.objects: list[str] = []
        self.optimizer: Optional[optimizer_state.OptimizerState] = None

    @property
    def args(self):
        args = self.common.get("args")
        if args is None:
            raise CheckpointError(f"{self.path} stores no args; growth needs the model's sizes: "
                                  "re-save it with Megatron-LM (which stores args)")
        return args

    @property
    def content_metadata(self) -> dict:
        return dict(self.common.get("content_metadata") or {})

    def read_model(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """One global model tensor, or its slice of one layer (a stacked key's leading axis)."""
        raise NotImplementedError

    def read_object_bytes(self, unique_key: str) -> bytes:
        raise NotImplementedError

    def check_manifest(self) -> Optional[dict]:
        """Check the files against a manifest of checksums; None: the format has none."""
        return None

    def files_of(self, key: str, kind: Optional[str] = None) -> list[str]:
        """The files (relative to `path`) holding a model tensor (kind None) or one kind of its
        optimizer state: what a message about a damaged value names; [] when unknown."""
        return []

    def files(self) -> list[str]:
        """Every file of the checkpoint (the converter hashes them to prove it wrote none)."""
        out = []
        for dirpath, _, names in os.walk(self.path):
            out += [os.path.join(dirpath, n) for n in names]
        return sorted(out)

    def check_args_match_tensors(self) -> None:
        """The stored args describe the stored tensors (refuse a mismatch before any work)."""
        shape = ModelShape.from_args(self.args)
        for key, spec in self.model_tensors.items():
            expected = expected_shape(key, shape)
            if expected is not None and expected != spec.shape:
                raise CheckpointError(
                    f"{key} is stored with shape {spec.shape} but the stored args "
                    f"(hidden_size={shape.hidden_size}, num_attention_heads="
                    f"{shape.num_attention_heads}, num_query_groups={shape.num_query_groups}, "
                    f"moe_ffn_hidden_size={shape.moe_ffn_hidden_size}, num_experts="
                    f"{shape.num_experts}) give {expected}; the checkpoint's args do not "
                    "describe its tensors: fix `args` in the checkpoint")


def expected_shape(key: str, shape: ModelShape) -> Optional[tuple]:
    """A model key's global shape under `shape` (layout table); None for keys it does not know."""
    if layout_lib.is_extra_state(key):
        return None
    try:
        lay = layout_lib.resolve(key, shape.swiglu)
    except layout_lib.UnknownTensorError:
        return None
    sizes = []
    for dim in lay.dims:
        size = shape.axis_size(dim.axis)
        if size is None:
            return None
        sizes.append(2 * size if dim.packing is layout_lib.Packing.GLU else size)
    return tuple(sizes)


def object_bytes(data) -> bytes:
    """A ShardedObject's data serialized the way megatron-core stores it in torch_dist."""
    buf = io.BytesIO()
    torch.save([data], buf)
    return buf.getvalue()
