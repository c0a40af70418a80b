"""FAISS dense passage index.

A :class:`PassageIndex` holds dense passage embeddings in a FAISS index (always inner-product metric)
together with a plain numpy id map: row ``i`` of the FAISS index is passage row ``ids[i]``. There is no
``faiss.IndexIDMap`` in the picture, which keeps GPU indexes and HNSW simple; search results are
mapped back through the id array.

Vectors are indexed as given: normalise them first if cosine similarity is wanted.

On disk a saved index is a directory with three files, each written atomically (temp name, then
``os.replace``; ``index.json`` is replaced last):

- ``index.faiss`` -- the FAISS index, always written as a CPU index;
- ``ids.npy``     -- int64 row ids, ``ids[i]`` = passage row of FAISS position ``i`` (mmapped on load);
- ``removed.npy`` -- (only once rows were removed) bool per FAISS position: the rows a store update deleted,
  never returned by a search (a faiss ``IDSelector`` skips them; the vectors stay until the store is compacted);
- ``index.json``  -- its ``memvq-index`` header (:mod:`memvq.memory.artifact`): the :class:`IndexConfig`, the other
  files' sizes and sha256, ``dim``, ``ntotal`` (searchable rows) and the faiss version.

An index grows with :meth:`PassageIndex.add` and loses rows with :meth:`PassageIndex.remove` (a store update: the
trained structure of an IVF or PQ index is kept, so an update costs what its own rows cost).
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from memvq.memory.artifact import ArtifactError, ArtifactFormat, atomic_write, read_artifact, save_npy, write_artifact

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
REMOVED_FILE = "removed.npy"
META_FILE = "index.json"
INDEX_FORMAT = ArtifactFormat("memvq-index", 2, remake="rebuild the store with `memvq build-index`")

#: The most results a GPU index returns per query (faiss-gpu's limit): its removed rows are filtered after a search.
GPU_MAX_K = 2048

#: The "auto" index is exact (Flat) for stores of fewer passages than this (`IndexConfig.resolved`).
AUTO_FLAT_BELOW = 32_768

#: FAISS k-means wants at least this many training points per centroid (it warns below).
MIN_POINTS_PER_CENTROID = 39


class IndexFileNotFoundError(FileNotFoundError, ArtifactError):
    """A saved index directory, or one of its files, is missing (``filename`` names the path)."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(errno.ENOENT, message, str(path))


