"""An offline text corpus tokenized into megatron-core's indexed format (.bin + .idx).

The default corpus is the Python standard library's own source on this machine (no download):
every `*.py` file under `sysconfig.get_paths()["stdlib"]`, test suites and site-packages left
out, in sorted path order, one document per file. Tokens are UTF-8 bytes (megatron-core's
byte-level tokenizer, vocabulary 256); each document ends with id 0, the end-of-document token.
"""
from __future__ import annotations

import os
import pathlib
import sysconfig

import numpy as np

SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def default_source_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root) -> list[pathlib.Path]:
    root = pathlib.Path(root)
    return [p for p in sorted(root.rglob("*.py"))
            if not SKIP_DIRS.intersection(p.relative_to(root).parts)]


def exists(output_prefix: str) -> bool:
    return os.path.exists(output_prefix + ".bin") and os.path.exists(output_prefix + ".idx")


def build(files, output_prefix: str, max_tokens: int | None = None) -> dict:
    """Tokenize `files` (one document each) into output_prefix.bin/.idx; returns counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from megatron.core.tokenizers import MegatronTokenizer

    tokenizer = MegatronTokenizer.from_pretrained(
        metadata_path={"library": "byte-level", "model_type": "gpt"}, vocab_size=256)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_prefix = output_prefix + ".partial"
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=np.uint16)
    documents = tokens = 0
    for path in files:
        ids = tokenizer.tokenize(pathlib.Path(path).read_text(encoding="utf-8", errors="replace"))
        ids = [i for i in ids if i != tokenizer.eod]  # a NUL byte would read as end-of-document
        if not ids:
            continue
        ids.append(tokenizer.eod)
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
        documents += 1
        tokens += len(ids)
        if max_tokens is not None and tokens >= max_tokens:
            break
    builder.finalize(tmp_prefix + ".idx")
    # Publish both files only once complete: a killed run leaves no usable half dataset.
    os.replace(tmp_prefix + ".bin", output_prefix + ".bin")
    os.replace(tmp_prefix + ".idx", output_prefix + ".idx")
    return {"documents": documents, "tokens": tokens, "vocab_size": tokenizer.vocab_size}
