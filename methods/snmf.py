"""Semi-nonnegative matrix factorisation of MLP activations (arXiv 2506.10920).

A ~= Z Y with A = acts.x.T [d_mlp, n_tokens], Z [d_mlp, k] of any sign and Y [k, n_tokens] >= 0. Each
iteration follows the reference code (ordavid-s/snmf-mlp-decomposition, factorization/seminmf.py):
(1) ridge least squares for Z; (2) hard winner-take-all: each column of Z keeps its ceil(sparsity*d)
largest |entries|; (3) each row of Y is scaled to unit L2 norm, its column of Z takes the norm;
(4) Ding-Li-Jordan multiplicative update of Y. The factors of the best loss are kept; the fit stops
after `patience` consecutive iterations without an improvement, or at `max_iter`.

Stopping. An iteration improves when its loss L is below the best loss so far by more than the tolerance:
L < best - tol * best with `tol_mode="relative"` (the default; scale-free: the same data times any constant
stops at the same iteration), L < best - tol with `tol_mode="absolute"` (the reference's rule; its tol=1e-4 on
an unnormalised ||A - ZY||_F^2 of ~1e6 counts every decrease, so its patience practically never triggers).
An improving iteration becomes the best and resets the patience counter; any other iteration, including a
smaller decrease, adds one to it (and does not move the best, as in the reference).

Cost. The reference does three dense d*n*k products per iteration and rebuilds the d x n reconstruction
for the loss. Here one pass over A (token chunks) per iteration does one dense product A Y^T, the sparse
product Z^T A (Z has s = ceil(sparsity*d) non-zeros per column, so k*s*n multiply-adds), and the loss
comes from the trace form ||A||^2 - 2 tr(Z^T A Y^T) + tr(Z^T Z Y Y^T) with every product reused.
On CPU A is held as [d, n] (one transposed copy, or per chunk) so the sparse product reads rows, and the
float32 dense product goes through oneDNN (`USE_ONEDNN`; same precision, 2x MKL's speed on AMD CPUs).

Deviations from the reference (final losses after 200 iterations on synthetic d=512, n=5000, k=50, vs the
reference's own code from the same seed; random init: equal to 6 digits):
- WTA keeps exactly s entries per column (top-k indices); the reference also keeps entries tied with the
  s-th largest, so the two differ only on exact ties.
- Z = A Y^T (Y Y^T + 1e-6 I)^-1 with the k x k inverse taken in float64 (the reference: in the fit dtype).
- The loss is the trace form with float64 sums (equal to ||A - ZY||^2 up to rounding); the reference's
  float32 `torch.norm` of the d x n residual is itself off by up to ~1% at d=2048, n=20000.
- kmeans init: Y = cluster indicators + 0.2 as in Ding et al. 2010 (the reference floors them at 1e-6;
  with that floor this code gives the reference's loss; with 0.2 the loss is 0.3-0.4% lower). Empty
  clusters take spare random tokens drawn with the initial centres, so the init can stream.
- svd init: from the eigendecomposition of A A^T (streamable); each singular pair's sign is fixed so the
  right singular vector sums positive (LAPACK's sign is arbitrary); Y = max(sqrt(S) V^T, 1e-6) as there.
  Loss +0.03% against the reference's svd init.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from bench import Activations, Site, register_method
from bench.activations import cache_root, memory_budget
from bench.store import pread_into

log = logging.getLogger(__name__)
INITS = ("random", "svd", "kmeans")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL_MODES = ("relative", "absolute")
RIDGE = 1e-6  # added to Y Y^T in the least squares for Z
EPS = 1e-6  # added to the update's denominator; floor of the initial Y
NORM_EPS = 1e-8  # floor of the row norms of Y when rescaling
KMEANS_ITER, KMEANS_OFFSET = 15, 0.2
ENCODE_BATCH = 8192
KEEP_TOP = 100  # largest codes of Y kept per feature after the fit (for labels: the paper's top 25)
USE_ONEDNN = True  # float32 A Y^T on CPU through oneDNN (strict float32); False: torch's default (MKL)
STREAM_CHUNK_BYTES = 64 * 2**20  # chunk size of a fit that streams A from the store by itself (chunk_tokens=None)


@register_method("snmf")
@dataclass
class SNMF:
    """Semi-NMF features of the MLP hidden state: `directions_` are the columns of Z, codes are Y >= 0."""

    site: Site = field(default_factory=lambda: Site(0, "mlp"))
    n_features: int = 100
    sparsity: float = 0.01  # fraction of d_mlp kept per feature by winner-take-all
    max_iter: int = 500
    patience: int = 100
    tol: float = 1e-4  # an iteration improves (resets patience) when loss < best - tol * best (see tol_mode)
    tol_mode: str = "relative"  # relative: tol is a fraction of the best loss | absolute: loss < best - tol (reference)
    init: str = "random"  # random | svd | kmeans
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | float64
    chunk_tokens: int | None = None  # None: A in memory, or streamed when on disk and over memory_budget(); else chunks
    encode_iter: int = 100  # multiplicative updates of Y per encode() call

    def fit(self, acts: Activations) -> SNMF:
        t0 = time.perf_counter()
        self._validate()
        data = _Chunks(acts, self.chunk_tokens, self._device(), DTYPES[self.dtype])
        n, d, sq = data.stats()
        k, s = self.n_features, math.ceil(self.sparsity * d)
        limit = {"svd": min(n, d), "kmeans": n}.get(self.init)
        if limit is not None and k > limit:
            raise ValueError(f"init={self.init!r} needs n_features <= {limit} here (n_tokens={n}, d={d}); "
                             "lower n_features or use init='random'")
        y = self._init_y(data, n, d)  # Y [k, n], in memory or (streamed fits) in a temp file
        m, c = _sweep(data, y)  # A Y^T [d, k], Y Y^T [k, k]
        best, best_z, best_y, stall, n_iter = math.inf, None, None, 0, 0
        eye = torch.eye(k, dtype=torch.float64, device=c.device)
        bar = tqdm(range(self.max_iter), desc="snmf", unit="it", leave=False, disable=None)
        for it in bar:
            n_iter = it + 1
            z = m @ torch.linalg.inv(c.double() + RIDGE * eye).to(m)  # [d, k] least squares
            idx = z.abs().topk(s, dim=0).indices  # [s, k] winner-take-all support
            nrm = c.diagonal().sqrt().clamp_min(NORM_EPS)  # [k] row norms of Y
            z = torch.zeros_like(z).scatter_(0, idx, z.gather(0, idx)) * nrm
            m, c = _sweep(data, y, z, idx, nrm)
            loss = _loss(sq, z, m, c)
            if loss < best - self._margin(best):
                best, best_z, best_y, stall = loss, z.clone(), y.best(), 0
            else:
                stall += 1
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            if stall >= self.patience:
                break
        if best_z is None:
            raise FloatingPointError("snmf loss is not finite: check acts.x for NaN/inf, try dtype='float64'")
        self.directions_ = best_z.T.to("cpu", torch.float32).contiguous()  # [k, d]
        self._keep_top(acts, best_y)
        y.close()
        self.fit_metrics_ = {
            "loss": best, "rel_error": math.sqrt(max(best, 0.0) / sq) if sq > 0 else 0.0,
            "n_iter": float(n_iter), "fit_seconds": time.perf_counter() - t0,
        }
        log.info("snmf k=%d: loss %.4g, rel. error %.4f after %d iterations", k, best,
                 self.fit_metrics_["rel_error"], n_iter)
        return self

    def encode(self, x: Tensor) -> Tensor:
        """[n, d_mlp] -> [n, n_features] codes >= 0: Y for the fitted Z by `encode_iter` multiplicative
        updates from the clamped least-squares solution, in batches of ENCODE_BATCH tokens. (The reference has
        no encoder; with 100 updates the codes are within 0.3% (relative L2) of exact non-negative least
        squares on held-out tokens, measured at d=512, k=50.)"""
        dev, dt = self._device(), DTYPES[self.dtype]
        z = self.directions_.T.to(dev, dt)  # [d, k]
        q = z.T @ z
        qp, qm = q.clamp_min(0), (-q).clamp_min(0)
        ridge = q.double() + RIDGE * torch.eye(len(q), dtype=torch.float64, device=dev)
        out = []
        for batch in x.split(ENCODE_BATCH):
            p = batch.to(dev, dt) @ z  # [b, k] = (Z^T A)^T
            g = torch.linalg.solve(ridge, p.T.double()).T.to(dt).clamp_min(EPS)  # [b, k]
            pp, pm = p.clamp_min(0), (-p).clamp_min(0).add_(EPS)
            for _ in range(self.encode_iter):
                g = g * ((pp + g @ qm) / (pm + g @ qp)).sqrt_()
            out.append(g.to(x.device, torch.float32))
        return torch.cat(out)

    def _keep_top(self, acts: Activations, y: Tensor | tuple[Tensor, Tensor]) -> None:
        """Keep the KEEP_TOP largest codes of the best iterate's Y per feature, and where their tokens are, as
        learned state: `top_codes_` [k, t] (descending), `top_prompt_`, `top_position_` [k, t] int64 (the
        token's `acts.prompt_idx` and `acts.position`), so a feature's top tokens come from the fit itself.
        `y`: the best Y [k, n], or (streamed fits) its running top (values, token indices) [k, t]."""
        vals, idx = y if isinstance(y, tuple) else y.topk(min(KEEP_TOP, y.shape[1]), dim=1)  # [k, t]
        idx = idx.cpu()
        self.top_codes_ = vals.to("cpu", torch.float32).contiguous()
        self.top_prompt_ = acts.prompt_idx.long()[idx].contiguous()
        self.top_position_ = acts.position.long()[idx].contiguous()

    def _margin(self, best: float) -> float:
        """The decrease below `best` an iteration must exceed to count as an improvement (0 before the first)."""
        if not math.isfinite(best):
            return 0.0
        return self.tol * abs(best) if self.tol_mode == "relative" else self.tol

    def _validate(self) -> None:
        if self.tol_mode not in TOL_MODES:
            raise ValueError(f"unknown tol_mode {self.tol_mode!r}; valid: {', '.join(TOL_MODES)}")
        if not (self.tol >= 0 and (self.tol < 1 or self.tol_mode == "absolute")):
            raise ValueError(f"tol={self.tol}; valid: 0 <= tol < 1 with tol_mode='relative' (a fraction of the "
                             "loss), tol >= 0 with tol_mode='absolute'")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")
        if not 0 < self.sparsity <= 1:
            raise ValueError(f"sparsity={self.sparsity} is the kept fraction of d; valid: 0 < sparsity <= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        for name in ("n_features", "max_iter", "patience", "encode_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={self.chunk_tokens}; valid: None (in memory) or >= 1")

    def _device(self) -> torch.device:
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; valid: {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use device='auto' or 'cpu'")
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _init_y(self, data: _Chunks, n: int, d: int) -> _Codes:
        """Initial Y [k, n] on the fit device (or in its file), drawn from `seed` on the CPU."""
        k, g = self.n_features, torch.Generator().manual_seed(self.seed)
        y = _Codes(k, n, data.dtype, data.device, data.streams)
        if self.init == "random":  # the reference's torch.rand(n, k) after torch.manual_seed(seed), drawn in chunks
            step = data.chunk_tokens or n
            for start in range(0, n, step):
                b = min(step, n - start)
                y.put(start, torch.rand(b, k, generator=g).clamp_min(EPS).T.to(data.device, data.dtype))
            return y
        if self.init == "svd":  # A = U S V^T; Y = max(sqrt(S) V^T, eps) = max(S^-1/2 U^T A, eps)
            gram, colsum = torch.zeros(d, d, dtype=torch.float64, device=data.device), 0
            for _, a in data:
                gram += (a @ a.T).double()
                colsum = colsum + a.double().sum(1)
            lam, u = torch.linalg.eigh(gram)
            lam, u = lam.flip(0)[:k].clamp_min(1e-12), u.flip(1)[:, :k]
            u = u * torch.sign(colsum @ u + 1e-30)  # right singular vectors sum positive
            w = (u / lam.pow(0.25)).T.to(data.dtype)  # [k, d] = S^-1/2 U^T
            for start, a in data:
                y.put(start, (w @ a).clamp_min(EPS))
            return y
        pick = torch.randperm(n, generator=g)[: 2 * k].to(data.device)  # k centres + k spares
        pool = torch.zeros(d, len(pick), dtype=data.dtype, device=data.device)
        for start, a in data:
            hit = ((pick >= start) & (pick < start + a.shape[1])).nonzero().squeeze(1)
            pool[:, hit] = a[:, pick[hit] - start]
        cent, spare = pool[:, :k].T.clone(), iter(pool[:, k:].T)  # [k, d]
        for it in range(KMEANS_ITER):
            sums, counts = torch.zeros_like(cent), torch.zeros(k, dtype=data.dtype, device=data.device)
            c2 = (cent * cent).sum(1, keepdim=True)
            for start, a in data:
                lab = (c2 - 2 * cent @ a).argmin(0)  # [b] nearest centre
                if it == KMEANS_ITER - 1:  # Y from the last assignment: indicators + offset
                    ind = torch.full((k, len(lab)), KMEANS_OFFSET, dtype=data.dtype, device=data.device)
                    y.put(start, ind.scatter_(0, lab[None], 1 + KMEANS_OFFSET))
                sums.index_add_(0, lab, a.T)
                counts += torch.bincount(lab, minlength=k).to(counts)
            empty = (counts == 0).nonzero().squeeze(1).tolist()
            cent = sums / counts.clamp_min(1)[:, None]
            for j in empty:
                cent[j] = next(spare, cent[j])
        return y


@functools.cache
def _onednn() -> bool:
    """Whether oneDNN's float32 matmul runs here (torch uses MKL for float32, which on AMD CPUs takes an AVX2
    path; oneDNN's AVX-512 kernel measured 2.2x faster at the same float32 precision)."""
    try:
        a, b = torch.rand(3, 5), torch.rand(4, 5)
        return torch.allclose(torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""), a @ b.T)
    except (AttributeError, RuntimeError, NotImplementedError):  # a torch built without oneDNN
        return False


