"""The query-time reader: backbone (question memory + live layers) + GLIMMER reranker + an answer head, the span
head (`head = "extract"`: a span of a passage read) or a Fusion-in-Decoder decoder (`"generate"`).

It owns the forward path from (questions, retrieved passage memory) to answers, the training loss and which parts
are trained (their files on disk: `encoders.reader_io`). Four modes (`ReaderConfig.mode`):

* lumen:   the question goes through the memory layers once (`Backbone.encode_memory`) and is put in front of
           each of the K passages' memory, `[question tokens; passage memory tokens]`; the live layers
           [memory_layers, num_layers) run over each pair; the answer head reads all K pairs.
* glimmer: Live-A (the first `rerank_layers` live layers) runs over all K pairs, the reranker scores them, the
           top `rerank_k` pairs go on through Live-B (the remaining live layers) to the answer head.
* fid:     no memory: `question [SEP] title [SEP] text` is tokenised and every layer is live (alpha = 1).
* memory:  no live layers (alpha = 0): the answer head reads [question memory; passage memory] directly (after
           the T5 final norm, for T5).

The pairs are built and packed by `encoders.pairs`. The memory side (embeddings and memory layers) is frozen by
default: the store was built with it. Trainable and saved: the live layers (and the T5 final norm), the reranker
and the answer head; with `train_memory_layers` the memory layers too, and the store must then be rebuilt with
them (`build-index --memory-from READER_DIR`): `Backbone.memory_digest` names them in the store's manifest and
the pipeline refuses a mismatch. The passages arrive as `ReaderInputs` (memory 'b k l d', mask 'b k l', as
`MemoryStore.get_memory` returns them per question; fid: the passage (title, text) pairs) so the reader does not
depend on the store; the query knobs (rerank_k, answer length, beams) as `QueryOptions`, None resolved against
the config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from memvq.encoders.backbone import Backbone, layer_index
from memvq.encoders.config import ReaderConfig, memory_layer_count
from memvq.encoders.decoder import FiDDecoder
from memvq.encoders.inputs import ReaderInputs
from memvq.encoders.options import QueryOptions
from memvq.encoders.pairs import PairSpans, memory_pairs, text_pairs
from memvq.encoders.reranker import RerankerHead, perplexity_distillation_loss, perplexity_distillation_target
from memvq.encoders.span_head import SpanHead, answer_log_likelihood, best_spans, no_answer_log_prob, span_loss
from memvq.encoders.spans import AnswerSpan, aggregate

logger = logging.getLogger(__name__)

SPAN_CANDIDATES = 20  # extract: the best spans per question whose equal answers are added up

# A clock the caller may give: `stage(name)` times a named part of the reader's work ("live", "rerank", "decode").
Stage = Callable[[str], AbstractContextManager[None]]


def untimed(name: str) -> AbstractContextManager[None]:
    """The `Stage` of a caller that does not time the reader."""
    return nullcontext()


@dataclass
class EncoderOutput:
    """What the decoder reads, plus the reranking that chose it.

    hidden 'b k n d', mask 'b k n' (bool) and token_ids 'b k n': the final states of the k pairs kept (k = K
    except in glimmer) and their tokens' ids (0 where unknown: passage memory given without its ids);
    passage_scores 'b K' (glimmer, else None); kept 'b k' (indices into the K passages, best score first in
    glimmer, 0..K-1 otherwise); live_a 'b K n d' / live_a_mask 'b K n': glimmer's states of all K pairs after
    Live-A (else None), live_a_ids 'b K n' their token ids; spans (extract head): where all K pairs' tokens sit
    in their passages' text.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    token_ids: torch.Tensor
    passage_scores: torch.Tensor | None
    kept: torch.Tensor
    live_a: torch.Tensor | None = None
    live_a_mask: torch.Tensor | None = None
    live_a_ids: torch.Tensor | None = None
    spans: PairSpans | None = None

    def decoder_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The FiD concatenation: states 'b (k n) d', mask 'b (k n)', token ids 'b (k n)'."""
        return (
            rearrange(self.hidden, "b k n d -> b (k n) d"),
            rearrange(self.mask, "b k n -> b (k n)"),
            rearrange(self.token_ids, "b k n -> b (k n)"),
        )


@dataclass
class ReaderOutput:
    """Answers with the passages read: scores 'b K' (glimmer, else None), kept 'b k'; spans (extract head): each
    answer's place, `AnswerSpan.passage` indexing the question's kept passages (None: no answer), and
    no_answer: per question the log of the head's "no answer in these passages" mass (`no_answer_log_prob`)."""

    answers: list[str]
    passage_scores: torch.Tensor | None
    kept: torch.Tensor
    spans: list[AnswerSpan | None] | None = None
    no_answer: list[float] | None = None


