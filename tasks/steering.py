"""Steering: add a concept's matched feature direction while the model answers neutral instructions, then
judge whether the output shows the concept, still addresses the instruction and stays fluent (axbench).

Protocol, per (model, layer, method):
1. Each concept gets the feature matched to it on the train split (`bench.features.match_concepts`, the same
   matching as detection; DiM: its own row). The steering vector is `unit(direction) * alpha`, added at every
   position of the method's site with `bench.hooks.steer` around `generate()`.
2. Candidate alphas per concept, by `calibration`:
   - `factor` (axbench): `alpha = factor * scale`, for each factor of `factors`, with the concept's `scale`:
     - `mean_norm` (the default): the mean L2 norm of the train activations at the steered site, the same for
       every concept.
     - `max_act` (axbench): the matched feature's maximal activation, `max_act * |direction|`: the largest
       `method.encode` value of the feature over every token (BOS and padding out) of the test split of the
       concept data, i.e. the concept's detection examples (positives, negatives, hard negatives), times the norm
       of its direction (axbench adds `factor * max_act * direction` without normalising the direction; DiM and
       Gemma Scope directions have unit norm). A maximum <= 0 becomes 50, as in axbench. Where the feature is
       steered at another site than it is read (Gemma's mlp features, at `mlp_out`), the scale is carried over as
       the same fraction of the site's mean train norm: `max_act * |direction| * mean_norm(steered) /
       mean_norm(read)`.
   - `kl` (the paper): for each target of `kl_targets`, alpha found by geometric bisection so that the KL
     divergence KL(unsteered || steered) of the next-token distribution at the end of `n_kl_prompts` neutral
     sentences (mean over sentences) hits the target; its `factor` is `alpha / scale`.
3. Dev: every candidate generates on `n_dev` dev instructions; the judge rates concept, instruction and fluency
   (0-2 each) and the candidate with the best mean harmonic mean is chosen per concept. Ties, by `ties`:
   `concept` (the default) the higher mean concept rating, then the smaller alpha; `smallest` (axbench) the
   smallest factor.
4. Test: the chosen alpha and the unsteered reference (alpha = 0) generate on `n_test` test instructions and
   are rated. Records: `score` (mean harmonic mean), `concept`, `instruction`, `fluency`, the same with
   `_base` for alpha = 0, and `scored_fraction` (test split); `score`, `factor`, `alpha` (and `kl_target`)
   of the choice, `scale` (alpha per unit factor) and with `scale = "max_act"` the feature's `max_act` (dev
   split). Every generation, prompt, alpha, the scale's kind and judge answer goes to samples.jsonl.

axbench (github.com/stanfordnlp/axbench, read at e9b8cd4): `max_act` per concept is the maximum over the concept's
latent-evaluation rows of each row's maximal token activation, BOS excluded (axbench/models/model.py,
`predict_latent` and `pre_compute_mean_activations`; the rows are the concept's positives, negatives and hard
negatives, axbench/utils/dataset.py `create_eval_df`), 50 where it is <= 0; its GemmaScopeSAE takes Neuronpedia's
`maxValue` of the feature instead unless `disable_neuronpedia_max_act` (axbench/models/sae.py), and featbench,
offline, always takes the data's. Steering adds `max_act * factor * proj.weight[concept]` at every position
(`AdditionIntervention`, axbench/models/interventions.py; DiffMean's weight is its unit-normalised direction,
axbench/models/mean.py, GemmaScopeSAE's its decoder row, axbench/models/sae.py). The factor is chosen per concept
and method as `np.argmax` of the mean judge score over the factors in ascending order, so ties go to the smallest
factor (axbench/scripts/evaluate.py, `get_best_factors`; the scores per factor, axbench/evaluators/lm_judge.py).
axbench rounds activations to 3 decimals before the maximum; featbench does not. `bench/configs/axbench-gemma2.toml`
sets `scale = "max_act"` and `ties = "smallest"`; the defaults stay `mean_norm` and `concept`, with which the
committed runs were made.

Defaults are sized for the default CPU run (gemma-3-270m, 2 CPU cores; bench/configs/default.toml repeats them):
12 concepts (a seeded sample of the 25), 2 dev and 4 test instructions, 24 new tokens sampled at temperature 0.7,
and factors 0.1, 0.3, 1 and 3, log-spaced in half decades from weak to strong. Measured on that model (DiM, 8-12
concepts, factors 0.05-4): at 0.05-0.125 outputs are about as unsteered (concept rating 0.1-0.3 of 2); the dev
harmonic mean peaks at 0.25-0.5 at layer 3 (instruction following is gone by 1-2) and near 1 at layer 14; at 4
every layer scored 0. The old grid (1, 4, 16) started where instruction following was already lost (harmonic mean
0 in 35 of 36 cells). That is 12 x (4 x 2 + 4) + 4 = 148 generations per unit, about 1.5-3 minutes on 2 idle
cores (scaled from the old default's 34 in 20-25 s, and from 800-850 CPU-seconds per 196 generations, judge included,
measured on a loaded shared 2-core machine, where such a unit took 20 minutes of wall time). 12 concepts
give a bootstrap CI over concepts of about +-0.25 on the 0-2 scale (layer 3, DiM: 0.57 [0.32, 0.86], unsteered
0.12 [0.00, 0.28]). `bench/configs/paper.toml` has the papers' settings (14 factors, every concept, 5 + 5
instructions, 128 tokens at temperature 1.0) for GPU users.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from bench import Context, FeatureMethod, Score, register_task
from bench.features import match_concepts, max_activations, mean_norm, steering_target
from bench.hooks import steer
from bench.judge import Item, Ratings
from bench.sites import Site
from bench.steer import geometric_kl_alphas

log = logging.getLogger(__name__)
CALIBRATIONS = ("factor", "kl")
SCALES = ("mean_norm", "max_act")  # alpha per unit factor: the site's mean train norm | the feature's max activation
TIES = ("concept", "smallest")  # among the best dev scores: higher concept rating, then smaller alpha | smallest factor
MAX_ACT_SPLIT = "test"  # the concept data split max_act is taken over: axbench's latent-evaluation examples
MAX_ACT_FALLBACK = 50.0  # axbench's max_act for a feature whose maximum is <= 0


@dataclass(frozen=True)
class Candidate:
    """One steering strength for a concept: `alpha` in site units, `factor = alpha / scale` (the concept's scale)."""

    alpha: float
    factor: float
    kl_target: float | None = None
    kl: float | None = None  # the KL actually reached (kl calibration)


@register_task("steering")
@dataclass
class Steering:
    """Steer with each concept's matched feature; judge concept, instruction and fluency (axbench protocol).

    The defaults (`scale = "mean_norm"`, `ties = "concept"`) are featbench's; axbench's own choices are
    `scale = "max_act"` and `ties = "smallest"`, which `bench/configs/axbench-gemma2.toml` sets (module docstring)."""

    calibration: str = "factor"  # factor (axbench: alpha = factor x scale) | kl (alpha hits a KL target)
    # multiples of the scale, log-spaced from weak to strong (see the module docstring)
    factors: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    scale: str = "mean_norm"  # mean_norm (mean L2 norm at the site) | max_act (axbench: the feature's max activation)
    ties: str = "concept"  # dev-score ties: concept (higher concept rating, smaller alpha) | smallest (axbench)
    kl_targets: tuple[float, ...] = (0.5, 1.0, 2.0)  # nats, next-token KL on neutral sentences
    concepts: tuple[str, ...] = ()  # concepts to steer (empty: a seeded sample of max_concepts)
    max_concepts: int = 12  # 0 = every concept
    n_dev: int = 2  # dev instructions per candidate (choose alpha)
    n_test: int = 4  # test instructions (score the chosen alpha and alpha = 0)
    max_new_tokens: int = 24
    temperature: float = 0.7  # 0 = greedy
    batch_size: int = 32  # generations per forward pass
    chat: bool = True  # use the tokenizer's chat template when it has one
    prompt_format: str = "Q: {instruction}\nA:"  # for tokenizers without a chat template (base models)
    n_kl_prompts: int = 2  # neutral sentences for the kl calibration
    pool: str = "max"  # token pooling when matching features to concepts (as detection)

    needs_judge: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"unknown steering.calibration {self.calibration!r}; valid: {', '.join(CALIBRATIONS)}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown steering.scale {self.scale!r}; valid: {', '.join(SCALES)}")
        if self.ties not in TIES:
            raise ValueError(f"unknown steering.ties {self.ties!r}; valid: {', '.join(TIES)}")
        for name in ("factors", "kl_targets"):  # CLI values arrive as strings, TOML ones as lists
            try:
                setattr(self, name, tuple(float(v) for v in getattr(self, name)))
            except (TypeError, ValueError):
                raise ValueError(f"steering.{name} must be numbers, got {getattr(self, name)!r}") from None
        self.concepts = tuple(self.concepts)
        grid = self.factors if self.calibration == "factor" else self.kl_targets
        name = "factors" if self.calibration == "factor" else "kl_targets"
        if not grid or any(not v > 0 for v in grid):
            raise ValueError(f"steering.{name} must be positive numbers, got {grid!r}")
        for f in ("n_dev", "n_test", "max_new_tokens", "batch_size", "n_kl_prompts"):
            if getattr(self, f) < 1:
                raise ValueError(f"steering.{f} must be at least 1, got {getattr(self, f)}")
        if self.temperature < 0 or self.max_concepts < 0:
            raise ValueError(f"steering.temperature and steering.max_concepts must be >= 0, got "
                             f"{self.temperature} and {self.max_concepts}")
        if "{instruction}" not in self.prompt_format:
            raise ValueError(f"steering.prompt_format must contain {{instruction}}, got {self.prompt_format!r}")

    def cost(self, n_concepts: int, n_instructions: int) -> dict[str, float]:
        """Work per unit: generations (dev candidates, chosen and unsteered test), new tokens, judge items."""
        c = n_concepts if self.max_concepts == 0 else min(n_concepts, self.max_concepts)
        c = len(self.concepts) or c
        k = len(self.factors if self.calibration == "factor" else self.kl_targets)
        gens = c * (k * self.n_dev + self.n_test) + self.n_test
        return {"steering_generations": float(gens), "steering_new_tokens": float(gens * self.max_new_tokens),
                "steering_judge_items": 3.0 * c * (k * self.n_dev + 2 * self.n_test)}

    # ------------------------------------------------------------------------------------------- run
    def run(self, method: FeatureMethod, ctx: Context) -> Iterator[Score]:
        if ctx.judge is None:
            raise ValueError("the steering task needs a judge: --judge offline | fake | openai:<model> | hf:<id>")
        t0 = time.perf_counter()
        calls0, hits0 = ctx.judge.calls, ctx.judge.cache.hits
        matches = match_concepts(method, ctx, self.pool)
        concepts = self._concepts(ctx)
        dev, test = self._instructions(ctx)
        train = ctx.concepts.split("train").frame
        examples = {c: tuple(train.loc[train["concept"] == c, "text"]) for c in concepts}
        descriptions = ctx.concepts.descriptions
        features = [matches[c].feature for c in concepts]
        site, units = steering_target(ctx.model, method.site, method.directions_[features])
        unit = dict(zip(concepts, units, strict=True))  # concept -> unit vector [d_target] added at `site`
        norm = mean_norm(ctx.acts("train", site))
        scales, max_acts = self._scales(method, ctx, concepts, features, site, norm)
        cands = self._candidates(ctx, site, unit, norm, scales)
        gen = _Generator(self, ctx, site, units.shape[1])

        def judged(jobs: list[tuple[str, Candidate, str]], prompts: list[str], outputs: list[str], split: str,
                   chosen: bool | None) -> list[dict[str, Any]]:
            items = [Item(i, descriptions[c], out, examples[c]) for (c, _, i), out in zip(jobs, outputs, strict=True)]
            ratings = ctx.judge.rate(items, ctx)
            return [{"concept": c, "feature": matches[c].feature, "split": split, "instruction": instr,
                     "prompt": prompt, "alpha": cand.alpha, "factor": cand.factor, "kl_target": cand.kl_target,
                     "kl": cand.kl, "scale": self.scale, "max_act": max_acts[c], "output": out,
                     "judge": ctx.judge.name, "ratings": _ratings(r), "score": r.score,
                     "answers": dict(r.answers), "chosen": chosen}
                    for (c, cand, instr), prompt, out, r in zip(jobs, prompts, outputs, ratings, strict=True)]

        def steered(jobs: list[tuple[str, Candidate, str]], split: str, seed: int,
                    chosen: bool | None) -> list[dict[str, Any]]:
            vectors = [unit[c] * cand.alpha for c, cand, _ in jobs]
            prompts, outputs = gen.generate([i for _, _, i in jobs], vectors, seed)
            return judged(jobs, prompts, outputs, split, chosen)

        dev_rows = steered([(c, cand, i) for c in concepts for cand in cands[c] for i in dev], "dev", ctx.seed, None)
        chosen = {c: self._choose(cands[c], [r for r in dev_rows if r["concept"] == c], self.ties)
                  for c in concepts}
        for r in dev_rows:
            r["chosen"] = r["alpha"] == chosen[r["concept"]].alpha
        test_rows = steered([(c, chosen[c], i) for c in concepts for i in test], "test", ctx.seed + 1, True)
        # alpha = 0 does not depend on the concept: generate once per instruction, rate once per concept
        base_prompts, base_out = gen.generate(test, [None] * len(test), ctx.seed + 2)
        zero = Candidate(0.0, 0.0)
        base_rows = judged([(c, zero, i) for c in concepts for i in test], base_prompts * len(concepts),
                           base_out * len(concepts), "test", False)
        for r in dev_rows + test_rows + base_rows:
            ctx.samples({"kind": "steering", **r})

        for c in concepts:
            f = matches[c].feature
            pick = chosen[c]
            yield Score("score", _mean([r["score"] for r in dev_rows if r["concept"] == c and r["chosen"]]),
                        concept=c, split="dev", feature=f)
            yield Score("factor", pick.factor, concept=c, split="dev", feature=f)
            yield Score("alpha", pick.alpha, concept=c, split="dev", feature=f)
            yield Score("scale", scales[c], concept=c, split="dev", feature=f)
            if max_acts[c] is not None:
                yield Score("max_act", max_acts[c], concept=c, split="dev", feature=f)
            if pick.kl_target is not None:
                yield Score("kl_target", pick.kl_target, concept=c, split="dev", feature=f)
            for cand in cands[c]:  # the dev sweep, for trade-off curves
                rows = [r for r in dev_rows if r["concept"] == c and r["alpha"] == cand.alpha]
                yield Score("sweep_score", _mean([r["score"] for r in rows]), c, "dev", f, cand.factor)
                for aspect in ("concept", "instruction", "fluency"):
                    yield Score(f"sweep_{aspect}", _mean([r["ratings"][aspect] for r in rows]), c, "dev", f,
                                cand.factor)
            for suffix, rows in (("", test_rows), ("_base", base_rows)):
                rows = [r for r in rows if r["concept"] == c]
                yield Score(f"score{suffix}", _mean([r["score"] for r in rows]), concept=c, feature=f)
                for aspect in ("concept", "instruction", "fluency"):
                    yield Score(f"{aspect}{suffix}", _mean([r["ratings"][aspect] for r in rows]), concept=c, feature=f)
            steered_rows = [r for r in test_rows if r["concept"] == c]
            yield Score("scored_fraction", sum(r["score"] is not None for r in steered_rows) / len(steered_rows),
                        concept=c, feature=f)
        log.info("steering %s: %d concepts, %d generations in %.1fs; judge %s: %d computed, %d cache hits",
                 method.site, len(concepts), gen.count, time.perf_counter() - t0, ctx.judge.name,
                 ctx.judge.calls - calls0, ctx.judge.cache.hits - hits0)

    # ------------------------------------------------------------------------------------------- parts
    def _concepts(self, ctx: Context) -> list[str]:
        known = ctx.concepts.concepts
        if self.concepts:
            unknown = sorted(set(self.concepts) - set(known))
            if unknown:
                raise ValueError(f"unknown steering.concepts {unknown}; known: {', '.join(known)}")
            return list(dict.fromkeys(self.concepts))
        if self.max_concepts == 0 or self.max_concepts >= len(known):
            return list(known)
        return sorted(random.Random(ctx.seed).sample(list(known), self.max_concepts))

    def _instructions(self, ctx: Context) -> tuple[list[str], list[str]]:
        frame = ctx.instructions
        if frame is None:
            from bench.data import load_lines

            frame = load_lines(None, "instructions.jsonl")
        out = []
        for split, n in (("dev", self.n_dev), ("test", self.n_test)):
            texts = frame.loc[frame["split"] == split, "text"].tolist()
            if len(texts) < n:
                raise ValueError(f"steering.n_{split}={n} but the instructions have only {len(texts)} {split} rows")
            out.append(sorted(random.Random(ctx.seed).sample(texts, n)))
        return out[0], out[1]

    def _scales(self, method: FeatureMethod, ctx: Context, concepts: list[str], features: list[int], site: Site,
                norm: float) -> tuple[dict[str, float], dict[str, float | None]]:
        """Per concept: (alpha per unit factor, the feature's max_act or None). `features` are the concepts'
        matched features, `site` where they are steered, `norm` the mean train norm there (module docstring)."""
        if self.scale == "mean_norm":
            return {c: norm for c in concepts}, {c: None for c in concepts}
        peaks = max_activations(method, ctx.acts(MAX_ACT_SPLIT, method.site), features)  # [c]
        lengths = method.directions_[features].float().norm(dim=-1).cpu()  # [c]
        carry = 1.0 if site == method.site else norm / mean_norm(ctx.acts("train", method.site))
        scales: dict[str, float] = {}
        max_acts: dict[str, float | None] = {}
        for c, f, peak, length in zip(concepts, features, peaks.tolist(), lengths.tolist(), strict=True):
            if not peak > 0:
                log.warning("steering: feature %d of concept %s has max_act %.3g <= 0 on the %s split; using %g, "
                            "as axbench does", f, c, peak, MAX_ACT_SPLIT, MAX_ACT_FALLBACK)
                peak = MAX_ACT_FALLBACK
            max_acts[c] = peak
            scales[c] = peak * length * carry
        return scales, max_acts

    def _candidates(self, ctx: Context, site: Site, unit: dict[str, Tensor], norm: float,
                    scales: dict[str, float] | None = None) -> dict[str, list[Candidate]]:
        """Per concept, the candidates in increasing strength; `scales` (default: `norm` for all) is alpha per unit
        factor, `norm` the mean train norm at `site` (the KL bisection's bracket)."""
        scales = scales or {c: norm for c in unit}
        if self.calibration == "factor":
            return {c: [Candidate(f * scales[c], f) for f in sorted(self.factors)] for c in unit}
        from bench.data import load_lines

        prompts = load_lines(None, "neutral.jsonl")["text"].tolist()[: self.n_kl_prompts]
        dirs = torch.stack(list(unit.values()))  # [c, d] unit
        targets = sorted(self.kl_targets)
        alphas, kls = geometric_kl_alphas(ctx.model, ctx.tokenizer, site, dirs, targets, prompts, norm,
                                          self.batch_size, ctx.device)  # [c, k]; reduced per batch
        return {c: [Candidate(float(alphas[i, k]), float(alphas[i, k]) / scales[c], t, float(kls[i, k]))
                    for k, t in enumerate(targets)] for i, c in enumerate(unit)}

    @staticmethod
    def _choose(cands: list[Candidate], rows: list[dict[str, Any]], ties: str = "concept") -> Candidate:
        """The candidate with the best mean dev score (unscored items ignored). Ties, common when every candidate
        scores 0 on a small model, go by `ties`: `concept`, the higher mean concept rating, then the smaller alpha;
        `smallest` (axbench's argmax over factors in ascending order), the smallest factor."""

        def key(cand: Candidate) -> tuple[float, float, float]:
            mine = [r for r in rows if r["alpha"] == cand.alpha]
            score = _mean([r["score"] for r in mine])
            if ties == "smallest":
                return (-math.inf if score is None else score, -cand.factor, -cand.alpha)
            concept = _mean([r["ratings"]["concept"] for r in mine])
            return (-math.inf if score is None else score, -math.inf if concept is None else concept, -cand.alpha)

        if ties not in TIES:
            raise ValueError(f"unknown steering.ties {ties!r}; valid: {', '.join(TIES)}")
        best = max(cands, key=key)
        if key(best)[0] == -math.inf:
            log.warning("steering: no dev generation of concept %s was scored; choosing %s",
                        rows[0]["concept"] if rows else "?",
                        "the smallest factor" if ties == "smallest" else "by concept rating and alpha")
        return best


