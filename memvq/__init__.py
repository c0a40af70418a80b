"""memvq: retrieval-augmented question answering over a compressed passage memory (LUMEN, GLIMMER, MEMORY-VQ).

The package face: build a store from a corpus, answer questions from it, train a reader, evaluate one::

    from memvq import BuildConfig, QueryOptions, RAGPipeline, build_index

    build_index("corpus.jsonl", "runs/my-store", BuildConfig())  # resumable
    rag = RAGPipeline.load("runs/my-store")  # the embedded default reader
    [result] = rag.answer(["who got the first nobel prize in physics"], QueryOptions(top_k=10, rerank_k=3))
    result.answer, result.kilt_output()["provenance"]

`train(store, out, TrainConfig)` fine-tunes a reader (it ends in OUT/reader, for `RAGPipeline.load(store,
model=...)`), `evaluate(rag, data_files, out_dir)` scores one on KILT question files, `MemoryStore.open(store)`
reads a store directly. See the README for the command line and the HTTP API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each name of the API and the module it comes from, imported on first use: `import memvq.memory.store` (or the
# command line) does not load the whole library.
_EXPORTS = {
    "BuildConfig": "memvq.pipelines.config",
    "EvalSettings": "memvq.pipelines.evaluate",
    "MemoryStore": "memvq.memory.store",
    "QueryOptions": "memvq.encoders.options",
    "RAGPipeline": "memvq.pipelines.rag",
    "ReaderConfig": "memvq.encoders.config",
    "TrainConfig": "memvq.pipelines.config",
    "build_index": "memvq.pipelines.build",
    "evaluate": "memvq.pipelines.evaluate",
    "train": "memvq.pipelines.train",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors: the same names, eagerly
    from memvq.encoders.config import ReaderConfig as ReaderConfig
    from memvq.encoders.options import QueryOptions as QueryOptions
    from memvq.memory.store import MemoryStore as MemoryStore
    from memvq.pipelines.build import build_index as build_index
    from memvq.pipelines.config import BuildConfig as BuildConfig
    from memvq.pipelines.config import TrainConfig as TrainConfig
    from memvq.pipelines.evaluate import EvalSettings as EvalSettings
    from memvq.pipelines.evaluate import evaluate as evaluate
    from memvq.pipelines.rag import RAGPipeline as RAGPipeline
    from memvq.pipelines.train import train as train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'memvq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