def _dense_at(a: Tensor, y: Tensor) -> Tensor:
    """A Y^T [d, k] for a [d, b], y [k, b]: the one dense product of an iteration."""
    cpu32 = a.device.type == "cpu" and a.dtype == y.dtype == torch.float32 and a.is_contiguous()
    if USE_ONEDNN and cpu32 and _onednn():
        return torch.ops.mkldnn._linear_pointwise(a, y.contiguous(), None, "none", [], "")
    return a @ y.T


class _Chunks:
    """A = acts.x.T as token chunks (start, [d, b]) on the fit device; on CPU contiguous, for the sparse
    product. With chunk_tokens=None A is built once and kept, unless acts are still on disk and larger than
    `memory_budget()`: then they stream in chunks of STREAM_CHUNK_BYTES. Streamed chunks are re-read on every pass
    (from the store when acts.source is set); a fit that streams from the store keeps Y in a file too (`streams`)."""

    def __init__(self, acts: Activations, chunk_tokens: int | None, device: torch.device, dtype: torch.dtype):
        if chunk_tokens is None and acts.streams and acts.nbytes > memory_budget():
            chunk_tokens = acts.chunk_tokens(STREAM_CHUNK_BYTES, dtype.itemsize)  # <= 1/8 of the budget
            log.info("snmf: streaming %.1f GiB of activations in chunks of %d tokens", acts.nbytes / 2**30,
                     chunk_tokens)
        self.acts, self.chunk_tokens, self.device, self.dtype = acts, chunk_tokens, device, dtype
        self.streams = chunk_tokens is not None and acts.reads_source  # A from the store: Y goes to a file too
        self._whole: Tensor | None = None
        self.d = 0

    def _prep(self, x: Tensor) -> Tensor:
        a = x.to(self.device, self.dtype).T
        return a if a.is_cuda else a.contiguous()  # [d, b]

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        if self.chunk_tokens is None:
            if self._whole is None:
                self._whole = self._prep(self.acts.x)
            yield 0, self._whole
            return
        start = 0
        for x in self.acts.iter_chunks(self.chunk_tokens):
            yield start, self._prep(x)
            start += len(x)

    def stats(self) -> tuple[int, int, float]:
        """n_tokens, d and ||A||_F^2 in one pass."""
        n, d, sq = 0, 0, torch.zeros((), dtype=torch.float64, device=self.device)
        for _, a in self:  # per-row norms: a float32 norm of all of A can be off by ~1%
            d, n = a.shape[0], n + a.shape[1]
            sq += torch.linalg.vector_norm(a, dim=1).double().square().sum()
        if n == 0:
            raise ValueError("no tokens to fit: acts.x is empty (to stream acts.source, set chunk_tokens)")
        self.d = d
        return n, d, float(sq)