class IndexConfig(BaseModel):
    """How to build and search a :class:`PassageIndex` (saved in the index header and the build config)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    factory: str = Field(
        "auto",
        min_length=1,
        description="faiss.index_factory string, e.g. Flat, HNSW32, IVF1024,PQ32x8 (the metric is always inner "
        "product, and no IDMap: the row ids live in ids.npy), or auto: Flat below 32,768 passages, else "
        "IVF{4 sqrt(n)},PQ{dim / 12}x8 re-ranked (`IndexConfig.resolved`)",
    )
    train_size: int = Field(
        100_000, ge=1, description="vectors of the training sample for index types that train (`training_rows`)"
    )
    nprobe: int = Field(16, ge=1, description="inverted lists visited per query (IVF)")
    ef_search: int = Field(128, ge=1, description="HNSW search breadth (efSearch), also of an IVF's HNSW quantizer")
    use_gpu: bool | None = Field(
        None, description="None: GPU faiss when available and the type supports it; True: require it; False: CPU"
    )
    seed: int = Field(0, description="seed of the training subsample")
    rerank: int = Field(
        30,
        ge=1,
        description="an approximate index (any but Flat) is asked for rerank x k candidates, which the store "
        "scores again by exact inner product with its fp16 embeddings (`MemoryStore.search`); 1: its own scores",
    )

    def resolved(self, num_passages: int, dim: int) -> IndexConfig:
        """This config with factory "auto" made concrete for `num_passages` vectors of `dim` (any other: itself).
        The rule, measured by bench/bench_index.py on 2 cores (docs/benchmarks.md, "The index rule"): exact Flat
        search below `AUTO_FLAT_BELOW` passages (14.6 ms a question at 100k, so under ~5 ms there); above, IVF with
        about 4 sqrt(n) lists and PQ of about dim / 12 bytes per vector, searched at nprobe 16 with `rerank` x k
        candidates re-scored exactly (at 1M: recall@10 0.994 of exact, 1.3 ms a question, 55 bytes per passage)."""
        if self.factory != "auto":
            return self
        factory = "Flat" if num_passages < AUTO_FLAT_BELOW else approximate_factory(num_passages, dim)
        return self.model_copy(update={"factory": factory})

    @field_validator("factory")
    @classmethod
    def _no_id_map(cls, factory: str) -> str:
        if not factory.strip():
            raise ValueError("the factory string is empty")
        if "IDMap" in factory:
            raise ValueError(f"{factory!r}: IDMap is not supported, PassageIndex keeps the row ids itself (ids.npy)")
        return factory


def approximate_factory(num_passages: int, dim: int) -> str:
    """The auto rule's approximate index for `num_passages` vectors of `dim`: IVF with the power of two nearest
    4 sqrt(n) lists (1M -> 4096, 22M -> 16384), PQ with the largest divisor of dim up to dim / 12 one-byte codes
    (384 -> PQ32x8, 768 -> PQ64x8)."""
    lists = 2 ** round(math.log2(4 * math.sqrt(max(1, num_passages))))
    codes = max(m for m in range(1, max(1, dim // 12) + 1) if dim % m == 0)
    return f"IVF{lists},PQ{codes}x8"


def training_rows(num_rows: int, config: IndexConfig) -> np.ndarray:
    """Sorted positions (int64) of the rows to train on: all rows, or ``config.train_size`` of them
    drawn without replacement with ``config.seed`` -- deterministic, so a build job can read only these."""
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if num_rows <= config.train_size:
        return np.arange(num_rows, dtype=np.int64)
    rng = np.random.default_rng(config.seed)
    return np.sort(rng.choice(num_rows, size=config.train_size, replace=False)).astype(np.int64)


# --------------------------------------------------------------------------- faiss helpers


def _new_cpu_index(factory: str, dim: int) -> Any:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"invalid faiss factory string {factory!r} for dim {dim}: {exc}") from exc
    # Polysemous training (on by default for 8-bit PQ from the factory) only serves polysemous
    # Hamming filtering, which this index never enables; it costs seconds per sub-quantizer.
    ivf = faiss.try_extract_index_ivf(index)
    core = faiss.downcast_index(ivf) if ivf is not None else _unwrap(index)
    if hasattr(core, "do_polysemous_training"):
        core.do_polysemous_training = False
    return index


def _unwrap(index: Any) -> Any:
    """The innermost index below IndexPreTransform / IndexRefine wrappers, downcast."""
    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return index


def _search_params(cpu_index: Any, config: IndexConfig) -> dict[str, int]:
    """The ParameterSpace settings that apply to this index type."""
    params: dict[str, int] = {}
    ivf = faiss.try_extract_index_ivf(cpu_index)
    if ivf is not None:
        params["nprobe"] = config.nprobe
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            params["quantizer_efSearch"] = config.ef_search
    elif isinstance(_unwrap(cpu_index), faiss.IndexHNSW):
        params["efSearch"] = config.ef_search
    return params


def _filtered_params(cpu_index: Any, config: IndexConfig, selector: Any) -> Any:
    """faiss SearchParameters of this index type (its nprobe / efSearch from `config`) that skip what `selector`
    rejects."""
    ivf = faiss.try_extract_index_ivf(cpu_index)
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = config.nprobe
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            quantizer = faiss.SearchParametersHNSW()
            quantizer.efSearch = config.ef_search
            params.quantizer_params = quantizer
    elif isinstance(_unwrap(cpu_index), faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = config.ef_search
    else:
        params = faiss.SearchParameters()
    params.sel = selector
    return params


def _apply_params(index: Any, params: Mapping[str, int], on_gpu: bool) -> None:
    space = faiss.GpuParameterSpace() if on_gpu and hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def _gpu_available() -> bool:
    # faiss-cpu defines get_num_gpus (returns 0) and even index_cpu_to_all_gpus; both checks are needed.
    return hasattr(faiss, "get_num_gpus") and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def _place(cpu_index: Any, params: Mapping[str, int], use_gpu: bool | None) -> tuple[Any, bool]:
    """Apply search params and move to all GPUs when ``use_gpu`` asks for it; returns (index, on_gpu)."""
    _apply_params(cpu_index, params, on_gpu=False)
    available = _gpu_available()
    if use_gpu is True and not available:
        raise ValueError("use_gpu=True but faiss sees no GPU (faiss-cpu, or faiss.get_num_gpus() == 0)")
    if not (use_gpu is True or (use_gpu is None and available)):
        return cpu_index, False
    try:
        gpu_index = faiss.index_cpu_to_all_gpus(cpu_index)
    except RuntimeError as exc:  # e.g. "This index type is not implemented on GPU" (HNSW)
        if use_gpu is True:
            raise ValueError(f"this index type cannot run on GPU: {exc}") from exc
        logger.info("index type not supported by GPU faiss (%s); searching on CPU", exc)
        return cpu_index, False
    _apply_params(gpu_index, params, on_gpu=True)
    return gpu_index, True


# --------------------------------------------------------------------------- input checks


def _check_dim(dim: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")


def _as_vectors(array: Any, dim: int, what: str) -> np.ndarray:
    vectors = np.asarray(array)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {vectors.shape}")
    if not (np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer)):
        raise ValueError(f"{what} must be a real-valued array, got dtype {vectors.dtype}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise ValueError(f"{what} contains NaN or inf")
    return vectors


def _check_batch(row_ids: Any, vectors: Any, dim: int, batch_no: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(row_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"batch {batch_no}: row_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    vecs = _as_vectors(vectors, dim, f"batch {batch_no} vectors")
    if len(ids) != len(vecs):
        raise ValueError(f"batch {batch_no}: {len(ids)} row_ids but {len(vecs)} vectors")
    if len(ids) and ids.min() < 0:
        raise ValueError(f"batch {batch_no}: row_ids must be >= 0 (-1 marks a missing result)")
    return ids.astype(np.int64, copy=False), vecs


def _check_unique(ids: np.ndarray) -> None:
    values, counts = np.unique(ids, return_counts=True)
    if len(values) != len(ids):
        dups = values[counts > 1]
        raise ValueError(f"{len(dups)} row ids occur more than once, e.g. {dups[:5].tolist()}")


# --------------------------------------------------------------------------- the index


class PassageIndex:
    """Dense passage embeddings in a FAISS index with the id map (row i of the index = passage row ids[i]).

    Build with :meth:`build` or :meth:`load`; the constructor is internal.
    """

    def __init__(
        self,
        index: Any,
        ids: np.ndarray,
        dim: int,
        config: IndexConfig,
        on_gpu: bool,
        removed: np.ndarray | None = None,
    ) -> None:
        if index.ntotal != len(ids):
            raise ValueError(f"faiss index holds {index.ntotal} vectors but the id map has {len(ids)}")
        self._index = index
        self._ids = ids
        self._dim = dim
        self._config = config
        self._on_gpu = on_gpu
        self._removed = np.zeros(len(ids), dtype=bool) if removed is None else np.array(removed, dtype=bool)
        if self._removed.shape != (len(ids),):
            raise ValueError(f"the removed mask has shape {self._removed.shape}, the index {len(ids)} rows")
        self._params: Any = None  # the search's filter, made when a search first needs it

    @classmethod
    def build(
        cls,
        embeddings: Iterable[tuple[np.ndarray, np.ndarray]],
        dim: int,
        config: IndexConfig,
        train_sample: np.ndarray | None = None,
    ) -> PassageIndex:
        """Build from a stream of ``(row_ids int64 (n,), vectors float32 (n, dim))`` batches.

        Batches are added to the index one by one (only the row ids are accumulated). Index types
        that need training (IVF, PQ, ...) are first trained on ``train_sample`` -- required for them --
        subsampled to ``config.train_size`` rows with ``config.seed`` when larger. The index is built
        on CPU, then moved to GPU per ``config.use_gpu``. Row ids must be unique and non-negative.
        """
        _check_dim(dim)
        dim = int(dim)
        if config.factory == "auto":
            raise ValueError("the index factory is auto: resolve it for the passage count first (IndexConfig.resolved)")
        started = time.perf_counter()
        index = _new_cpu_index(config.factory, dim)
        if not index.is_trained:
            if train_sample is None:
                raise ValueError(
                    f"index type {config.factory!r} needs training: pass train_sample, an (n, {dim}) sample "
                    "of the passage embeddings (e.g. the rows training_rows(num_passages, config) picks)"
                )
            cls._train(index, train_sample, dim, config)
        elif train_sample is not None:
            logger.debug("index type %r needs no training; train_sample ignored", config.factory)

        id_chunks: list[np.ndarray] = []
        for batch_no, (row_ids, vectors) in enumerate(embeddings):
            ids, vecs = _check_batch(row_ids, vectors, dim, batch_no)
            if len(ids) == 0:
                continue
            index.add(vecs)
            id_chunks.append(ids)
            logger.debug("batch %d: added %d vectors (%d so far)", batch_no, len(ids), index.ntotal)
        all_ids = np.concatenate(id_chunks) if id_chunks else np.empty(0, dtype=np.int64)
        _check_unique(all_ids)
        if len(all_ids) == 0:
            logger.warning("building %r index from an empty embedding stream", config.factory)
        logger.info(
            "built %r index: %d vectors of dim %d in %.1fs",
            config.factory,
            index.ntotal,
            dim,
            time.perf_counter() - started,
        )
        placed, on_gpu = _place(index, _search_params(index, config), config.use_gpu)
        return cls(placed, all_ids, dim, config, on_gpu)

    @staticmethod
    def _train(index: Any, train_sample: np.ndarray, dim: int, config: IndexConfig) -> None:
        sample = np.asarray(train_sample)
        if sample.ndim != 2 or sample.shape[1] != dim:
            raise ValueError(f"train_sample must have shape (n, {dim}), got {sample.shape}")
        rows = training_rows(len(sample), config)
        if len(rows) < len(sample):
            sample = sample[rows]
        sample = _as_vectors(sample, dim, "train_sample")
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and len(sample) < MIN_POINTS_PER_CENTROID * ivf.nlist:
            logger.warning(
                "training %r on %d vectors; faiss wants >= %d (%d per inverted list)",
                config.factory,
                len(sample),
                MIN_POINTS_PER_CENTROID * ivf.nlist,
                MIN_POINTS_PER_CENTROID,
            )
        started = time.perf_counter()
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise ValueError(f"training {config.factory!r} on {len(sample)} vectors failed: {exc}") from exc
        logger.info("trained %r on %d vectors in %.1fs", config.factory, len(sample), time.perf_counter() - started)

    # ----------------------------------------------------------------------- properties

    @property
    def ntotal(self) -> int:
        """Number of searchable passages (indexed, not removed)."""
        return len(self._ids) - int(self._removed.sum())

    @property
    def num_removed(self) -> int:
        """Rows removed by `remove` (still in the FAISS index, never returned)."""
        return int(self._removed.sum())

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim

    @property
    def config(self) -> IndexConfig:
        """The config the index was built (or loaded) with."""
        return self._config

    @property
    def ids(self) -> np.ndarray:
        """Row ids, ``ids[i]`` = passage row of FAISS position ``i``, removed ones too (read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on GPU faiss."""
        return self._on_gpu

    @property
    def faiss_index(self) -> Any:
        """The underlying FAISS index (CPU or GPU); positions, not row ids."""
        return self._index

    def __repr__(self) -> str:
        where = "gpu" if self._on_gpu else "cpu"
        return f"PassageIndex(factory={self._config.factory!r}, ntotal={self.ntotal}, dim={self._dim}, {where})"

    # ----------------------------------------------------------------------- updates

    def add(self, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows (new row ids only) to the trained index; an IVF or PQ index is not trained again."""
        ids, vecs = _check_batch(row_ids, vectors, self._dim, 0)
        _check_unique(np.concatenate([np.asarray(self._ids), ids]))
        if len(ids):
            self._index.add(vecs)
            self._ids = np.concatenate([np.asarray(self._ids), ids])
            self._removed = np.concatenate([self._removed, np.zeros(len(ids), dtype=bool)])
            self._params = None

    def remove(self, row_ids: np.ndarray) -> int:
        """Never return these rows again (their vectors stay in the FAISS index); returns how many were searchable."""
        hit = np.isin(self._ids, np.asarray(row_ids, dtype=np.int64)) & ~self._removed
        self._removed |= hit
        self._params = None
        return int(hit.sum())

    def _filter(self) -> Any:
        """The search parameters that skip removed rows (None: nothing is removed, or a GPU index, filtered after)."""
        if self._params is None and self._removed.any() and not self._on_gpu:
            self._bitmap = np.packbits(~self._removed, bitorder="little")  # both kept alive beside the params
            self._selector = faiss.IDSelectorBitmap(len(self._removed), faiss.swig_ptr(self._bitmap))
            self._params = _filtered_params(self._index, self._config, self._selector)
        return self._params

    # ----------------------------------------------------------------------- search

    def search(self, queries: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner-product search.

        Args:
            queries: ``(q, dim)`` or a single ``(dim,)`` query (treated as ``(1, dim)``).
            k: results per query (> 0); with fewer than ``k`` indexed passages the tail is padded.
            batch_size: queries per FAISS call.

        Returns:
            ``(scores float32 (q, k), row_ids int64 (q, k))``, best first; missing results have row id
            ``-1`` and score ``-inf``.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self._dim:
            raise ValueError(f"queries must have shape (n, {self._dim}) or ({self._dim},), got {np.shape(queries)}")
        q = _as_vectors(q, self._dim, "queries")
        k = int(k)
        num = len(q)
        scores = np.full((num, k), -np.inf, dtype=np.float32)
        rows = np.full((num, k), -1, dtype=np.int64)
        if self.ntotal == 0:
            return scores, rows
        params = self._filter()
        # a GPU index cannot take a selector: it is asked for the removed rows more and they are dropped after
        wanted = min(k + self.num_removed, max(k, GPU_MAX_K)) if params is None else k
        for start in range(0, num, batch_size):
            stop = min(start + batch_size, num)
            dist, pos = self._index.search(q[start:stop], wanted, params=params)
            if wanted > k:
                dist, pos = _drop_removed(dist, pos, self._removed, k)
            found = pos >= 0
            rows[start:stop][found] = self._ids[pos[found]]
            scores[start:stop] = np.where(found, dist, -np.inf)
        return scores, rows

    # ----------------------------------------------------------------------- persistence

    def save(self, directory: Path) -> None:
        """Write ``index.faiss`` (as a CPU index), ``ids.npy`` and ``index.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cpu_index = faiss.index_gpu_to_cpu(self._index) if self._on_gpu else self._index
        ids = np.asarray(self._ids, dtype=np.int64)
        atomic_write(directory / INDEX_FILE, lambda tmp: faiss.write_index(cpu_index, str(tmp)))
        save_npy(directory / IDS_FILE, ids)
        names = [INDEX_FILE, IDS_FILE]
        if self._removed.any():
            save_npy(directory / REMOVED_FILE, self._removed)
            names.append(REMOVED_FILE)
        write_artifact(  # last: a directory with index.json is complete
            directory,
            META_FILE,
            INDEX_FORMAT,
            self._config.model_dump(mode="json"),
            files={name: directory / name for name in names},
            extra={"dim": self._dim, "ntotal": self.ntotal, "faiss_version": faiss.__version__},
        )
        logger.info("saved %r index (%d vectors) to %s", self._config.factory, self.ntotal, directory)

    @classmethod
    def load(cls, directory: Path, use_gpu: bool | None = None) -> PassageIndex:
        """Load a saved index; ``ids.npy`` is memory-mapped.

        ``use_gpu`` has the :class:`IndexConfig` meaning (``None`` = GPU when available) and replaces the
        saved ``config.use_gpu``. Raises :class:`IndexFileNotFoundError` (a ``FileNotFoundError``) naming
        the missing directory or file, :class:`~memory.artifact.ArtifactError` for a header of another format or
        version, ``ValueError`` for inconsistent contents. The files' sha256 are not checked here (the store's
        manifest checks them).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise IndexFileNotFoundError(directory, "passage index directory not found")
        for name in (META_FILE, INDEX_FILE, IDS_FILE):
            if not (directory / name).is_file():
                raise IndexFileNotFoundError(
                    directory / name,
                    f"passage index file {name} missing (expected {INDEX_FILE}, {IDS_FILE}, {META_FILE})",
                )
        meta_path = directory / META_FILE
        header = read_artifact(meta_path, INDEX_FORMAT, "passage index header")
        try:
            config = IndexConfig.model_validate(header.config)
            dim, ntotal = int(header.extra["dim"]), int(header.extra["ntotal"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{meta_path}: not a valid passage index description: {exc}") from exc
        saved_with = header.extra.get("faiss_version")
        if saved_with != faiss.__version__:
            logger.info("index saved with faiss %s, loading with %s", saved_with, faiss.__version__)

        try:
            cpu_index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as exc:  # faiss's message carries a C++ trace; its last line says what it found
            reason = str(exc).strip().splitlines()[-1]
            raise ArtifactError(f"cannot read {directory / INDEX_FILE}: not a FAISS index ({reason})") from exc
        ids = np.load(directory / IDS_FILE, mmap_mode="r")
        if cpu_index.d != dim:
            raise ValueError(f"{directory / INDEX_FILE}: dim {cpu_index.d}, but {META_FILE} says {dim}")
        if ids.ndim != 1 or ids.dtype != np.int64:
            raise ValueError(f"{directory / IDS_FILE}: expected 1-D int64, got {ids.dtype} {ids.shape}")
        removed = np.load(directory / REMOVED_FILE) if REMOVED_FILE in header.files else None
        if removed is not None and (removed.dtype != np.bool_ or removed.shape != (len(ids),)):
            raise ValueError(
                f"{directory / REMOVED_FILE}: expected {len(ids)} bools, got {removed.dtype} {removed.shape}"
            )
        live = len(ids) - (0 if removed is None else int(removed.sum()))
        if not cpu_index.ntotal == len(ids) or live != ntotal:
            raise ValueError(
                f"{directory}: {INDEX_FILE} holds {cpu_index.ntotal} vectors, {IDS_FILE} {len(ids)} ids "
                f"({live} not removed), {META_FILE} says {ntotal}"
            )
        config = config.model_copy(update={"use_gpu": use_gpu})
        placed, on_gpu = _place(cpu_index, _search_params(cpu_index, config), use_gpu)
        logger.info("loaded %r index (%d vectors, dim %d) from %s", config.factory, ntotal, dim, directory)
        return cls(placed, ids, dim, config, on_gpu, removed)


def exact_scores(queries: np.ndarray, rows: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Inner products 'q c' float32 of each query with the vectors of its rows 'q c' (`vectors_of(rows)` -> 'n d');
    -inf where a row is -1."""
    queries = np.asarray(queries, dtype=np.float32).reshape(len(rows), -1)
    found = rows >= 0
    exact = np.full(rows.shape, -np.inf, dtype=np.float32)
    if found.any():
        vectors = np.asarray(vectors_of(rows[found]), dtype=np.float32)
        exact[found] = np.einsum("nd,nd->n", vectors, np.repeat(queries, found.sum(axis=1), axis=0))
    return exact


def rerank_exact(
    queries: np.ndarray, rows: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each query's candidate rows 'q c' (-1: none) by exact inner product with their vectors
    (`vectors_of(rows)` -> 'n d', e.g. a store's fp16 embeddings): (scores 'q k' float32, rows 'q k' int64)."""
    exact = exact_scores(queries, rows, vectors_of)
    best_scores, best_rows = top_k_by(exact, k, exact, rows)
    return best_scores, best_rows


def top_k_by(key: np.ndarray, k: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each of `arrays` 'q n' cut to its first k columns by `key` 'q n', highest first (ties in column order)."""
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    return tuple(np.take_along_axis(array, order, axis=1) for array in arrays)


def _drop_removed(dist: np.ndarray, pos: np.ndarray, removed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` results per query that are not removed (padded with -1 / -inf)."""
    out_dist = np.full((len(pos), k), -np.inf, dtype=np.float32)
    out_pos = np.full((len(pos), k), -1, dtype=np.int64)
    for i in range(len(pos)):
        keep = (pos[i] >= 0) & ~removed[np.maximum(pos[i], 0)]
        kept = np.flatnonzero(keep)[:k]
        out_dist[i, : len(kept)], out_pos[i, : len(kept)] = dist[i, kept], pos[i, kept]
    return out_dist, out_pos
