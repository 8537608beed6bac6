"""Tokenize an offline text corpus into megatron-core's indexed format (.bin + .idx).

The default corpus is the Python standard library's own source on this machine (no download):
every `*.py` file under `sysconfig.get_paths()["stdlib"]`, test suites and site-packages left
out, in sorted path order, one document per file. Tokens are UTF-8 bytes (megatron-core's
byte-level tokenizer, vocabulary 256); each document ends with id 0, the end-of-document token.

    python examples/prepare_corpus.py --output-prefix data/stdlib_text_document
    # -> data/stdlib_text_document.bin / .idx, for --data-path data/stdlib_text_document
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import sysconfig

import numpy as np

SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in sorted(root.rglob("*.py"))
            if not SKIP_DIRS.intersection(p.relative_to(root).parts)]


def build(files, output_prefix: str, max_bytes: int | None = None) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from megatron.core.tokenizers import MegatronTokenizer

    tokenizer = MegatronTokenizer.from_pretrained(
        metadata_path={"library": "byte-level", "model_type": "gpt"}, vocab_size=256)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_prefix = output_prefix + ".partial"
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=np.uint16)
    documents = tokens = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.tokenize(text)
        if 0 in ids:  # a NUL byte would read as end-of-document
            ids = [i for i in ids if i != 0]
        if not ids:
            continue
        ids.append(tokenizer.eod)
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
        documents += 1
        tokens += len(ids)
        if max_bytes is not None and tokens >= max_bytes:
            break
    builder.finalize(tmp_prefix + ".idx")
    # Publish both files only once complete, so a killed run leaves no usable half dataset.
    os.replace(tmp_prefix + ".bin", output_prefix + ".bin")
    os.replace(tmp_prefix + ".idx", output_prefix + ".idx")
    return {"documents": documents, "tokens": tokens, "vocab_size": tokenizer.vocab_size}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-prefix", default="data/stdlib_text_document")
    parser.add_argument("--input-dir", default=sysconfig.get_paths()["stdlib"],
                        help="directory whose *.py files form the corpus (default: the stdlib)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="stop after about this many tokens")
    parser.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = parser.parse_args(argv)
    if (not args.force and os.path.exists(args.output_prefix + ".bin")
            and os.path.exists(args.output_prefix + ".idx")):
        print(f"{args.output_prefix}.bin/.idx exist; --force rebuilds them")
        return 0
    files = stdlib_files(pathlib.Path(args.input_dir))
    if not files:
        print(f"error: no *.py files under {args.input_dir}; pass --input-dir", file=sys.stderr)
        return 2
    stats = build(files, args.output_prefix, args.max_tokens)
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, "
          f"{stats['tokens']} tokens, vocabulary {stats['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
