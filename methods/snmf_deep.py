"""Recursive (deep) semi-NMF of MLP activations: the paper's hierarchical SNMF (arXiv 2506.10920; reference
`factorization/hierchichal_snmf.py` and `hierarchial_nmf_tutorial.ipynb` of ordavid-s/snmf-mlp-decomposition).

Level 1 is the flat fit A ~= Z1 Y1 (A = acts.x.T [d_mlp, n_tokens], Z1 [d, r1] sparse by winner-take-all, Y1 >= 0).
Level l+1 runs the same solver (`methods.snmf.SNMF`) on the previous level's feature matrix as data, its r_l
features as the "tokens": Z_l ~= Z_{l+1} Y_{l+1}, Y_{l+1} [r_{l+1}, r_l] >= 0 (the coefficients: how much of
coarse feature j each finer feature i uses). Stacked: A ~= Z_L Y_L ... Y_2 Y_1, and a token's code at level l is
C_l = Y_l ... Y_2 Y_1 (the reference's "effective activation" W_0 @ ... @ W_l).

Joint fine-tuning (the reference: Adam, lr 1e-3, MSE of the stacked reconstruction, 2,500 steps) updates Y1, every
Y_l and Z_L together. Two deviations: (1) the reference's Adam steps are unconstrained; here every step is followed
by a projection that keeps the model a semi-NMF: Y >= 0 (clamped) and Z_L on its winner-take-all support. (2) The
reference applies lr to the raw entries, whose scales differ by orders of magnitude (rows of Y1 have unit norm over
the tokens, Z carries the norms), so its Z barely moves; here Adam runs on each factor divided by the RMS of its
initial non-zero entries, i.e. lr is relative to each factor's scale, and the result does not depend on how the
norms are split between Z and Y. The loss is the
trace form over token chunks with hand-written gradients for Y1 and Z_eff = Z_L Y_L ... Y_2 (autograd only through
the small product), so one step costs about one SNMF iteration; the parameters of the lowest loss are kept. Y1
([r1, n_tokens]) is held in memory; A is streamed like the flat fit.

Every level's features are ordinary features: `level` picks which level `directions_`/`encode` expose, `fine_tuned`
whether from the per-level fits (sparse supports; what trees and neuron groups use, as the reference builds its
trees from the pre-fine-tune factors) or from the fine-tuned stack (level l: Z_L Y_L ... Y_{l+1}). Level-1 codes of
new tokens come from `SNMF.encode` with the level's Z1; coarser codes are propagated through the coefficients.
Coefficients are those codes of the previous level's features (`SNMF.encode`), not the fit's last iterate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench import Activations, Site, register_method
from methods.snmf import DTYPES, KEEP_TOP, SNMF

log = logging.getLogger(__name__)
CHUNK = 8192  # tokens per chunk in the fine-tuning passes when chunk_tokens is None


@register_method("snmf_deep")
@dataclass
class DeepSNMF:
    """Recursive semi-NMF: SNMF of SNMF features, fine-tuned jointly; `level` picks the exposed features."""

    site: Site = field(default_factory=lambda: Site(0, "mlp"))
    ranks: tuple[int, ...] = (100, 50, 25)  # features per level, finest first (the paper: 400, 200, 100, 50)
    level: int | None = None  # 1-based level whose features are directions_; None = the coarsest
    fine_tuned: bool = False  # expose the jointly fine-tuned stack instead of the per-level fits
    sparsity: float = 0.01  # fraction of d_mlp kept per feature by winner-take-all, at every level
    max_iter: int = 500
    patience: int = 100
    tol: float = 1e-4
    tol_mode: str = "relative"  # relative | absolute (the reference's: tol=1e-6 absolute)
    init: str = "random"
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    chunk_tokens: int | None = None
    encode_iter: int = 100
    fine_tune_steps: int = 300  # the reference: 2500
    fine_tune_lr: float = 1e-3

    def fit(self, acts: Activations) -> DeepSNMF:
        t0 = time.perf_counter()
        self._validate()
        metrics: dict[str, float] = {}
        data, zs, ys = acts, [], []
        for lvl, rank in enumerate(self.ranks, start=1):
            solver = self._solver(rank).fit(data)  # level 1: tokens; level l+1: level l's features
            zs.append(solver.directions_)  # [r_l, d]
            if lvl > 1:
                ys.append(solver.encode(data.x).T.contiguous())  # [r_l, r_{l-1}] coefficients >= 0
            metrics[f"rel_error_level{lvl}"] = solver.fit_metrics_["rel_error"]
            data = _as_data(solver.directions_, acts)
        self.level_directions_, self.coefficients_ = zs, ys
        y1 = self._codes1(acts, zs[0])  # [r1, n] level-1 codes of the fit tokens
        tuned_top, tuned_ys, y1_tuned, before, after = self._fine_tune(acts, y1, zs[-1], ys)
        self.tuned_coefficients_ = tuned_ys
        self.tuned_directions_ = _stack_directions(tuned_top, tuned_ys)
        metrics.update(stack_mse_before=before, stack_mse_after=after, fine_tune_steps=float(self.fine_tune_steps))
        level = self._level()
        self.directions_ = self.directions_of(level, self.fine_tuned)
        codes = _propagate(y1_tuned if self.fine_tuned else y1, self._coefs(self.fine_tuned)[: level - 1])
        vals, idx = codes.topk(min(KEEP_TOP, codes.shape[1]), dim=1)  # [r, t] the fit's own top codes
        self.top_codes_ = vals.float().contiguous()
        self.top_prompt_ = acts.prompt_idx.long()[idx].contiguous()
        self.top_position_ = acts.position.long()[idx].contiguous()
        metrics["fit_seconds"] = time.perf_counter() - t0
        self.fit_metrics_ = metrics
        log.info("snmf_deep ranks %s: stacked MSE %.4g -> %.4g after %d fine-tuning steps", list(self.ranks),
                 before, after, self.fine_tune_steps)
        return self

    def encode(self, x: Tensor) -> Tensor:
        """[n, d_mlp] -> [n, r_level] codes >= 0 of the exposed level."""
        return self.codes(x, self._level(), self.fine_tuned)

    def codes(self, x: Tensor, level: int, fine_tuned: bool = False) -> Tensor:
        """[n, d_mlp] -> [n, r_level]: level-1 codes for Z1 (`SNMF.encode`), propagated through the coefficients."""
        enc = self._solver(self.ranks[0])
        enc.directions_ = self.directions_of(1, fine_tuned)
        c = enc.encode(x)  # [n, r1]
        for y in self._coefs(fine_tuned)[: level - 1]:
            c = c @ y.T.to(c)  # [n, r_l]
        return c

    def directions_of(self, level: int, fine_tuned: bool = False) -> Tensor:
        """Features of `level` (1-based): [r_level, d_mlp]."""
        return (self.tuned_directions_ if fine_tuned else self.level_directions_)[level - 1]

    def _coefs(self, fine_tuned: bool) -> list[Tensor]:
        return self.tuned_coefficients_ if fine_tuned else self.coefficients_

    def _solver(self, rank: int) -> SNMF:
        keep = {f.name for f in dataclasses.fields(SNMF)} - {"n_features"}
        return SNMF(n_features=rank, **{k: getattr(self, k) for k in keep})

    def _level(self) -> int:
        return len(self.ranks) if self.level is None else self.level

    def _codes1(self, acts: Activations, z1: Tensor) -> Tensor:
        """Level-1 codes of every fit token, streamed: [r1, n]."""
        enc = self._solver(self.ranks[0])
        enc.directions_ = z1
        return torch.cat([enc.encode(x).T for x in acts.iter_chunks(self.chunk_tokens or CHUNK)], dim=1)

    def _fine_tune(self, acts: Activations, y1: Tensor, top: Tensor, ys: list[Tensor],
                   ) -> tuple[Tensor, list[Tensor], Tensor, float, float]:
        """Adam on the stacked MSE ||A - Z_L Y_L ... Y_2 Y_1||^2 / (d n) with Y >= 0 and Z_L on its support kept
        after every step. Returns (Z_L^T [r_L, d], [Y_2..Y_L], Y1, MSE before, best MSE)."""
        dev, dt = self._fit_device(), DTYPES[self.dtype]
        start_vals = [top.T, *ys, y1]  # Z_L [d, r_L], Y_2..Y_L, Y1 [r1, n]
        scales = [_rms(t) for t in start_vals]  # Adam steps are relative to each factor's scale (see the docstring)
        hats = [(t.to(dev, dt) / sc).requires_grad_(True) for t, sc in zip(start_vals, scales, strict=True)]
        mask = hats[0].detach() != 0
        opt = torch.optim.Adam(hats, lr=self.fine_tune_lr)
        y1_hat, s1 = hats[-1], scales[-1]
        n, d = y1.shape[1], top.shape[1]
        sq = sum(float(x.to(dev, torch.float64).square().sum()) for x in acts.iter_chunks(self.chunk_tokens or CHUNK))
        best, before, best_state = math.inf, math.nan, None
        for step in range(self.fine_tune_steps + 1):
            zeff = _product(hats[0] * scales[0], [h * sc for h, sc in zip(hats[1:-1], scales[1:-1], strict=True)])
            zd = zeff.detach()  # [d, r1]
            gram = zd.T @ zd
            m, c = torch.zeros_like(zd), torch.zeros_like(gram)
            g1 = torch.empty_like(y1_hat)
            start = 0
            for x in acts.iter_chunks(self.chunk_tokens or CHUNK):
                a = x.to(dev, dt).T  # [d, b]
                y = y1_hat.detach()[:, start : start + a.shape[1]] * s1
                g1[:, start : start + a.shape[1]] = (gram @ y - zd.T @ a) * (2 * s1 / (d * n))  # d loss / d Y1-hat
                m += a @ y.T
                c += y @ y.T
                start += a.shape[1]
            cross, quad = float((zd.double() * m.double()).sum()), float((gram.double() * c.double()).sum())
            loss = (sq - 2 * cross + quad) / (d * n)
            if step == 0:
                before = loss
            if loss < best:
                best, best_state = loss, [h.detach() * sc for h, sc in zip(hats, scales, strict=True)]
            if step == self.fine_tune_steps:
                break
            opt.zero_grad()
            zeff.backward((zd @ c - m) * (2 / (d * n)))
            y1_hat.grad = g1
            opt.step()
            with torch.no_grad():  # projection: a semi-NMF again
                hats[0].mul_(mask)
                for h in hats[1:]:
                    h.clamp_(min=0)
        assert best_state is not None, "fine-tuning evaluated no loss"
        top_t, *rest = best_state
        return top_t.T.to("cpu", torch.float32), [y.to("cpu", torch.float32) for y in rest[:-1]], rest[-1], before, best

    def _fit_device(self) -> torch.device:
        """The fit device, as SNMF resolves `device`."""
        return self._solver(self.ranks[0])._device()

    def _validate(self) -> None:
        if not self.ranks or any(int(r) < 1 for r in self.ranks):
            raise ValueError(f"ranks={list(self.ranks)}; valid: one or more positive sizes, finest first, "
                             "e.g. ranks=[400,200,100,50]")
        if self.level is not None and not 1 <= self.level <= len(self.ranks):
            raise ValueError(f"level={self.level}; valid: 1..{len(self.ranks)} (one per rank) or None (the coarsest)")
        if self.fine_tune_steps < 0 or not self.fine_tune_lr > 0:
            raise ValueError(f"fine_tune_steps={self.fine_tune_steps}, fine_tune_lr={self.fine_tune_lr}; valid: "
                             "steps >= 0 and lr > 0")
        self._solver(self.ranks[0])._validate()


def _rms(t: Tensor) -> float:
    """Root mean square of the non-zero entries (1 when there are none)."""
    nz = t[t != 0]
    return float(nz.double().square().mean().sqrt()) if nz.numel() else 1.0


def _as_data(directions: Tensor, acts: Activations) -> Activations:
    """A level's features [r, d] as the next level's data: one "token" per feature."""
    r = len(directions)
    idx = torch.arange(r)
    return Activations(x=directions, site=acts.site, model_id=acts.model_id, prompt_idx=idx, position=idx * 0,
                       token_ids=idx * 0, texts=[""] * r)


def _product(top: Tensor, coefs: list[Tensor]) -> Tensor:
    """Z_L Y_L ... Y_2: level-1 features of the stack, [d, r1] (top [d, r_L], coefs [Y_2..Y_L])."""
    z = top
    for y in reversed(coefs):
        z = z @ y
    return z


def _stack_directions(top: Tensor, coefs: list[Tensor]) -> list[Tensor]:
    """Every level's features of the stack, [r_l, d] each: level l is Z_L Y_L ... Y_{l+1}."""
    out = [top.T]  # [d, r_L] as columns
    for y in reversed(coefs):
        out.append(out[-1] @ y)
    return [z.T.contiguous() for z in reversed(out)]


def _propagate(y1: Tensor, coefs: list[Tensor]) -> Tensor:
    """Level-1 codes [r1, n] -> codes of the level after `coefs` (Y_2, ...): [r_l, n]."""
    c = y1.to("cpu", torch.float32)
    for y in coefs:
        c = y @ c
    return c