def _mean(values: list[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None


def _ratings(r: Ratings) -> dict[str, float | None]:
    return {"concept": r.concept, "instruction": r.instruction, "fluency": r.fluency}


class _Generator:
    """Batched, seeded generation with a per-row steering vector at the method's site."""

    def __init__(self, task: Steering, ctx: Context, site: Site, d: int) -> None:
        self.task, self.ctx, self.site, self.d = task, ctx, site, d
        tok = ctx.tokenizer
        self.templated = bool(task.chat and getattr(tok, "chat_template", None))
        prefix = task.prompt_format.split("{instruction}")[0].strip()
        self.stop = None if self.templated or not prefix else "\n" + prefix
        self.count = 0

    def prompt(self, instruction: str) -> str:
        if self.templated:
            return self.ctx.tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                                          add_generation_prompt=True)
        return self.task.prompt_format.format(instruction=instruction)

    def generate(self, instructions: list[str], vectors: list[Tensor | None], seed: int) -> tuple[list[str], list[str]]:
        """(prompts, outputs): one sampled continuation per instruction, row i steered by vectors[i] ([d_site])."""
        task, model, tok = self.task, self.ctx.model, self.ctx.tokenizer
        prompts = [self.prompt(i) for i in instructions]
        outputs: list[str] = []
        side, tok.padding_side = tok.padding_side, "left"
        sampling = {"do_sample": True, "temperature": task.temperature, "top_k": 0, "top_p": 1.0} \
            if task.temperature > 0 else {"do_sample": False}
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for start in range(0, len(prompts), task.batch_size):
                    chunk = slice(start, start + task.batch_size)
                    enc = tok(prompts[chunk], return_tensors="pt", padding=True,
                              add_special_tokens=not self.templated).to(self.ctx.device)
                    vec = torch.stack([v.float().cpu() if v is not None else torch.zeros(self.d)
                                       for v in vectors[chunk]])  # [b, d_site]
                    with steer(model, self.site, vec[:, None, :].to(self.ctx.device)), torch.no_grad():
                        out = model.generate(**enc, max_new_tokens=task.max_new_tokens, pad_token_id=tok.pad_token_id,
                                             **sampling)
                    outputs += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        finally:
            tok.padding_side = side
        self.count += len(prompts)
        if self.stop:
            outputs = [o.split(self.stop)[0] for o in outputs]
        return prompts, [o.strip() for o in outputs]


def positions(mask: Tensor) -> Tensor:
    """Position ids [b, t] of left-padded rows from their attention mask [b, t]: 0, 1, ... from each row's first
    real token (padding gets 0), so a padded row sees the positions it would see alone. Needed by models with
    absolute position embeddings (GPT-2); `generate()` derives the same from the mask itself."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def last_logprobs(model: Any, ids: Tensor, mask: Tensor, site: Site | None = None,
                  vectors: Tensor | None = None) -> Tensor:
    """Next-token log-probabilities [b, vocab] (float32) after the last token of left-padded rows ids [b, t]
    (attention mask [b, t]), optionally steered at `site` by vectors [b, 1, d_site] (or [d_site])."""
    with torch.no_grad(), (steer(model, site, vectors) if vectors is not None else contextlib.nullcontext()):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    return torch.log_softmax(logits[:, -1].float(), -1)
