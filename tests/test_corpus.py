"""The offline corpus: real text, byte tokens, megatron-core's indexed format."""
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_sparkling.training import corpus


def test_corpus_round_trips_to_the_source_text(corpus_prefix):
    files = corpus.stdlib_files(corpus.default_source_dir())
    dataset = IndexedDataset(corpus_prefix)
    assert len(dataset) > 10
    first = bytes(dataset[0][:-1].astype("uint8").tolist())
    assert first == files[0].read_bytes().replace(b"\0", b"")
    assert dataset[0][-1] == 0  # end-of-document token
    assert int(max(int(dataset[i].max()) for i in range(len(dataset)))) < 256
