"""Training questions: KILT and SQuAD files as (question, answers) examples, split into train / dev, mixed by task.

It owns turning a task file into `QAExample`s, the deterministic train / dev split (SQuAD by article, so no
paragraph is seen on both sides; KILT by id) and the multi-task schedule (which example every training slot
gets), which depends on the seed only so that a resumed run sees the same stream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import ijson
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from memvq.data.kilt.records import gold_answer_list, iter_kilt, record_id, record_input
from memvq.memory.artifact import atomic_write


class TaskConfig(BaseModel):
    """One training task: a question file, how it is split into train and dev, and its share of the mix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    path: str = Field(description="KILT jsonl (id, input, output answers) or SQuAD json")
    format: Literal["kilt", "squad"] = "kilt"
    dev_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="held out: by article (SQuAD) or by id (KILT)")
    weight: float = Field(1.0, gt=0.0, description="share of the training mix")
    max_dev: int = Field(200, ge=0, description="dev questions scored at each evaluation")
    unanswerable: bool = Field(
        False,
        description="SQuAD 2.0 (format squad): keep the questions its paragraph cannot answer (is_impossible), with "
        "the empty answer as gold: no span of any passage read is a positive, so the head learns its no-answer "
        "position. memvq eval does not score them (a KILT record without an answer); bench_squad2 does",
    )

    @model_validator(mode="after")
    def _unanswerable_is_squad(self) -> Self:
        if self.unanswerable and self.format != "squad":
            raise ValueError("unanswerable = true reads SQuAD 2.0's is_impossible questions: it needs format squad")
        return self


@dataclass(frozen=True)
class QAExample:
    """One question with its gold answers; `group` decides its split (article for SQuAD, id for KILT)."""

    id: str
    question: str
    answers: tuple[str, ...]
    group: str
    record: dict[str, Any]  # the KILT-format record (what `memvq eval` reads)


def iter_squad(path: str | Path, unanswerable: bool = False) -> Iterator[QAExample]:
    """SQuAD v1.1 / 2.0 json -> examples in KILT form (the article title as provenance), streamed article by
    article. SQuAD 2.0's unanswerable questions are skipped, or kept with the empty answer ("", as the official
    SQuAD 2.0 script scores them) when `unanswerable`."""
    with open(path, "rb") as handle:
        for article in ijson.items(handle, "data.item", use_float=True):
            title = article["title"].replace("_", " ")
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = tuple(dict.fromkeys(a["text"].strip() for a in qa["answers"] if a["text"].strip()))
                    if not answers and unanswerable and qa.get("is_impossible"):
                        answers = ("",)
                    if not answers:
                        continue
                    provenance = [{"wikipedia_id": title, "title": title}]
                    record = {
                        "id": qa["id"],
                        "input": qa["question"].strip(),
                        "output": [*({"answer": answer} for answer in answers), {"provenance": provenance}],
                    }
                    yield QAExample(qa["id"], record["input"], answers, title, record)


def iter_kilt_examples(path: str | Path) -> Iterator[QAExample]:
    """KILT jsonl -> examples (records without an input or an answer cannot be trained on and are skipped)."""
    for record in iter_kilt(path):
        question, answers = record_input(record), gold_answer_list(record)
        if question and answers:
            identifier = record_id(record)
            yield QAExample(identifier, question, tuple(answers), identifier, record)


def in_dev(group: str, fraction: float) -> bool:
    """Whether a group is held out: a stable hash of its key, independent of file order and machine."""
    digest = hashlib.sha256(group.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass(frozen=True)
class TaskData:
    """A task's train and dev examples."""

    config: TaskConfig
    train: list[QAExample]
    dev: list[QAExample]


def load_task(config: TaskConfig) -> TaskData:
    """Read a task file and split it."""
    examples = (
        iter_squad(config.path, config.unanswerable) if config.format == "squad" else iter_kilt_examples(config.path)
    )
    train, dev = [], []
    for example in examples:
        (dev if in_dev(example.group, config.dev_fraction) else train).append(example)
    if not train:
        raise ValueError(f"task {config.name!r}: no training examples in {config.path}")
    return TaskData(config, train, dev)


def write_split_files(tasks: Sequence[TaskData], out: Path, splits: Sequence[str] = ("train", "dev")) -> list[Path]:
    """Write each task's splits as KILT jsonl files, OUT/{task}-{split}.jsonl (what `memvq eval --data` reads)."""
    written = []
    for task in tasks:
        for split in splits:
            examples = task.train if split == "train" else task.dev
            path = out / f"{task.config.name}-{split}.jsonl"
            text = "".join(json.dumps(example.record, ensure_ascii=False) + "\n" for example in examples)
            atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
            written.append(path)
    return written


def schedule(tasks: Sequence[TaskData], slots: int, seed: int) -> list[tuple[int, int]]:
    """(task, example) for each of `slots` training slots: a task drawn by weight, then its next example in a
    per-task shuffled order (reshuffled at every pass)."""
    rng = np.random.default_rng(seed)
    weights = np.array([task.config.weight for task in tasks], dtype=np.float64)
    choices = rng.choice(len(tasks), size=slots, p=weights / weights.sum())
    orders: list[list[int]] = [[] for _ in tasks]
    out = []
    for task in choices.tolist():
        if not orders[task]:
            orders[task] = rng.permutation(len(tasks[task].train)).tolist()[::-1]
        out.append((task, orders[task].pop()))
    return out
