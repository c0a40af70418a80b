"""Step 2 of a build, codec: the codec the memory is compressed with, saved in the store with where it came from
(`StoreLayout.codec_source`): one an earlier run saved, one given (`--codec-from`, e.g. codebooks fine-tuned by
`memvq train`), the one shipped for the embedded encoder's memory (`codec_source = "auto"`), or one fitted on the
token vectors of a seeded sample of this corpus's passages."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from memvq.encoders.embedded import shipped_codec
from memvq.memory.artifact import ManifestError, read_json, write_json
from memvq.memory.codecs import MemoryCodec, load_codec, make_codec
from memvq.memory.store import StoreLayout
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.indexing.encode import Encoders, encode_passages
from memvq.pipelines.indexing.plan import Plan, read_rows

log = logging.getLogger(__name__)


def shipped_codec_for(config: BuildConfig, encoders: Encoders) -> Path | None:
    """The codec shipped for this build's memory (`encoders.embedded.shipped_codec`) when `codec_source` is auto,
    the memory is the pretrained embedded encoder's and the shipped codec's config is this build's; else None."""
    if config.codec_source != "auto" or config.encoder.memory_from is not None:
        return None
    path = shipped_codec(config.encoder.model, encoders.memory.memory_layers)
    if path is None or load_codec(path).config != config.codec:
        return None
    return path


def train_codec(
    layout: StoreLayout, config: BuildConfig, plan: Plan, encoders: Encoders, codec_from: Path | None = None
) -> tuple[MemoryCodec, str]:
    """The build's codec and where it came from (see the module docstring), saved in the store."""
    if layout.codec_file.is_file():
        return load_codec(layout.codec_dir), read_json(layout.codec_source, "codec source")["source"]
    shipped = shipped_codec_for(config, encoders) if codec_from is None else None
    given = codec_from or shipped
    if given is not None:
        codec = load_codec(given)
        if codec.config != config.codec:
            raise ManifestError(
                f"the codec in {codec_from} was made with another codec config than this build's; build with the "
                "config of the store it came from (--config STORE/build_config.json)"
            )
        source = f"shipped: {given.name}" if shipped is not None else f"codec_from: {codec_from}"
        log.info("codec: taking the fitted codec in %s", given)
        return _save_codec(codec, layout, source), source
    rng = np.random.default_rng(config.seed)
    rows = codec_sample_rows(config, plan.passages, rng)
    titles, texts = read_rows(layout, plan, rows)
    vectors = []
    with tqdm(total=len(rows), desc="codec: encoding sample", unit=" passages") as bar:
        for chosen, memories, _ in encode_passages(encoders, titles, texts, config):
            vectors.extend(memory.cpu() for memory in memories)
            bar.update(len(chosen))
    sample = torch.cat(vectors)
    if len(sample) > config.codec_train_vectors:
        keep = np.sort(rng.choice(len(sample), size=config.codec_train_vectors, replace=False))
        sample = sample[torch.from_numpy(keep)]
    log.info("fitting codec %s on %d token vectors", config.codec.kind, len(sample))
    return _save_codec(make_codec(config.codec).fit(sample), layout, "fitted"), "fitted"


def codec_sample_rows(config: BuildConfig, passages: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The store rows whose memory a codec is fitted on (sorted; seeded by `config.seed` unless `rng` is given)."""
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    return np.sort(rng.choice(passages, size=min(config.codec_sample_passages, passages), replace=False))


def _save_codec(codec: MemoryCodec, layout: StoreLayout, source: str) -> MemoryCodec:
    """Save the build's codec with a record of where it came from (written first: the codec's header says the
    directory is complete)."""
    write_json(layout.codec_source, {"source": source})
    codec.save(layout.codec_dir)
    return codec
