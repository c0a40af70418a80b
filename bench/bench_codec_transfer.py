"""The codec shipped for the embedded encoder's memory, on passages it was not fitted on, against codecs fitted on
the passages' own pages: what skipping the fit costs.

The mini corpus holds two kinds of page: the NQ questions' gold pages and the SQuAD dev articles. Each kind's pages
are split in two halves (crc32 of the page id); the codec config is the default (the shipped one's). For each kind,
on the token vectors of its test half (minus every passage of the shipped codec's own fitting sample):

- own: a codec fitted on the other half of the same kind of page (a corpus-fitted codec);
- foreign: a codec fitted on the other kind's fitting half (pages of another source);
- shipped: `encoders/weights/minilm-codec` (fitted on a sample of the whole mini corpus, `make codec`).

Memory vectors are the store's: the embedded encoder's memory layers over the passages as the build tokenises
them, in the store's precision. Relative error is mean ||x - x_hat|| / ||x||; NN@10 as in bench_codec.

    python -m bench.bench_codec_transfer --store runs/minilm-mini
"""

from __future__ import annotations

import argparse
import json
import logging
import zlib
from pathlib import Path

import torch

from bench.bench_codec import NN_DEFINITION, NN_K, NN_QUERIES
from bench.quality import nn_agreement, relative_error
from memvq.encoders.backbone import Backbone
from memvq.encoders.embedded import SHIPPED_CODECS, portable_model_path
from memvq.encoders.hardware import autocast
from memvq.memory.codecs import load_codec, make_codec
from memvq.memory.store import MemoryStore
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.indexing.codec import codec_sample_rows
from memvq.pipelines.logs import configure_logging

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def page_kinds() -> dict[str, set[str]]:
    """The titles of the NQ gold pages and of the SQuAD dev articles."""
    articles = json.loads((SHARED / "squad" / "dev-v1.1.json").read_text())["data"]
    squad = {article["title"].replace("_", " ") for article in articles}
    nq = set()
    for line in (SHARED / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl").read_text().splitlines():
        for output in json.loads(line)["output"]:
            nq |= {p["wikipedia_id"] for p in output.get("provenance") or []}
    return {"NQ pages": nq - squad, "SQuAD pages": squad - nq}


@torch.inference_mode()
def memory_vectors(store: MemoryStore, backbone: Backbone, rows: list[int], cap: int, seed: int) -> torch.Tensor:
    """The memory token vectors 'n d' of store rows (as the build computes them), a seeded sample of at most `cap`."""
    config = BuildConfig.model_validate(store.manifest["config"])
    out = []
    for first in range(0, len(rows), 64):
        records = store.passages(rows[first : first + 64])
        batch = backbone.tokenize_passages(
            [r["title"] for r in records], [r["text"] for r in records], config.encoder.max_passage_tokens
        )
        with autocast(backbone.device, config.encoder.precision):
            memory = backbone.encode_memory(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        out.append(memory.float()[batch["attention_mask"].bool()])
    vectors = torch.cat(out)
    if len(vectors) > cap:
        keep = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:cap]
        vectors = vectors[torch.sort(keep).values]
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=ROOT / "runs" / "minilm-mini", help="a store of the mini corpus")
    parser.add_argument("--fit-vectors", type=int, default=100_000)
    parser.add_argument("--test-vectors", type=int, default=30_000)
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    store = MemoryStore.open(args.store, verify=False)
    info = store.manifest["backbone"]
    shipped_dir = SHIPPED_CODECS[(portable_model_path(info["model_path"]), info["memory_layers"])]
    shipped = load_codec(shipped_dir)
    # the passages of the shipped codec's fitting sample (the recipe's seeded rows of this corpus) are never tested
    recipe = BuildConfig.from_file(ROOT / "configs" / "build-minilm-codec.toml")
    seen = set(codec_sample_rows(recipe, store.num_passages).tolist())

    doc_ids = [r["doc_id"] for r in store.passages(list(range(store.num_passages)))]
    backbone = Backbone.from_pretrained(info["model_path"], memory_layers=info["memory_layers"])
    vectors: dict[tuple[str, str], torch.Tensor] = {}
    for kind, titles in page_kinds().items():
        # 0: the fitting half, 1: the test half
        half = {row: zlib.crc32(doc.encode()) % 2 for row, doc in enumerate(doc_ids) if doc in titles}
        fit_rows = [row for row, h in half.items() if h == 0]
        test_rows = [row for row, h in half.items() if h == 1 and row not in seen]
        vectors[(kind, "fit")] = memory_vectors(store, backbone, fit_rows, args.fit_vectors, 0)
        vectors[(kind, "test")] = memory_vectors(store, backbone, test_rows, args.test_vectors, 1)
        print(f"{kind}: {len(fit_rows)} fitting passages, {len(test_rows)} test passages", flush=True)

    kinds = list(page_kinds())
    fitted = {kind: make_codec(shipped.config).fit(vectors[(kind, "fit")]) for kind in kinds}
    size = f"{shipped.config.kind}, {shipped.bytes_per_token} bytes/token"
    print(f"\n## The shipped codec on pages it was not fitted on ({size})\n")
    print(f"{NN_DEFINITION}\n")
    print("| test pages | codec | fitted on | relative error | vs own | NN@10 | vs own |")
    print("|---|---|---|---:|---:|---:|---:|")
    for kind in kinds:
        test = vectors[(kind, "test")]
        queries = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:NN_QUERIES]]
        other = next(k for k in kinds if k != kind)
        rows = [
            ("own", f"the other half of the {kind}", fitted[kind]),
            ("foreign", f"the {other}", fitted[other]),
            ("shipped", "the mini corpus (make codec)", shipped),
        ]
        own_error = own_nn = None
        for name, source, codec in rows:
            x_hat = codec.decode(codec.encode(test))
            error, nn = relative_error(test, x_hat), nn_agreement(test, x_hat, queries, k=NN_K)
            own_error, own_nn = own_error or error, own_nn or nn
            print(
                f"| {kind} ({len(test):,} tokens) | {name} | {source} | {error:.4f} | {error / own_error - 1:+.1%} | "
                f"{nn:.3f} | {nn / own_nn - 1:+.1%} |"
            )


if __name__ == "__main__":
    main()
