"""Tokenize an offline text corpus into megatron-core's indexed format (.bin + .idx).

The default corpus is the Python standard library's own source on this machine (no download);
see megatron_sparkling/training/corpus.py for exactly what is read and how it is tokenized.

    python examples/prepare_corpus.py --output-prefix data/stdlib_text_document
    # -> data/stdlib_text_document.bin / .idx, for --data-path data/stdlib_text_document
"""
from __future__ import annotations

import argparse
import sys

from megatron_sparkling.training import corpus


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-prefix", default="data/stdlib_text_document")
    parser.add_argument("--input-dir", default=corpus.default_source_dir(),
                        help="directory whose *.py files form the corpus (default: the stdlib)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="stop after about this many tokens")
    parser.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = parser.parse_args(argv)
    if not args.force and corpus.exists(args.output_prefix):
        print(f"{args.output_prefix}.bin/.idx exist; --force rebuilds them")
        return 0
    files = corpus.stdlib_files(args.input_dir)
    if not files:
        print(f"error: no *.py files under {args.input_dir}; pass --input-dir", file=sys.stderr)
        return 2
    stats = corpus.build(files, args.output_prefix, args.max_tokens)
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, "
          f"{stats['tokens']} tokens, vocabulary {stats['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
