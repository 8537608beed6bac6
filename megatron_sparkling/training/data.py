"""Tokenizer, megatron-core GPT datasets and the pre-training sample order.

Datasets are megatron-core's own (`IndexedDataset` + `GPTDataset`, or `MockGPTDataset` with
--mock-data) built by `BlendedMegatronDatasetBuilder`, as Megatron-LM's pretrain_gpt.py builds them.
The sample order follows Megatron-LM's MegatronPretrainingSampler: iteration i reads global samples
[i*GBS, (i+1)*GBS); within each micro-batch x DP slice, DP rank r reads micro-batch r. A resumed
run continues at `consumed_train_samples`, so N iterations straight and N/2 + N/2 see the same data.
Validation reads the first `eval_iters x GBS` validation samples at every evaluation, so
validation losses at different iterations (and of different runs) are on the same held-out text.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import torch

from megatron_sparkling.compat.cpu import have_gpu


def build_tokenizer(args):
    from megatron.core.tokenizers import MegatronTokenizer

    if args.tokenizer_type == "ByteLevelTokenizer":
        # 256 byte values; id 0 (the NUL byte, absent from text) ends each document.
        return MegatronTokenizer.from_pretrained(
            metadata_path={"library": "byte-level", "model_type": "gpt"}, vocab_size=256)
    if args.tokenizer_type == "NullTokenizer":
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"},
                                                 vocab_size=args.vocab_size)
    raise ValueError(f"unsupported --tokenizer-type {args.tokenizer_type}")


def dataset_config(args, tokenizer):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    blend = None
    if args.data_path:
        paths = list(args.data_path)
        if len(paths) > 1 and _is_number(paths[0]):
            blend = (paths[1::2], [float(w) for w in paths[0::2]])
        else:
            blend = (paths, None)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        split=args.split,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        # byte tokenizers have no pad token of their own (megatron-core 0.16+ asks; 0.15 did not)
        **({"allow_ambiguous_pad_tokens": True} if "allow_ambiguous_pad_tokens" in {
            f.name for f in dataclasses.fields(GPTDatasetConfig)} else {}),
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_datasets(args, tokenizer):
    """(train, valid, test) megatron-core datasets sized for the whole run."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    if not args.mock_data:
        _check_splits_have_documents(args)
    gbs = args.global_batch_size
    eval_samples = max(args.eval_iters, 1) * gbs
    sizes = [args.train_iters * gbs, eval_samples, eval_samples]
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True,
                                         dataset_config(args, tokenizer)).build()


def _check_splits_have_documents(args) -> None:
    """megatron-core's GPTDataset loops forever on a split with no documents: refuse it first."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(args.split))
    paths = list(args.data_path)
    if len(paths) > 1 and _is_number(paths[0]):
        paths = paths[1::2]
    for path in paths:
        if not (os.path.exists(path + ".bin") and os.path.exists(path + ".idx")):
            raise FileNotFoundError(f"--data-path {path}: no {path}.bin/.idx; build it with "
                                    "examples/prepare_corpus.py --output-prefix " + path)
        documents = len(IndexedDataset(path).document_indices) - 1
        for name, bound in zip(("train", "validation", "test"), bounds):
            if bound is None:
                continue
            count = int(round(bound[1] * documents)) - int(round(bound[0] * documents))
            if count <= 0:
                raise ValueError(
                    f"--split {args.split} leaves the {name} split of {path} ({documents} "
                    f"documents) empty; give it a larger share (e.g. --split 90,10,0)")


def _collate(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def microbatches(dataset, start_sample: int, num_iterations: int, args) -> Iterator[dict]:
    """This DP rank's micro-batches for `num_iterations` iterations from global sample
    `start_sample`, in Megatron-LM's MegatronPretrainingSampler order."""
    from megatron.core import parallel_state as mpu

    mbs, dp = args.micro_batch_size, args.data_parallel_size
    dp_rank = mpu.get_data_parallel_rank()
    slice_size = mbs * dp
    slices = args.global_batch_size // slice_size
    for it in range(num_iterations):
        base = start_sample + it * args.global_batch_size
        for k in range(slices):
            first = base + k * slice_size + dp_rank * mbs
            yield _collate([dataset[i % len(dataset)] for i in range(first, first + mbs)])


def to_device(batch: dict) -> dict:
    device = torch.cuda.current_device() if have_gpu() else "cpu"
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
