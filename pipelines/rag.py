"""The query-time pipeline: question -> FAISS retrieval -> memory codes decoded -> reader -> answer + provenance.

It owns putting a store and a reader together (and checking that they fit), batching questions through the
stages and timing each one: retrieve, memory (codes read and decoded), live, rerank, decode. `memvq query`,
`memvq eval`, `memvq serve` and notebooks all go through `RAGPipeline`:

    rag = RAGPipeline.load("runs/minilm-mini")          # the embedded default reader
    [result] = rag.answer(["who got the first nobel prize in physics"], QueryOptions(top_k=10))
    result.answer, [p.title for p in result.passages], result.timings_ms
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from memvq.encoders.config import ReaderConfig
from memvq.encoders.embedded import default_reader_path
from memvq.encoders.hardware import Resolved, autocast, resolve_device, resolve_precision
from memvq.encoders.inputs import PassageOffsets, ReaderInputs
from memvq.encoders.options import QueryOptions
from memvq.encoders.reader import Reader
from memvq.encoders.reader_io import load_reader, reader_weights_sha256
from memvq.encoders.spans import AnswerSpan, passage_token_offsets
from memvq.memory.store import MemoryStore
from memvq.pipelines.compatibility import check_compatible
from memvq.pipelines.confidence import Calibration, Evidence, load_calibration
from memvq.pipelines.config import LoadOptions
from memvq.pipelines.timing import QUERY_STAGES, Stopwatch
from memvq.retrieval.retriever import RetrievedPassage, Retriever

logger = logging.getLogger(__name__)


@dataclass
class RAGAnswer:
    """One question's answer, the passages the reader read (best first), the batch's milliseconds per stage and,
    from an extract head, where the answer stands (`span.passage` indexes `passages`, [char_start, char_end) of
    that passage's text), its confidence (`memvq.pipelines.confidence`) and whether it abstained (confidence
    below `min_confidence`: `answer` is then the answer it did not give)."""

    question: str
    answer: str
    passages: list[RetrievedPassage]
    timings_ms: dict[str, float] = field(default_factory=dict)
    span: AnswerSpan | None = None
    confidence: float | None = None
    abstained: bool = False
    evidence: Evidence | None = None

    @property
    def given(self) -> str | None:
        """The answer as given: None when it abstained."""
        return None if self.abstained else self.answer

    def kilt_output(self, with_text: bool = False) -> dict[str, Any]:
        """A KILT `output` entry: the answer ("" when it abstained, as KILT scores a missing answer; the one not
        given in `candidate`) and the passages read as provenance; the passage the answer was taken from carries
        `answer_span`, its [start, end) characters in the passage text; `confidence` / `abstained` when known."""
        provenance = [p.provenance(with_text) for p in self.passages]
        if self.span is not None:
            provenance[self.span.passage]["answer_span"] = [self.span.char_start, self.span.char_end]
        output: dict[str, Any] = {"answer": self.given or "", "provenance": provenance}
        if self.confidence is not None:
            output |= {"confidence": self.confidence, "abstained": self.abstained}
        if self.abstained:
            output["candidate"] = self.answer
        return output


def passage_tokens(store: MemoryStore, reader: Reader, rows: list[int]) -> dict[str, torch.Tensor]:
    """Passages (store rows) tokenised exactly as the build tokenised them: input_ids 'r l', attention_mask
    'r l' (and token_type_ids for BERT), on the reader's device."""
    records = store.passages(rows)
    max_tokens = store.manifest["config"]["encoder"]["max_passage_tokens"]
    tokens = reader.backbone.tokenize_passages([r["title"] for r in records], [r["text"] for r in records], max_tokens)
    return {name: values.to(reader.device) for name, values in tokens.items()}


def passage_offsets(store: MemoryStore, reader: Reader, rows: list[list[int]], mask: torch.Tensor) -> PassageOffsets:
    """Where the memory's tokens of passages 'b k' (store rows) sit in their text, for the extract head: the
    passages tokenised as the build tokenised them, cut to the memory read (mask '(b k) l')."""
    records = store.passages([row for question_rows in rows for row in question_rows])
    max_tokens = store.manifest["config"]["encoder"]["max_passage_tokens"]
    texts = [r["text"] for r in records]
    offsets, text_mask = passage_token_offsets(
        reader.backbone.tokenizer, [r["title"] for r in records], texts, max_tokens
    )
    cut = mask.shape[1]
    offsets, text_mask = offsets[:, :cut].to(mask.device), text_mask[:, :cut].to(mask.device)
    if text_mask.shape != mask.shape or (text_mask & ~mask.bool()).any():
        raise ValueError("the passages' tokens do not line up with the store's memory (another tokenizer?)")
    k = len(rows[0])
    return PassageOffsets(
        [texts[i : i + k] for i in range(0, len(texts), k)],
        rearrange(offsets, "(b k) l two -> b k l two", k=k),
        rearrange(text_mask, "(b k) l -> b k l", k=k),
    )


