"""Fast unit tests of the memory codecs on small random / structured data."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from bench.quality import nn_agreement, relative_error
from memvq.memory.artifact import CHECKSUM_KEY, header_checksum
from memvq.memory.codecs import (
    CODEC_FILE,
    CodebookFinetuner,
    CodecConfig,
    CodecLoadError,
    FaissCodec,
    Segment,
    VQCodec,
    compression_ratio,
    load_codec,
    make_codec,
    preset,
)
from memvq.memory.codecs.config import DEFAULT_16X, DEFAULT_32X
from memvq.memory.codecs.vq import _Quantizer, procrustes

DIM = 32
REPO = Path(__file__).resolve().parents[1]


def roundtrip(codec, x):
    """decode(encode(x)): what the store gives back of x."""
    return codec.decode(codec.encode(x))


def structured(n: int, dim: int = DIM, rank: int = 6, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """'n dim' low-rank + noise + offset data, like real memory vectors (a mean and a decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=g) * torch.linspace(2.0, 0.5, rank).unsqueeze(1)
    x = torch.randn(n, rank, generator=g) @ basis + noise * torch.randn(n, dim, generator=g)
    return x + torch.randn(dim, generator=g)


def small_cfg(**kw: object) -> CodecConfig:
    base: dict[str, object] = {
        "dim": DIM,
        "segments": (Segment(dims=16, heads=4), Segment(dims=16, heads=2)),
        "codebook_size": 16,
        "opq_init": "pca",
        "rotation_iters": 3,
        "kmeans_iters": 4,
        "epochs": 1,
        "batch_size": 256,
        "max_train_vectors": 2000,
    }
    base.update(kw)
    return CodecConfig.model_validate(base)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """(train 'n d', held-out test 'n d') from one distribution."""
    x = structured(2500, seed=0)
    return x[:2000], x[2000:]


@pytest.fixture(scope="module")
def fitted(data: tuple[torch.Tensor, torch.Tensor]) -> VQCodec:
    codec = make_codec(small_cfg())
    assert isinstance(codec, VQCodec)
    return codec.fit(data[0])


# --- config, sizes ------------------------------------------------------------------------------


def test_defaults_are_16x_and_32x_vs_bf16() -> None:
    for cfg, ratio in ((DEFAULT_16X, 16.0), (DEFAULT_32X, 32.0)):
        codec = make_codec(cfg)
        assert cfg.dim == 384
        assert codec.code_dtype == np.uint8
        assert codec.bytes_per_token == 384 * 2 / ratio
        assert compression_ratio(codec) == ratio
        assert compression_ratio(codec, dtype_bytes=4) == 2 * ratio
    assert preset("vq16x") == DEFAULT_16X and preset("vq32x") == DEFAULT_32X
    with pytest.raises(ValueError, match="unknown codec preset"):
        preset("nope")


def test_code_width_dtype_and_bytes_per_token() -> None:
    c = make_codec(small_cfg())
    assert (c.code_width, c.code_dtype, c.bytes_per_token) == (6, np.dtype(np.uint8), 6)
    c = make_codec(small_cfg(segments=(Segment(dims=16, heads=4, levels=2),), codebook_size=300))
    assert (c.code_width, c.code_dtype, c.bytes_per_token) == (8, np.dtype(np.uint16), 16)
    assert compression_ratio(c) == DIM * 2 / 16
    f = make_codec(CodecConfig(kind="faiss", dim=DIM, factory="PQ8x8"))
    assert (f.code_width, f.code_dtype, f.bytes_per_token) == (8, np.dtype(np.uint8), 8)
    f = make_codec(CodecConfig(kind="faiss", dim=DIM, factory="PQ8x4"))
    assert f.bytes_per_token == 4  # nibble-packed by faiss: stored bytes, not codes


def test_config_validation_and_json_round_trip() -> None:
    with pytest.raises(pydantic.ValidationError, match="divisible"):
        Segment(dims=10, heads=4)
    with pytest.raises(pydantic.ValidationError, match="dims > dim"):
        CodecConfig(dim=32, segments=(Segment(dims=32, heads=4), Segment(dims=8, heads=2)))
    with pytest.raises(pydantic.ValidationError):
        CodecConfig(kind="faiss", factory=" ")
    with pytest.raises(pydantic.ValidationError):
        CodecConfig(unknown_knob=1)  # type: ignore[call-arg]
    cfg = small_cfg()
    with pytest.raises(pydantic.ValidationError):
        cfg.seed = 3  # type: ignore[misc]
    assert CodecConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert CodecConfig.uniform(heads=8, dim=32).segments == (Segment(dims=32, heads=8),)


