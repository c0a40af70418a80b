"""The memory store: sharded, memory-mapped per-token codes with per-passage offsets, passage metadata in parquet.
A store built without memory (`BuildConfig.memory` false: for fid readers, which read passage text) has no codec
and no codes or offsets; `has_memory` says which, and asking it for memory is a `NoMemoryError`.

Layout of a store directory::

    manifest.json                       the memvq-store header (memory.artifact) of the store's current generation,
                                        written last: a store is complete iff it exists; build config, backbone,
                                        codec, counts, shards, the build (or update) report and the size and sha256
                                        of every file it reads
    build_config.json, corpus.json      the build's config and corpus record (what a resume must match)
    plan.json                           the build's plan: documents, passages, shard sizes
    codec/                              (memory) the codec that made the codes (load with
                                        memory.codecs.load_codec) and source.json, where the build took it from
    index/                              the FAISS passage index (memory.index.PassageIndex)
    lexical/                            (BuildConfig.lexical) the BM25 index of the passages (retrieval.lexical)
    shards/shard-00000.passages.parquet passage rows [start, start + n) with their text and KILT provenance
    shards/shard-00000.codes.npy        (memory) 'tokens m' uint8/uint16 codes of every token of those passages
    shards/shard-00000.offsets.npy      (memory) 'n+1' int64: passage i's tokens are codes[offsets[i]:offsets[i+1]]
    shards/shard-00000.emb.npy          'n d' float16 dense passage embeddings (the index's input)
    shards/shard-00000.done.json        the shard's done marker: its counts and the sha256 of its files
    generations/00001/                  an update's (or compaction's) generation: its job record, its index,
                                        deleted.npy (the rows deleted so far) and its manifest, published by
                                        replacing manifest.json in one step (`memvq.pipelines.update`);
                                        generations/00000/manifest.json keeps the build's manifest once updated
    .writer.lock                        held (flock) by the update or compaction writing the store

Generations: a build is generation 0. An update adds shards (new files; the rows after the last) and writes a new
index and a new manifest naming its parent's; nothing a published manifest names is changed in place, so a reader
keeps its generation while the next one is written, and sees the next one when it opens the store again.

Passages are addressed by their global row id (0 .. num_rows - 1), the id the FAISS index returns; `num_passages`
counts the rows not deleted by an update (the index never returns a deleted one).
`get` reads only the rows asked for through memory maps, so it stays fast when the store exceeds RAM.

Opening a store verifies it (unless `verify=False`): the manifest's own checksum, every file's size and sha256
(remembered per file in `memvq.memory.integrity.VerifiedFiles`, so a second open hashes only files that changed),
and the manifest's derived fields (row starts, passage and token counts, code width) against the shard files. `watch`
then tells a long-running reader (the server) when a file changes under it. A file that cannot be read is a
`StoreReadError` naming it, never a library's traceback.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from memvq.memory.artifact import (
    CHECKSUM_KEY,
    MANIFEST_NAME,
    ArtifactError,
    ArtifactFormat,
    ArtifactHeader,
    ManifestError,
    read_artifact,
    sha256_file,
)
from memvq.memory.codecs import CODEC_FILE, MemoryCodec, load_codec
from memvq.memory.index import PassageIndex, exact_scores, rerank_exact
from memvq.memory.integrity import FileWatch, VerifiedFiles
from memvq.memory.location import is_uri

STORE_FORMAT = ArtifactFormat("memvq-store", 3, remake="rebuild it with `memvq build-index`")
MEMORY_SUFFIXES = ("codes.npy", "offsets.npy")  # the shard files of a store with memory only
# what reading a damaged file raises from numpy, pyarrow and faiss
_READ_ERRORS = (OSError, ValueError, EOFError, RuntimeError, pa.ArrowException)


class StoreReadError(ArtifactError):
    """A store file could not be read or does not agree with the manifest."""


class NoMemoryError(ValueError):
    """The store was built without memory (`BuildConfig.memory` false) and something asked it for memory."""


def shard_suffixes(memory: bool) -> tuple[str, ...]:
    """The files of a shard besides its done marker, the passages first: with `memory`, its codes and offsets."""
    return ("passages.parquet", *(MEMORY_SUFFIXES if memory else ()), "emb.npy")


@dataclass(frozen=True)
class StoreLayout:
    """Where each file of a store lives."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def build_config(self) -> Path:
        """The config the build was started with (precision resolved): a resume must bring the same."""
        return self.root / "build_config.json"

    @property
    def corpus_record(self) -> Path:
        """The corpus the store is built from: each file's path, size and sha256 (a resume must read the same)."""
        return self.root / "corpus.json"

    @property
    def plan(self) -> Path:
        """The plan step's marker: document, passage and shard counts (the passages' shards are written)."""
        return self.root / "plan.json"

    @property
    def codec_dir(self) -> Path:
        return self.root / "codec"

    @property
    def codec_source(self) -> Path:
        """Where the build took its codec from (shipped, given with --codec-from, or fitted on the corpus)."""
        return self.codec_dir / "source.json"

    @property
    def codec_file(self) -> Path:
        """The codec's header, written last: the codec directory is complete iff it exists."""
        return self.codec_dir / CODEC_FILE

    @property
    def index_dir(self) -> Path:
        """The build's index (generation 0); a later generation's is `generation_dir(g) / "index"`."""
        return self.root / "index"

    @property
    def lexical_dir(self) -> Path:
        """The build's BM25 index (generation 0); a later generation's is `generation_dir(g) / "lexical"`."""
        return self.root / "lexical"

    @property
    def generations_dir(self) -> Path:
        return self.root / "generations"

    def generation_dir(self, generation: int) -> Path:
        """Where an update writes generation `generation` (> 0) before publishing it, and keeps its files."""
        return self.generations_dir / f"{generation:05d}"

    @property
    def writer_lock(self) -> Path:
        """The lock file an update or compaction holds while it writes the store."""
        return self.root / ".writer.lock"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard_file(self, shard: int, suffix: str) -> Path:
        return self.shards_dir / f"shard-{shard:05d}.{suffix}"

    def shard_done(self, shard: int) -> Path:
        """The marker a shard's encoder writes last, with the sha256 of the shard's files."""
        return self.shards_dir / f"shard-{shard:05d}.done.json"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


