"""The pairs a reader's live layers read, `[question; passage]`, batched as (b k) rows: packing (each pair's real
tokens moved to the front, so that a pair's states do not depend on how long the batch's other questions and
passages are) and, for the extract head, where each pair's tokens sit in its passage's text (`PairSpans`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat

from memvq.encoders.backbone import Backbone
from memvq.encoders.config import ReaderConfig
from memvq.encoders.inputs import PassageText, ReaderInputs
from memvq.encoders.spans import fid_pair_tokens, label_positives


@dataclass
class PairSpans:
    """Where each pair's tokens sit in its passage's text (extract head): texts 'b k', offsets 'b k n 2'
    (character offsets into the text at pair positions) and text_mask 'b k n' (the position is a text token)."""

    texts: list[list[str]]
    offsets: torch.Tensor
    text_mask: torch.Tensor

    def select(self, kept: torch.Tensor) -> PairSpans:
        """The pairs `kept` 'b k' (indices into these K)."""
        rows = torch.arange(kept.shape[0], device=kept.device).unsqueeze(1)
        texts = [[row[j] for j in chosen] for row, chosen in zip(self.texts, kept.tolist(), strict=True)]
        return PairSpans(texts, self.offsets[rows, kept], self.text_mask[rows, kept])

    def positives(self, answers: Sequence[Sequence[str]], max_tokens: int) -> list[list[tuple[int, int]]]:
        """Every occurrence of a question's gold answers in each of its pairs, '(b k)' order, as pair positions
        (first, last); occurrences longer than `max_tokens` tokens are left out."""
        k = len(self.texts[0])
        spans = label_positives(
            [text for row in self.texts for text in row],
            [answer for answer in answers for _ in range(k)],
            rearrange(self.offsets, "b k n two -> (b k) n two"),
            rearrange(self.text_mask, "b k n -> (b k) n"),
            [0] * (len(self.texts) * k),
        )
        return [[(first, last) for first, last in row if last - first < max_tokens] for row in spans]


@dataclass
class Pairs:
    """Packed [question; passage] pairs, (b k) rows: hidden '(b k) n d', mask, segment and token ids '(b k) n'."""

    hidden: torch.Tensor
    mask: torch.Tensor
    segment: torch.Tensor  # 0 = question token, 1 = passage token
    ids: torch.Tensor
    batch: int
    k: int
    spans: PairSpans | None = None  # 'b k ...' (extract head)


def pack(hidden: torch.Tensor, mask: torch.Tensor, *per_token: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move each row's real tokens to the front, keeping their order, and trim the padding to the longest row.

    hidden 'r n d', mask 'r n' (bool), per-token tensors 'r n' -> the same, n = the longest row's token count.
    """
    order = torch.argsort((~mask).int(), dim=1, stable=True)
    order = order[:, : int(mask.sum(dim=1).max())]
    hidden = hidden.gather(1, repeat(order, "r n -> r n d", d=hidden.shape[-1]))
    return hidden, mask.gather(1, order), *(values.gather(1, order) for values in per_token)


