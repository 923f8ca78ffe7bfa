"""The paper's concept detection (feature-centric protocol; arXiv 2506.10920, reference
`experiments/concept_detection/` and `experiments/evaluation/concept_evaluator.py`).

For each selected feature with an input-side label (`ctx.labels`, shared with feature_labels and feature_steering):
1. Sentences. The generator writes `n_sentences` sentences that should activate the feature, from its label, and
   as many neutral ones on an unrelated topic: one call per sentence, each prompt listing the sentences accepted so
   far (templates `feature_sentences`, `feature_sentences_neutral`). An empty or repeated answer is dropped and
   ends that list (a cached, deterministic writer would repeat it; the reference retries at temperature 1).
   Under an LLM judge (`--judge fake | openai:<model> | hf:<id>`) the judge writes them. Under the offline judge
   the local model `generator` (gemma-3-270m base by default, the labeler `bench.labeler_choice` chose; weak: it
   often drifts from the label) completes the few-shot template `feature_sentences_local`, and the neutral
   sentences are a seeded sample of the shipped neutral corpus (a deviation: the small model cannot be asked for
   "unrelated"). Sentences are cached like judge answers.
2. Response. Each sentence is read at the method's site with BOS prepended and BOS and padding excluded (the
   reference's mask), one correctly masked batch (the reference runs left-padded batches without an attention
   mask, its quirk). The feature's response to a sentence is the max over its tokens of cos(unit direction,
   activation); the reference's other per-sentence statistics (max over tokens of r2, Pearson corr and mse
   between the unit direction and the activation) go to the samples.
3. Score. S_CD = log(mean response on activating sentences / mean response on neutral ones). It is undefined when
   either mean is <= 0 (the log of a ratio of cosines needs both positive): then S_CD is None (unscored), counted
   in the log line, and the two means are still recorded.

Records per feature (`feature`): `s_cd`, `mean_activating`, `mean_neutral`, and `s_cd_positive` (1 if S_CD > 0,
0 if not, None when S_CD is None): the report's headline is the fraction of features with S_CD > 0. A feature
without an input label or without sentences of both kinds gets None for all four. Samples (`kind:
feature_detection`): the label, the sentences and every per-sentence statistic.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from bench import Context, FeatureMethod, Score, register_task
from bench.activations import collect
from bench.data import load_lines
from bench.feature_labels import FeatureLabel, label_features, select_features
from bench.judge import load_template
from bench.labeler import can_complete, complete_grouped, writer

log = logging.getLogger(__name__)
MODES = ("activating", "neutral")
STATS = ("cosine", "r2", "corr", "mse")


@register_task("feature_detection")
@dataclass
class FeatureDetection:
    """S_CD per feature: does the feature respond more to sentences written for its label than to neutral ones?"""

    max_features: int = 8  # 0 = every feature (the paper); else a seeded sample, the same in every feature task
    n_sentences: int = 5  # activating and neutral sentences per feature (the reference's 5 + 5)
    generator: str = "gemma-3-270m-gguf"  # local model writing sentences under the offline judge (as labeler)
    max_new_tokens: int = 40  # sentence length (tokens) of the local generator
    max_len: int = 64  # tokens per sentence when reading activations
    batch_size: int = 64  # prompts per decoding batch of the local generator; sentences per activation batch

    needs_judge: ClassVar[bool] = True
    main_metric: ClassVar[str] = "s_cd_positive"

    def __post_init__(self) -> None:
        if self.max_features < 0:
            raise ValueError(f"feature_detection.max_features must be >= 0 (0 = every feature), got "
                             f"{self.max_features}")
        for name in ("n_sentences", "max_new_tokens", "max_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"feature_detection.{name} must be at least 1, got {getattr(self, name)}")

    def requires(self, cfg: Any) -> tuple[str, ...]:
        """For `bench.preflight`: the local generator's model under the offline judge."""
        return (f"model:{self.generator}",) if cfg.judge == "offline" else ()

    def cost(self, n_concepts: int, n_instructions: int) -> dict[str, float]:
        """Sentences written per unit, or per feature when every feature is scored (an upper bound: under the
        offline judge the neutral ones are sampled, not written)."""
        if self.max_features:
            return {"sentence_generations": 2.0 * self.n_sentences * self.max_features}
        return {"sentence_generations_per_feature": 2.0 * self.n_sentences}

    def run(self, method: FeatureMethod, ctx: Context) -> Iterator[Score]:
        t0 = time.perf_counter()
        features = select_features(method.directions_.shape[0], self.max_features, ctx.seed)
        get = getattr(ctx, "labels", None)
        labels = get(method, features) if get is not None else label_features(method, features, ctx)
        labelled = [f for f in features if labels[f].input]
        sentences = self.sentences(labelled, labels, ctx)
        stats = self.responses(method, sentences, ctx)
        unscored = 0
        for f in features:
            row = stats.get(f)
            means = {m: _mean(row[m]["cosine"]) if row else None for m in MODES}
            s_cd = s_cd_score(means["activating"], means["neutral"])
            unscored += s_cd is None
            ctx.samples({"kind": "feature_detection", "site": str(method.site), "feature": f,
                         "label": labels[f].input, "s_cd": s_cd, **{f"{m}_sentences": sentences.get(f, {}).get(m, [])
                                                                    for m in MODES},
                         **{f"{m}_{s}": row[m][s] if row else [] for m in MODES for s in STATS}})
            yield Score("s_cd", s_cd, feature=f)
            yield Score("mean_activating", means["activating"], feature=f)
            yield Score("mean_neutral", means["neutral"], feature=f)
            yield Score("s_cd_positive", None if s_cd is None else float(s_cd > 0), feature=f)
        log.info("feature_detection %s: %d features, %d labelled, %d without S_CD (no label, no sentences or a "
                 "mean <= 0), in %.1fs", method.site, len(features), len(labelled), unscored, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------- sentences
    def sentences(self, features: list[int], labels: dict[int, FeatureLabel],
                  ctx: Context) -> dict[int, dict[str, list[str]]]:
        """{feature: {"activating": [...], "neutral": [...]}} written from the features' input labels."""
        if not features:
            return {}
        llm = can_complete(ctx.judge)
        w = writer(ctx.judge, self.generator, ctx.device, self.max_new_tokens, self.batch_size)
        out: dict[int, dict[str, list[str]]] = {f: {m: [] for m in MODES} for f in features}
        modes = MODES if llm else ("activating",)
        templates = {m: load_template(t) for m, t in zip(modes, ("feature_sentences", "feature_sentences_neutral")
                                                         if llm else ("feature_sentences_local",), strict=True)}
        open_ = {(f, m) for f in features for m in modes}
        for _ in range(self.n_sentences):  # one sentence per call, each listing the accepted ones
            jobs = sorted(open_)
            if not jobs:
                break
            prompts = [templates[m].render(description=labels[f].input or "", previous=_previous(out[f][m], llm))
                       for f, m in jobs]
            prompts = prompts if llm else [p.rstrip() for p in prompts]  # a completion ends at `Sentence:`
            answers = complete_grouped(w, prompts, [templates[m].tag for _, m in jobs])
            for (f, m), a in zip(jobs, answers, strict=True):
                text = clean_sentence(a)
                if text is None or text in out[f][m]:
                    open_.discard((f, m))
                else:
                    out[f][m].append(text)
        if not llm:
            corpus = load_lines(None, "neutral.jsonl")["text"].tolist()
            for f in features:
                out[f]["neutral"] = random.Random(f"{ctx.seed}:{f}").sample(corpus, min(self.n_sentences, len(corpus)))
        return out

    # ------------------------------------------------------------------------------------------- responses
    def responses(self, method: FeatureMethod, sentences: dict[int, dict[str, list[str]]],
                  ctx: Context) -> dict[int, dict[str, dict[str, list[float]]]]:
        """{feature: {mode: {stat: [per-sentence max over tokens]}}} for features with sentences of both kinds."""
        texts = sorted({t for by_mode in sentences.values() for ts in by_mode.values() for t in ts})
        if not texts:
            return {}
        got = collect(ctx.model, ctx.tokenizer, texts, [method.site], self.batch_size, self.max_len,
                      desc="feature_detection")[method.site]
        x, prompt = got["x"].float(), got["prompt_idx"]  # [n_tokens, d], [n_tokens]
        row = {t: i for i, t in enumerate(texts)}
        out = {}
        for f, by_mode in sentences.items():
            if not all(by_mode[m] for m in MODES):
                continue
            d = F.normalize(method.directions_[f].float().cpu(), dim=0)  # [d]
            out[f] = {m: sentence_stats(d, x, prompt, [row[t] for t in by_mode[m]]) for m in MODES}
        return out


def sentence_stats(d: Tensor, x: Tensor, prompt: Tensor, rows: Sequence[int]) -> dict[str, list[float]]:
    """Per sentence (rows of `prompt`), the max over its tokens of cos(d, x_t) and of the reference's r2, Pearson
    corr and mse between d and x_t (over the hidden dimension). d [dim], x [n_tokens, dim]."""
    out: dict[str, list[float]] = {s: [] for s in STATS}
    for r in rows:
        b = x[prompt == r]  # [t, dim]
        if len(b) == 0:
            continue
        a = d.expand_as(b)
        cos = F.cosine_similarity(b, a, dim=-1)
        r2 = 1 - (b - a).pow(2).sum(-1) / ((b - b.mean(-1, keepdim=True)).pow(2).sum(-1) + 1e-8)
        ac, bc = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        corr = (ac * bc).sum(-1) / (ac.norm(dim=-1) * bc.norm(dim=-1)).clamp_min(1e-12)
        mse = (a - b).pow(2).mean(-1)
        for name, v in zip(STATS, (cos, r2, corr, mse), strict=True):
            out[name].append(float(v.max()))
    return out


def s_cd_score(mean_activating: float | None, mean_neutral: float | None) -> float | None:
    """log(mean_activating / mean_neutral); None when either is missing or <= 0 (the log is undefined)."""
    if mean_activating is None or mean_neutral is None or mean_activating <= 0 or mean_neutral <= 0:
        return None
    return math.log(mean_activating / mean_neutral)


def clean_sentence(answer: str | None) -> str | None:
    """The first non-empty line of a generator's answer without quotes or a `Sentence:` prefix; None if empty."""
    if answer is None:
        return None
    for line in answer.strip().splitlines():
        line = re.sub(r"^\s*(sentence|answer)\s*\d*\s*:\s*", "", line.strip(), flags=re.IGNORECASE).strip(" \"'`*")
        if line:
            return line[:400]
    return None


def _previous(done: list[str], llm: bool) -> str:
    """The accepted sentences as the template's `previous` slot: `- s` lines (LLM), `Sentence: s` lines (local)."""
    prefix = "- " if llm else "Sentence: "
    return "".join(f"{prefix}{s}\n" for s in done)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