def reader_inputs(store: MemoryStore, reader: Reader, rows: list[list[int]]) -> ReaderInputs:
    """What the reader reads for passages 'b k' (store rows): decoded memory + mask on the reader's device (and,
    for a copying decoder, the passages' token ids; for the extract head, their offsets in the text), or (fid)
    the passages' (title, text)."""
    flat = [row for question_rows in rows for row in question_rows]
    if reader.config.mode == "fid":
        records = iter(store.passages(flat))
        return ReaderInputs(passage_texts=[[(r["title"], r["text"]) for r in islice(records, len(q))] for q in rows])
    memory, mask = store.get_memory(flat, reader.device, max_tokens=reader.config.max_passage_tokens)
    k = len(rows[0])
    memory_ids = None
    if reader.config.copy_answers:
        tokens = passage_tokens(store, reader, flat)
        cut = mask.shape[1]
        if not torch.equal(tokens["attention_mask"][:, :cut].bool(), mask):
            raise ValueError("the passages' tokens do not line up with the store's memory (another tokenizer?)")
        memory_ids = rearrange(tokens["input_ids"][:, :cut], "(b k) l -> b k l", k=k)
    return ReaderInputs(
        memory=rearrange(memory, "(b k) l d -> b k l d", k=k),
        memory_mask=rearrange(mask, "(b k) l -> b k l", k=k),
        memory_ids=memory_ids,
        passage_offsets=passage_offsets(store, reader, rows, mask) if reader.config.head == "extract" else None,
    )


