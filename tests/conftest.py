"""Shared fixtures: where the real data lives, and skips with a clear reason when it is absent."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

TINY_CODEC = {
    "dim": 32,
    "segments": [{"dims": 32, "heads": 8}],
    "codebook_size": 16,
    "epochs": 1,
    "kmeans_iters": 4,
    "rotation_iters": 2,
}


def tiny_config(model: Path, **extra):
    """A build config for the tiny BERT: a small codec, 16-passage shards."""
    from memvq.pipelines.config import BuildConfig

    return BuildConfig.model_validate(
        {
            "encoder": {"model": str(model)},
            "codec": TINY_CODEC,
            "shard_size": 16,
            "codec_sample_passages": 64,
            **extra,
        }
    )


@pytest.fixture(scope="session", autouse=True)
def verified_cache(tmp_path_factory) -> Path:
    """Stores opened by the tests remember their verified checksums in a temporary cache, not the user's."""
    import os

    from memvq.memory.integrity import CACHE_ENV

    path = tmp_path_factory.mktemp("memvq-cache")
    os.environ[CACHE_ENV] = str(path)
    return path


def flip_byte(path: Path, at: int = -1, keep_mtime: bool = False) -> None:
    """Flip one bit of one byte in place (same size); with `keep_mtime` the modification time is set back
    afterwards."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    with open(path, "r+b") as handle:
        handle.write(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def store_bytes(root: Path) -> dict[str, str]:
    """sha256 of every file of a store (hidden ones too: no temporary may be left), the manifest aside."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


def assert_same_store(store: Path, reference: Path) -> None:
    """Byte-identical file for file; the manifests differ only in the run's report (timings) and their checksum."""
    assert store_bytes(store) == store_bytes(reference)

    def manifest(root: Path) -> dict:
        header = json.loads((root / "manifest.json").read_text())
        return {key: value for key, value in header.items() if key not in ("report", "header_sha256")}

    assert manifest(store) == manifest(reference)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@contextmanager
