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

from encoders.config import ReaderConfig
from encoders.options import QueryOptions
from memory.store import MemoryStore
from pipelines.build import build_index
from pipelines.config import BuildConfig, TrainConfig
from pipelines.evaluate import EvalSettings, evaluate
from pipelines.rag import RAGPipeline
from pipelines.train import train

__all__ = [
    "BuildConfig",
    "EvalSettings",
    "MemoryStore",
    "QueryOptions",
    "RAGPipeline",
    "ReaderConfig",
    "TrainConfig",
    "build_index",
    "evaluate",
    "train",
]
