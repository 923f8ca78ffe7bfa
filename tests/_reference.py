"""Plain reference implementations that the library's batched, streaming code is tested against."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bench.hooks import steer
from bench.sites import Site


def kl_alphas(model: Any, tokenizer: Any, site: Site, directions: Tensor, targets: Sequence[float],
              prompts: Sequence[str], norm: float, iters: int = 10) -> tuple[Tensor, Tensor]:
    """Per direction ([c, d_site], unit rows) and KL target: the alpha where the mean over `prompts` of the
    next-token KL(unsteered || steered) reaches the target, by geometric bisection in [norm/64, norm*64].

    One (direction, target) at a time, every prompt run alone (no padding, no batching): what
    `bench.steer.geometric_kl_alphas` computes for all of them at once. Returns (alphas [c, k], KL reached [c, k])."""
    ids = [tokenizer(p, return_tensors="pt", truncation=True, max_length=64)["input_ids"] for p in prompts]

    def logprobs(vector: Tensor | None) -> list[Tensor]:
        out = []
        for x in ids:
            with torch.no_grad(), steer(model, site, vector) if vector is not None else contextlib.nullcontext():
                out.append(torch.log_softmax(model(input_ids=x).logits[0, -1].float(), -1))
        return out

    base = logprobs(None)

    def kl(vector: Tensor) -> float:
        return sum(float((b.exp() * (b - s)).sum()) for b, s in zip(base, logprobs(vector), strict=True)) / len(ids)

    alphas, reached = torch.zeros(len(directions), len(targets)), torch.zeros(len(directions), len(targets))
    for i, direction in enumerate(directions.float()):
        for j, target in enumerate(targets):
            lo, hi = norm / 64, norm * 64
            for _ in range(iters):
                mid = math.sqrt(lo * hi)
                lo, hi = (mid, hi) if kl(direction * mid) < target else (lo, mid)
            alphas[i, j] = math.sqrt(lo * hi)
            reached[i, j] = kl(direction * alphas[i, j])
    return alphas, reached
