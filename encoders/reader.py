"""The query-time reader: backbone (question memory + live layers) + GLIMMER reranker + Fusion-in-Decoder decoder.

It owns the forward path from (questions, retrieved passage memory) to answers, the training loss and saving the
trained parts. Four modes (`ReaderConfig.mode`):

* lumen:   the question goes through the memory layers once (`Backbone.encode_memory`) and is put in front of
           each of the K passages' memory, `[question tokens; passage memory tokens]`; the live layers
           [memory_layers, num_layers) run over each pair; the decoder reads all K pairs, 'b (k n) d' (FiD).
* glimmer: Live-A (the first `rerank_layers` live layers) runs over all K pairs, the reranker scores them, the
           top `rerank_k` pairs go on through Live-B (the remaining live layers) to the decoder.
* fid:     no memory: `question [SEP] title [SEP] text` is tokenised and every layer is live (alpha = 1).
* memory:  no live layers (alpha = 0): the decoder reads [question memory; passage memory] directly (after the
           T5 final norm, for T5).

Pairs are packed: each pair's real tokens are moved to the front (question, then passage) and the padding to the
end, so that a pair's states do not depend on how long the other questions / passages of the batch are (this
matters for T5, whose relative position bias sees gaps). Passages are batched together as (b k) rows.

The memory side (embeddings and memory layers) is frozen by default: the store was built with it. Trainable and
saved: the live layers (and the T5 final norm), the reranker and the decoder; with `train_memory_layers` the
memory layers too, and the store must then be rebuilt with them (`build-index --memory-from READER_DIR`):
`Backbone.memory_digest` names them in the store's manifest and the pipeline refuses a mismatch. The memory
arrives as tensors (memory 'b k l d', mask 'b k l', as `MemoryStore.get_memory` returns them per question) so
the reader does not depend on the store; fid takes the passage (title, text) pairs instead.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from einops import rearrange, repeat
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from encoders.backbone import Backbone, memory_layer_count, portable_model_path
from encoders.decoder import FiDDecoder
from encoders.reranker import RerankerHead, perplexity_distillation_loss, perplexity_distillation_target
from memory.artifact import atomic_write, write_json

logger = logging.getLogger(__name__)

Mode = Literal["fid", "lumen", "glimmer", "memory"]
PassageText = tuple[str, str]  # (title, text)

READER_FORMAT = "memvq-reader/1"
READER_FILE = "reader.json"
WEIGHTS_FILE = "reader.pt"

# The live fraction each mode implies when `alpha` is not given (LUMEN's default for lumen and glimmer).
DEFAULT_ALPHA: dict[str, float] = {"fid": 1.0, "lumen": 1 / 3, "glimmer": 1 / 3, "memory": 0.0}

# The embedded default reader (MiniLM, trained by `memvq train` with configs/train-minilm.toml; see its README).
DEFAULT_READER_DIR = Path(__file__).parent / "weights" / "minilm-glimmer"

_LAYER_KEY = re.compile(r"^encoder\.(?:layer|block)\.(\d+)\.")


def _layer_index(key: str) -> int | None:
    """The encoder layer a backbone state_dict key belongs to (None: embeddings, final norm, ...)."""
    match = _LAYER_KEY.match(key)
    return None if match is None else int(match.group(1))


def default_reader_path() -> Path:
    """The embedded default reader's directory; a clear error when its weights are not there."""
    if not (DEFAULT_READER_DIR / READER_FILE).is_file():
        raise FileNotFoundError(
            f"the embedded default reader is missing ({DEFAULT_READER_DIR}): train one with "
            "`memvq train --config configs/train-minilm.toml` and pass it with --model"
        )
    return DEFAULT_READER_DIR