# --- vq: shapes, determinism, persistence ---------------------------------------------------------


def test_encode_decode_shapes_and_dtypes(fitted: VQCodec, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    test = data[1]
    codes = fitted.encode(test)
    assert isinstance(codes, np.ndarray)
    assert codes.shape == (len(test), 6) and codes.dtype == np.uint8
    assert codes.max() < 16
    out = fitted.decode(codes)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (len(test), DIM)
    # '... m' -> '... d', numpy or torch codes of any integer type
    batched = fitted.decode(torch.from_numpy(codes[:12].astype(np.int64)).reshape(3, 4, 6))
    assert batched.shape == (3, 4, DIM)
    torch.testing.assert_close(batched.reshape(12, DIM), out[:12])
    assert fitted.encode(test[:0]).shape == (0, 6)
    with pytest.raises(ValueError, match="codes must be"):
        fitted.decode(codes[:, :5])
    with pytest.raises(ValueError, match="expected 'n 32'"):
        fitted.encode(test[:, :5])


def test_uint16_codes_when_codebook_larger_than_256() -> None:
    x = structured(1200, seed=1)
    cfg = small_cfg(segments=(Segment(dims=16, heads=2),), codebook_size=300, rotation_iters=1, epochs=1)
    codec = make_codec(cfg).fit(x)
    codes = codec.encode(x[:100])
    assert codes.dtype == np.uint16 and codes.shape == (100, 2)
    assert codes.max() >= 256  # the upper half of the codebooks is in use
    assert codec.decode(codes).shape == (100, DIM)


def test_unfitted_codec_refuses(tmp_path: Path) -> None:
    codec = make_codec(small_cfg())
    assert not codec.is_fitted
    with pytest.raises(RuntimeError, match="not fitted"):
        codec.encode(structured(10))
    with pytest.raises(RuntimeError, match="unfitted"):
        codec.save(tmp_path / "c")


def test_fit_is_deterministic_and_seed_matters(data: tuple[torch.Tensor, torch.Tensor], fitted: VQCodec) -> None:
    again = make_codec(small_cfg()).fit(data[0])
    np.testing.assert_array_equal(again.encode(data[1]), fitted.encode(data[1]))
    for a, b in zip(again.codebooks, fitted.codebooks, strict=True):
        assert torch.equal(a, b)
    other = make_codec(small_cfg(seed=1)).fit(data[0])
    assert not np.array_equal(other.encode(data[1]), fitted.encode(data[1]))


def test_fit_is_deterministic_across_fresh_processes(tmp_path: Path) -> None:
    """A refit after a crash (a new process) must give byte-identical codes."""
    script = textwrap.dedent(
        f"""
        import hashlib, sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_codec import small_cfg, structured
        from memvq.memory.codecs import make_codec
        x = structured(2000, seed=0)
        codes = make_codec(small_cfg()).fit(x).encode(x)
        print(hashlib.sha256(codes.tobytes()).hexdigest())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    x = structured(2000, seed=0)
    here = hashlib.sha256(make_codec(small_cfg()).fit(x).encode(x).tobytes()).hexdigest()
    assert out.stdout.strip().splitlines()[-1] == here


def test_save_load_round_trip(tmp_path: Path, fitted: VQCodec, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    d = tmp_path / "codec"
    fitted.save(d)
    meta = json.loads((d / CODEC_FILE).read_text())
    assert meta["kind"] == "vq" and meta["bytes_per_token"] == 6
    assert CodecConfig.model_validate(meta["config"]) == fitted.config
    assert sorted(p.name for p in d.iterdir()) == [CODEC_FILE, VQCodec.weights_file]  # no temp files left
    loaded = load_codec(d)
    assert isinstance(loaded, VQCodec) and loaded.config == fitted.config
    codes = fitted.encode(data[1])
    np.testing.assert_array_equal(loaded.encode(data[1]), codes)
    assert torch.equal(loaded.decode(codes), fitted.decode(codes))
    fitted.save(d)  # overwriting in place works
    assert load_codec(d).config == fitted.config


def test_load_errors_are_clear(tmp_path: Path, fitted: VQCodec) -> None:
    with pytest.raises(CodecLoadError, match="does not exist"):
        load_codec(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecLoadError, match=r"codec\.json is missing"):
        load_codec(tmp_path / "empty")
    d = tmp_path / "c"
    fitted.save(d)
    weights = d / VQCodec.weights_file
    blob = weights.read_bytes()
    weights.write_bytes(blob[:-10] + b"0123456789")
    with pytest.raises(CodecLoadError, match="sha256 mismatch"):
        load_codec(d)
    weights.unlink()
    with pytest.raises(CodecLoadError, match="missing"):
        load_codec(d)
    (d / CODEC_FILE).write_text("{not json")
    with pytest.raises(CodecLoadError, match="corrupt"):
        load_codec(d)
    (d / CODEC_FILE).write_text(json.dumps({"format_version": 1, "kind": "vq", "config": {"kind": "vq"}}))
    with pytest.raises(CodecLoadError, match="built by an older memvq"):
        load_codec(d)
    header = {"format": "memvq-codec", "version": 2, "kind": "vq", "config": {"kind": "zzz"}}
    header |= {"files": {}, "library_versions": {}}
    (d / CODEC_FILE).write_text(json.dumps(header | {CHECKSUM_KEY: header_checksum(header)}))
    with pytest.raises(CodecLoadError, match="corrupt"):
        load_codec(d)


# --- vq: quality ----------------------------------------------------------------------------------


def test_codebook_points_round_trip_exactly(fitted: VQCodec) -> None:
    """Vectors that are decoded codes re-encode to the same codes (single-level segments)."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (200, fitted.code_width), generator=g)
    x = fitted.decode(codes)
    np.testing.assert_array_equal(fitted.encode(x), codes.numpy().astype(np.uint8))
    torch.testing.assert_close(fitted.decode(fitted.encode(x)), x, atol=1e-4, rtol=1e-4)


def test_vq_beats_random_codes_and_the_mean(fitted: VQCodec, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, test = data
    err = relative_error(test, roundtrip(fitted, test))
    g = torch.Generator().manual_seed(0)
    random_codes = torch.randint(0, 16, (len(test), fitted.code_width), generator=g)
    err_random = relative_error(test, fitted.decode(random_codes))
    err_mean = relative_error(test, train.mean(0).expand_as(test))
    assert err < 0.5 * err_mean < err_random
    assert err < 0.2


def test_more_bits_and_rotation_help(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, test = data

    def err(**kw: object) -> float:
        return relative_error(test, roundtrip(make_codec(small_cfg(**kw)).fit(train), test))

    plain = err(rotation="none", epochs=0)
    opq = err(rotation="opq", epochs=0)
    residual = err(segments=(Segment(dims=16, heads=4, levels=2), Segment(dims=16, heads=2)), epochs=0)
    assert opq < plain
    assert residual < opq


def test_ema_epochs_update_the_codebooks(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    a = make_codec(small_cfg(epochs=0)).fit(data[0])
    b = make_codec(small_cfg(epochs=2)).fit(data[0])
    assert isinstance(a, VQCodec) and isinstance(b, VQCodec)
    assert any(not torch.equal(x, y) for x, y in zip(a.codebooks, b.codebooks, strict=True))
    assert relative_error(data[1], roundtrip(b, data[1])) < 1.1 * relative_error(data[1], roundtrip(a, data[1]))


def test_codebook_finetuner_reads_like_the_codec_and_passes_gradients(
    fitted: VQCodec, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    tuner = CodebookFinetuner(fitted).eval()
    x = data[1][:200].clone().requires_grad_(True)
    out = tuner(x)
    assert torch.allclose(out, fitted.decode(fitted.encode(x.detach())), atol=1e-5)
    out.square().sum().backward()  # straight-through: d out / d x is the identity
    assert x.grad is not None and torch.allclose(x.grad, 2 * out.detach())
    assert all(torch.equal(a, b) for a, b in zip(tuner.codec().codebooks, fitted.codebooks, strict=True))


def test_codebook_finetuner_follows_the_data_it_is_trained_on(
    fitted: VQCodec, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    before = [cb.clone() for cb in fitted.codebooks]
    shifted = structured(2500, seed=0) * 1.3 + 0.4  # the memory the model reads drifts from the fit sample
    train, test = shifted[:2000], shifted[2000:]
    tuner = CodebookFinetuner(fitted, decay=0.8).train()
    for _ in range(3):
        for start in range(0, len(train), 250):
            tuner(train[start : start + 250])
    tuned = tuner.codec()
    assert relative_error(test, roundtrip(tuned, test)) < 0.8 * relative_error(test, roundtrip(fitted, test))
    assert all(torch.equal(a, b) for a, b in zip(fitted.codebooks, before, strict=True))  # the base is untouched
    resumed = CodebookFinetuner(fitted)
    resumed.load_state_dict(tuner.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.codec().codebooks, tuned.codebooks, strict=True))


def test_faiss_kernel_and_torch_kernel_agree() -> None:
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(6, 256, 8, generator=g)
    r = torch.randn(3000, 48, generator=g)
    fast = _Quantizer(cb)
    assert fast._pq is not None
    slow = _Quantizer(cb)
    slow._pq = None
    assert torch.equal(fast.assign(r), slow.assign(r))


def test_procrustes_recovers_a_rotation() -> None:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    z = torch.randn(100, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(procrustes(z, z @ q), q)


# --- faiss baseline, dispatch ---------------------------------------------------------------------


def test_faiss_codec_fit_encode_save_load(tmp_path: Path, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, test = data
    codec = make_codec(CodecConfig(kind="faiss", dim=DIM, factory="PQ8x5"))
    assert isinstance(codec, FaissCodec)
    codec.fit(train)
    codes = codec.encode(test)
    assert codes.shape == (len(test), codec.code_width) and codes.dtype == np.uint8
    err = relative_error(test, codec.decode(codes))
    err_mean = relative_error(test, train.mean(0).expand_as(test))
    assert err < 0.5 * err_mean and err < 0.4
    codec.save(tmp_path / "f")
    loaded = load_codec(tmp_path / "f")
    assert isinstance(loaded, FaissCodec)
    np.testing.assert_array_equal(loaded.encode(test), codes)
    assert torch.equal(loaded.decode(codes), codec.decode(codes))
    again = make_codec(codec.config).fit(train)
    np.testing.assert_array_equal(again.encode(test), codes)
    with pytest.raises(ValueError, match="factory"):
        make_codec(CodecConfig(kind="faiss", dim=DIM, factory="NotAnIndex12"))


def test_make_and_load_dispatch_on_kind(tmp_path: Path, fitted: VQCodec) -> None:
    assert isinstance(make_codec(small_cfg()), VQCodec)
    assert isinstance(make_codec(CodecConfig(kind="faiss", dim=DIM, factory="PQ4x4")), FaissCodec)
    fitted.save(tmp_path / "v")
    assert isinstance(load_codec(tmp_path / "v"), VQCodec)
    with pytest.raises(ValueError, match="kind='vq'"):
        VQCodec(CodecConfig(kind="faiss", dim=DIM))
    with pytest.raises(ValueError, match="kind='faiss'"):
        FaissCodec(small_cfg())


# --- metrics --------------------------------------------------------------------------------------


def test_relative_error() -> None:
    x = structured(100)
    assert relative_error(x, x) == 0.0
    assert relative_error(x, torch.zeros_like(x)) == pytest.approx(1.0)
    assert relative_error(x, 1.5 * x) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        relative_error(x, x[:, :3])


def test_nn_agreement() -> None:
    x = structured(400, seed=3)
    q = structured(50, seed=4)
    assert nn_agreement(x, x, q, k=10) == 1.0
    assert nn_agreement(x, x + 1e-6, q, k=10) == 1.0
    shuffled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    assert nn_agreement(x, shuffled, q, k=10) < 0.2
    assert 0.0 <= nn_agreement(x, x + 0.5 * torch.randn_like(x), q, k=5) <= 1.0
    with pytest.raises(ValueError):
        nn_agreement(x, x, q, k=0)
