"""The Fusion-in-Decoder decoder: reads the concatenated encoder states of all passages and writes the answer.

It owns the decoder model, the answer tokenisation (start / end tokens), teacher-forced likelihoods and
generation (greedy or beam, batched across questions).

* BERT backbones: a BERT2BERT decoder, `BertLMHeadModel(is_decoder=True, add_cross_attention=True)` loaded from the
  backbone's own checkpoint: embeddings, self-attention and FFN weights come from the checkpoint; each layer's
  cross-attention starts as a copy of its self-attention (it learns to read the passages much sooner than from a
  random start); the MLM transform (sentence-transformers checkpoints ship none) is new; the LM head is tied to the
  decoder's word embeddings. Targets are `[CLS] answer [SEP]`: [CLS] starts decoding, [SEP] ends it.
* T5 backbones: the decoder and lm_head of `T5ForConditionalGeneration` from the same local path, loaded with
  `num_layers=0` so that the encoder (which the backbone already holds) is not loaded twice. Targets are
  `<pad> answer </s>` (`decoder_start_token_id`, `eos_token_id` of the checkpoint's config).

With `copy=True` the decoder is a pointer-generator (See et al., 2017): a `CopyHead` attends from the decoder's last
hidden state over the encoder tokens it reads, and each answer token's probability mixes the LM head's softmax with
that attention over the encoder positions holding the token, `p = g p_vocab + (1 - g) p_copy`. Short factoid
answers are mostly spans of the passages, and copying them is learnt from far fewer examples than generating
them; it needs the encoder tokens' ids (`encoder_ids`). Generation with copying runs its own greedy / beam loop
over the model's KV cache (the library's `generate` cannot mix in the copy distribution).

Encoder states go in only through the libraries' public arguments: `encoder_hidden_states` /
`encoder_attention_mask` for BERT, `encoder_outputs=BaseModelOutput(...)` + `attention_mask` for T5, and
`.generate(...)`. BERT generation is given an `EncoderDecoderCache` (a public `Cache`), because the default cache
that `generate` makes for a decoder-only model has no room for cross-attention keys.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import nn
from transformers import (
    AutoConfig,
    BertLMHeadModel,
    DynamicCache,
    EncoderDecoderCache,
    MT5ForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5ForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutput

if TYPE_CHECKING:
    from memvq.encoders.backbone import Backbone

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# model_type -> decoder class
DECODER_CLASSES: dict[str, type[PreTrainedModel]] = {
    "bert": BertLMHeadModel,
    "t5": T5ForConditionalGeneration,
    "mt5": MT5ForConditionalGeneration,
}


@dataclass
class DecoderOutput:
    """Teacher-forced pass: mean token cross entropy, summed answer log-likelihood 'b'."""

    loss: torch.Tensor
    log_likelihood: torch.Tensor


class CopyHead(nn.Module):
    """Pointer-generator head: from decoder states 'b t d' and encoder states 'b n d', the copy attention
    'b t n' (a distribution over the encoder tokens) and the gate 'b t 1' (the weight of the LM head's softmax)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(2 * dim, 1)
        with torch.no_grad():  # start by matching decoder and encoder states as they are, the gate at 1/2
            self.query.weight.copy_(torch.eye(dim))
            self.gate.weight.zero_()
            self.gate.bias.zero_()

    def forward(
        self, hidden: torch.Tensor, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, encoder_hidden = hidden.float(), encoder_hidden.float()
        scores = torch.einsum("btd,bnd->btn", self.query(hidden.to(self.query.weight.dtype)).float(), encoder_hidden)
        scores = scores / math.sqrt(hidden.shape[-1])
        # float32 even under bf16 autocast (which runs the einsums in bf16): the copy distribution is mixed with the
        # LM head's float32 softmax
        attention = scores.float().masked_fill(~encoder_mask.bool()[:, None, :], float("-inf")).softmax(dim=-1)
        context = torch.einsum("btn,bnd->btd", attention, encoder_hidden).float()
        both = torch.cat([hidden, context], dim=-1).to(self.gate.weight.dtype)
        return attention, torch.sigmoid(self.gate(both).float())


class FiDDecoder(nn.Module):
    """A decoder that cross-attends over encoder states 'b n d' and predicts answer tokens."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: str, copy: bool = False
    ) -> None:
        super().__init__()
        if family not in ("bert", "t5"):
            raise ValueError(f"no FiD decoder for family {family!r} (bert or t5)")
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        config = model.config
        if family == "bert":
            start, end, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        else:
            start, end, pad = config.decoder_start_token_id, config.eos_token_id, config.pad_token_id
        if start is None or end is None or pad is None:
            raise ValueError(f"{family} decoder needs start, end and pad token ids, got {start}, {end}, {pad}")
        self.start_id: int = int(start)
        self.end_id: int = int(end)
        self.pad_id: int = int(pad)
        self.copy_head: CopyHead | None = None
        if copy:
            dim = config.hidden_size if family == "bert" else config.d_model
            parameter = next(model.parameters())
            self.copy_head = CopyHead(dim).to(device=parameter.device, dtype=parameter.dtype)

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(cls, backbone: Backbone, num_layers: int | None = None, copy: bool = False) -> FiDDecoder:
        """The decoder initialised from the backbone's own local checkpoint (`backbone.info.model_path`).

        `num_layers` keeps the checkpoint's first layers only (None: all): a shallow decoder is cheap, and for
        short answers most of FiD's cost is in the encoder anyway. `copy`: add a (new) `CopyHead`.
        """
        from memvq.encoders.embedded import resolve_model_path

        if not backbone.info.model_path:
            raise ValueError("the backbone has no model_path: load it with Backbone.from_pretrained(path)")
        path = resolve_model_path(backbone.info.model_path)
        dtype = next(backbone.model.parameters()).dtype
        model_type = backbone.info.model_type
        if model_type not in DECODER_CLASSES:
            raise ValueError(
                f"the generate head has a decoder for {', '.join(sorted(DECODER_CLASSES))} backbones, not "
                f'{model_type}: use the extract head (head = "extract")'
            )
        model_class = DECODER_CLASSES[model_type]
        if backbone.family == "bert":
            depth = {} if num_layers is None else {"num_hidden_layers": num_layers}
            model, info = model_class.from_pretrained(
                path, is_decoder=True, add_cross_attention=True, dtype=dtype, output_loading_info=True, **depth
            )
            with torch.no_grad():  # cross-attention starts as a copy of the layer's self-attention, not random
                for layer in model.bert.encoder.layer:
                    layer.crossattention.load_state_dict(layer.attention.state_dict())
            logger.info("BERT2BERT decoder from %s: %d new tensors", path, len(info["missing_keys"]))
        else:
            config = AutoConfig.from_pretrained(path)
            model, info = model_class.from_pretrained(
                path,
                num_layers=0,
                num_decoder_layers=num_layers or config.num_decoder_layers,
                dtype=dtype,
                output_loading_info=True,
            )
            missing = [key for key in info["missing_keys"] if key.startswith("decoder.")]
            if missing:
                logger.warning(
                    "%s has no trained T5 decoder (%d decoder tensors missing, e.g. %s): it starts random",
                    path,
                    len(missing),
                    missing[0],
                )
        return cls(model.to(backbone.device).eval(), backbone.tokenizer, backbone.family, copy=copy)

    @property
    def num_layers(self) -> int:
        config = self.model.config
        return int(config.num_hidden_layers if self.family == "bert" else config.num_decoder_layers)

    def embedding_keys(self) -> set[str]:
        """state_dict keys of the word embeddings (and the LM head when it is tied to them)."""
        embeddings = self.model.get_input_embeddings().weight
        return {key for key, value in self.model.state_dict(keep_vars=True).items() if value is embeddings}

    def freeze_embeddings(self) -> None:
        """Keep the checkpoint's word embeddings (and a tied LM head) as they are: not trained, not saved."""
        self.model.get_input_embeddings().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- targets -----------------------------------------------------------------------------------------------

    def tokenize_targets(self, answers: list[str], max_length: int) -> torch.Tensor:
        """Answers -> labels 'b t': the answer's tokens then the end token, padded with IGNORE_INDEX.

        The start token is not part of the labels: `forward` prepends it to make the decoder input.
        """
        pieces = self.tokenizer(answers, add_special_tokens=False, truncation=True, max_length=max_length - 1)
        rows = [[*ids, self.end_id] for ids in pieces["input_ids"]]
        length = max(len(row) for row in rows)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, : len(row)] = torch.tensor(row)
        return labels.to(self.device)

    def decoder_inputs(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels 'b t' -> (decoder input ids 'b t' = [start, labels[:-1]], attention mask 'b t')."""
        shifted = torch.cat([torch.full_like(labels[:, :1], self.start_id), labels[:, :-1]], dim=1)
        mask = torch.cat([torch.ones_like(labels[:, :1]), (labels[:, :-1] != IGNORE_INDEX).long()], dim=1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.pad_id), mask

    # -- teacher forcing ---------------------------------------------------------------------------------------

    def _run(
        self,
        input_ids: torch.Tensor,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor,
        decoder_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoder pass over input_ids 'b t' -> (logits 'b t v', last hidden states 'b t d' when copying).
        With `cache`, input_ids are the new tokens only and the cache is extended in place."""
        wants_hidden = self.copy_head is not None
        common = {"cache": cache, "use_cache": cache is not None, "output_hidden_states": wants_hidden}
        if self.family == "bert":
            out = self.model(
                input_ids=input_ids,
                attention_mask=decoder_mask,
                encoder_hidden_states=encoder_hidden,
                encoder_attention_mask=encoder_mask,
                **common,
            )
            return out.logits, out.hidden_states[-1] if wants_hidden else None
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
            attention_mask=encoder_mask,
            decoder_input_ids=input_ids,
            decoder_attention_mask=decoder_mask,
            **common,
        )
        return out.logits, out.decoder_hidden_states[-1] if wants_hidden else None

    def _check_ids(self, encoder_hidden: torch.Tensor, encoder_ids: torch.Tensor | None) -> torch.Tensor | None:
        if self.copy_head is None:
            return None
        if encoder_ids is None or encoder_ids.shape != encoder_hidden.shape[:2]:
            shape = None if encoder_ids is None else tuple(encoder_ids.shape)
            raise ValueError(
                f"a copying decoder needs encoder_ids 'b n' {tuple(encoder_hidden.shape[:2])}, got {shape}"
            )
        return encoder_ids.to(encoder_hidden.device)

    def forward(
        self,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor,
        labels: torch.Tensor,
        encoder_ids: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """encoder_hidden 'b n d', encoder_mask 'b n', labels 'b t' (from `tokenize_targets`), encoder_ids 'b n'
        (the encoder tokens' ids; copying decoders only) -> DecoderOutput.

        Position i predicts labels[:, i]; loss is the mean negative log-likelihood over the real label tokens.
        """
        encoder_ids = self._check_ids(encoder_hidden, encoder_ids)
        input_ids, decoder_mask = self.decoder_inputs(labels)
        encoder_mask = encoder_mask.long()
        logits, hidden = self._run(input_ids, encoder_hidden, encoder_mask, decoder_mask)
        valid = labels != IGNORE_INDEX
        targets = labels.clamp(min=0)
        token_ll = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if self.copy_head is not None:
            assert hidden is not None and encoder_ids is not None
            attention, gate = self.copy_head(hidden, encoder_hidden, encoder_mask)
            copied = (attention * (encoder_ids[:, None, :] == targets[:, :, None])).sum(dim=-1)
            token_ll = torch.log((gate.squeeze(-1) * token_ll.exp() + (1 - gate.squeeze(-1)) * copied).clamp_min(1e-12))
        token_ll = token_ll * valid
        loss = -token_ll.sum() / valid.sum().clamp(min=1)
        return DecoderOutput(loss=loss, log_likelihood=token_ll.sum(dim=-1))

    # -- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor,
        max_new_tokens: int = 16,
        num_beams: int = 1,
        min_new_tokens: int = 0,
        encoder_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy (num_beams=1) or beam search: encoder_hidden 'b n d', encoder_mask 'b n' (encoder_ids 'b n' for
        a copying decoder) -> token ids 'b t'.

        Row i starts with the start token and ends with the end token, then pad (or stops at max_new_tokens).
        """
        batch = encoder_hidden.shape[0]
        encoder_mask = encoder_mask.long()
        if self.copy_head is not None:
            ids = self._check_ids(encoder_hidden, encoder_ids)
            assert ids is not None
            return self._search(encoder_hidden, encoder_mask, ids, max_new_tokens, num_beams, min_new_tokens)
        common = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "num_beams": num_beams,
            "do_sample": False,
            "eos_token_id": self.end_id,
            "pad_token_id": self.pad_id,
        }
        if self.family == "bert":
            start = torch.full((batch, 1), self.start_id, dtype=torch.long, device=encoder_hidden.device)
            return self.model.generate(
                input_ids=start,
                attention_mask=torch.ones_like(start),
                encoder_hidden_states=encoder_hidden,
                encoder_attention_mask=encoder_mask,
                cache=self._new_cache(),
                **common,
            )
        return self.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
            attention_mask=encoder_mask,
            decoder_start_token_id=self.start_id,
            **common,
        )

    def _new_cache(self) -> EncoderDecoderCache:
        config = self.model.config
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))

    def _search(
        self,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor,
        encoder_ids: torch.Tensor,
        max_new_tokens: int,
        num_beams: int,
        min_new_tokens: int,
    ) -> torch.Tensor:
        """Beam search (greedy at num_beams=1) over the pointer-generator mixture, on the model's KV cache.

        Beams are ranked by summed log-probability; a finished beam only continues with pad at no cost.
        """
        assert self.copy_head is not None
        batch, device = encoder_hidden.shape[0], encoder_hidden.device
        encoder_hidden, encoder_mask, encoder_ids = (
            x.repeat_interleave(num_beams, dim=0) for x in (encoder_hidden, encoder_mask, encoder_ids)
        )
        tokens = torch.full((batch * num_beams, 1), self.start_id, dtype=torch.long, device=device)
        scores = torch.full((batch, num_beams), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start equal: expand the first one only
        finished = torch.zeros(batch * num_beams, dtype=torch.bool, device=device)
        cache = self._new_cache()
        for step in range(max_new_tokens):
            logits, hidden = self._run(tokens[:, -1:], encoder_hidden, encoder_mask, cache=cache)
            assert hidden is not None
            attention, gate = self.copy_head(hidden[:, -1:], encoder_hidden, encoder_mask)
            vocab = torch.softmax(logits[:, -1].float(), dim=-1)
            copied = torch.zeros_like(vocab).scatter_add_(-1, encoder_ids, attention[:, 0])
            log_probs = torch.log((gate[:, 0] * vocab + (1 - gate[:, 0]) * copied).clamp_min(1e-12))
            if step < min_new_tokens:
                log_probs[:, self.end_id] = float("-inf")
            log_probs[finished] = float("-inf")
            log_probs[finished, self.pad_id] = 0.0
            vocab_size = log_probs.shape[-1]
            total = rearrange(scores, "b k -> (b k) 1") + log_probs
            scores, best = rearrange(total, "(b k) v -> b (k v)", k=num_beams).topk(num_beams, dim=-1)
            source = rearrange(
                torch.arange(batch, device=device)[:, None] * num_beams + best // vocab_size, "b k -> (b k)"
            )
            chosen = rearrange(best % vocab_size, "b k -> (b k) 1")
            tokens = torch.cat([tokens[source], chosen], dim=1)
            finished = finished[source] | (chosen[:, 0] == self.end_id)
            if num_beams > 1:  # greedy keeps every row in place: no copy of the (cross-attention) cache
                cache.reorder_cache(source)
            if bool(finished.all()):
                break
        winner = torch.arange(batch, device=device) * num_beams + scores.argmax(dim=-1)
        return tokens[winner]

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """Generated ids 'b t' -> answer strings: drop the start token, cut at the end token, detokenise."""
        rows = []
        for row in token_ids[:, 1:].tolist():
            rows.append(row[: row.index(self.end_id)] if self.end_id in row else row)
        return [text.strip() for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
