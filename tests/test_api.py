"""The package face: `from memvq import ...` gives the API, and the README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import memvq

README = Path(__file__).resolve().parents[1] / "README.md"
CORPUS = "../shared/data/nq_open_oracle/wiki-mini-knowledgesource.jsonl"
QUESTIONS = "../shared/data/nq_open_oracle/nq-oracle-dev-kilt.jsonl"


def readme_example() -> str:
    """The ```python block under the README's "The Python API" heading."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## The Python API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no ```python block under '## The Python API' in the README"
    return match.group(1)


def test_face_exports_the_api():
    for name in ("RAGPipeline", "MemoryStore", "build_index", "train", "evaluate", "QueryOptions"):
        assert name in memvq.__all__
    for name in ("BuildConfig", "TrainConfig", "ReaderConfig"):
        assert name in memvq.__all__
    assert all(getattr(memvq, name) is not None for name in memvq.__all__)
    assert (
        memvq.evaluate.__module__ == "memvq.pipelines.evaluate"
        and memvq.build_index.__module__ == "memvq.pipelines.build"
    )


@pytest.mark.slow
def test_readme_python_example_runs(shared_data, mini_corpus, tmp_path, monkeypatch, capsys):
    code = readme_example()
    # the example's only inputs: the corpus (here the 40-page slice) and the questions; its outputs go under cwd
    assert CORPUS in code and QUESTIONS in code
    code = code.replace(CORPUS, str(mini_corpus))
    code = code.replace(QUESTIONS, str(shared_data / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl"))
    monkeypatch.chdir(tmp_path)
    names: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), names)

    result, store, report = names["result"], names["store"], names["report"]
    assert isinstance(result.answer, str)
    assert len(result.passages) == 5  # the embedded FiD reader reads all top_k
    passage = result.passages[result.span.passage]
    assert result.answer == passage.text[result.span.char_start : result.span.char_end] == "Wilhelm Conrad Röntgen"
    assert all(p.title and p.wikipedia_id and p.passage_id.startswith(p.wikipedia_id) for p in result.passages)
    provenance = result.kilt_output()["provenance"]
    assert [p["wikipedia_id"] for p in provenance] == [p.wikipedia_id for p in result.passages]
    assert "List of Nobel laureates in Physics" in [p.title for p in result.passages]  # the page with the answer
    assert set(result.timings_ms) >= {"retrieve", "memory", "live", "rerank", "decode", "total"}

    assert store.num_passages == names["built"].passages
    codes, mask = names["codes"], names["mask"]
    assert codes.shape[:2] == mask.shape and codes.shape[0] == 2 and mask.any(axis=1).all()

    nq = report["tasks"]["nq"]
    assert nq["questions"] == 20 and set(nq["metrics"]["downstream"]) >= {"em", "f1"}
    assert (tmp_path / "runs" / "api-eval" / "nq-predictions.jsonl").is_file()
    assert result.answer in capsys.readouterr().out
