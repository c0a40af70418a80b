"""A store's memory codec on passages it was not fitted on, beside a 32x codec fitted on the same sample: what each
size keeps of the memory of that store's encoder (for a backbone without a shipped codec, such as MPNet).

The fitting vectors are the memory of the store's codec sample (`codec_sample_rows`, as the build chose them); the
test vectors that of a seeded choice of other passages. The 32x codec keeps the leading half of the rotated
dimensions with 8 dims per head (DEFAULT_32X's shape at any width). Relative error and NN@10 as in bench_codec.

    python -m bench.bench_store_codec --store runs/mpnet-mini
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from bench.bench_codec import NN_DEFINITION, NN_K, NN_QUERIES
from bench.bench_codec_transfer import memory_vectors
from bench.quality import nn_agreement, relative_error
from memvq.encoders.backbone import Backbone
from memvq.memory.codecs import CodecConfig, make_codec
from memvq.memory.codecs.config import Segment
from memvq.memory.store import MemoryStore
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.indexing.codec import codec_sample_rows
from memvq.pipelines.logs import configure_logging


def half_width_32x(stored: CodecConfig) -> CodecConfig:
    """The store's codec config at 32x: half the rotated dims kept, 8 dims per head."""
    segment = Segment(dims=stored.dim // 2, heads=stored.dim // 16)
    return CodecConfig.model_validate({**stored.model_dump(), "segments": [segment.model_dump()]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--test-passages", type=int, default=400)
    parser.add_argument("--test-vectors", type=int, default=30_000)
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    torch.set_grad_enabled(False)
    store = MemoryStore.open(args.store, verify=False)
    config = BuildConfig.model_validate(store.manifest["config"])
    info = store.manifest["backbone"]
    backbone = Backbone.from_pretrained(info["model_path"], memory_layers=info["memory_layers"])
    sample = codec_sample_rows(config, store.num_passages)
    others = np.setdiff1d(np.arange(store.num_passages), sample)
    test_rows = np.sort(np.random.default_rng(1).choice(others, size=args.test_passages, replace=False))
    fit = memory_vectors(store, backbone, sample.tolist(), config.codec_train_vectors, 0)
    test = memory_vectors(store, backbone, test_rows.tolist(), args.test_vectors, 1)
    queries = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:NN_QUERIES]]
    stored = store.codec
    codecs = {"the store's": stored, "32x, fitted here": make_codec(half_width_32x(stored.config)).fit(fit)}
    print(f"store {args.store}: {info['model_path']}, memory = {info['memory_layers']} of {info['num_layers']} layers")
    print(f"fitted on {len(sample)} passages ({len(fit):,} vectors), tested on {len(test_rows)} others")
    print(f"({len(test):,} vectors)\n\n{NN_DEFINITION}\n")
    print("| codec | config | bytes/token | vs bf16 | relative error | NN@10 |")
    print("|---|---|---:|---:|---:|---:|")
    for name, codec in codecs.items():
        x_hat = codec.decode(codec.encode(test))
        segments = ", ".join(f"{s.dims}d:{s.heads}x{s.sub_dim}" for s in codec.config.segments)
        print(
            f"| {name} | {codec.config.kind} {segments} | {codec.bytes_per_token} | "
            f"{2 * codec.config.dim / codec.bytes_per_token:.0f}x | {relative_error(test, x_hat):.4f} | "
            f"{nn_agreement(test, x_hat, queries, k=NN_K):.3f} |"
        )


if __name__ == "__main__":
    main()
