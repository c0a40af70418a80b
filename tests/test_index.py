"""Tests for memory.index: exactness of Flat, id mapping, streaming, persistence, ANN recall, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from memvq.memory.index import (
    IndexConfig,
    IndexFileNotFoundError,
    PassageIndex,
    training_rows,
)

DIM = 64
IVFPQ = "IVF16,PQ16x8"  # 16 bytes/vector; 2,000 random 64-d vectors, 1,000 to train: recall@10 0.61 at nprobe 16


def _normalised(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k: (scores, positions)."""
    sims = queries @ base.T
    pos = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, pos, axis=1), pos


def _batches(ids: np.ndarray, vectors: np.ndarray, sizes: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    start = 0
    for size in sizes:
        yield ids[start : start + size], vectors[start : start + size]
        start += size
    assert start == len(ids), "batch sizes must cover the data"


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact, strict=True)]))


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return _normalised(rng, 500), _normalised(rng, 40)


@pytest.fixture(scope="module")
def ann_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return _normalised(rng, 2000), _normalised(rng, 100)


@pytest.fixture(scope="module")
def ivfpq_index(ann_data: tuple[np.ndarray, np.ndarray]) -> PassageIndex:
    base, _ = ann_data
    ids = np.arange(len(base), dtype=np.int64)
    config = IndexConfig(factory=IVFPQ, nprobe=16, train_size=1000, use_gpu=False)  # PQ training dominates
    return PassageIndex.build(_batches(ids, base, [700, 700, 600]), DIM, config, train_sample=base)


# ----------------------------------------------------------------------------- Flat exactness and ids


def test_flat_search_equals_numpy_brute_force(small: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = small
    index = PassageIndex.build([(np.arange(len(base)), base)], DIM, IndexConfig(factory="Flat", use_gpu=False))
    assert (index.ntotal, index.dim, index.on_gpu) == (len(base), DIM, False)

    scores, rows = index.search(queries, k=10)

    exact_scores, exact_pos = _exact(queries, base, 10)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert scores.shape == rows.shape == (len(queries), 10)
    np.testing.assert_array_equal(rows, exact_pos)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)