class ReaderConfig(BaseModel):
    """How the reader reads: mode, live fraction, passage counts, token budgets, decoding, loss weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = "lumen"
    alpha: float | None = Field(default=None, ge=0.0, le=1.0, description="live fraction; None: the mode's default")
    retrieve_k: int = Field(
        default=20, ge=1, description="K: passages retrieved per question (the reader reads all given)"
    )
    rerank_k: int = Field(default=5, ge=1, description="glimmer: passages kept after reranking")
    rerank_layers: int = Field(default=1, ge=1, description="glimmer: Live-A layer count")
    retrieval_weight: float = Field(
        default=0.0, ge=0.0, description="glimmer: passages are kept by reranker score + this x retrieval score"
    )
    max_question_tokens: int = Field(default=32, ge=2)
    max_passage_tokens: int = Field(default=128, ge=2)
    max_answer_tokens: int = Field(default=16, ge=2)
    decoder_layers: int | None = Field(default=None, ge=1, description="decoder depth; None: the checkpoint's")
    train_decoder_embeddings: bool = Field(
        default=False, description="False: the checkpoint's word embeddings (and tied LM head) stay frozen, unsaved"
    )
    copy_answers: bool = Field(
        default=False,
        description="pointer-generator decoder: answer tokens may be copied from the question and passages read",
    )
    train_memory_layers: bool = Field(
        default=False,
        description="the memory layers are trained (on memory recomputed from passage text) and saved with the "
        "reader; its store is then built with them: build-index --memory-from READER_DIR",
    )
    num_beams: int = Field(default=1, ge=1)
    distill_temperature: float = Field(default=1.0, gt=0.0)
    rerank_loss_weight: float = Field(default=1.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> ReaderConfig:
        alpha = self.live_fraction
        if self.mode == "fid" and alpha != 1.0:
            raise ValueError(f"fid re-encodes the passage text through every layer: alpha must be 1, got {alpha}")
        if self.mode == "memory" and alpha != 0.0:
            raise ValueError(f"memory mode has no live layers: alpha must be 0, got {alpha}")
        if self.mode in ("lumen", "glimmer") and alpha <= 0.0:
            raise ValueError(f"{self.mode} needs live layers: alpha must be > 0 (alpha = 0 is mode 'memory')")
        if self.mode == "fid" and self.train_memory_layers:
            raise ValueError("fid has no memory layers (every layer is live): train_memory_layers needs memory")
        if self.mode == "glimmer" and self.rerank_k > self.retrieve_k:
            raise ValueError(f"rerank_k ({self.rerank_k}) must be <= retrieve_k ({self.retrieve_k})")
        return self

    @property
    def live_fraction(self) -> float:
        return DEFAULT_ALPHA[self.mode] if self.alpha is None else self.alpha


@dataclass
class EncoderOutput:
    """What the decoder reads, plus the reranking that chose it.

    hidden 'b k n d', mask 'b k n' (bool) and token_ids 'b k n': the final states of the k pairs kept (k = K
    except in glimmer) and their tokens' ids (0 where unknown: passage memory given without its ids);
    passage_scores 'b K' (glimmer, else None); kept 'b k' (indices into the K passages, best score first in
    glimmer, 0..K-1 otherwise); live_a 'b K n d' / live_a_mask 'b K n': glimmer's states of all K pairs after
    Live-A (else None), live_a_ids 'b K n' their token ids; timings_ms: milliseconds per stage ("live", "rerank").
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    token_ids: torch.Tensor
    passage_scores: torch.Tensor | None
    kept: torch.Tensor
    live_a: torch.Tensor | None = None
    live_a_mask: torch.Tensor | None = None
    live_a_ids: torch.Tensor | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def decoder_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The FiD concatenation: states 'b (k n) d', mask 'b (k n)', token ids 'b (k n)'."""
        return (
            rearrange(self.hidden, "b k n d -> b (k n) d"),
            rearrange(self.mask, "b k n -> b (k n)"),
            rearrange(self.token_ids, "b k n -> b (k n)"),
        )


@dataclass
class ReaderOutput:
    """Answers with the passages read: scores 'b K' (glimmer, else None), kept 'b k', ms per stage."""

    answers: list[str]
    passage_scores: torch.Tensor | None
    kept: torch.Tensor
    timings_ms: dict[str, float]


@dataclass
class _Pairs:
    """Packed [question; passage] pairs, (b k) rows: hidden '(b k) n d', mask, segment and token ids '(b k) n'."""

    hidden: torch.Tensor
    mask: torch.Tensor
    segment: torch.Tensor  # 0 = question token, 1 = passage token
    ids: torch.Tensor
    batch: int
    k: int


class Stopwatch:
    """Milliseconds per named stage (synchronising CUDA around each stage); `stages` start at 0."""

    def __init__(self, device: torch.device, stages: Sequence[str] = ()) -> None:
        self.device = device
        self.ms: dict[str, float] = dict.fromkeys(stages, 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def pack(hidden: torch.Tensor, mask: torch.Tensor, *per_token: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move each row's real tokens to the front, keeping their order, and trim the padding to the longest row.

    hidden 'r n d', mask 'r n' (bool), per-token tensors 'r n' -> the same, n = the longest row's token count.
    """
    order = torch.argsort((~mask).int(), dim=1, stable=True)
    order = order[:, : int(mask.sum(dim=1).max())]
    hidden = hidden.gather(1, repeat(order, "r n -> r n d", d=hidden.shape[-1]))
    return hidden, mask.gather(1, order), *(values.gather(1, order) for values in per_token)