def two_node_cluster(staging: bool = False) -> Iterator[Any]:
    """Two Ray nodes of 1 CPU each on this machine (`ray.cluster_utils.Cluster`), their files in a directory of their
    own (`cluster.temp_dir`); with `staging`, each node stages in a directory of its own (MEMVQ_STAGING_DIR in its
    raylet's environment: `cluster.staging`). At the end every process of theirs must be gone."""
    from ray.cluster_utils import Cluster

    from memvq.memory.location import STAGING_ENV
    from memvq.pipelines import local_ray

    temp_dir = Path(tempfile.mkdtemp(prefix="memvq-cluster-"))
    args: dict[str, Any] = {"num_cpus": 1, "temp_dir": str(temp_dir)}
    dirs = [temp_dir / "node-a-staging", temp_dir / "node-b-staging"]
    env = [{"env_vars": {STAGING_ENV: str(path)}} if staging else {} for path in dirs]
    # Cluster writes the head's address to Ray's default temp dir (/tmp/ray) without creating it, which a machine
    # where Ray never ran lacks.
    (Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray").mkdir(exist_ok=True)
    started = None
    try:
        started = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False, **env[0]})
        started.temp_dir = temp_dir
        started.staging = dirs if staging else []
        started.add_node(**args, **env[1])
        started.wait_for_nodes()
        yield started
    finally:
        if started is not None:
            started.shutdown()
        left = local_ray.processes_using(temp_dir)
        local_ray.stop_processes(left)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert left == [], f"Ray processes left by the cluster: {left}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory) -> Path:
    """A tiny random BERT (3 layers, 32 dims) with MiniLM's real tokenizer, saved as a local checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from memvq.encoders.embedded import default_model_path

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_mpnet_path(tmp_path_factory) -> Path:
    """A tiny random MPNet (3 layers, 32 dims) with an MPNet tokenizer over MiniLM's vocabulary (MPNet's special
    tokens first, as all-mpnet-base-v2 has them), saved as a local checkpoint."""
    import torch
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    from memvq.encoders.embedded import default_model_path

    words = (Path(default_model_path()) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = ["<s>", "<pad>", "</s>", "<unk>", *(w for w in words if w not in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))]
    vocab.append("<mask>")
    path = tmp_path_factory.mktemp("tiny-mpnet")
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    MPNetModel(config, add_pooling_layer=False).save_pretrained(path)
    MPNetTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def mini_corpus(shared_data, tmp_path_factory) -> Path:
    """The first 40 pages of the shared KILT mini corpus (the Nobel physics page is the first)."""
    path = tmp_path_factory.mktemp("corpus") / "mini.jsonl"
    with open(shared_data / "nq_open_oracle" / "wiki-mini-knowledgesource.jsonl") as source:
        path.write_text("".join(line for _, line in zip(range(40), source, strict=False)))
    return path


@pytest.fixture(scope="session")
def tiny_store(tiny_bert_path, mini_corpus, tmp_path_factory) -> tuple[Path, object]:
    """A finished store of the 40-page mini corpus built with the tiny BERT (memory = 2 of 3 layers): (path, report)."""
    from memvq.pipelines.build import build_index

    out = tmp_path_factory.mktemp("stores") / "tiny"
    report = build_index(mini_corpus, out, tiny_config(tiny_bert_path))
    return out, report


@pytest.fixture(scope="session")
def tiny_reader_path(tiny_bert_path, tmp_path_factory) -> Path:
    """An untrained copying glimmer reader on the tiny BERT (fits `tiny_store`), saved as `memvq train` saves one."""
    import torch

    from memvq.encoders.backbone import Backbone
    from memvq.encoders.config import ReaderConfig
    from memvq.encoders.reader import Reader
    from memvq.encoders.reader_io import save_reader

    config = ReaderConfig(mode="glimmer", top_k=6, rerank_k=3, max_answer_tokens=4, decoder_layers=1, copy_answers=True)
    torch.manual_seed(0)
    reader = Reader.from_backbone(Backbone.from_pretrained(tiny_bert_path, alpha=config.live_fraction), config)
    return save_reader(reader, tmp_path_factory.mktemp("readers") / "tiny-glimmer")


@pytest.fixture(scope="session")
def tiny_extract_reader_path(tiny_bert_path, tmp_path_factory) -> Path:
    """An untrained glimmer reader with the extract head on the tiny BERT (fits `tiny_store`)."""
    import torch

    from memvq.encoders.backbone import Backbone
    from memvq.encoders.config import ReaderConfig
    from memvq.encoders.reader import Reader
    from memvq.encoders.reader_io import save_reader

    config = ReaderConfig(mode="glimmer", top_k=6, rerank_k=3, max_answer_tokens=4, head="extract")
    torch.manual_seed(0)
    reader = Reader.from_backbone(Backbone.from_pretrained(tiny_bert_path, alpha=config.live_fraction), config)
    return save_reader(reader, tmp_path_factory.mktemp("readers") / "tiny-extract")


def _minilm_build(corpus: Path, out: Path, **extra) -> Path:
    from memvq.pipelines.build import build_index
    from memvq.pipelines.config import BuildConfig

    build_index(corpus, out, BuildConfig.model_validate({"shard_size": 64, **extra}))
    return out


@pytest.fixture(scope="session")
def minilm_store(mini_corpus, tmp_path_factory) -> Path:
    """A store of the 40-page mini corpus built with the real embedded MiniLM, its memory in the default VQ codec
    (the one shipped for it: no fit), in the precision auto resolves to."""
    return _minilm_build(mini_corpus, tmp_path_factory.mktemp("stores") / "minilm")


@pytest.fixture(scope="session")
def demo_store(mini_corpus, tmp_path_factory) -> Path:
    """The same built as `make demo` builds one: without memory (its fid default reads passage text)."""
    return _minilm_build(mini_corpus, tmp_path_factory.mktemp("stores") / "demo", memory=False)


def gold_to_guess(record: dict) -> dict:
    """A perfect guess built from a gold record: its first answer and first non-empty evidence set.

    The answer is omitted when the gold record has none (e.g. an ELI5 record with only provenance) and
    the provenance is empty when it has no provenance. The oracle the metric tests score.
    """
    output: dict = {}
    answers = _gold_answer_list(record)
    if answers:
        output["answer"] = answers[0]
    provenance: list = []
    for out in record.get("output", []):
        if out.get("provenance"):
            provenance = [dict(p) for p in out["provenance"]]
            break
    output["provenance"] = provenance
    guess: dict = {"id": record["id"], "output": [output]}
    if "input" in record:
        guess["input"] = record["input"]
    return guess


def _gold_answer_list(record: dict) -> list:
    from memvq.data.kilt.records import gold_answer_list

    return gold_answer_list(record)