class MemoryStore:
    """Read access to a finished store: codes by passage row, passage metadata, codec and index."""

    def __init__(
        self, root: Path, manifest: dict[str, Any], cache_shards: int = 64, watch: FileWatch | None = None
    ) -> None:
        """`manifest`: the store's header as JSON (`ArtifactHeader.to_json`); `watch`: the verified files' stamps."""
        self.layout = StoreLayout(root)
        self.manifest = manifest
        shards = manifest["shards"]
        self._row_starts = np.array([shard["row_start"] for shard in shards], dtype=np.int64)
        self._shard_ids = [int(shard["shard"]) for shard in shards]
        self.generation = int(manifest["generation"])
        self.num_rows = int(manifest["num_rows"])
        self.num_passages = int(manifest["num_passages"])
        self.num_tokens = int(manifest["num_tokens"])
        self.watch = watch
        self._cache_size = cache_shards
        self._arrays: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, manifest: Path | None = None) -> MemoryStore:
        """Open a store. `verify`: check the manifest's checksum, every file's sha256 (hashing only files not
        verified before in their present state) and the manifest's counts against the shard files; without it
        only the manifest's checksum and the files' sizes are checked. `manifest`: open the generation this
        manifest describes (an update checks its generation so before publishing it); default the store's."""
        if is_uri(path):
            raise ManifestError(f"{path} is a URI: copy the store to local disk first (`memvq fetch {path} DIR`)")
        root = Path(path)
        if not root.is_dir():
            raise ManifestError(f"no memory store at {root}: the directory does not exist")
        manifest_path = root / MANIFEST_NAME if manifest is None else Path(manifest)
        if not manifest_path.is_file():
            raise ManifestError(
                f"{root} has no store manifest ({MANIFEST_NAME}, written when a build finishes): if its build was "
                "stopped, run the same build-index command again to finish it"
            )
        try:
            # the manifest's sha256 as read: a generation published meanwhile changes it, so the watch sees it
            manifest_sha256 = sha256_file(manifest_path)
            header = read_artifact(manifest_path, STORE_FORMAT, "store manifest")
            if sha256_file(manifest_path) != manifest_sha256:
                return cls.open(path, verify, manifest)  # replaced between the two reads: read the new one
            if not verify:
                header.verify(root, checksums=False)
                return cls(root, header.to_json())
            verified = VerifiedFiles(root)
            header.verify(root, sha256=verified.sha256)
        except ArtifactError as error:
            raise ManifestError(str(error)) from error
        fields = header.to_json()
        watched = {manifest_path.relative_to(root).as_posix(): manifest_sha256}
        store = cls(root, fields, watch=FileWatch(root, header.files, watched))
        # the derived fields depend only on the manifest and the files: checked again when either changed
        if verified.hashed_bytes or verified.checked != fields[CHECKSUM_KEY]:
            store.check_shards(header)
            verified.remember_checked(fields[CHECKSUM_KEY])
        verified.save()
        return store

    def check_shards(self, header: ArtifactHeader) -> None:
        """The manifest's derived fields against the shard files: row starts follow the passage counts, each
        shard's offsets, codes, embeddings and parquet rows agree with its counts, and the totals add up."""
        shards = header.extra["shards"]
        row = 0
        for entry in shards:
            shard, passages, tokens = int(entry["shard"]), int(entry["passages"]), int(entry["tokens"])
            if int(entry["row_start"]) != row:
                raise StoreReadError(
                    f"{self.layout.manifest}: shard {shard} starts at row {entry['row_start']}, the shards before it "
                    f"hold {row} passages; {STORE_FORMAT.remake}"
                )
            row += passages
            emb = self._read(self.layout.shard_file(shard, "emb.npy"), lambda path: np.load(path, mmap_mode="r"))
            parquet = self.layout.shard_file(shard, "passages.parquet")
            rows = self._read(parquet, lambda path: pq.ParquetFile(path).metadata.num_rows)
            problems = self._memory_problems(shard, passages, tokens) if self.has_memory else []
            if emb.shape[0] != passages:
                problems.append(f"{emb.shape[0]} embeddings, expected {passages}")
            if rows != passages:
                problems.append(f"{parquet.name} holds {rows} rows, expected {passages}")
            if problems:
                raise StoreReadError(
                    f"{self.layout.shards_dir}: shard {shard} disagrees with the manifest: {'; '.join(problems)}"
                )
        totals = (row, sum(int(entry["tokens"]) for entry in shards))
        if totals != (self.num_rows, self.num_tokens):
            raise StoreReadError(
                f"{self.layout.manifest}: the shards hold {totals[0]} passages and {totals[1]} tokens, the manifest "
                f"says {self.num_rows} and {self.num_tokens}"
            )
        if self.num_rows - len(self.deleted_rows()) != self.num_passages:
            raise StoreReadError(
                f"{self.layout.manifest}: {self.num_rows} rows less {len(self.deleted_rows())} deleted are not the "
                f"{self.num_passages} passages it says"
            )

    def _memory_problems(self, shard: int, passages: int, tokens: int) -> list[str]:
        """How a shard's offsets and codes disagree with its counts (none: an empty list)."""
        offsets_path = self.layout.shard_file(shard, "offsets.npy")
        offsets = self._read(offsets_path, lambda path: np.load(path, mmap_mode="r"))
        codes = self._read(self.layout.shard_file(shard, "codes.npy"), lambda path: np.load(path, mmap_mode="r"))
        problems = []
        if offsets.shape != (passages + 1,) or int(offsets[0]) != 0 or int(offsets[-1]) != tokens:
            problems.append(f"{offsets_path.name} does not hold {passages} passages of {tokens} tokens")
        elif np.any(np.diff(offsets) < 0):
            problems.append(f"{offsets_path.name} is not increasing")
        if codes.shape != (tokens, self.code_width):
            problems.append(f"codes {codes.shape}, expected ({tokens}, {self.code_width})")
        return problems

    @staticmethod
    def _read(path: Path, read: Any) -> Any:
        """`read(path)`, with what a damaged file raises turned into a StoreReadError naming the file."""
        try:
            return read(path)
        except _READ_ERRORS as error:
            raise StoreReadError(
                f"cannot read {path}: {error} (the store is damaged; {STORE_FORMAT.remake})"
            ) from error

    @property
    def has_memory(self) -> bool:
        """Whether the store holds per-token memory (codes and their codec); without it, passages and the dense
        index only (`BuildConfig.memory` false: what a fid reader reads)."""
        return self.manifest.get("codec") is not None

    def _require_memory(self) -> None:
        if not self.has_memory:
            raise NoMemoryError(
                f"the store {self.layout.root} was built without memory (memory = false): it holds passages and "
                "the dense index, what a fid reader reads; a reader of memory (lumen, glimmer) needs a store "
                "built with memory (build-index --memory)"
            )

    @property
    def code_width(self) -> int:
        self._require_memory()
        return int(self.manifest["codec"]["code_width"])

    @cached_property
    def codec(self) -> MemoryCodec:
        self._require_memory()
        return load_codec(self.layout.codec_dir)

    @property
    def index_dir(self) -> Path:
        """This generation's index directory."""
        return self.layout.root / self.manifest["index"]

    @cached_property
    def index(self) -> PassageIndex:
        index = self._read(self.index_dir, PassageIndex.load)
        if index.ntotal != self.num_passages:
            raise StoreReadError(
                f"{self.index_dir}: the index holds {index.ntotal} passages, the store {self.num_passages}"
            )
        return index

    def search(self, queries: np.ndarray, k: int, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages by inner product: (scores 'q k' float32, rows 'q k' int64), best first, -inf / -1 where
        the store holds fewer. An approximate index (any but Flat) gives `rerank` x k candidates (None: its config's
        `rerank`), re-scored exactly with the stored fp16 embeddings (memory-mapped: only the candidates' rows are
        read)."""
        factor = 1 if self.index.config.factory == "Flat" else rerank or self.index.config.rerank
        scores, rows = self.index.search(queries, k * factor)
        if factor == 1:
            return scores, rows
        return rerank_exact(queries, rows, self.embeddings_of, k)

    def scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact inner products 'q k' of queries 'q d' with their passages `rows` 'q k' (-inf where a row is -1)."""
        return exact_scores(queries, rows, self.embeddings_of)

    def embeddings_of(self, rows: Any) -> np.ndarray:
        """Dense embeddings of passages 'n d' float32, in the order of `rows` (read through the shards' maps)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        positions = self._locate(rows)
        out: np.ndarray | None = None
        for position in np.unique(positions).tolist():
            chosen = positions == position
            emb = self.embeddings(self._shard_ids[position])
            if out is None:
                out = np.empty((len(rows), emb.shape[1]), dtype=np.float32)
            out[chosen] = emb[rows[chosen] - int(self._row_starts[position])]
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    @property
    def lexical_dir(self) -> Path | None:
        """This generation's BM25 index directory (None: the store was built without one)."""
        name = self.manifest.get("lexical")
        return None if name is None else self.layout.root / name

    @property
    def default_retrieval(self) -> str:
        """The retrieval mode a query gets unless it asks for another (the build config's `retrieval`)."""
        return str(self.manifest["config"].get("retrieval", "dense"))

    def deleted_rows(self) -> np.ndarray:
        """The rows updates deleted, sorted int64 (empty for a store never updated, or compacted since)."""
        return self._deleted

    @cached_property
    def _deleted(self) -> np.ndarray:
        name = self.manifest.get("deleted")
        if name is None:
            return np.empty(0, dtype=np.int64)
        return self._read(self.layout.root / name, np.load)

    def shard_rows(self) -> list[tuple[int, int, int]]:
        """(shard, first row, passages) of every shard, in row order."""
        return [
            (int(entry["shard"]), int(entry["row_start"]), int(entry["passages"])) for entry in self.manifest["shards"]
        ]

    def _locate(self, rows: np.ndarray) -> np.ndarray:
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            bad = rows[(rows < 0) | (rows >= self.num_rows)]
            raise IndexError(f"passage rows {bad.tolist()} out of range [0, {self.num_rows})")
        return np.searchsorted(self._row_starts, rows, side="right") - 1

    def _shard_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes 'tokens m', offsets 'n+1') of one shard, memory-mapped; a small LRU keeps the maps open."""
        if shard in self._arrays:
            self._arrays.move_to_end(shard)
            return self._arrays[shard]
        codes = self._read(self.layout.shard_file(shard, "codes.npy"), lambda path: np.load(path, mmap_mode="r"))
        offsets = self._read(self.layout.shard_file(shard, "offsets.npy"), lambda path: np.load(path, mmap_mode="r"))
        self._arrays[shard] = (codes, offsets)
        if len(self._arrays) > self._cache_size:
            self._arrays.popitem(last=False)
        return codes, offsets

    def get(self, rows: Any, max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Codes of passages: rows 'b' -> (codes 'b l m' zero-padded, mask 'b l' bool); l = longest passage."""
        self._require_memory()
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        positions = self._locate(rows)
        pieces = []
        for row, position in zip(rows.tolist(), positions.tolist(), strict=True):
            codes, offsets = self._shard_arrays(self._shard_ids[position])
            local = row - int(self._row_starts[position])
            start, stop = int(offsets[local]), int(offsets[local + 1])
            if max_tokens is not None:
                stop = min(stop, start + max_tokens)
            pieces.append(codes[start:stop])
        length = max((len(piece) for piece in pieces), default=0)
        dtype = pieces[0].dtype if pieces else np.uint8
        out = np.zeros((len(rows), length, self.code_width), dtype=dtype)
        mask = np.zeros((len(rows), length), dtype=bool)
        for i, piece in enumerate(pieces):
            out[i, : len(piece)] = piece
            mask[i, : len(piece)] = True
        return out, mask

    def get_memory(
        self, rows: Any, device: str | torch.device = "cpu", max_tokens: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded memory vectors: rows 'b' -> (memory 'b l d' float32, mask 'b l' bool), on `device`."""
        codes, mask = self.get(rows, max_tokens=max_tokens)
        memory = self.codec.decode(torch.from_numpy(codes.astype(np.int64)).to(device))
        return memory, torch.from_numpy(mask).to(device)

    def _shard_table(self, shard: int) -> pa.Table:
        if shard in self._tables:
            self._tables.move_to_end(shard)
            return self._tables[shard]
        table = self._read(
            self.layout.shard_file(shard, "passages.parquet"), lambda path: pq.read_table(path, memory_map=True)
        )
        self._tables[shard] = table
        if len(self._tables) > self._cache_size:
            self._tables.popitem(last=False)
        return table

    def passages(self, rows: Any) -> list[dict[str, Any]]:
        """Passage metadata (passage_id, doc_id, title, text, KILT paragraph range, ...) for rows, in order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        positions = self._locate(rows)
        out = []
        for row, position in zip(rows.tolist(), positions.tolist(), strict=True):
            table = self._shard_table(self._shard_ids[position])
            record = table.slice(row - int(self._row_starts[position]), 1).to_pylist()[0]
            out.append({"row": row, **record})
        return out

    def embeddings(self, shard: int) -> np.ndarray:
        """Dense passage embeddings 'n d' (float16, memory-mapped) of one shard."""
        return self._read(self.layout.shard_file(shard, "emb.npy"), lambda path: np.load(path, mmap_mode="r"))