class Reader(nn.Module):
    """Backbone + (glimmer) reranker + FiD decoder, reading K retrieved passages per question."""

    def __init__(
        self,
        backbone: Backbone,
        decoder: FiDDecoder,
        config: ReaderConfig,
        reranker: RerankerHead | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.config = config
        num_layers = backbone.num_layers
        if config.mode == "fid":
            self.first_live = 0
        else:
            expected = memory_layer_count(num_layers, config.live_fraction)
            if backbone.memory_layers != expected:
                raise ValueError(
                    f"{config.mode} with alpha={config.live_fraction:.4g} needs {expected} memory layers of "
                    f"{num_layers}, but the backbone (and so the memory) has {backbone.memory_layers}"
                )
            self.first_live = backbone.memory_layers
        self.reranker: RerankerHead | None = None
        if config.mode == "glimmer":
            live = num_layers - self.first_live
            if config.rerank_layers > live:
                raise ValueError(f"rerank_layers ({config.rerank_layers}) > live layers ({live})")
            self.reranker = reranker if reranker is not None else RerankerHead(backbone.hidden_size)
            self.reranker.to(device=backbone.device, dtype=next(backbone.model.parameters()).dtype)
        self._freeze_memory_side()

    @classmethod
    def from_backbone(cls, backbone: Backbone, config: ReaderConfig) -> Reader:
        """A new reader: decoder from the backbone's checkpoint, fresh reranker (glimmer)."""
        return cls(
            backbone, FiDDecoder.from_backbone(backbone, config.decoder_layers, copy=config.copy_answers), config
        )

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def _encoder_layers(self) -> nn.ModuleList:
        model = self.backbone.model
        return model.encoder.layer if self.backbone.family == "bert" else model.encoder.block

    def _freeze_memory_side(self) -> None:
        model = self.backbone.model
        embeddings = model.embeddings if self.backbone.family == "bert" else model.shared
        memory_layers = [] if self.config.train_memory_layers else list(self._encoder_layers()[: self.first_live])
        for module in [embeddings, *memory_layers]:
            module.requires_grad_(False)
        if not self.config.train_decoder_embeddings:
            self.decoder.freeze_embeddings()

    # -- encoder side ------------------------------------------------------------------------------------------

    def _memory_pairs(
        self,
        questions: list[str],
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        memory_ids: torch.Tensor | None = None,
    ) -> _Pairs:
        """[question memory; passage memory] for every (question, passage): memory 'b k l d', mask 'b k l',
        memory_ids 'b k l' (the passage tokens' ids; None: unknown, 0)."""
        cfg = self.config
        memory = memory[:, :, : cfg.max_passage_tokens].to(self.device)
        memory_mask = memory_mask[:, :, : cfg.max_passage_tokens].to(self.device).bool()
        if memory_ids is None:
            memory_ids = torch.zeros(memory.shape[:3], dtype=torch.long)
        memory_ids = memory_ids[:, :, : cfg.max_passage_tokens].to(self.device)
        if memory_ids.shape != memory_mask.shape:
            raise ValueError(f"memory_ids {tuple(memory_ids.shape)} do not match the memory {tuple(memory_mask.shape)}")
        batch, k = memory.shape[:2]
        if batch != len(questions):
            raise ValueError(f"{len(questions)} questions but memory for {batch}")
        tokens = self.backbone.tokenize_questions(questions, cfg.max_question_tokens).to(self.device)
        question = self.backbone.encode_memory(
            tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids")
        )
        question_mask = tokens["attention_mask"].bool()
        hidden = torch.cat(
            [
                repeat(question, "b q d -> (b k) q d", k=k),
                rearrange(memory.to(question.dtype), "b k l d -> (b k) l d"),
            ],
            dim=1,
        )
        mask = torch.cat(
            [repeat(question_mask, "b q -> (b k) q", k=k), rearrange(memory_mask, "b k l -> (b k) l")], dim=1
        )
        segment = torch.cat(
            [torch.zeros(batch * k, question.shape[1]), torch.ones(batch * k, memory.shape[2])], dim=1
        ).to(device=self.device, dtype=torch.long)
        ids = torch.cat(
            [repeat(tokens["input_ids"], "b q -> (b k) q", k=k), rearrange(memory_ids, "b k l -> (b k) l")], dim=1
        )
        return _Pairs(*pack(hidden, mask, segment, ids), batch=batch, k=k)

    def _text_pairs(self, questions: list[str], passage_texts: Sequence[Sequence[PassageText]]) -> _Pairs:
        """FiD: `question [SEP] title [SEP] text` for every (question, passage), embedded (no layer run yet)."""
        cfg = self.config
        if len(passage_texts) != len(questions):
            raise ValueError(f"{len(questions)} questions but passages for {len(passage_texts)}")
        rows = [list(passages) for passages in passage_texts]
        k = len(rows[0])
        if any(len(row) != k for row in rows):
            raise ValueError("every question needs the same number of passages")
        tokenizer = self.backbone.tokenizer
        sep = tokenizer.sep_token or tokenizer.eos_token
        firsts = [question for question in questions for _ in range(k)]
        seconds = [f"{title} {sep} {text}" for row in rows for title, text in row]
        tokens = tokenizer(
            firsts,
            seconds,
            truncation="longest_first",
            max_length=cfg.max_question_tokens + cfg.max_passage_tokens,
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.backbone.embed(tokens["input_ids"], tokens.get("token_type_ids"))
        mask = tokens["attention_mask"].bool()
        # The reranker (the only reader of segments) is not used in fid: every token is marked as passage.
        return _Pairs(
            hidden, mask, torch.ones_like(tokens["input_ids"]), tokens["input_ids"], batch=len(questions), k=k
        )

    def _live_b(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """glimmer: the live layers after Live-A over '(b k) n d' (nothing left when Live-A reached the top)."""
        start = self.first_live + self.config.rerank_layers
        if start >= self.backbone.num_layers:
            return hidden  # Live-A ran the last layer and the final norm already
        return self.backbone.run_live(hidden, mask, start=start)

    def encode(
        self,
        questions: list[str],
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        passage_texts: Sequence[Sequence[PassageText]] | None = None,
        rerank_k: int | None = None,
        retrieval_scores: torch.Tensor | None = None,
        memory_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Questions + memory 'b k l d' / mask 'b k l' / token ids 'b k l' (fid: passage (title, text) 'b k')
        -> EncoderOutput. A copying decoder (`copy_answers`) needs `memory_ids`.

        glimmer keeps `rerank_k` passages (default: the config's; at most the K given) by reranker score, plus
        `retrieval_weight` x `retrieval_scores` 'b K' when they are given (the retriever as a prior)."""
        watch = Stopwatch(self.device)
        with watch.stage("live"):
            if self.config.mode == "fid":
                if passage_texts is None:
                    raise ValueError("fid mode reads passage text: give passage_texts")
                pairs = self._text_pairs(questions, passage_texts)
            else:
                if memory is None or memory_mask is None:
                    raise ValueError(f"{self.config.mode} mode reads memory: give memory and memory_mask")
                if self.config.copy_answers and memory_ids is None:
                    raise ValueError("copy_answers reads the passages' token ids: give memory_ids")
                pairs = self._memory_pairs(questions, memory, memory_mask, memory_ids)
            batch, k = pairs.batch, pairs.k
            if self.config.mode == "glimmer":  # Live-A only; Live-B after reranking
                stop = self.first_live + self.config.rerank_layers
                live_a = self.backbone.run_live(pairs.hidden, pairs.mask, start=self.first_live, stop=stop)
            else:
                hidden = self.backbone.run_live(pairs.hidden, pairs.mask, start=self.first_live)
        if self.config.mode != "glimmer":
            return EncoderOutput(
                hidden=rearrange(hidden, "(b k) n d -> b k n d", b=batch),
                mask=rearrange(pairs.mask, "(b k) n -> b k n", b=batch),
                token_ids=rearrange(pairs.ids, "(b k) n -> b k n", b=batch),
                passage_scores=None,
                kept=torch.arange(k, device=self.device).expand(batch, k),
                timings_ms=watch.ms,
            )
        assert self.reranker is not None
        live_a = rearrange(live_a, "(b k) n d -> b k n d", b=batch)
        mask = rearrange(pairs.mask, "(b k) n -> b k n", b=batch)
        segment = rearrange(pairs.segment, "(b k) n -> b k n", b=batch)
        ids = rearrange(pairs.ids, "(b k) n -> b k n", b=batch)
        with watch.stage("rerank"):
            scores = self.reranker(live_a, mask & (segment == 0), mask & (segment == 1))
            if retrieval_scores is not None and self.config.retrieval_weight:
                scores = scores + self.config.retrieval_weight * retrieval_scores.to(scores)
            kept = scores.topk(min(rerank_k or self.config.rerank_k, k), dim=-1).indices
        with watch.stage("live"):
            rows = torch.arange(batch, device=self.device).unsqueeze(1)
            chosen = live_a[rows, kept]  # 'b k n d'
            chosen_mask = mask[rows, kept]
            hidden = self._live_b(rearrange(chosen, "b k n d -> (b k) n d"), rearrange(chosen_mask, "b k n -> (b k) n"))
        return EncoderOutput(
            hidden=rearrange(hidden, "(b k) n d -> b k n d", b=batch),
            mask=chosen_mask,
            token_ids=ids[rows, kept],
            passage_scores=scores,
            kept=kept,
            live_a=live_a,
            live_a_mask=mask,
            live_a_ids=ids,
            timings_ms=watch.ms,
        )

    # -- answers -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def answer(
        self,
        questions: list[str],
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        passage_texts: Sequence[Sequence[PassageText]] | None = None,
        num_beams: int | None = None,
        rerank_k: int | None = None,
        max_answer_tokens: int | None = None,
        min_answer_tokens: int = 0,
        retrieval_scores: torch.Tensor | None = None,
        memory_ids: torch.Tensor | None = None,
    ) -> ReaderOutput:
        """Answers of a batch of questions; None for `num_beams`, `rerank_k`, `max_answer_tokens`: the config's.
        `min_answer_tokens` forbids the end token before that many tokens (benchmarks use it to fix the length)."""
        encoded = self.encode(
            questions,
            memory,
            memory_mask,
            passage_texts,
            rerank_k=rerank_k,
            retrieval_scores=retrieval_scores,
            memory_ids=memory_ids,
        )
        watch = Stopwatch(self.device)
        with watch.stage("decode"):
            hidden, mask, token_ids = encoded.decoder_inputs()
            ids = self.decoder.generate(
                hidden,
                mask,
                max_new_tokens=max_answer_tokens or self.config.max_answer_tokens,
                num_beams=num_beams or self.config.num_beams,
                min_new_tokens=min_answer_tokens,
                encoder_ids=token_ids,
            )
            answers = self.decoder.decode(ids)
        timings = {"live": 0.0, "rerank": 0.0, **encoded.timings_ms, **watch.ms}
        return ReaderOutput(answers, encoded.passage_scores, encoded.kept, timings)

    # -- training ----------------------------------------------------------------------------------------------

    def _passage_log_likelihood(self, encoded: EncoderOutput, labels: torch.Tensor) -> torch.Tensor:
        """log p(answer | question, passage k alone) for all K passages: -> 'b K' (no grad).

        Each pair gets the whole live encoder on its own (glimmer: Live-B over its Live-A states, so also the
        passages the reranker dropped) and the decoder reads that one pair. It runs in the module's current
        train/eval mode (with dropout while training, as the generation loss does).
        """
        with torch.no_grad():
            if encoded.live_a is not None and encoded.live_a_mask is not None and encoded.live_a_ids is not None:
                batch = encoded.live_a.shape[0]
                mask = rearrange(encoded.live_a_mask, "b k n -> (b k) n")
                hidden = self._live_b(rearrange(encoded.live_a, "b k n d -> (b k) n d"), mask)
                ids = rearrange(encoded.live_a_ids, "b k n -> (b k) n")
            else:
                batch = encoded.hidden.shape[0]
                mask = rearrange(encoded.mask, "b k n -> (b k) n")
                hidden = rearrange(encoded.hidden, "b k n d -> (b k) n d")
                ids = rearrange(encoded.token_ids, "b k n -> (b k) n")
            k = hidden.shape[0] // batch
            out = self.decoder(hidden, mask, labels.repeat_interleave(k, dim=0), ids)
            return rearrange(out.log_likelihood, "(b k) -> b k", b=batch)

    @torch.no_grad()
    def distillation_target(
        self,
        questions: list[str],
        answers: list[str],
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        passage_texts: Sequence[Sequence[PassageText]] | None = None,
        memory_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The perplexity-distillation target 'b K' (rows sum to 1) over the K passages read."""
        encoded = self.encode(questions, memory, memory_mask, passage_texts, memory_ids=memory_ids)
        labels = self.decoder.tokenize_targets(answers, self.config.max_answer_tokens)
        ll = self._passage_log_likelihood(encoded, labels)
        return perplexity_distillation_target(ll, self.config.distill_temperature)

    def loss(
        self,
        questions: list[str],
        answers: list[str],
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        passage_texts: Sequence[Sequence[PassageText]] | None = None,
        retrieval_scores: torch.Tensor | None = None,
        memory_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{loss, generation_loss, rerank_loss}: teacher-forced answer cross entropy over the passages read, plus
        (glimmer) rerank_loss_weight * KL(target || softmax(reranker scores)) with the perplexity target.

        glimmer reads the passages it would keep at query time: by reranker score plus `retrieval_weight` x
        `retrieval_scores` 'b K' when they are given."""
        if len(answers) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        encoded = self.encode(
            questions, memory, memory_mask, passage_texts, retrieval_scores=retrieval_scores, memory_ids=memory_ids
        )
        labels = self.decoder.tokenize_targets(answers, self.config.max_answer_tokens)
        hidden, mask, token_ids = encoded.decoder_inputs()
        generation_loss = self.decoder(hidden, mask, labels, token_ids).loss
        rerank_loss = torch.zeros((), device=generation_loss.device)
        if encoded.passage_scores is not None:
            target = perplexity_distillation_target(
                self._passage_log_likelihood(encoded, labels), self.config.distill_temperature
            )
            rerank_loss = perplexity_distillation_loss(encoded.passage_scores, target)
        loss = generation_loss + self.config.rerank_loss_weight * rerank_loss
        return {"loss": loss, "generation_loss": generation_loss, "rerank_loss": rerank_loss}

    def forward(
        self,
        questions: list[str],
        answers: list[str],
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        passage_texts: Sequence[Sequence[PassageText]] | None = None,
        retrieval_scores: torch.Tensor | None = None,
        memory_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The training loss (see `loss`)."""
        return self.loss(questions, answers, memory, memory_mask, passage_texts, retrieval_scores, memory_ids)

    # -- persistence -------------------------------------------------------------------------------------------

    def _backbone_part(self, key: str) -> str | None:
        """The trained part a backbone state_dict key belongs to: "live" (live layers, T5 final norm), "memory"
        (memory layers, with `train_memory_layers`) or None (frozen: embeddings, memory layers by default)."""
        layer = _layer_index(key)
        if layer is None:
            return "live" if key.startswith("encoder.final_layer_norm.") else None
        if layer >= self.first_live:
            return "live"
        return "memory" if self.config.train_memory_layers else None

    def memory_digest(self) -> str | None:
        """`Backbone.memory_digest` of fine-tuned memory layers (`train_memory_layers`), else None: the pretrained
        ones, which every store built without `--memory-from` holds."""
        return self.backbone.memory_digest() if self.config.train_memory_layers else None

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What the backbone checkpoint does not ship: live.*, (train_memory_layers) memory.*, reranker.*,
        decoder.* tensors (without the decoder's word embeddings when they stay frozen)."""
        state = {}
        for key, value in self.backbone.model.state_dict().items():
            part = self._backbone_part(key)
            if part is not None:
                state[f"{part}.{key}"] = value
        if self.reranker is not None:
            state.update({f"reranker.{key}": value for key, value in self.reranker.state_dict().items()})
        frozen = set() if self.config.train_decoder_embeddings else self.decoder.embedding_keys()
        state.update(
            {f"decoder.{key}": value for key, value in self.decoder.model.state_dict().items() if key not in frozen}
        )
        if self.decoder.copy_head is not None:
            state.update({f"copy.{key}": value for key, value in self.decoder.copy_head.state_dict().items()})
        return state

    def save(self, directory: str | Path, fp16: bool = False) -> Path:
        """Write reader.json (config, backbone info) and reader.pt (trained tensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Tied tensors (the BERT2BERT LM head and word embeddings) stay one tensor in the file.
        converted: dict[tuple[int, torch.Size, torch.dtype], torch.Tensor] = {}
        state = {}
        for key, value in self.trained_state().items():
            ident = (value.data_ptr(), value.shape, value.dtype)
            if ident not in converted:
                tensor = value.detach().to("cpu")
                converted[ident] = tensor.half() if fp16 and tensor.is_floating_point() else tensor
            state[key] = converted[ident]
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: torch.save(state, tmp))
        meta: dict[str, Any] = {
            "format": READER_FORMAT,
            "config": self.config.model_dump(),
            "backbone": asdict(self.backbone.info) | {"model_path": portable_model_path(self.backbone.info.model_path)},
            "dtype": "float16" if fp16 else str(next(self.parameters()).dtype).removeprefix("torch."),
        }
        write_json(directory / READER_FILE, meta)
        logger.info("saved reader (%s, %d tensors) to %s", self.config.mode, len(state), directory)
        return directory

    @classmethod
    def load(
        cls, directory: str | Path, backbone_path: str | Path | None = None, device: str | torch.device = "cpu"
    ) -> Reader:
        """A saved reader on top of a freshly loaded backbone (its saved path, or `backbone_path`)."""
        directory = Path(directory)
        meta = _read_meta(directory)
        info = meta["backbone"]
        backbone = Backbone.from_pretrained(
            backbone_path or info["model_path"], memory_layers=info["memory_layers"]
        ).to(device)
        _check_backbone(backbone, info)
        reader = cls.from_backbone(backbone, ReaderConfig(**meta["config"]))
        reader.load_trained_state(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        return reader.eval()

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load `trained_state()` tensors (any float dtype) into the live (and memory) layers, reranker, decoder."""
        parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in ("live", "memory", "reranker", "decoder", "copy")}
        for key, value in state.items():
            part, _, name = key.partition(".")
            if part not in parts:
                raise ValueError(f"unexpected tensor {key!r} in a reader state")
            parts[part][name] = value
        if parts["memory"] and not self.config.train_memory_layers:
            raise ValueError("memory layers were saved but the config has train_memory_layers off")
        missing, unexpected = self.backbone.model.load_state_dict(parts["live"] | parts["memory"], strict=False)
        trained_missing = [key for key in missing if self._backbone_part(key) is not None]
        if trained_missing or unexpected:
            raise ValueError(f"backbone layers do not match: missing {trained_missing}, unexpected {unexpected}")
        if self.reranker is not None:
            self.reranker.load_state_dict(parts["reranker"])
        elif parts["reranker"]:
            raise ValueError(f"a reranker state was saved but mode {self.config.mode!r} has no reranker")
        missing, unexpected = self.decoder.model.load_state_dict(parts["decoder"], strict=False)
        frozen = set() if self.config.train_decoder_embeddings else self.decoder.embedding_keys()
        if set(missing) - frozen or unexpected:
            raise ValueError(
                f"decoder does not match: missing {sorted(set(missing) - frozen)}, unexpected {unexpected}"
            )
        if self.decoder.copy_head is not None:
            self.decoder.copy_head.load_state_dict(parts["copy"])
        elif parts["copy"]:
            raise ValueError("a copy head was saved but the config has copy_answers off")


def _read_meta(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / READER_FILE).read_text())
    if meta.get("format") != READER_FORMAT:
        raise ValueError(f"{directory} is not a {READER_FORMAT} reader (format {meta.get('format')!r})")
    return meta


def _check_backbone(backbone: Backbone, info: dict[str, Any]) -> None:
    """Refuse a backbone of another type, depth, width or memory split than a saved reader's `info`."""
    for name in ("model_type", "num_layers", "hidden_size", "memory_layers"):
        if getattr(backbone.info, name) != info[name]:
            raise ValueError(
                f"backbone {backbone.info.model_path} has {name}={getattr(backbone.info, name)}, "
                f"the reader was trained on {info[name]}"
            )


def load_memory_layers(backbone: Backbone, directory: str | Path) -> Backbone:
    """Put the fine-tuned memory layers of a saved reader (`train_memory_layers`) into `backbone` (which must
    be the reader's: same checkpoint and split) and return it: the encoder a store for that reader is built with."""
    directory = Path(directory)
    meta = _read_meta(directory)
    if not meta["config"].get("train_memory_layers"):
        raise ValueError(
            f"the reader in {directory} kept the pretrained memory layers (train_memory_layers off): "
            "build its store without --memory-from"
        )
    _check_backbone(backbone, meta["backbone"])
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    memory = {key.removeprefix("memory."): value for key, value in state.items() if key.startswith("memory.")}
    expected = {
        key
        for key in backbone.model.state_dict()
        if (layer := _layer_index(key)) is not None and layer < backbone.memory_layers
    }
    if set(memory) != expected:
        raise ValueError(f"the memory layers in {directory} do not match the backbone's {backbone.memory_layers}")
    backbone.model.load_state_dict(memory, strict=False)
    return backbone
