"""The backbone: a pretrained encoder split into memory layers (lower 1 - alpha) and live layers (top alpha).

It owns tokenisation, the memory pass (embeddings + memory layers, run offline over the corpus), the live pass
(the remaining layers, run at query time over [question; memory]) and the dense retrieval embedding (mean
pooling of the last layer, L2-normalised, as sentence-transformers does for MiniLM), which the build job gets
from the same forward pass as the memory so that the corpus is read once.

Three families are supported: BERT (the embedded default, all-MiniLM-L6-v2), MPNet (all-mpnet-base-v2) and T5 (t5,
flan-t5, mt5), from any local checkpoint. Layers are called through their public modules; masks come from
`transformers.masking_utils.create_bidirectional_mask`, as the models themselves build them.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BatchEncoding,
    BertModel,
    MPNetModel,
    MT5EncoderModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5EncoderModel,
)
from transformers.masking_utils import create_bidirectional_mask

from memvq.encoders.config import LUMEN_ALPHA, memory_layer_count
from memvq.encoders.embedded import resolve_model_path

# model_type (from config.json) -> (family, encoder class)
SUPPORTED_MODEL_TYPES: dict[str, tuple[str, type[PreTrainedModel]]] = {
    "bert": ("bert", BertModel),
    "mpnet": ("mpnet", MPNetModel),
    "t5": ("t5", T5EncoderModel),
    "mt5": ("t5", MT5EncoderModel),
}


def tokenize_passage_pairs(
    tokenizer: PreTrainedTokenizerBase, titles: list[str], texts: list[str], max_length: int, **options: bool | str
) -> BatchEncoding:
    """The one tokenisation of passages (the build's memory, the reader's token ids, the extract head's offsets):
    `[CLS] title [SEP] text [SEP]` for BERT, `title </s> text </s>` for T5; padded, the text truncated.
    `options`: more tokenizer arguments (return_tensors, return_offsets_mapping)."""
    return tokenizer(titles, texts, truncation="only_second", max_length=max_length, padding=True, **options)


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one the backbone can split."""


_LAYER_KEY = re.compile(r"^encoder\.(?:layer|block)\.(\d+)\.")


def layer_index(key: str) -> int | None:
    """The encoder layer a backbone state_dict key belongs to (None: embeddings, final norm, ...)."""
    match = _LAYER_KEY.match(key)
    return None if match is None else int(match.group(1))


class _LayerStack(ABC):
    """Family-specific access to the embedding layer, the transformer layers and the final normalisation."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList: ...

    @property
    def inputs(self) -> list[nn.Module]:
        """The modules before the layers, or shared by all of them (the embeddings): frozen with the memory side."""
        return [self.model.embeddings]

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor: ...

    @abstractmethod
    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor: ...

    def finalize(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask)


class _BertStack(_LayerStack):
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        return self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        mask = self.mask(hidden, attention_mask)
        for layer in self.layers[start:stop]:
            hidden = layer(hidden, attention_mask=mask)
        return hidden


class _MPNetStack(_LayerStack):
    """MPNet: absolute positions in the embeddings, and a relative position bias every layer adds, computed once
    per stack over the sequence it runs (the joined [question; memory] for the live layers, as the model does)."""

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    @property
    def inputs(self) -> list[nn.Module]:
        return [self.model.embeddings, self.model.encoder.relative_attention_bias]

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        return self.model.embeddings(input_ids=input_ids)

    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if start >= stop:
            return hidden
        mask = self.mask(hidden, attention_mask)
        position_bias = self.model.encoder.compute_position_bias(hidden).to(hidden.dtype)
        for layer in self.layers[start:stop]:
            hidden = layer(hidden, mask, position_bias)[0]
        return hidden


class _T5Stack(_LayerStack):
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.block

    @property
    def inputs(self) -> list[nn.Module]:
        return [self.model.shared]  # the relative position bias lives in block 0

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @property
    def num_layers(self) -> int:
        return self.model.config.num_layers

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        return self.model.encoder.dropout(self.model.encoder.embed_tokens(input_ids))

    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if start >= stop:
            return hidden
        mask = self.mask(hidden, attention_mask)
        length = hidden.shape[1]
        # Only block 0 owns the relative position bias; every block reuses it, so a split stack recomputes it.
        position_bias = self.layers[0].layer[0].SelfAttention.compute_bias(length, length, device=hidden.device)
        for block in self.layers[start:stop]:
            hidden = block(hidden, mask, position_bias)[0]
        return hidden

    def finalize(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.encoder.dropout(self.model.encoder.final_layer_norm(hidden))


_STACKS: dict[str, type[_LayerStack]] = {"bert": _BertStack, "mpnet": _MPNetStack, "t5": _T5Stack}


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a backbone in manifests."""

    model_path: str
    model_type: str
    family: str
    num_layers: int
    memory_layers: int
    hidden_size: int


class Backbone(nn.Module):
    """A pretrained encoder whose layers [0, memory_layers) make the memory and the rest are live."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        memory_layers: int,
        model_path: str = "",
    ) -> None:
        super().__init__()
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(_unsupported_message(model_type, model_path))
        self.family = SUPPORTED_MODEL_TYPES[model_type][0]
        self.model = model
        self.tokenizer = tokenizer
        self._stack = _STACKS[self.family](model)
        self.num_layers = len(self._stack.layers)
        if not 0 <= memory_layers <= self.num_layers:
            raise ValueError(f"memory_layers must be in [0, {self.num_layers}], got {memory_layers}")
        self.memory_layers = memory_layers
        self.info = BackboneInfo(
            model_path=model_path,
            model_type=model_type,
            family=self.family,
            num_layers=self.num_layers,
            memory_layers=memory_layers,
            hidden_size=self._stack.hidden_size,
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, alpha: float = LUMEN_ALPHA, memory_layers: int | None = None
    ) -> Backbone:
        """Load a local checkpoint (None or `EMBEDDED_MODEL`: the embedded MiniLM) and split it; nothing is
        fetched from a hub."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = resolve_model_path(path)
        if not Path(path).exists():
            raise FileNotFoundError(f"model path {path!r} does not exist (give a local checkpoint directory)")
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(_unsupported_message(config.model_type, path))
        family, model_class = SUPPORTED_MODEL_TYPES[config.model_type]
        options = {} if family == "t5" else {"add_pooling_layer": False}  # no pooler: the memvq embedding mean-pools
        model = model_class.from_pretrained(path, **options)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if memory_layers is None:
            memory_layers = memory_layer_count(_STACKS[family](model).num_layers, alpha)
        return cls(model.eval(), tokenizer, memory_layers, model_path=path)

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers, memory layers first."""
        return self._stack.layers

    @property
    def inputs(self) -> list[nn.Module]:
        """The modules before the layers or shared by all of them (embeddings; MPNet's relative position bias):
        frozen with the memory side."""
        return self._stack.inputs

    def memory_digest(self) -> str:
        """sha256 of the memory layers' tensors (as fp16): what names the memory they make, so that a store and
        a reader with fine-tuned memory layers can be matched."""
        digest = hashlib.sha256()
        for index, layer in enumerate(self._stack.layers[: self.memory_layers]):
            for key, value in sorted(layer.state_dict().items()):
                value = value.detach().to("cpu")
                value = value.half() if value.is_floating_point() else value
                digest.update(f"{index}.{key}".encode())
                digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- tokenisation ------------------------------------------------------------------------------------------

    def tokenize_passages(self, titles: list[str], texts: list[str], max_length: int) -> BatchEncoding:
        """`tokenize_passage_pairs` as tensors."""
        return tokenize_passage_pairs(self.tokenizer, titles, texts, max_length, return_tensors="pt")

    def tokenize_questions(self, questions: list[str], max_length: int) -> BatchEncoding:
        return self.tokenizer(questions, truncation=True, max_length=max_length, padding=True, return_tensors="pt")

    # -- forward passes ----------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids 'b l' -> input embeddings 'b l d'."""
        return self._stack.embed(input_ids, token_type_ids)

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run layers [start, stop) over hidden 'b l d' with padding mask 'b l' (1 = token)."""
        return self._stack.run(hidden, attention_mask, start, stop)

    def encode_memory(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The memory: embeddings + memory layers, 'b l' -> 'b l d'."""
        hidden = self.embed(input_ids, token_type_ids)
        return self.run_layers(hidden, attention_mask, 0, self.memory_layers)

    def run_live(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int | None = None,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Live layers over memory 'b l d' (default: all of them, then the family's final norm)."""
        start = self.memory_layers if start is None else start
        stop = self.num_layers if stop is None else stop
        hidden = self.run_layers(hidden, attention_mask, start, stop)
        return self._stack.finalize(hidden) if stop == self.num_layers else hidden

    def encode_with_embedding(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over passages: (memory 'b l d', dense embedding 'b d')."""
        memory = self.encode_memory(input_ids, attention_mask, token_type_ids)
        last = self.run_live(memory, attention_mask)
        return memory, mean_pool(last, attention_mask)

    def embed_texts(self, texts: list[str], max_length: int) -> torch.Tensor:
        """Dense retrieval embeddings 'b d' of plain texts (questions)."""
        batch = self.tokenize_questions(texts, max_length).to(self.device)
        return self.encode_with_embedding(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))[1]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens then L2 normalisation: 'b l d', 'b l' -> 'b d'."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def _unsupported_message(model_type: str, path: str) -> str:
    supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
    return (
        f"unsupported encoder architecture {model_type!r} at {path!r}: memvq can split these model types: "
        f"{supported} (BERT family, e.g. all-MiniLM-L6-v2; MPNet, e.g. all-mpnet-base-v2; T5 family: t5, flan-t5, mt5)"
    )