def memory_pairs(backbone: Backbone, cfg: ReaderConfig, questions: list[str], inputs: ReaderInputs) -> Pairs:
    """[question memory; passage memory] for every (question, passage), packed, from the inputs' memory 'b k l d',
    mask 'b k l', memory_ids 'b k l' (the passage tokens' ids; None: unknown, 0) and passage_offsets (extract
    head: where the memory's tokens sit in the passages' text); the question through the memory layers."""
    memory, memory_mask, memory_ids, offsets = (
        inputs.memory,
        inputs.memory_mask,
        inputs.memory_ids,
        inputs.passage_offsets,
    )
    assert memory is not None and memory_mask is not None
    device = backbone.device
    memory = memory[:, :, : cfg.max_passage_tokens].to(device)
    memory_mask = memory_mask[:, :, : cfg.max_passage_tokens].to(device).bool()
    if memory_ids is None:
        memory_ids = torch.zeros(memory.shape[:3], dtype=torch.long)
    memory_ids = memory_ids[:, :, : cfg.max_passage_tokens].to(device)
    if memory_ids.shape != memory_mask.shape:
        raise ValueError(f"memory_ids {tuple(memory_ids.shape)} do not match the memory {tuple(memory_mask.shape)}")
    batch, k = memory.shape[:2]
    if batch != len(questions):
        raise ValueError(f"{len(questions)} questions but memory for {batch}")
    tokens = backbone.tokenize_questions(questions, cfg.max_question_tokens).to(device)
    question = backbone.encode_memory(tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids"))
    question_mask = tokens["attention_mask"].bool()
    hidden = torch.cat(
        [
            repeat(question, "b q d -> (b k) q d", k=k),
            rearrange(memory.to(question.dtype), "b k l d -> (b k) l d"),
        ],
        dim=1,
    )
    mask = torch.cat([repeat(question_mask, "b q -> (b k) q", k=k), rearrange(memory_mask, "b k l -> (b k) l")], dim=1)
    segment = torch.cat([torch.zeros(batch * k, question.shape[1]), torch.ones(batch * k, memory.shape[2])], dim=1).to(
        device=device, dtype=torch.long
    )
    ids = torch.cat(
        [repeat(tokens["input_ids"], "b q -> (b k) q", k=k), rearrange(memory_ids, "b k l -> (b k) l")], dim=1
    )
    if offsets is None:
        return Pairs(*pack(hidden, mask, segment, ids), batch=batch, k=k)
    question_zeros = torch.zeros(batch * k, question.shape[1], dtype=torch.long, device=device)
    cut = memory.shape[2]
    starts, ends, text_mask = (
        torch.cat([question_zeros.to(values.dtype), rearrange(values[:, :, :cut], "b k l -> (b k) l")], dim=1)
        for values in (
            offsets.offsets[..., 0].to(device),
            offsets.offsets[..., 1].to(device),
            offsets.text_mask.to(device).bool(),
        )
    )
    hidden, mask, segment, ids, starts, ends, text_mask = pack(hidden, mask, segment, ids, starts, ends, text_mask)
    spans = PairSpans(
        [list(row) for row in offsets.texts],
        rearrange(torch.stack([starts, ends], dim=-1), "(b k) n two -> b k n two", b=batch),
        rearrange(text_mask, "(b k) n -> b k n", b=batch),
    )
    return Pairs(hidden, mask, segment, ids, batch=batch, k=k, spans=spans)


def text_pairs(
    backbone: Backbone, cfg: ReaderConfig, questions: list[str], passage_texts: Sequence[Sequence[PassageText]]
) -> Pairs:
    """FiD: `question [SEP] title [SEP] text` for every (question, passage), embedded (no layer run yet), with
    where their text tokens sit in the passages' text."""
    device = backbone.device
    if len(passage_texts) != len(questions):
        raise ValueError(f"{len(questions)} questions but passages for {len(passage_texts)}")
    rows = [list(passages) for passages in passage_texts]
    k = len(rows[0])
    tokens, offsets, text_mask = fid_pair_tokens(
        backbone.tokenizer,
        [question for question in questions for _ in range(k)],
        [title for row in rows for title, _ in row],
        [text for row in rows for _, text in row],
        max_length=cfg.max_question_tokens + cfg.max_passage_tokens,
    )
    tokens = tokens.to(device)
    hidden = backbone.embed(tokens["input_ids"], tokens.get("token_type_ids"))
    mask = tokens["attention_mask"].bool()
    spans = PairSpans(
        [[text for _, text in row] for row in rows],
        rearrange(offsets.to(device), "(b k) n two -> b k n two", k=k),
        rearrange(text_mask.to(device), "(b k) n -> b k n", k=k),
    )
    # The reranker (the only reader of segments) is not used in fid: every token is marked as passage.
    return Pairs(hidden, mask, torch.ones_like(tokens["input_ids"]), tokens["input_ids"], len(questions), k, spans)