def recomputed_inputs(
    store: MemoryStore,
    reader: Reader,
    rows: list[list[int]],
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ReaderInputs:
    """What the reader reads for passages 'b k' (store rows) with the memory recomputed instead of decoded: the
    reader's memory layers re-run over the passages' text as the build ran them (the memory uncompressed, with
    gradients when the memory layers are trained), and with `quantize` the valid token vectors 'n d' passed
    through it (MEMORY-VQ fine-tuning of the codebooks)."""
    if reader.config.mode == "fid":
        raise ValueError("a fid reader reads passage text, not memory")
    flat = [row for question_rows in rows for row in question_rows]
    tokens = passage_tokens(store, reader, flat)
    memory = reader.backbone.encode_memory(tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids"))
    cut = reader.config.max_passage_tokens  # the store keeps the whole passage's memory and cuts it when read
    memory, mask = memory[:, :cut], tokens["attention_mask"][:, :cut].bool()
    if quantize is not None:
        memory = memory.clone()
        memory[mask] = quantize(memory[mask]).to(memory.dtype)
    k = len(rows[0])
    ids = rearrange(tokens["input_ids"][:, :cut], "(b k) l -> b k l", k=k)
    return ReaderInputs(
        memory=rearrange(memory, "(b k) l d -> b k l d", k=k),
        memory_mask=rearrange(mask, "(b k) l -> b k l", k=k),
        memory_ids=ids if reader.config.copy_answers else None,
        passage_offsets=passage_offsets(store, reader, rows, mask) if reader.config.head == "extract" else None,
    )


InputsFn = Callable[[MemoryStore, Reader, list[list[int]]], ReaderInputs]


class RAGPipeline:
    """Retriever + memory store + reader; `inputs` turns retrieved store rows into what the reader reads (the
    store's decoded memory by default; `recomputed_inputs` in training with codebook or memory-layer fine-tuning,
    which does not read the store's memory, so the memory layers need not be the store's)."""

    def __init__(
        self,
        store: MemoryStore,
        reader: Reader,
        retriever: Retriever,
        inputs: InputsFn = reader_inputs,
        precision: Resolved = "fp32",
        calibration: Calibration | None = None,
    ) -> None:
        check_compatible(store, reader, stored_memory=inputs is reader_inputs)
        self.store = store
        self.reader = reader.eval()
        self.retriever = retriever
        self.inputs = inputs
        self.device = reader.device
        self.precision = precision
        self.calibration = calibration

    @classmethod
    def load(cls, store: str | Path, model: str | Path | None = None, **options: Any) -> RAGPipeline:
        """Open a store and a saved reader (None: the embedded default); `options`: `LoadOptions` fields (device,
        precision, verify: the store sha256-verified unless False)."""
        settings = LoadOptions(**options)
        device = resolve_device(settings.device)
        resolved = resolve_precision(settings.precision, device)
        opened = MemoryStore.open(store, verify=settings.verify)
        model = model or default_reader_path()
        reader = load_reader(model, device=device)
        calibration = load_calibration(model, reader_weights_sha256(model))
        retriever = Retriever.for_store(opened, device, resolved, mode=settings.retrieval)
        pipeline = cls(opened, reader, retriever, precision=resolved, calibration=calibration)
        if opened.has_memory:
            opened.codec.to(device)
        logger.info(
            "pipeline ready: store %s (%d passages), reader %s on %s in %s",
            store,
            opened.num_passages,
            reader.config.mode,
            device,
            resolved,
        )
        return pipeline

    @property
    def generation(self) -> int:
        """The generation of the store the answers come from (0: as built; each update or compaction adds one)."""
        return self.store.generation

    def with_store(self, store: MemoryStore) -> RAGPipeline:
        """This pipeline over another generation of its store (or another store of the same encoder): the reader,
        the question encoder, the retrieval mode and the calibration are shared, not loaded again."""
        old = self.retriever
        retriever = Retriever(store, old.encoder, old.precision, old.max_question_tokens, old.mode, old.fusion)
        if store.has_memory:
            store.codec.to(self.device)
        return RAGPipeline(store, self.reader, retriever, self.inputs, self.precision, self.calibration)

    @property
    def config(self) -> ReaderConfig:
        """The reader's config, with the default `min_confidence` of its calibration when that sets one."""
        config = self.reader.config
        if self.calibration is None or self.calibration.min_confidence is None:
            return config
        return config.model_copy(update={"min_confidence": self.calibration.min_confidence})

    def confidence(self, evidence: Evidence) -> float:
        """P(the answer is right) by the calibration (without one: the span head's raw answer probability)."""
        return self.calibration.confidence(evidence) if self.calibration else evidence.raw_confidence()

    def retrieve(self, questions: list[str], options: QueryOptions | None = None) -> list[list[RetrievedPassage]]:
        """The top-K passages of each question (K: `options.top_k`, None: the reader config's), by the options'
        retrieval mode (None: the pipeline's)."""
        options = (options or QueryOptions()).resolved(self.config)
        return self.retriever.search(questions, options.top_k, options.retrieval)

    @torch.no_grad()
    def answer(
        self, questions: list[str], options: QueryOptions | None = None, min_answer_tokens: int = 0
    ) -> list[RAGAnswer]:
        """Answer a batch of questions: retrieve `top_k`, (glimmer) keep `rerank_k`, generate (`options` left
        None: the reader config's). `min_answer_tokens` fixes the answer length for timing (benchmarks)."""
        if not questions:
            return []
        options = (options or QueryOptions()).resolved(self.config)
        timer = Stopwatch(self.device, QUERY_STAGES)
        start = time.perf_counter()
        with timer.stage("retrieve"):
            retrieved = self.retrieve(questions, options)
        answers = self.read(questions, retrieved, options, min_answer_tokens, timer)
        total = (time.perf_counter() - start) * 1000.0
        for result in answers:
            result.timings_ms["total"] = total
        return answers

    @torch.no_grad()
    def read(
        self,
        questions: list[str],
        retrieved: list[list[RetrievedPassage]],
        options: QueryOptions | None = None,
        min_answer_tokens: int = 0,
        timer: Stopwatch | None = None,
    ) -> list[RAGAnswer]:
        """Answer questions from passages already retrieved (the same number for every question)."""
        options = (options or QueryOptions()).resolved(self.config)
        timer = timer or Stopwatch(self.device, QUERY_STAGES)
        k = min(len(passages) for passages in retrieved)
        retrieved = [passages[:k] for passages in retrieved]
        with autocast(self.device, self.precision):  # the codec's decode too
            with timer.stage("memory"):
                inputs = self.inputs(self.store, self.reader, [[p.row for p in passages] for passages in retrieved])
            scores = torch.tensor([[p.score for p in passages] for passages in retrieved])
            inputs = replace(inputs, retrieval_scores=scores)
            out = self.reader.answer(questions, inputs, options, min_answer_tokens, timer.stage)
        kept = out.kept.tolist()
        scores = out.passage_scores.float().cpu().tolist() if out.passage_scores is not None else None
        results = []
        for i, question in enumerate(questions):
            read = [retrieved[i][j] if scores is None else retrieved[i][j].with_score(scores[i][j]) for j in kept[i]]
            span = out.spans[i] if out.spans is not None else None
            evidence, confidence = None, None
            if out.no_answer is not None:  # the extract head
                evidence = span and Evidence(
                    span.score, span.runner_up, span.support, out.no_answer[i], retrieved[i][0].score
                )
                confidence = self.confidence(evidence) if evidence else 0.0
            abstained = confidence is not None and confidence < (options.min_confidence or 0.0)
            results.append(
                RAGAnswer(question, out.answers[i], read, dict(timer.ms), span, confidence, abstained, evidence)
            )
        return results