class Reader(nn.Module):
    """Backbone + (glimmer) reranker + answer head (span head or FiD decoder), reading K passages per question."""

    def __init__(
        self,
        backbone: Backbone,
        decoder: FiDDecoder | None,
        config: ReaderConfig,
        reranker: RerankerHead | None = None,
    ) -> None:
        super().__init__()
        if (decoder is None) != (config.head == "extract"):
            raise ValueError(f"the {config.head} head {'needs' if decoder is None else 'has no'} decoder")
        self.backbone = backbone
        self.decoder = decoder
        self.span_head: SpanHead | None = None
        if config.head == "extract":
            self.span_head = SpanHead(backbone.hidden_size).to(
                device=backbone.device, dtype=next(backbone.model.parameters()).dtype
            )
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
        """A new reader: decoder from the backbone's checkpoint (generate head) or a fresh span head (extract),
        fresh reranker (glimmer)."""
        if config.head == "extract":
            return cls(backbone, None, config)
        return cls(
            backbone, FiDDecoder.from_backbone(backbone, config.decoder_layers, copy=config.copy_answers), config
        )

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def answer_head(self) -> nn.Module:
        """The decoder (generate head) or the span head (extract)."""
        head = self.decoder if self.span_head is None else self.span_head
        assert head is not None
        return head

    def _freeze_memory_side(self) -> None:
        memory_layers = [] if self.config.train_memory_layers else list(self.backbone.layers[: self.first_live])
        for module in [*self.backbone.inputs, *memory_layers]:
            module.requires_grad_(False)
        if self.decoder is not None and not self.config.train_decoder_embeddings:
            self.decoder.freeze_embeddings()

    # -- encoder side ------------------------------------------------------------------------------------------

    def _live_b(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """glimmer: the live layers after Live-A over '(b k) n d' (nothing left when Live-A reached the top)."""
        start = self.first_live + self.config.rerank_layers
        if start >= self.backbone.num_layers:
            return hidden  # Live-A ran the last layer and the final norm already
        return self.backbone.run_live(hidden, mask, start=start)

    def encode(
        self, questions: list[str], inputs: ReaderInputs, options: QueryOptions | None = None, stage: Stage = untimed
    ) -> EncoderOutput:
        """Questions + their passages (memory, or for fid passage text; a copying decoder needs `memory_ids`)
        -> EncoderOutput.

        glimmer keeps `options.rerank_k` passages (None: the config's; at most the K given) by reranker score,
        plus `retrieval_weight` x `inputs.retrieval_scores` when they are given (the retriever as a prior)."""
        rerank_k = (options or QueryOptions()).resolved(self.config).rerank_k
        with stage("live"):
            if self.config.mode == "fid":
                if inputs.passage_texts is None:
                    raise ValueError("fid mode reads passage text: give passage_texts")
                pairs = text_pairs(self.backbone, self.config, questions, inputs.passage_texts)
            else:
                if inputs.memory is None or inputs.memory_mask is None:
                    raise ValueError(f"{self.config.mode} mode reads memory: give memory and memory_mask")
                if self.config.copy_answers and inputs.memory_ids is None:
                    raise ValueError("copy_answers reads the passages' token ids: give memory_ids")
                if self.config.head == "extract" and inputs.passage_offsets is None:
                    raise ValueError("the extract head answers with spans of the passages' text: give passage_offsets")
                pairs = memory_pairs(self.backbone, self.config, questions, inputs)
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
                spans=pairs.spans,
            )
        assert self.reranker is not None
        live_a = rearrange(live_a, "(b k) n d -> b k n d", b=batch)
        mask = rearrange(pairs.mask, "(b k) n -> b k n", b=batch)
        segment = rearrange(pairs.segment, "(b k) n -> b k n", b=batch)
        ids = rearrange(pairs.ids, "(b k) n -> b k n", b=batch)
        with stage("rerank"):
            scores = self.reranker(live_a, mask & (segment == 0), mask & (segment == 1))
            if inputs.retrieval_scores is not None and self.config.retrieval_weight:
                scores = scores + self.config.retrieval_weight * inputs.retrieval_scores.to(scores)
            kept = scores.topk(min(rerank_k, k), dim=-1).indices
        with stage("live"):
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
            spans=pairs.spans,
        )

    # -- answers -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def answer(
        self,
        questions: list[str],
        inputs: ReaderInputs,
        options: QueryOptions | None = None,
        min_answer_tokens: int = 0,
        stage: Stage = untimed,
    ) -> ReaderOutput:
        """Answers of a batch of questions from their passages; `options` left None: the config's.
        `min_answer_tokens` forbids the end token before that many tokens (benchmarks use it to fix the length);
        `stage` times the live, rerank and decode stages."""
        options = (options or QueryOptions()).resolved(self.config)
        encoded = self.encode(questions, inputs, options, stage)
        if self.span_head is not None:
            with stage("decode"):
                spans, no_answer = self._extract(encoded, options.max_answer_tokens)
            answers = [span.answer if span is not None else "" for span in spans]
            return ReaderOutput(answers, encoded.passage_scores, encoded.kept, spans, no_answer)
        assert self.decoder is not None
        with stage("decode"):
            hidden, mask, token_ids = encoded.decoder_inputs()
            ids = self.decoder.generate(
                hidden,
                mask,
                max_new_tokens=options.max_answer_tokens,
                num_beams=options.num_beams,
                min_new_tokens=min_answer_tokens,
                encoder_ids=token_ids,
            )
            answers = self.decoder.decode(ids)
        return ReaderOutput(answers, encoded.passage_scores, encoded.kept)

    def _extract(self, encoded: EncoderOutput, max_span_tokens: int) -> tuple[list[AnswerSpan | None], list[float]]:
        """The extract head's answer per question (the best spans of its kept pairs, equal answers added up) and
        its log no-answer mass."""
        assert self.span_head is not None and encoded.spans is not None
        spans = encoded.spans.select(encoded.kept)
        logits = self.span_head(encoded.hidden)
        weight = self.config.passage_weight
        candidates = best_spans(logits, spans.text_mask, max_span_tokens, weight, top_n=SPAN_CANDIDATES)
        no_shift = [0] * encoded.kept.shape[1]
        answers = [
            aggregate(found, texts, offsets, no_shift)
            for found, texts, offsets in zip(candidates, spans.texts, spans.offsets.cpu(), strict=True)
        ]
        return answers, no_answer_log_prob(logits, spans.text_mask, weight).tolist()

    # -- training ----------------------------------------------------------------------------------------------

    def _all_pairs_final(self, encoded: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The final states of all K pairs, each through the whole live encoder on its own (glimmer: Live-B over
        its Live-A states, so also the passages the reranker dropped): hidden 'b K n d', mask, token ids 'b K n'."""
        if encoded.live_a is None or encoded.live_a_mask is None or encoded.live_a_ids is None:
            return encoded.hidden, encoded.mask, encoded.token_ids
        batch = encoded.live_a.shape[0]
        mask = rearrange(encoded.live_a_mask, "b k n -> (b k) n")
        hidden = self._live_b(rearrange(encoded.live_a, "b k n d -> (b k) n d"), mask)
        return rearrange(hidden, "(b k) n d -> b k n d", b=batch), encoded.live_a_mask, encoded.live_a_ids

    def _positives(self, encoded: EncoderOutput, answers: Sequence[Sequence[str]]) -> list[list[tuple[int, int]]]:
        """Extract head: the gold answers' occurrences in all K pairs, '(b K)' order (see `PairSpans.positives`)."""
        assert encoded.spans is not None
        return encoded.spans.positives(answers, self.config.max_answer_tokens)

    def _passage_log_likelihood(
        self,
        encoded: EncoderOutput,
        answers: Sequence[Sequence[str]],
        positives: list[list[tuple[int, int]]] | None = None,
    ) -> torch.Tensor:
        """log p(answer | question, passage k alone) for all K passages: -> 'b K' (no grad). The generate head:
        the decoder's likelihood of the first gold answer from that one pair; extract: the span head's
        likelihood of the gold answers' occurrences in it (`positives` of all K pairs, found here when not given;
        a floor where it holds none). It runs in the module's current train/eval mode (with dropout while
        training, as the answer loss does)."""
        with torch.no_grad():
            hidden, mask, ids = self._all_pairs_final(encoded)
            if self.span_head is not None:
                assert encoded.spans is not None
                positives = positives if positives is not None else self._positives(encoded, answers)
                return answer_log_likelihood(self.span_head(hidden), encoded.spans.text_mask, positives)
            assert self.decoder is not None
            batch, k = hidden.shape[:2]
            labels = self.decoder.tokenize_targets([answer[0] for answer in answers], self.config.max_answer_tokens)
            out = self.decoder(
                rearrange(hidden, "b k n d -> (b k) n d"),
                rearrange(mask, "b k n -> (b k) n"),
                labels.repeat_interleave(k, dim=0),
                rearrange(ids, "b k n -> (b k) n"),
            )
            return rearrange(out.log_likelihood, "(b k) -> b k", b=batch)

    def _answer_loss(
        self,
        encoded: EncoderOutput,
        answers: Sequence[Sequence[str]],
        positives: list[list[tuple[int, int]]] | None,
    ) -> dict[str, torch.Tensor]:
        """The answer head's loss over the passages read. generate: {generation_loss} (teacher-forced cross
        entropy of the first gold answer); extract: {span_loss, passage_loss} (every occurrence of a gold answer in
        a kept passage is a positive: `positives` of all K pairs, see `encoders.span_head.span_loss`)."""
        if self.span_head is not None:
            assert encoded.spans is not None and positives is not None
            k_all = len(positives) // encoded.kept.shape[0]
            kept = [positives[i * k_all + j] for i, row in enumerate(encoded.kept.tolist()) for j in row]
            text_mask = encoded.spans.select(encoded.kept).text_mask
            losses = span_loss(self.span_head(encoded.hidden), text_mask, kept, self.config.span_objective)
            return {"span_loss": losses["span_loss"], "passage_loss": losses["passage_loss"]}
        assert self.decoder is not None
        labels = self.decoder.tokenize_targets([answer[0] for answer in answers], self.config.max_answer_tokens)
        hidden, mask, token_ids = encoded.decoder_inputs()
        return {"generation_loss": self.decoder(hidden, mask, labels, token_ids).loss}

    def loss(
        self, questions: list[str], answers: Sequence[Sequence[str]], inputs: ReaderInputs
    ) -> dict[str, torch.Tensor]:
        """{loss, the answer head's losses, rerank_loss}: the answer loss over the passages read (`answers`: each
        question's gold answers; the generate head learns the first), plus (glimmer) rerank_loss_weight *
        KL(target || softmax(reranker scores)) with the perplexity target.

        glimmer reads the passages it would keep at query time: by reranker score plus `retrieval_weight` x
        `inputs.retrieval_scores` when they are given."""
        if len(answers) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        encoded = self.encode(questions, inputs)
        positives = self._positives(encoded, answers) if self.span_head is not None else None  # all K pairs, once
        losses = self._answer_loss(encoded, answers, positives)
        loss = sum(losses.values())
        rerank_loss = torch.zeros((), device=encoded.hidden.device)
        if encoded.passage_scores is not None:
            target = perplexity_distillation_target(
                self._passage_log_likelihood(encoded, answers, positives), self.config.distill_temperature
            )
            rerank_loss = perplexity_distillation_loss(encoded.passage_scores, target)
        loss = loss + self.config.rerank_loss_weight * rerank_loss
        return {"loss": loss, **losses, "rerank_loss": rerank_loss}

    def forward(
        self, questions: list[str], answers: Sequence[Sequence[str]], inputs: ReaderInputs
    ) -> dict[str, torch.Tensor]:
        """The training loss (see `loss`)."""
        return self.loss(questions, answers, inputs)

    # -- what is trained ---------------------------------------------------------------------------------------

    def trained_part(self, key: str) -> str | None:
        """The trained part a backbone state_dict key belongs to: "live" (live layers, T5 final norm), "memory"
        (memory layers, with `train_memory_layers`) or None (frozen: embeddings, memory layers by default)."""
        layer = layer_index(key)
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
        """What the backbone checkpoint does not ship: live.*, (train_memory_layers) memory.*, reranker.*, and
        decoder.* / copy.* tensors (without the decoder's word embeddings when they stay frozen) or span.*."""
        state = {}
        for key, value in self.backbone.model.state_dict().items():
            part = self.trained_part(key)
            if part is not None:
                state[f"{part}.{key}"] = value
        if self.reranker is not None:
            state.update({f"reranker.{key}": value for key, value in self.reranker.state_dict().items()})
        if self.span_head is not None:
            state.update({f"span.{key}": value for key, value in self.span_head.state_dict().items()})
            return state
        assert self.decoder is not None
        frozen = set() if self.config.train_decoder_embeddings else self.decoder.embedding_keys()
        state.update(
            {f"decoder.{key}": value for key, value in self.decoder.model.state_dict().items() if key not in frozen}
        )
        if self.decoder.copy_head is not None:
            state.update({f"copy.{key}": value for key, value in self.decoder.copy_head.state_dict().items()})
        return state
