"""VQ-VAE memory codec in the MEMORY-VQ sense, with EMA codebooks from ``vector-quantize-pytorch``.

Model (d = config.dim, e = config.kept_dims <= d):

* encoder: ``z = (x - mean) @ R``, R a 'd e' matrix with orthonormal columns (a learned rotation,
  optionally truncated to the leading e directions);
* quantizer: z is cut into segments (``config.segments``, in order); segment s covers ``dims`` dims
  with ``levels`` residual product quantizers, each splitting it into ``heads`` sub-vectors of
  ``c = dims / heads`` dims with a separate codebook of ``codebook_size`` codes per head
  (``VectorQuantize(heads=h, separate_codebook_per_head=True, codebook_dim=c)``). Level l
  quantizes what levels < l left. Segments give a non-uniform bit allocation: the leading,
  high-variance PCA directions get narrower sub-vectors (more bits per dim), trailing directions
  get wider ones, and the lowest-variance directions none (reverse water-filling);
* decoder: gather the codewords, sum the levels, concatenate the segments, ``x_hat = z_hat @ R^T +
  mean`` (an embedding lookup plus one 'e d' matmul).

Training (``fit``) on a sample of real memory vectors, deterministic given the sample and
``config.seed``:

1. a seeded subsample of at most ``max_train_vectors`` vectors; their mean;
2. initial rotation: identity (``none``) or PCA (``pca``/``opq``): eigenvectors in descending order
   of eigenvalue, segment s taking its slice of the ranking, dealt across the segment's heads so
   that every head gets a balanced share of log-variance (faiss's balanced bins); for ``opq`` with
   ``opq_init="random"`` further mixed by a seeded random rotation within each segment (on the
   MiniLM vectors the OPQ rounds from the plain PCA basis stall in a poor optimum: 0.36 relative
   error at 48 bytes, against 0.305 from the random start);
3. k-means init of every codebook (``kmeans_iters`` Lloyd iterations, level by level on residuals);
4. for ``opq``: ``rotation_iters`` rounds of [encode the sample, one Lloyd update of every codebook,
   orthogonal Procrustes ``R = U V^T`` with ``U S V^T = svd((x - mean)^T y)``, y the quantized
   sample in rotated space] - the OPQ alternation, against this very quantizer;
5. ``epochs`` epochs of EMA updates with dead-code reset in ``vector_quantize_pytorch``'s
   ``VectorQuantize`` (train mode, shuffled batches), rotation fixed; then the codebooks are frozen.

Encoding: eval mode, no codebook update, no randomness. The nearest-codeword search of a level uses
faiss's SIMD product-quantizer kernel (``ProductQuantizer.compute_codes``) when the codebook size
is 256 or 65536, a chunked batched-matmul + argmin in torch otherwise. Codes are laid out
'n (segment level head)'.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import faiss
import numpy as np
import torch
from einops import rearrange
from torch.nn import functional as F
from tqdm.auto import tqdm

from memvq.memory.codecs.base import MemoryCodec
from memvq.memory.codecs.config import CodecConfig, Segment
from memvq.memory.codecs.ema import ema_quantizer, quantize_levels, seed_usage

__all__ = ["VQCodec", "balanced_pca_rotation", "procrustes"]

LOG = logging.getLogger(__name__)

ENCODE_CHUNK = 4096  # tokens per encode chunk
FAISS_TABLE_CHUNK = 512  # tokens per faiss call for sub-vectors of >= 16 dims
TORCH_ASSIGN_CHUNK = 1024  # tokens per block of the torch fallback kernel ('h n k' scores in cache)


def balanced_pca_rotation(cov: torch.Tensor, segments: tuple[Segment, ...]) -> torch.Tensor:
    """'d e' matrix of covariance eigenvectors with orthonormal columns, grouped by segment and head.

    Eigen-directions ranked by descending eigenvalue; segment s gets the next ``s.dims`` of them,
    dealt to its heads each to the not-yet-full head with the smallest sum of log-eigenvalues so far.
    Column block [offset + h*c, offset + (h+1)*c) is head h of the segment. cov: 'd d' float64.
    """
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True, stable=True).tolist()
    log_ev = torch.log(evals.clamp_min(1e-12)).tolist()
    cols: list[int] = []
    start = 0
    for seg in segments:
        ranked = order[start : start + seg.dims]
        start += seg.dims
        loads = [0.0] * seg.heads
        members: list[list[int]] = [[] for _ in range(seg.heads)]
        for j in ranked:
            h = min((b for b in range(seg.heads) if len(members[b]) < seg.sub_dim), key=lambda b: loads[b])
            members[h].append(j)
            loads[h] += log_ev[j]
        cols.extend(j for m in members for j in m)
    return evecs[:, cols].contiguous()


def procrustes(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """'d e' R with orthonormal columns minimizing ||z @ R - y||_F; z: 'n d', y: 'n e'.

    R = U V^T with U S V^T the thin SVD of z^T y (the product in z's dtype, the SVD in float64).
    """
    m = (z.T @ y).double()  # 'd e'
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


class _Quantizer:
    """One product quantizer (a level of a segment): codebooks 'h k c' and its assignment kernel."""

    def __init__(self, codebooks: torch.Tensor) -> None:
        self.set(codebooks)

    def set(self, codebooks: torch.Tensor) -> None:
        self.codebooks = codebooks.contiguous()  # 'h k c'
        h, k, c = codebooks.shape
        self.table = rearrange(self.codebooks, "h k c -> (h k) c")
        self.offsets = torch.arange(h, device=codebooks.device) * k  # 'h'
        self._cb_t2 = (-2.0 * rearrange(self.codebooks, "h k c -> h c k")).contiguous()
        self._cb_sq = rearrange(self.codebooks.square().sum(-1), "h k -> h 1 k").contiguous()
        nbits = {256: 8, 65536: 16}.get(k)
        self._pq: faiss.ProductQuantizer | None = None
        if nbits is not None and codebooks.device.type == "cpu":
            pq = faiss.ProductQuantizer(h * c, h, nbits)
            faiss.copy_array_to_vector(self.codebooks.numpy().ravel(), pq.centroids)
            self._pq = pq

    def assign(self, r: torch.Tensor) -> torch.Tensor:
        """'n (h c)' float32 -> int64 'n h' nearest codeword per head."""
        if self._pq is not None:
            return torch.from_numpy(self.assign_faiss(r).astype(np.int64))
        return self.assign_torch(r)

    def assign_faiss(self, r: torch.Tensor) -> np.ndarray:
        """'n (h c)' float32 CPU -> 'n h' uint8 (256 codes) or uint16 (65536 codes), faiss's kernel."""
        assert self._pq is not None
        h, k, c = self.codebooks.shape
        dt = np.dtype(np.uint8) if k == 256 else np.dtype("<u2")
        if r.shape[0] == 0:
            return np.zeros((0, h), dtype=dt)
        rn = np.ascontiguousarray(r.numpy(), dtype=np.float32)
        # faiss switches to distance tables + BLAS for sub-vectors >= 16 dims; small blocks keep those
        # tables in cache
        step = FAISS_TABLE_CHUNK if c >= 16 else len(rn)
        parts = [self._pq.compute_codes(rn[s : s + step]) for s in range(0, len(rn), step)]
        codes = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return codes.reshape(len(rn), -1).view(dt)

    def assign_torch(self, r: torch.Tensor) -> torch.Tensor:
        """'n (h c)' float32 -> int64 'n h': chunked batched matmul + argmin (any device, any k)."""
        h = self.codebooks.shape[0]
        if r.shape[0] == 0:
            return torch.zeros(0, h, dtype=torch.int64, device=r.device)
        out = []
        for s in range(0, r.shape[0], TORCH_ASSIGN_CHUNK):
            rr = rearrange(r[s : s + TORCH_ASSIGN_CHUNK], "n (h c) -> h n c", h=h).contiguous()
            scores = torch.baddbmm(self._cb_sq, rr, self._cb_t2)  # 'h n k' = ||e||^2 - 2 r.e
            out.append(scores.argmin(dim=-1).T)  # 'n h'
        return torch.cat(out)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 'n h' -> 'n (h c)' codewords."""
        return rearrange(F.embedding(codes + self.offsets, self.table), "n h c -> n (h c)")


class VQCodec(MemoryCodec):
    """Rotation + segmented residual product VQ with EMA codebooks (see the module docstring)."""

    weights_file = "vq.pt"

    def __init__(self, config: CodecConfig) -> None:
        if config.kind != "vq":
            raise ValueError(f"VQCodec needs kind='vq', got {config.kind!r}")
        self.config = config
        self._device = torch.device("cpu")
        d, e, k = config.dim, config.kept_dims, config.codebook_size
        self.mean = torch.zeros(d)  # 'd'
        self.rotation = torch.eye(d, e)  # 'd e'; z = (x - mean) @ rotation
        # one 'h k c' tensor per (segment, level), segment-major
        self.codebooks: list[torch.Tensor] = [
            torch.zeros(seg.heads, k, seg.sub_dim) for seg in config.segments for _ in range(seg.levels)
        ]
        self._fitted = False
        self._refresh()

    # ---- properties ------------------------------------------------------------------------

    @property
    def code_width(self) -> int:
        return sum(seg.heads * seg.levels for seg in self.config.segments)

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.config.codebook_size <= 256 else np.dtype(np.uint16)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def to(self, device: torch.device | str) -> VQCodec:
        self._device = torch.device(device)
        self.mean = self.mean.to(self._device)
        self.rotation = self.rotation.to(self._device)
        self.codebooks = [cb.to(self._device) for cb in self.codebooks]
        self._refresh()
        return self

    def _refresh(self) -> None:
        """Derived tensors of the encode / decode kernels."""
        self._bias = (-self.mean @ self.rotation).contiguous()  # 'e': z = x @ R + bias
        self._rotation_t = self.rotation.T.contiguous()  # 'e d'
        self._quantizers = [_Quantizer(cb) for cb in self.codebooks]

    def _layout(self) -> list[tuple[int, int, list[int]]]:
        """Per segment: (first rotated dim, dims, indices of its levels in self._quantizers)."""
        out, off, qi = [], 0, 0
        for seg in self.config.segments:
            out.append((off, seg.dims, list(range(qi, qi + seg.levels))))
            off += seg.dims
            qi += seg.levels
        return out

    # ---- encode / decode -------------------------------------------------------------------

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """'n d' -> 'n e' centred and rotated."""
        return torch.addmm(self._bias, x, self.rotation)

    def _encode_rotated(
        self, z: torch.Tensor, targets: list[torch.Tensor] | None = None, recon: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotated 'n e' -> (int64 codes 'n m', quantized 'n e' or None); greedy over residual levels.

        (Training-time twin of encode().) If `targets` is a list, the residual each quantizer saw
        ('n (h c)') is appended to it. With recon=False the reconstruction is skipped where no
        later level needs it.
        """
        codes = []
        zq = torch.empty_like(z) if recon else None
        for off, dims, levels in self._layout():
            r = z[:, off : off + dims].contiguous()
            acc = torch.zeros_like(r) if recon else None
            for i, qi in enumerate(levels):
                quant = self._quantizers[qi]
                c = quant.assign(r)  # 'n h'
                codes.append(c)
                if targets is not None:
                    targets.append(r)
                if not recon and i + 1 == len(levels):
                    break
                chosen = quant.lookup(c)
                if acc is not None:
                    acc += chosen
                r = r - chosen
            if zq is not None and acc is not None:
                zq[:, off : off + dims] = acc
        return torch.cat(codes, dim=1), zq

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> np.ndarray:
        """'n d' float -> 'n m' code_dtype."""
        if not self._fitted:
            raise RuntimeError("codec is not fitted; call fit() or load_codec()")
        x = self._check_input(x)
        out = np.empty((x.shape[0], self.code_width), dtype=self.code_dtype)
        layout = self._layout()
        for s in range(0, x.shape[0], ENCODE_CHUNK):
            chunk = x[s : s + ENCODE_CHUNK].to(self._device, torch.float32)
            z = self._rotate(chunk)  # 'n e'
            rows, col = slice(s, s + len(chunk)), 0
            for off, dims, levels in layout:
                r = z[:, off : off + dims]
                for i, qi in enumerate(levels):
                    quant = self._quantizers[qi]
                    h = quant.codebooks.shape[0]
                    if quant._pq is not None:  # native uint8 / uint16 codes straight from faiss
                        raw = quant.assign_faiss(r)
                        out[rows, col : col + h] = raw
                        codes = torch.from_numpy(raw.astype(np.int64)) if i + 1 < len(levels) else None
                    else:
                        codes = quant.assign_torch(r)
                        out[rows, col : col + h] = codes.cpu().numpy()
                    col += h
                    if codes is not None and i + 1 < len(levels):
                        r = r - quant.lookup(codes)
        return out

    @torch.inference_mode()
    def decode(self, codes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """'... m' integer codes -> '... d' float32 on self.device."""
        if not self._fitted:
            raise RuntimeError("codec is not fitted; call fit() or load_codec()")
        t = self._check_codes(codes)
        z = self._lookup_rotated(t.reshape(-1, self.code_width))  # 'N e'
        return torch.addmm(self.mean, z, self._rotation_t).reshape(*t.shape[:-1], self.config.dim)

    def _check_input(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"expected 'n {self.config.dim}' vectors, got shape {tuple(x.shape)}")
        return x

    # ---- training --------------------------------------------------------------------------

    def _lloyd_step(self, qi: int, r: torch.Tensor, codes: torch.Tensor) -> None:
        """Codebook qi := mean of the residuals 'n (h c)' assigned to each entry (empty: unchanged)."""
        quant = self._quantizers[qi]
        h, k, c = quant.codebooks.shape
        idx = (codes + quant.offsets).reshape(-1)  # '(n h)'
        rows = rearrange(r, "n (h c) -> (n h) c", h=h).double()
        sums = torch.zeros(h * k, c, dtype=torch.float64).index_add_(0, idx, rows)
        counts = torch.bincount(idx, minlength=h * k).unsqueeze(1)  # '(h k) 1'
        new = torch.where(counts > 0, sums / counts.clamp_min(1), quant.table.double())
        self.codebooks[qi] = rearrange(new.float(), "(h k) c -> h k c", h=h).contiguous()
        quant.set(self.codebooks[qi])

    def _lloyd_update(self, targets: list[torch.Tensor], codes: torch.Tensor) -> None:
        """One Lloyd update of every codebook, given the residuals each saw and all the codes."""
        col = 0
        for qi, r in enumerate(targets):
            h = self.codebooks[qi].shape[0]
            self._lloyd_step(qi, r, codes[:, col : col + h])
            col += h

    def _kmeans_init(self, z: torch.Tensor, gen: torch.Generator) -> None:
        """Seeded random-sample init, then kmeans_iters Lloyd iterations, level by level."""
        k = self.config.codebook_size
        for off, dims, levels in self._layout():
            r = z[:, off : off + dims].contiguous()
            for qi in levels:
                h = self.codebooks[qi].shape[0]
                pick = torch.randperm(r.shape[0], generator=gen)[:k]
                self.codebooks[qi] = rearrange(r[pick], "k (h c) -> h k c", h=h).contiguous()
                self._quantizers[qi].set(self.codebooks[qi])
                for _ in range(self.config.kmeans_iters):
                    self._lloyd_step(qi, r, self._quantizers[qi].assign(r))
                r = r - self._quantizers[qi].lookup(self._quantizers[qi].assign(r))

    def _segment_mixing(self, gen: torch.Generator) -> torch.Tensor:
        """Block-diagonal 'e e' random orthogonal matrix, one block per segment (seeded).

        OPQ from the plain PCA basis gets stuck in a poor local optimum (every head a product of
        decorrelated directions); a random rotation within each segment (which keeps the
        segment's variance budget) is a much better starting point, as in faiss's OPQ.
        """
        blocks = []
        for seg in self.config.segments:
            g = torch.randn(seg.dims, seg.dims, generator=gen, dtype=torch.float64)
            q, r = torch.linalg.qr(g)
            blocks.append(q * torch.sign(torch.diagonal(r)))
        return torch.block_diag(*blocks)

    def _lookup_rotated(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 'n m' codes -> their reconstruction 'n e' in rotated space."""
        parts, col = [], 0
        for _, _, levels in self._layout():
            acc: torch.Tensor | None = None
            for qi in levels:
                quant = self._quantizers[qi]
                h = quant.codebooks.shape[0]
                v = quant.lookup(codes[:, col : col + h])  # 'n (h c)'
                acc = v if acc is None else acc + v
                col += h
            assert acc is not None
            parts.append(acc)
        return torch.cat(parts, dim=1)

    def _ema_refine(self, z: torch.Tensor, gen: torch.Generator, bar: tqdm) -> None:
        """EMA epochs with dead-code reset in vector_quantize_pytorch, starting from our codebooks (`bar` counts
        the epochs)."""
        cfg = self.config
        n, bs = z.shape[0], min(cfg.batch_size, z.shape[0])
        vqs = [ema_quantizer(quant.codebooks, cfg.decay, cfg.threshold_ema_dead_code) for quant in self._quantizers]
        seed_usage(vqs, self._encode_rotated(z, recon=False)[0], bs)
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n - bs + 1, bs):  # full batches only
                quantize_levels(self._layout(), vqs, z[perm[s : s + bs]])
            bar.update(1)
        self._set_codebooks([vq.codebook for vq in vqs])

    def _set_codebooks(self, codebooks: list[torch.Tensor]) -> None:
        self.codebooks = [cb.detach().clone().float().contiguous() for cb in codebooks]
        self._refresh()

    def fit(self, x: torch.Tensor) -> VQCodec:
        """Learn mean, rotation and codebooks on 'n d' float32 real memory vectors."""
        cfg = self.config
        x = self._check_input(x).detach().to("cpu", torch.float32)
        if x.shape[0] < cfg.codebook_size:
            raise ValueError(f"need at least codebook_size={cfg.codebook_size} vectors, got {x.shape[0]}")
        self.to("cpu")
        gen = torch.Generator().manual_seed(cfg.seed)
        if x.shape[0] > cfg.max_train_vectors:
            keep = torch.randperm(x.shape[0], generator=gen)[: cfg.max_train_vectors]
            x = x[torch.sort(keep).values]
        x = x.contiguous()
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.no_grad():
            torch.manual_seed(cfg.seed)  # the library's dead-code resets sample with the global RNG
            x64 = x.double()
            mean64 = x64.mean(0)
            self.mean = mean64.float()
            if cfg.rotation == "none":
                self.rotation = torch.eye(cfg.dim, cfg.kept_dims)
            else:
                xc64 = x64 - mean64
                cov = xc64.T @ xc64 / max(1, x.shape[0] - 1)
                rot = balanced_pca_rotation(cov, cfg.segments)
                if cfg.rotation == "opq" and cfg.opq_init == "random":
                    rot = rot @ self._segment_mixing(gen)
                self.rotation = rot.float()
            del x64
            self._refresh()
            xc = x - self.mean
            z = xc @ self.rotation
            rounds = cfg.rotation_iters if cfg.rotation == "opq" else 0
            with tqdm(total=1 + rounds + cfg.epochs, desc="codec: fitting", unit=" step", leave=False) as bar:
                self._kmeans_init(z, gen)
                bar.update(1)
                for it in range(rounds):
                    targets: list[torch.Tensor] = []
                    codes, zq = self._encode_rotated(z, targets)
                    assert zq is not None
                    err = float((z - zq).square().sum() / xc.square().sum())
                    self._lloyd_update(targets, codes)
                    del targets
                    self.rotation = procrustes(xc, self._lookup_rotated(codes)).float()
                    self._refresh()
                    z = xc @ self.rotation
                    LOG.debug("vq: opq round %d/%d: relative squared error %.4f", it + 1, rounds, err)
                    bar.set_postfix(squared_error=f"{err:.4f}")
                    bar.update(1)
                if cfg.epochs:
                    self._ema_refine(z.contiguous(), gen, bar)
        self._fitted = True
        return self

    # ---- persistence -----------------------------------------------------------------------

    def _weights_bytes(self) -> bytes:
        state = {"mean": self.mean.cpu(), "rotation": self.rotation.cpu()}
        state.update({f"codebook.{i}": cb.cpu() for i, cb in enumerate(self.codebooks)})
        buf = io.BytesIO()
        torch.save({k: v.contiguous() for k, v in state.items()}, buf)
        return buf.getvalue()

    def _load_weights(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        cfg = self.config
        want = {"mean": (cfg.dim,), "rotation": (cfg.dim, cfg.kept_dims)}
        want.update({f"codebook.{i}": tuple(cb.shape) for i, cb in enumerate(self.codebooks)})
        if not isinstance(state, dict) or set(state) != set(want):
            raise ValueError(f"expected tensors {sorted(want)}")
        for name, shape in want.items():
            t = state[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32:
                raise ValueError(f"{name}: expected float32 {shape}, got {getattr(t, 'shape', t)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} has non-finite values")
        self.mean, self.rotation = state["mean"], state["rotation"]
        self.codebooks = [state[f"codebook.{i}"] for i in range(len(self.codebooks))]
        self._device = torch.device("cpu")
        self._fitted = True
        self._refresh()
