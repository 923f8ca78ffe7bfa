"""Concept data made from another method's labelled features: the paper's difference-in-means baseline.

The reference (`experiments/causal/generate_diffmean_factors.py`, `experiments/baselines/diffmean.py`) builds one
DiM direction per SNMF feature: for the feature's input-side label, the generator's activating sentences against
its neutral sentences (those concept detection writes), mean over every token of each set. A method asks for this
data with a `features_of = "<run method>"` field; the runner fits that source method at the same layer, labels the
features `feature_detection` would score (its `max_features` sample) and writes their sentences with its settings
(both cached: a later feature_detection unit of the source pays nothing), then hands the method these texts with
int8 labels: +1 where a text was written for the feature, -1 for the feature's neutral sentences, 0 elsewhere.

Deviation: activations exclude BOS and padding, as everywhere in featbench; the reference keeps BOS in both means
where the tokenizer adds it (it cancels up to the sentences' lengths).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.feature_labels import select_features
from bench.protocols import Context, FeatureMethod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureConcepts:
    """Texts labelled per source feature: labels [n_texts, n_features] int8 (+1 activating, -1 neutral, 0 neither)."""

    texts: list[str]
    labels: Tensor  # [n_texts, n_concepts] int8
    concepts: list[str]  # "<source> <feature>: <input label>" per column
    features: list[int]  # the source's feature index per column


def feature_concepts(source: FeatureMethod, source_name: str, ctx: Context, detection: Any) -> FeatureConcepts:
    """The activating and neutral sentences of the labelled features of fitted `source` that `detection` (a
    `feature_detection` task) scores, as concept data. `ctx` is the source's context (its fit key and labels)."""
    if ctx.labels is None:
        raise ValueError("feature concepts need the run's labels (ctx.labels)")
    chosen = select_features(source.directions_.shape[0], detection.max_features, ctx.seed)
    labels = ctx.labels(source, chosen)
    labelled = [f for f in chosen if labels[f].input]
    sentences = detection.sentences(labelled, labels, ctx)
    usable = [f for f in labelled if sentences[f]["activating"] and sentences[f]["neutral"]]
    log.info("features of %s at %s: %d chosen, %d with an input label, %d with activating and neutral sentences",
             source_name, source.site, len(chosen), len(labelled), len(usable))
    if not usable:
        raise ValueError(f"no feature of {source_name} at {source.site} has an input label and sentences of both "
                         f"kinds ({len(chosen)} chosen, {len(labelled)} labelled), so there is nothing to contrast")
    texts = sorted({t for f in usable for mode in ("activating", "neutral") for t in sentences[f][mode]})
    row = {t: i for i, t in enumerate(texts)}
    out = torch.zeros(len(texts), len(usable), dtype=torch.int8)  # [n_texts, n_concepts]
    for j, f in enumerate(usable):
        for t in sentences[f]["neutral"]:
            out[row[t], j] = -1
        for t in sentences[f]["activating"]:  # a sentence written for the label wins over a neutral duplicate
            out[row[t], j] = 1
    names = [f"{source_name} {f}: {labels[f].input}" for f in usable]
    return FeatureConcepts(texts, out, names, usable)