def test_non_contiguous_row_ids_are_mapped_back(small: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = small
    rng = np.random.default_rng(7)
    row_ids = rng.choice(10**12, size=len(base), replace=False).astype(np.int64)  # large, unsorted, sparse
    index = PassageIndex.build(_batches(row_ids, base, [123, 0, 377]), DIM, IndexConfig(factory="Flat", use_gpu=False))

    _, rows = index.search(queries, k=5)

    _, exact_pos = _exact(queries, base, 5)
    np.testing.assert_array_equal(rows, row_ids[exact_pos])
    np.testing.assert_array_equal(index.ids, row_ids)


def test_single_query_batching_and_padding(small: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = small
    index = PassageIndex.build([(np.arange(30) + 100, base[:30])], DIM, IndexConfig(factory="Flat", use_gpu=False))

    one_scores, one_rows = index.search(queries[3], k=4)
    assert one_scores.shape == one_rows.shape == (1, 4)
    _, all_rows = index.search(queries, k=4, batch_size=7)  # 40 queries in uneven batches
    np.testing.assert_array_equal(one_rows[0], all_rows[3])
    np.testing.assert_array_equal(all_rows, index.search(queries, k=4, batch_size=1000)[1])

    scores, rows = index.search(queries[:2], k=35)  # more than ntotal
    assert (rows[:, 30:] == -1).all() and np.isneginf(scores[:, 30:]).all()
    assert (rows[:, :30] >= 100).all() and np.isfinite(scores[:, :30]).all()
    assert sorted(rows[0, :30].tolist()) == list(range(100, 130))


def test_empty_stream_gives_empty_results() -> None:
    index = PassageIndex.build(iter([]), DIM, IndexConfig(factory="Flat", use_gpu=False))
    scores, rows = index.search(np.ones(DIM, dtype=np.float32), k=3)
    assert index.ntotal == 0
    assert (rows == -1).all() and np.isneginf(scores).all()


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_streaming_build_equals_one_batch(factory: str, ann_data: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = ann_data
    ids = np.arange(len(base), dtype=np.int64) * 3
    config = IndexConfig(factory=factory, nprobe=4, use_gpu=False)

    one = PassageIndex.build([(ids, base)], DIM, config, train_sample=base)
    streamed = PassageIndex.build(
        _batches(ids, base, [1, 999, 0, 500, 500]), DIM, config, train_sample=base
    )  # a generator: consumed once, batch by batch

    s1, r1 = one.search(queries, k=10)
    s2, r2 = streamed.search(queries, k=10)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_save_load_round_trip(factory: str, tmp_path: Path, small: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = small
    row_ids = np.arange(len(base), dtype=np.int64)[::-1] * 10 + 5
    config = IndexConfig(factory=factory, ef_search=64, use_gpu=False)
    index = PassageIndex.build([(row_ids, base)], DIM, config)
    before = index.search(queries, k=8)

    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["ids.npy", "index.faiss", "index.json"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["config"] == config.model_dump(mode="json")
    assert (meta["dim"], meta["ntotal"], meta["faiss_version"]) == (DIM, len(base), faiss.__version__)

    loaded = PassageIndex.load(tmp_path / "idx", use_gpu=False)
    assert isinstance(loaded.ids, np.memmap) or isinstance(loaded.ids.base, np.memmap)
    assert (loaded.ntotal, loaded.dim, loaded.config) == (index.ntotal, index.dim, config)
    after = loaded.search(queries, k=8)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])

    loaded.save(tmp_path / "idx")  # overwrite in place (ids are mmapped from the file being replaced)
    again = PassageIndex.load(tmp_path / "idx", use_gpu=False).search(queries, k=8)
    np.testing.assert_array_equal(again[1], before[1])


def test_ivfpq_save_load_keeps_results_and_nprobe(
    ivfpq_index: PassageIndex, ann_data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    _, queries = ann_data
    ivfpq_index.save(tmp_path)
    loaded = PassageIndex.load(tmp_path, use_gpu=False)
    assert faiss.extract_index_ivf(loaded.faiss_index).nprobe == 16
    np.testing.assert_array_equal(loaded.search(queries, k=10)[1], ivfpq_index.search(queries, k=10)[1])


def test_load_missing_directory_or_file_is_clear(tmp_path: Path, small: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(FileNotFoundError, match="directory not found") as info:
        PassageIndex.load(tmp_path / "nope")
    assert isinstance(info.value, IndexFileNotFoundError) and info.value.filename == str(tmp_path / "nope")

    base, _ = small
    PassageIndex.build([(np.arange(10), base[:10])], DIM, IndexConfig(factory="Flat", use_gpu=False)).save(
        tmp_path / "idx"
    )
    (tmp_path / "idx" / "ids.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"ids\.npy"):
        PassageIndex.load(tmp_path / "idx")


def test_load_rejects_inconsistent_files(tmp_path: Path, small: tuple[np.ndarray, np.ndarray]) -> None:
    base, _ = small
    PassageIndex.build([(np.arange(10), base[:10])], DIM, IndexConfig(factory="Flat", use_gpu=False)).save(tmp_path)
    np.save(tmp_path / "ids.npy", np.arange(9, dtype=np.int64))
    with pytest.raises(ValueError, match=r"10 vectors, ids\.npy 9 ids"):
        PassageIndex.load(tmp_path)


# ----------------------------------------------------------------------------- ANN types


def test_hnsw_builds_searches_and_recalls(ann_data: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = ann_data
    config = IndexConfig(factory="HNSW32", ef_search=128, use_gpu=False)
    index = PassageIndex.build(_batches(np.arange(len(base)), base, [1000, 1000]), DIM, config)
    assert faiss.downcast_index(index.faiss_index).hnsw.efSearch == 128

    _, rows = index.search(queries, k=10)

    assert _recall(rows, _exact(queries, base, 10)[1]) >= 0.9


def test_ivfpq_builds_searches_and_recalls(ivfpq_index: PassageIndex, ann_data: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = ann_data
    ivf = faiss.extract_index_ivf(ivfpq_index.faiss_index)
    assert ivf.nprobe == 16 and ivf.nlist == 16 and ivfpq_index.ntotal == len(base)
    assert not faiss.downcast_index(ivf).do_polysemous_training  # seconds per sub-quantizer, never used

    scores, rows = ivfpq_index.search(queries, k=10)

    assert (rows >= 0).all() and np.isfinite(scores).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    assert _recall(rows, _exact(queries, base, 10)[1]) >= 0.5


def test_train_sample_is_subsampled_to_train_size(ann_data: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = ann_data
    config = IndexConfig(factory="IVF8,Flat", train_size=400, seed=3, nprobe=1, use_gpu=False)
    index = PassageIndex.build([(np.arange(len(base)), base)], DIM, config, train_sample=base)
    # same result as training on exactly the rows training_rows picks
    rows = training_rows(len(base), config)
    assert len(rows) == 400 and (np.diff(rows) > 0).all()
    reference = PassageIndex.build([(np.arange(len(base)), base)], DIM, config, train_sample=base[rows])
    np.testing.assert_array_equal(index.search(queries, 5)[1], reference.search(queries, 5)[1])
    np.testing.assert_array_equal(training_rows(len(base), config), rows)  # deterministic
    np.testing.assert_array_equal(training_rows(300, config), np.arange(300))


# ----------------------------------------------------------------------------- errors


def test_missing_train_sample_is_a_clear_error(ann_data: tuple[np.ndarray, np.ndarray]) -> None:
    base, _ = ann_data
    with pytest.raises(ValueError, match=r"'IVF16,Flat' needs training: pass train_sample"):
        PassageIndex.build([(np.arange(10), base[:10])], DIM, IndexConfig(factory="IVF16,Flat"))


def test_bad_train_sample_is_a_clear_error(ann_data: tuple[np.ndarray, np.ndarray]) -> None:
    base, _ = ann_data
    config = IndexConfig(factory="IVF16,Flat", use_gpu=False)
    with pytest.raises(ValueError, match=r"train_sample must have shape \(n, 64\)"):
        PassageIndex.build([], DIM, config, train_sample=base[:, :32])
    with pytest.raises(ValueError, match="training 'IVF16,Flat' on 8 vectors failed"):
        PassageIndex.build([], DIM, config, train_sample=base[:8])


def test_query_dim_and_k_errors(small: tuple[np.ndarray, np.ndarray]) -> None:
    base, queries = small
    index = PassageIndex.build([(np.arange(len(base)), base)], DIM, IndexConfig(factory="Flat", use_gpu=False))
    with pytest.raises(ValueError, match=r"queries must have shape \(n, 64\)"):
        index.search(queries[:, :32], k=5)
    with pytest.raises(ValueError, match=r"queries must have shape"):
        index.search(np.zeros((2, 3, DIM), dtype=np.float32), k=5)
    for bad_k in (0, -1):
        with pytest.raises(ValueError, match="k must be a positive int"):
            index.search(queries, k=bad_k)
    with pytest.raises(ValueError, match="batch_size"):
        index.search(queries, k=5, batch_size=0)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full(DIM, np.nan, dtype=np.float32), k=5)


def test_bad_batches_are_rejected(small: tuple[np.ndarray, np.ndarray]) -> None:
    base, _ = small
    config = IndexConfig(factory="Flat", use_gpu=False)
    cases = [
        ([(np.arange(5), base[:5, :10])], r"batch 0 vectors must have shape \(n, 64\)"),
        ([(np.arange(5), base[:5]), (np.arange(5, 9), base[5:10])], "batch 1: 4 row_ids but 5 vectors"),
        ([(np.arange(5).astype(np.float64), base[:5])], "1-D integer array"),
        ([(np.array([0, 1, -1]), base[:3])], ">= 0"),
        ([(np.arange(3), base[:3]), (np.array([7, 2]), base[3:5])], "occur more than once"),
        ([(np.arange(2), np.full((2, DIM), np.inf, dtype=np.float32))], "NaN or inf"),
    ]
    for batches, message in cases:
        with pytest.raises(ValueError, match=message):
            PassageIndex.build(batches, DIM, config)


def test_config_validation_and_json() -> None:
    config = IndexConfig(factory="HNSW32", use_gpu=None)
    assert IndexConfig.model_validate(json.loads(json.dumps(config.model_dump(mode="json")))) == config
    for kwargs in ({"nprobe": 0}, {"train_size": -1}, {"ef_search": 1.5}, {"factory": ""}, {"factory": "IDMap,Flat"}):
        with pytest.raises(ValueError):
            IndexConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bogus"):
        IndexConfig.model_validate({"factory": "Flat", "bogus": 1})
    with pytest.raises(ValueError, match="invalid faiss factory string 'NotAnIndex'"):
        PassageIndex.build([], DIM, IndexConfig(factory="NotAnIndex"))
    with pytest.raises(ValueError, match="resolve it"):
        PassageIndex.build([], DIM, IndexConfig())


def test_the_auto_index_rule() -> None:
    """Exact below 32,768 passages; above, IVF at about 4 sqrt(n) lists and PQ of about dim / 12 bytes (a divisor of
    dim), re-ranked from 30 x k candidates; a factory given is kept."""
    assert IndexConfig().resolved(32_767, 384).factory == "Flat"
    assert IndexConfig().resolved(1_000_000, 384).factory == "IVF4096,PQ32x8"
    assert IndexConfig().resolved(22_000_000, 768).factory == "IVF16384,PQ64x8"
    assert IndexConfig().resolved(100_000, 64).factory == "IVF1024,PQ4x8"
    assert IndexConfig().rerank == 30
    assert IndexConfig(factory="HNSW32").resolved(10**6, 384).factory == "HNSW32"


def test_use_gpu_true_without_gpu_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(ValueError, match="use_gpu=True but faiss sees no GPU"):
        PassageIndex.build([], DIM, IndexConfig(factory="Flat", use_gpu=True))
    assert not PassageIndex.build([], DIM, IndexConfig(factory="Flat", use_gpu=None)).on_gpu


def test_gpu_path_with_fake_gpu_faiss(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, small: tuple[np.ndarray, np.ndarray]
) -> None:
    """The GPU code path with CPU clones standing in for GPU faiss: placement, fallback, save as CPU."""
    base, queries = small
    moved: list[str] = []

    def to_gpus(index: object) -> object:
        if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
            raise RuntimeError("This index type is not implemented on GPU.")
        moved.append("to")
        return faiss.clone_index(index)

    def to_cpu(index: object) -> object:
        moved.append("back")
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", to_cpu, raising=False)

    index = PassageIndex.build([(np.arange(len(base)), base)], DIM, IndexConfig(factory="Flat"))
    assert index.on_gpu and moved == ["to"]
    expected = _exact(queries, base, 5)[1]
    np.testing.assert_array_equal(index.search(queries, 5)[1], expected)
    index.save(tmp_path)
    assert moved == ["to", "back"]
    assert PassageIndex.load(tmp_path).on_gpu
    assert not PassageIndex.load(tmp_path, use_gpu=False).on_gpu

    hnsw = PassageIndex.build([(np.arange(len(base)), base)], DIM, IndexConfig(factory="HNSW32"))
    assert not hnsw.on_gpu  # None: falls back to CPU
    with pytest.raises(ValueError, match="cannot run on GPU"):
        PassageIndex.build([], DIM, IndexConfig(factory="HNSW32", use_gpu=True))


# ----------------------------------------------------------------------------- updates: add and remove


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", IVFPQ])
def test_removed_rows_are_never_found_and_added_ones_are(
    factory: str, ann_data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A store update: rows removed from a trained index are skipped by every search (even asked for all rows), rows
    added are found, and both survive save and load; the trained structure is kept (no retraining)."""
    base, queries = ann_data
    first, extra = base[:1500], base[1500:]
    config = IndexConfig(factory=factory, nprobe=64, train_size=1000, use_gpu=False)
    index = PassageIndex.build([(np.arange(1500), first)], DIM, config, train_sample=first)
    removed = np.arange(0, 1500, 3)
    assert index.remove(removed) == len(removed) and index.remove(removed) == 0
    index.add(np.arange(1500, 2000), extra)
    with pytest.raises(ValueError, match="more than once"):
        index.add(np.array([1600]), extra[:1])
    index.save(tmp_path)
    for searched in (index, PassageIndex.load(tmp_path, use_gpu=False)):
        assert searched.ntotal == 2000 - len(removed) and searched.num_removed == len(removed)
        _, rows = searched.search(np.concatenate([queries, base[removed[:20]]]), k=2000)
        found = rows[rows >= 0]
        assert not np.isin(found, removed).any()
        _, own = searched.search(extra[:20], k=1)  # an added row is its own nearest neighbour
        assert np.mean(own[:, 0] == np.arange(1500, 1520)) >= (1.0 if factory == "Flat" else 0.8)
