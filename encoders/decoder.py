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

Encoder states go in only through the libraries' public arguments: `encoder_hidden_states` /
`encoder_attention_mask` for BERT, `encoder_outputs=BaseModelOutput(...)` + `attention_mask` for T5, and
`.generate(...)`. BERT generation is given an `EncoderDecoderCache` (a public `Cache`), because the default cache
that `generate` makes for a decoder-only model has no room for cross-attention keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
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
    from encoders.backbone import Backbone

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
    """Teacher-forced pass: mean token cross entropy, logits 'b t v', summed answer log-likelihood 'b'."""

    loss: torch.Tensor
    logits: torch.Tensor
    log_likelihood: torch.Tensor


class FiDDecoder(nn.Module):
    """A decoder that cross-attends over encoder states 'b n d' and predicts answer tokens."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: str) -> None:
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

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(cls, backbone: Backbone, num_layers: int | None = None) -> FiDDecoder:
        """The decoder initialised from the backbone's own local checkpoint (`backbone.info.model_path`).

        `num_layers` keeps the checkpoint's first layers only (None: all): a shallow decoder is cheap, and for
        short answers most of FiD's cost is in the encoder anyway.
        """
        from encoders.backbone import resolve_model_path

        if not backbone.info.model_path:
            raise ValueError("the backbone has no model_path: load it with Backbone.from_pretrained(path)")
        path = resolve_model_path(backbone.info.model_path)
        dtype = next(backbone.model.parameters()).dtype
        model_type = backbone.info.model_type
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
        return cls(model.to(backbone.device).eval(), backbone.tokenizer, backbone.family)

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

    def forward(self, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor, labels: torch.Tensor) -> DecoderOutput:
        """encoder_hidden 'b n d', encoder_mask 'b n', labels 'b t' (from `tokenize_targets`) -> DecoderOutput.

        logits[:, i] predicts labels[:, i]; loss is the mean cross entropy over the real label tokens.
        """
        input_ids, decoder_mask = self.decoder_inputs(labels)
        encoder_mask = encoder_mask.long()
        if self.family == "bert":
            logits = self.model(
                input_ids=input_ids,
                attention_mask=decoder_mask,
                encoder_hidden_states=encoder_hidden,
                encoder_attention_mask=encoder_mask,
                use_cache=False,
            ).logits
        else:
            logits = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
                attention_mask=encoder_mask,
                decoder_input_ids=input_ids,
                decoder_attention_mask=decoder_mask,
                use_cache=False,
            ).logits
        valid = labels != IGNORE_INDEX
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        token_ll = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
        loss = -token_ll.sum() / valid.sum().clamp(min=1)
        return DecoderOutput(loss=loss, logits=logits, log_likelihood=token_ll.sum(dim=-1))

    # -- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor,
        max_new_tokens: int = 16,
        num_beams: int = 1,
        min_new_tokens: int = 0,
    ) -> torch.Tensor:
        """Greedy (num_beams=1) or beam search: encoder_hidden 'b n d', encoder_mask 'b n' -> token ids 'b t'.

        Row i starts with the start token and ends with the end token, then pad (or stops at max_new_tokens).
        """
        batch = encoder_hidden.shape[0]
        encoder_mask = encoder_mask.long()
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
            config = self.model.config
            return self.model.generate(
                input_ids=start,
                attention_mask=torch.ones_like(start),
                encoder_hidden_states=encoder_hidden,
                encoder_attention_mask=encoder_mask,
                past_key_values=EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config)),
                **common,
            )
        return self.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
            attention_mask=encoder_mask,
            decoder_start_token_id=self.start_id,
            **common,
        )

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """Generated ids 'b t' -> answer strings: drop the start token, cut at the end token, detokenise."""
        rows = []
        for row in token_ids[:, 1:].tolist():
            rows.append(row[: row.index(self.end_id)] if self.end_id in row else row)
        return [text.strip() for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
