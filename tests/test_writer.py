"""The streaming writer on its own (checkpoint/writer.py): pieces are made one ahead of the
writer in a background thread; a failure on either side ends the write with its own error and
leaves no thread behind."""
import errno
import os
import threading

import pytest
import torch

from megatron_sparkling.checkpoint.dcp import DcpCheckpoint, TensorSpec
from megatron_sparkling.checkpoint.paths import CheckpointError
from megatron_sparkling.checkpoint.writer import write_torch_dist

SPECS = {f"t{i}": TensorSpec((4, 3), torch.float32) for i in range(6)}
SPECS["stacked"] = TensorSpec((3, 2, 5), torch.bfloat16)


def _value(key, layer):
    spec = SPECS[key]
    shape = spec.shape if layer is None else spec.shape[1:]
    return torch.full(shape, float(len(key) + (layer or 0)), dtype=spec.dtype)


def _ahead_threads():
    return [t for t in threading.enumerate() if t.name == "produce-ahead"]


def test_pieces_are_made_once_in_stream_order_and_read_back(tmp_path):
    made = []

    def produce(key, layer):
        made.append((key, layer))
        return _value(key, layer)

    stats = write_torch_dist(str(tmp_path), SPECS, produce, {}, {"iteration": 1},
                             layered={"stacked": True}, progress=False)
    pieces = [(k, None) for k in SPECS if k != "stacked"] + [("stacked", i) for i in range(3)]
    assert sorted(made, key=str) == sorted(pieces, key=str) and len(made) == len(pieces)
    assert stats.pieces == len(pieces) and stats.held_bytes == 0
    assert stats.peak_held_bytes <= 2 * 4 * 3 * 4   # the piece written and the one made ahead
    ckpt = DcpCheckpoint(str(tmp_path))
    for key in SPECS:
        for layer in ([None] if key != "stacked" else range(3)):
            assert torch.equal(ckpt.read_layer(key, layer), _value(key, layer))
    assert not _ahead_threads()


def test_a_piece_that_fails_ends_the_write_with_its_error_and_nothing_more_is_made(tmp_path):
    made = []

    def produce(key, layer):
        made.append(key)
        if len(made) == 3:
            raise CheckpointError(f"{key} is damaged")
        return _value(key, layer)

    with pytest.raises(CheckpointError, match="is damaged"):
        write_torch_dist(str(tmp_path), SPECS, produce, {}, {}, layered={"stacked": True},
                         progress=False)
    assert len(made) == 3
    assert not _ahead_threads()


def test_a_write_that_fails_stops_the_thread_making_pieces(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    written = []
    write_item = filesystem._write_item

    def full_disk(*args, **kwargs):   # the second piece's file cannot be written
        if len(written) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(args)
        return write_item(*args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", full_disk)
    made = []

    def produce(key, layer):
        made.append(key)
        return _value(key, layer)

    with pytest.raises(OSError, match="No space left"):
        write_torch_dist(str(tmp_path), SPECS, produce, {}, {}, layered={"stacked": True},
                         progress=False)
    assert len(written) == 1 and 2 <= len(made) <= 3   # the writer's, and at most one ahead
    assert not _ahead_threads()


def test_the_digests_taken_as_files_are_written_are_those_of_the_files(tmp_path):
    """Each data file's checksum is taken from the bytes on their way to it (no second read):
    the same as reading the file back."""
    from megatron_sparkling.checkpoint import integrity

    stats = write_torch_dist(str(tmp_path), SPECS, _value, {}, {}, layered={"stacked": True},
                             progress=False, digest=integrity.Crc32)
    data_files = sorted(n for n in os.listdir(tmp_path) if n.endswith(".distcp"))
    assert sorted(stats.digests) == data_files and len(data_files) == len(SPECS) + 2
    for name, value in stats.digests.items():
        assert value == integrity.file_checksum(str(tmp_path / name)), name