def _loss(sq: float, z: Tensor, m: Tensor, c: Tensor) -> float:
    """||A - ZY||_F^2 = ||A||^2 - 2 tr(Z^T A Y^T) + tr(Z^T Z Y Y^T) from m = A Y^T [d, k], c = Y Y^T [k, k]."""
    zd = z.double()
    return sq - 2 * float((zd * m.double()).sum()) + float(((zd.T @ zd) * c.double()).sum())


def _sweep(
    data: _Chunks, y: _Codes | Tensor, z: Tensor | None = None, idx: Tensor | None = None, nrm: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One pass over A. With z ([d, k], non-zero at idx [s, k]) given, first updates Y in place:
    Y <- Y/nrm * sqrt((P+ + Q- Y/nrm) / (P- + Q+ Y/nrm + eps)), P = Z^T A, Q = Z^T Z.
    Returns A Y^T [d, k] and Y Y^T [k, k] of the new Y."""
    y = y if isinstance(y, _Codes) else _Codes.of(y)
    k = y.k
    m = torch.zeros(data.d, k, dtype=data.dtype, device=data.device)
    c = torch.zeros(k, k, dtype=data.dtype, device=data.device)
    y.begin()
    if z is not None:
        q = z.T @ z
        qp, qm = q.clamp_min(0) / nrm, q.clamp_max(0).neg_() / nrm  # Y/nrm folded into Q's columns
        flat, vals = idx.T.reshape(-1), z.gather(0, idx).T.reshape(-1)  # Z^T as k bags of s (row, value)
        offsets = torch.arange(0, idx.numel(), idx.shape[0], device=idx.device)
    for start, a in data:
        yc = y.get(start, a.shape[1])  # [k, b]: a view into Y, or read from its file
        if z is not None:
            # P = Z^T A [k, b]: dense on a GPU; on CPU sparse, k*s*b multiply-adds reading s rows of a each
            p = z.T @ a if a.is_cuda else F.embedding_bag(flat, a, offsets, mode="sum", per_sample_weights=vals)
            num = torch.addmm(p.clamp_min(0), qm, yc)
            den = torch.addmm(p.clamp_max_(0).sub_(EPS), qp, yc, beta=-1)  # P- + eps + Q+ Y/nrm
            yc.div_(nrm[:, None]).mul_(num.div_(den).sqrt_())
            y.put(start, yc)
        c.addmm_(yc, yc.T)
        m += _dense_at(a, yc)
    return m, c


class _Codes:
    """Y [k, n]: a tensor on the fit device, or, for a fit that streams A from the store, a temp file of [n, k] rows
    (under the featbench cache, deleted on close) read and written a chunk at a time, so no stage holds all of Y. A
    file also keeps the running top-KEEP_TOP (values, token indices) [k, t] per feature of the current pass."""

    def __init__(self, k: int, n: int, dtype: torch.dtype, device: torch.device, in_file: bool) -> None:
        self.k, self.n, self.dtype, self.device = k, n, dtype, device
        self.y: Tensor | None = None if in_file else torch.empty(k, n, dtype=dtype, device=device)
        self.top: tuple[Tensor, Tensor] | None = None
        self._file = None
        if in_file:
            folder = cache_root() / "tmp"
            folder.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - closed by close()
            self._file.truncate(k * n * dtype.itemsize)

    @classmethod
    def of(cls, y: Tensor) -> _Codes:
        """Codes around an existing Y [k, n] (updated in place)."""
        codes = cls(y.shape[0], 0, y.dtype, y.device, False)
        codes.y, codes.n = y, y.shape[1]
        return codes

    def get(self, start: int, b: int) -> Tensor:
        """Y[:, start:start + b]: [k, b]."""
        if self.y is not None:
            return self.y[:, start : start + b]
        assert self._file is not None
        buf = torch.empty(b * self.k * self.dtype.itemsize, dtype=torch.uint8)
        pread_into(self._file.fileno(), buf, start * self.k * self.dtype.itemsize, Path("<snmf codes>"))
        return buf.view(self.dtype).view(b, self.k).T.to(self.device).contiguous()

    def put(self, start: int, yc: Tensor) -> None:
        """Store yc [k, b] as Y[:, start:start + b] (a view from `get` is already in place)."""
        if self.y is not None:
            view = self.y[:, start : start + yc.shape[1]]
            if view.data_ptr() != yc.data_ptr():
                view.copy_(yc)
            return
        assert self._file is not None
        rows = yc.T.to("cpu").contiguous()  # [b, k]
        raw, off = memoryview(rows.view(torch.uint8).numpy()).cast("B"), start * self.k * self.dtype.itemsize
        done = 0
        while done < len(raw):
            done += os.pwritev(self._file.fileno(), [raw[done:]], off + done)
        t = min(KEEP_TOP, self.n)
        vals, idx = yc.topk(min(t, yc.shape[1]), dim=1)  # [k, t'] of this chunk
        if self.top is not None:
            vals, pick = torch.cat([self.top[0], vals], 1).topk(min(t, self.top[0].shape[1] + vals.shape[1]), dim=1)
            idx = torch.cat([self.top[1], idx + start], 1).gather(1, pick)
        else:
            idx = idx + start
        self.top = (vals, idx)

    def begin(self) -> None:
        """A new pass: its running top starts empty."""
        self.top = None

    def best(self) -> Tensor | tuple[Tensor, Tensor]:
        """What the fit keeps of the current Y: a copy (in memory) or its top (file)."""
        if self.y is not None:
            return self.y.clone()
        assert self.top is not None
        return self.top

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
