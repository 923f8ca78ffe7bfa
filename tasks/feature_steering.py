"""Feature-centric steering (the paper's protocol, arXiv 2506.10920): steer every feature (or a seeded sample) both
ways at calibrated strengths and judge the generations against the feature's own labels.

Per (model, layer, method):
1. Features: `select_features(n_features, max_features, seed)`, labelled by `ctx.labels(method, features)` (the
   `feature_labels` artifact: an input-side label, and an output-side label per sign; None = unlabelled).
2. Steering vector: the unit feature direction at the method's site, or, for `mlp`-site features on
   architectures with a norm after the MLP (Gemma), the unit residual image (`bench.features.steering_target`),
   added at every position (BOS, prompt and generated tokens), times +alpha or -alpha.
3. Alpha per feature, sign and KL target by the reference's bisection (`bench.steer.calibrate`): KL(unsteered ||
   steered) of the next-token distribution after the prompt (mean over `prompts`), alpha in [1, 2000], 20
   halvings, |KL - target| < 0.01. A target no midpoint hits is recorded as unreached (alpha and scores None).
   `sign_calibration`: `each` (default, as the issue asks) bisects +d and -d separately (twice the cost);
   `positive` is the reference's code: +d only, -alpha reused for -d (its KL is measured and recorded).
4. Generation (`bench.steer.sample`): `n_samples` continuations of `max_new_tokens` tokens per prompt, feature,
   sign and reached target, at temperature 1 with top-k 30. The reference passes top-p 0.3 too, but
   TransformerLens ignores top-p when top-k is set, so its effective sampling is top-k only: `top_p` defaults to
   1.0 (off) and is offered as an option. Prompts get the model's BOS (GPT-2 included), as in the reference;
   there is no stop on EOS by default (the reference always decodes the full length).
5. Judge (`ctx.judge.rate_features`, rubrics `feature_concept` and `feature_fluency`, 0-2): every text (the
   prompt and its continuation, without the BOS string; the reference also sends the BOS text) is rated for
   fluency, and for concept twice: against the feature's input-side label (input score) and against the
   output-side label of the applied sign (output score). Per generation the score is the harmonic mean of concept
   and fluency (0 if either is 0; None if either is unscored, e.g. an unlabelled side).

Records (test split), per feature x sign x KL target (`sign`, `kl_target` fields): `input_score`, `output_score`,
`input_concept`, `output_concept`, `fluency` (means over the continuations), `alpha` (magnitude), `kl` (reached),
`reached` (1/0). Per feature and sign: `best_input_score`, `best_output_score` (the best target; its value in
`kl_target`, ties to the smaller target) and `score`, the mean of the two (featbench's headline; the paper
reports the two sides separately). Samples: every generation with its prompt, alpha, sign, target, labels and
judge answers.

Defaults are sized for a CPU run (8 features, 2 continuations of 24 tokens, all 7 targets, both signs); the
paper's settings are `max_features = 0` (every feature), `n_samples = 8`, `max_new_tokens = 50`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bench import Context, FeatureMethod, Score, register_task
from bench.feature_labels import select_features
from bench.features import steering_target
from bench.steer import Bisection, KLProbe, Sampling, calibrate, prompt_ids, sample

log = logging.getLogger(__name__)
SIGN_CALIBRATIONS = ("each", "positive")
PAPER_KL_TARGETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5)


@register_task("feature_steering")
@dataclass
class FeatureSteering:
    """Steer each feature both ways at calibrated KL targets; judge against its own labels (the paper's protocol)."""

    max_features: int = 8  # 0 = every feature of the method; else a seeded sample (shared with feature_labels)
    prompts: tuple[str, ...] = ("I think that",)
    kl_targets: tuple[float, ...] = PAPER_KL_TARGETS  # nats
    signs: tuple[int, ...] = (1, -1)
    sign_calibration: str = "each"  # each (+d and -d bisected separately) | positive (the reference: +d, reused)
    alpha_low: float = 1.0  # the bisection bracket, in site units (the direction is unit-norm)
    alpha_high: float = 2000.0
    bisection_steps: int = 20
    kl_tolerance: float = 0.01  # absolute, nats
    n_samples: int = 2  # continuations per prompt, feature, sign and target (paper: 8)
    max_new_tokens: int = 24  # paper: 50
    temperature: float = 1.0
    top_k: int = 30
    top_p: float = 1.0  # the reference's effective value (its 0.3 is ignored by TransformerLens next to top-k)
    stop_at_eos: bool = False
    batch_size: int = 128  # rows per forward pass (generation and calibration)

    needs_judge: ClassVar[bool] = True
    rubrics: ClassVar[tuple[str, ...]] = ("feature_concept", "feature_fluency")
    main_metric: ClassVar[str] = "score"

    def __post_init__(self) -> None:
        try:  # CLI values arrive as strings, TOML ones as lists
            self.kl_targets = tuple(float(v) for v in self.kl_targets)
            self.signs = tuple(int(v) for v in self.signs)
        except (TypeError, ValueError):
            raise ValueError(f"feature_steering.kl_targets and .signs must be numbers, got {self.kl_targets!r} and "
                             f"{self.signs!r}") from None
        self.prompts = tuple(self.prompts)
        if not self.kl_targets or any(not t > 0 for t in self.kl_targets):
            raise ValueError(f"feature_steering.kl_targets must be positive numbers, got {self.kl_targets!r}")
        if not self.signs or not set(self.signs) <= {1, -1} or len(set(self.signs)) != len(self.signs):
            raise ValueError(f"feature_steering.signs must be 1, -1 or both, got {self.signs!r}")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(f"feature_steering.prompts must be non-empty texts, got {self.prompts!r}")
        if self.sign_calibration not in SIGN_CALIBRATIONS:
            raise ValueError(f"unknown feature_steering.sign_calibration {self.sign_calibration!r}; valid: "
                             f"{', '.join(SIGN_CALIBRATIONS)}")
        for name in ("n_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"feature_steering.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_features < 0:
            raise ValueError(f"feature_steering.max_features must be >= 0 (0 = every feature), got {self.max_features}")
        self.sampling()  # checks the sampling settings
        self.bisection()

    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.stop_at_eos)

    def bisection(self) -> Bisection:
        return Bisection(self.alpha_low, self.alpha_high, self.bisection_steps, self.kl_tolerance)

    def cost(self, n_concepts: int, n_instructions: int) -> dict[str, float]:
        """Work per unit: calibration rows x steps (prompt forwards), generations, new tokens, judge items. With
        max_features = 0 the number of features is the method's; the figures are then per feature."""
        f = self.max_features or 1
        suffix = "" if self.max_features else "_per_feature"
        cal_signs = len(self.signs) if self.sign_calibration == "each" else 1
        cal = f * cal_signs * len(self.kl_targets) * self.bisection_steps * len(self.prompts)
        gens = f * len(self.signs) * len(self.kl_targets) * len(self.prompts) * self.n_samples
        return {f"feature_steering_calibration_forwards{suffix}": float(cal),
                f"feature_steering_generations{suffix}": float(gens),
                f"feature_steering_new_tokens{suffix}": float(gens * self.max_new_tokens),
                f"feature_steering_judge_items{suffix}": 3.0 * gens}

    # ------------------------------------------------------------------------------------------- run
    def run(self, method: FeatureMethod, ctx: Context) -> Iterator[Score]:
        if ctx.judge is None:
            raise ValueError("feature_steering needs a judge: --judge offline | fake | openai:<model> | hf:<id>")
        if ctx.labels is None:
            raise ValueError("feature_steering needs feature labels (ctx.labels, set by the runner from the "
                             "feature_labels settings)")
        t0 = time.perf_counter()
        features = select_features(int(method.directions_.shape[0]), self.max_features, ctx.seed)
        labels = ctx.labels(method, features)
        site, units = steering_target(ctx.model, method.site, method.directions_[features])  # [f, d_target] unit
        tok = ctx.tokenizer
        prompts = [prompt_ids(tok, p) for p in self.prompts]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        cells = [(i, s, t) for i in range(len(features)) for s in self.signs for t in self.kl_targets]
        alpha, kl = self._calibrate(ctx, site, units, prompts, cells, pad)
        t1 = time.perf_counter()

        jobs = [(c, p) for c in range(len(cells)) if alpha[c] is not None for p in range(len(prompts))
                for _ in range(self.n_samples)]
        vectors = torch.stack([units[cells[c][0]] * cells[c][1] * alpha[c] for c, _ in jobs]) if jobs else None
        new = sample(ctx.model, [prompts[p] for _, p in jobs], self.sampling(), site=site, vectors=vectors,
                     seed=ctx.seed, batch_size=self.batch_size, pad_id=pad, eos_id=tok.eos_token_id,
                     device=ctx.device)
        texts = [tok.decode(prompts[p] + n, skip_special_tokens=True) for (_, p), n in zip(jobs, new, strict=True)]
        t2 = time.perf_counter()

        def label(c: int, side: str) -> str | None:
            got = labels.get(features[cells[c][0]])
            if got is None:
                return None
            text = got.input if side == "input" else got.output.get("+" if cells[c][1] > 0 else "-")
            return text if text and text.strip() else None  # an empty label is no label

        pairs = [(label(c, side), text) for side in ("input", "output") for (c, _), text in zip(jobs, texts,
                                                                                                strict=True)]
        rated = ctx.judge.rate_features(pairs, ctx) if pairs else []
        inp, out = rated[: len(jobs)], rated[len(jobs) :]
        by_cell: dict[int, list[int]] = {}
        for j, (c, p) in enumerate(jobs):
            by_cell.setdefault(c, []).append(j)
            ctx.samples({"kind": "feature_steering", "feature": features[cells[c][0]], "sign": cells[c][1],
                         "kl_target": cells[c][2], "alpha": alpha[c], "kl": kl[c], "prompt": self.prompts[p],
                         "text": texts[j], "continuation": tok.decode(new[j], skip_special_tokens=True),
                         "labels": {"input": label(c, "input"), "output": label(c, "output")},
                         "judge": ctx.judge.name,
                         "ratings": {"input_concept": inp[j].concept, "output_concept": out[j].concept,
                                     "fluency": inp[j].fluency, "input_score": inp[j].score,
                                     "output_score": out[j].score},
                         "answers": {"input": dict(inp[j].answers), "output": dict(out[j].answers)}})

        best: dict[tuple[int, int], dict[str, tuple[float, float] | None]] = {}
        for c, (i, s, t) in enumerate(cells):
            f, js = features[i], by_cell.get(c, [])
            values = {"input_score": _mean([inp[j].score for j in js]),
                      "output_score": _mean([out[j].score for j in js]),
                      "input_concept": _mean([inp[j].concept for j in js]),
                      "output_concept": _mean([out[j].concept for j in js]),
                      "fluency": _mean([inp[j].fluency for j in js]),
                      "alpha": alpha[c], "kl": kl[c], "reached": float(alpha[c] is not None)}
            for metric, value in values.items():
                yield Score(metric, value, feature=f, sign=s, kl_target=t)
            for side in ("input", "output"):
                v, mine = values[f"{side}_score"], best.setdefault((f, s), {}).get(side)
                if v is not None and (mine is None or v > mine[0] or (v == mine[0] and t < mine[1])):
                    best[(f, s)][side] = (v, t)  # ties go to the smaller target
        for (f, s), sides in best.items():
            for side in ("input", "output"):
                got = sides.get(side)
                yield Score(f"best_{side}_score", None if got is None else got[0], feature=f, sign=s,
                            kl_target=None if got is None else got[1])
            yield Score("score", _mean([g[0] for g in (sides.get("input"), sides.get("output")) if g is not None]),
                        feature=f, sign=s)
        log.info("feature_steering %s: %d features, %d of %d cells reached; calibration %.1fs, %d generations "
                 "%.1fs, judge %.1fs", method.site, len(features), sum(a is not None for a in alpha), len(cells),
                 t1 - t0, len(jobs), t2 - t1, time.perf_counter() - t2)

    # ------------------------------------------------------------------------------------------- parts
    def _calibrate(self, ctx: Context, site: Any, units: torch.Tensor, prompts: list[list[int]],
                   cells: list[tuple[int, int, float]], pad: int) -> tuple[list[float | None], list[float | None]]:
        """Alpha (magnitude) and the KL it reaches, per cell (feature index, sign, target); None = unreached."""
        n = len(units)
        signed = torch.cat([units, -units])  # [2f, d]: row i = +d_i, row n + i = -d_i
        each = self.sign_calibration == "each"
        keys = [(i if s > 0 or not each else n + i, t) for i, s, t in cells]  # positive: every sign bisects +d
        unique = list(dict.fromkeys(keys))
        found = calibrate(ctx.model, site, prompts, signed, torch.tensor([k[0] for k in unique]),
                          torch.tensor([k[1] for k in unique], dtype=torch.float64), self.bisection(),
                          self.batch_size, pad, ctx.device)
        result = dict(zip(unique, zip(found.alpha.tolist(), found.kl.tolist(), strict=True), strict=True))
        alpha = [None if result[k][0] != result[k][0] else result[k][0] for k in keys]  # NaN = unreached
        kl = [None if a is None else result[k][1] for k, a in zip(keys, alpha, strict=True)]
        reuse = [c for c, (_, s, _) in enumerate(cells) if not each and s < 0 and alpha[c] is not None]
        if reuse:  # the reference's -alpha on -d: measure the KL it reaches
            probe = KLProbe(ctx.model, site, prompts, signed, self.batch_size, pad, ctx.device)
            got = probe(torch.tensor([n + cells[c][0] for c in reuse]),
                        torch.tensor([alpha[c] for c in reuse], dtype=torch.float64))
            for c, k in zip(reuse, got.tolist(), strict=True):
                kl[c] = k
        return alpha, kl


def _mean(values: list[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None
