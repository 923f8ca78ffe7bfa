"""Difference in means: the supervised baseline."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from bench import Activations, Site, register_method

log = logging.getLogger(__name__)


@register_method("dim")
@dataclass
class DiffInMeans:
    """One direction per concept: mean(activations in the concept) - mean(activations of its contrast rows).

    The contrast of a concept is every other prompt (concept data: boolean labels), or the rows marked -1 in its
    label column (int labels: +1 concept, -1 contrast, 0 neither), as for `features_of`. Means are running sums
    over chunks of `chunk_tokens` (streamed from the cache when the activations came from it).

    Reads the MLP hidden state by default, the site SNMF factorises, so the comparison is like for like
    (`-M dim.site=resid` for the residual stream; on Gemma-3 its few massive dimensions swamp the means).

    `features_of = "snmf"` is the paper's DiM baseline: one direction per labelled feature of that run method at
    the same layer, from the sentences `feature_detection` writes for the feature's input label (activating) against
    its neutral sentences (the reference's `experiments/baselines/diffmean.py`: mean over every token of each set).
    The runner builds that data (`bench.feature_concepts`); the directions are scored like any method's."""

    site: Site = field(default_factory=lambda: Site(layer=0, kind="mlp"))  # any site; mlp = same as SNMF
    normalize: bool = True
    features_of: str | None = None  # a run method whose labelled features define the concepts (the paper's DiM)
    chunk_tokens: int = 65_536  # tokens per running-sum step

    def fit(self, acts: Activations) -> DiffInMeans:
        if acts.labels is None or acts.concepts is None:
            raise ValueError("dim needs concept labels; run it on a concept dataset")
        if self.chunk_tokens < 1:
            raise ValueError(f"dim.chunk_tokens must be at least 1, got {self.chunk_tokens}")
        labels = acts.labels  # [n, c]
        contrast = labels.dtype != torch.bool and bool((labels < 0).any())
        pos = (labels > 0).float()  # [n, c]
        neg = (labels < 0).float() if contrast else (labels <= 0).float()  # [n, c]
        d_site = acts.d
        sums = torch.zeros(2, labels.shape[1], d_site, dtype=torch.float64)  # [2, c, d]
        start = 0
        for chunk in acts.iter_chunks(self.chunk_tokens):  # [<=chunk, d]
            rows = slice(start, start + len(chunk))
            x = chunk.float()
            sums[0] += (pos[rows].T @ x).double()
            sums[1] += (neg[rows].T @ x).double()
            start += len(chunk)
        counts = torch.stack([pos.sum(0), neg.sum(0)]).double()  # [2, c]
        empty = [acts.concepts[i] for i in torch.nonzero((counts == 0).any(0)).flatten().tolist()]
        if empty:
            log.warning("dim: %d concept(s) without tokens on one side get a zero direction: %s", len(empty),
                        ", ".join(empty[:5]))
        means = sums / counts.clamp(min=1)[..., None]  # [2, c, d]
        d = (means[0] - means[1]).float()  # [c, d]
        self.directions_ = F.normalize(d, dim=-1) if self.normalize else d  # [c, d]
        self.concepts_ = list(acts.concepts)
        return self

    def encode(self, x: Tensor) -> Tensor:
        """[n, d_site] -> [n, n_concepts] projections on the concept directions."""
        return x.to(self.directions_) @ self.directions_.T
