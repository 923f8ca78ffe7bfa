"""Which local model, with which few-shot prompt, writes feature labels under the offline judge (issue #14)?

Measured on the shipped concepts at one layer of the default model, for every method of the default config
(fits from the fit cache when a default run was done):

- names the concept: for each concept its best-matched feature (`bench.features.match_concepts`, as the concept
  tasks) is labelled (`bench.feature_labels`, input side and output side of the + sign); a label names the concept
  when cos(label, concept description) >= the labeling task's `concept_threshold` (0.28, validated there) under the
  offline judge's embedder. An unlabelled feature names nothing. Baselines: the rate when each label is compared
  with another concept's description (the mean over every c != c' pair, i.e. the expectation over seeded
  derangements: what an uninformative label reaches), and the rate of one constant label (the most common label of
  those features) against every description.
- diversity: over a seeded sample of `n_sample` features (`select_features`, as the feature tasks), the number of
  distinct labels, the most common label and its count, and the share of labels that copy a few-shot example
  (`echo`): a labeler that echoes its examples shows up here.

Candidates are labelers (any local model id, e.g. the embedded `smollm2-135m-gguf`, `gemma-3-270m-gguf`) times
prompt variants: `shipped` (tasks/prompts/feature_label_{input,output}_local.txt), `far` (three examples on topics
far from every shipped concept), `rotated` (nine such examples in three sets; feature f sees set f mod 3) and
`zero` (no examples: nothing to echo). Answers are cached in the judge cache, so a rerun costs seconds.

    python -m bench.labeler_choice [--layer middle] [--out bench/data/labeler_choice.csv]

Writes one tidy CSV: labeler, variant, method, metric, value, n, text (the label of `*_top_count` and
`*_constant` rows; the example labels that name a concept in `examples_naming_a_concept` rows).
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from bench.config import RunConfig
from bench.feature_labels import (
    LabelSettings,
    TopToken,
    _prompt,
    gather_evidence,
    parse_label,
    render_tokens,
    render_vocab,
    select_features,
)
from bench.features import match_concepts
from bench.fits import FitCache
from bench.judges.templates import Template, load_template
from bench.labeler import complete_grouped, writer
from bench.protocols import Context, FeatureMethod

log = logging.getLogger(__name__)
CANDIDATES = ("smollm2-135m-gguf", "gemma-3-270m-gguf")
SIDES = ("input", "output")  # output = the + sign
OUT = Path(__file__).resolve().parent / "data" / "labeler_choice.csv"
COLUMNS = ["labeler", "variant", "method", "metric", "value", "n", "text"]
Embed = Callable[[Sequence[str]], Tensor]  # texts -> unit-norm embeddings [n, d]


# ----------------------------------------------------------------------------------------------- prompt variants
@dataclass(frozen=True)
class Variant:
    """Few-shot templates (input side, output side) per example set; feature f uses set f mod len(sets)."""

    name: str
    sets: tuple[tuple[Template, Template], ...]

    @property
    def examples(self) -> tuple[str, ...]:
        """Every example label the labeler is shown (a copy of one is an echo)."""
        out: list[str] = []
        for pair in self.sets:
            for t in pair:
                out += example_labels(t)
        return tuple(dict.fromkeys(out))


def example_labels(template: Template) -> list[str]:
    """The labels of a few-shot template's examples (`Label:` / `Topic:` lines with text)."""
    return re.findall(r"^(?:Label|Topic):[ \t]*(\S.*)$", template.body, re.M)


_IN_HEAD = ("Each block lists texts on which one feature of a language model is most active; the token where it is "
            "active is marked [[like this]]. The label names what the marked tokens share.\n\n")
_OUT_HEAD = "Tokens that one feature of a language model makes more likely, and the topic they share.\n\n"
# examples far from every shipped concept: no example label reaches the concept threshold against any concept
# description (`examples_naming_a_concept` rows of the CSV; under this embedder `the word "in"` names german and
# `word endings` nearly negative_sentiment, so neither is used here)
_FAR_IN = {
    "clothing": ("The [[jacket]] hung on a hook by the door.", "He pulled on a pair of wool [[socks]].",
                 "She tied a silk [[scarf]] around her neck."),
    "the preposition \"of\"": ("Most [[of]] the boxes were empty.", "A cup [[of]] tea, please.",
                        "The edge [[of]] the table was chipped."),
    "hand tools": ("He drove the nail in with a [[hammer]].", "Loosen the bolt with a [[wrench]].",
                   "She cut the plank with a [[saw]]."),
    "furniture": ("They bought a new [[sofa]] for the lounge.", "The [[wardrobe]] stood against the wall.",
                  "He sat on the edge of the [[bed]]."),
    "the conjunction \"and\"": ("Salt [[and]] pepper.", "She smiled [[and]] waved.", "Black [[and]] white."),
    "body parts": ("He scraped his [[elbow]] on the wall.", "She rested her [[chin]] on her hand.",
                   "My [[knee]] clicks on the stairs."),
    "toys": ("The child hugged her teddy [[bear]].", "He flew a paper [[kite]] on the hill.",
             "A wooden [[puzzle]] lay on the rug."),
    "plurals": ("The [[cats]] slept on the porch.", "Two [[boxes]] were missing.",
                     "Her [[shoes]] were by the door."),
    "hair": ("She brushed her long [[hair]].", "He trimmed his [[beard]].", "A [[curl]] fell over her eye."),
}
_FAR_OUT = {
    "clothing": "shirt, jacket, socks, scarf, gloves, boots",
    "the preposition \"of\"": "of, Of, OF, of's",
    "hand tools": "hammer, saw, wrench, pliers, chisel, drill",
    "furniture": "sofa, chair, wardrobe, bed, table, shelf",
    "suffixes": "ing, ed, ly, ness, ment, tion",
    "body parts": "elbow, knee, chin, shoulder, ankle, wrist",
    "toys": "doll, kite, teddy, puzzle, marbles, yo-yo",
    "plurals": "cats, boxes, shoes, cars, trees, cups",
    "hair": "hair, beard, curl, braid, fringe, moustache",
}
_FAR_SETS = (("clothing", "the preposition \"of\"", "hand tools"),
             ("furniture", "the conjunction \"and\"", "body parts"), ("toys", "plurals", "hair"))
_FAR_OUT_SETS = (("clothing", "suffixes", "hand tools"), ("furniture", "the preposition \"of\"", "body parts"),
                 ("toys", "plurals", "hair"))


def _few_shot(name: str, in_topics: Sequence[str], out_topics: Sequence[str]) -> tuple[Template, Template]:
    ins = "".join("Texts:\n" + "\n".join(f"- {t}" for t in _FAR_IN[k]) + f"\nLabel: {k}\n\n" for k in in_topics)
    outs = "".join(f"Tokens: {_FAR_OUT[k]}\nTopic: {k}\n\n" for k in out_topics)
    return (Template(f"labeler_choice_{name}_input", "1", _IN_HEAD + ins + "Texts:\n{examples}\nLabel:\n"),
            Template(f"labeler_choice_{name}_output", "1", _OUT_HEAD + outs + "Tokens: {tokens}\nTopic:\n"))


def variants() -> dict[str, Variant]:
    """The prompt variants measured, by name."""
    shipped = (load_template("feature_label_input_local"), load_template("feature_label_output_local"))
    zero = (Template("labeler_choice_zero_input", "1", _IN_HEAD.replace("Each block lists", "The block lists")
                     + "Texts:\n{examples}\n\nIn a few words, the marked tokens share this topic or word.\nLabel:\n"),
            Template("labeler_choice_zero_output", "1", _OUT_HEAD + "Tokens: {tokens}\n\nIn a few words, the topic "
                     "these tokens share.\nTopic:\n"))
    return {
        "shipped": Variant("shipped", (shipped,)),
        "far": Variant("far", (_few_shot("far", _FAR_SETS[0], _FAR_OUT_SETS[0]),)),
        "rotated": Variant("rotated", tuple(_few_shot(f"rotated{i}", a, b)
                                           for i, (a, b) in enumerate(zip(_FAR_SETS, _FAR_OUT_SETS, strict=True)))),
        "zero": Variant("zero", (zero,)),
    }


# ----------------------------------------------------------------------------------------------- scoring
def norm_label(label: str | None) -> str | None:
    """A label compared case- and punctuation-insensitively (None stays None)."""
    if label is None:
        return None
    text = re.sub(r"[^\w\s]", "", label.lower())
    return re.sub(r"\s+", " ", text).strip() or None


@dataclass(frozen=True)
class NamesConcept:
    """How often labels name their concept, against baselines (rates in 0..1)."""

    rate: float  # label of concept i's feature names concept i
    baseline: float  # label of concept i's feature names concept j != i (mean over all pairs)
    constant: float  # the most common label names concept j (mean over concepts)
    constant_label: str | None
    n: int  # concepts


def names_concept(labels: Sequence[str | None], cos: Tensor, threshold: float) -> NamesConcept:
    """Scores of `labels[i]`, the label of concept i's best feature, given cos[i, j] = cos(labels[i], description
    of concept j) ([n, n]); an unlabelled feature (None) names no concept."""
    n = len(labels)
    if cos.shape != (n, n) or n < 2:
        raise ValueError(f"need an [n, n] cosine matrix for n >= 2 labels, got {tuple(cos.shape)} for {n}")
    hit = (cos >= threshold) & torch.tensor([lab is not None for lab in labels])[:, None]
    eye = torch.eye(n, dtype=torch.bool)
    common = Counter(x for x in map(norm_label, labels) if x is not None).most_common(1)
    constant, const_label = 0.0, None
    if common:
        i = [norm_label(x) for x in labels].index(common[0][0])
        constant, const_label = float(hit[i].float().mean()), labels[i]
    return NamesConcept(float(hit[eye].float().mean()), float(hit[~eye].float().mean()), constant, const_label, n)


@dataclass(frozen=True)
class Diversity:
    """Labels of a sample of features: how many differ, which is most common, how many copy an example."""

    n: int  # features
    labelled: int
    distinct: int
    top: str | None
    top_count: int
    echo: int  # labels equal to one of the few-shot examples' labels


def diversity(labels: Sequence[str | None], examples: Sequence[str] = ()) -> Diversity:
    """Distinct labels (case and punctuation ignored), the most common one and its count, and echoes of
    `examples`; unlabelled features (None) count in n only."""
    normed = [x for x in map(norm_label, labels) if x is not None]
    counts = Counter(normed)
    top, top_count = counts.most_common(1)[0] if counts else (None, 0)
    shown = next((x for x in labels if norm_label(x) == top), None)
    seen = {norm_label(e) for e in examples}
    return Diversity(len(labels), len(normed), len(counts), shown, top_count, sum(x in seen for x in normed))


def cosines(embed: Embed, labels: Sequence[str | None], descriptions: Sequence[str]) -> Tensor:
    """cos(labels[i], descriptions[j]) as [n_labels, n_descriptions]; rows of None labels are -1."""
    texts = sorted({x for x in labels if x is not None})
    out = torch.full((len(labels), len(descriptions)), -1.0)
    if texts:
        emb = dict(zip(texts, embed(texts), strict=True))
        d = embed(list(descriptions))
        for i, x in enumerate(labels):
            if x is not None:
                out[i] = d @ emb[x]
    return out


def score_rows(labeler: str, variant: str, method: str, concept_labels: Mapping[str, Mapping[str, str | None]],
               descriptions: Mapping[str, str], sample_labels: Mapping[str, Sequence[str | None]],
               examples: Sequence[str], embed: Embed, threshold: float) -> list[dict[str, Any]]:
    """The CSV rows of one (labeler, variant, method): `concept_labels[side][concept]` are the labels of each
    concept's best feature, `sample_labels[side]` those of the sampled features."""
    rows: list[dict[str, Any]] = []

    def add(metric: str, value: float, n: int, text: str | None = "") -> None:
        rows.append({"labeler": labeler, "variant": variant, "method": method, "metric": metric,
                     "value": round(float(value), 4), "n": n, "text": text or ""})

    concepts = sorted(descriptions)
    for side in SIDES:
        labels = [concept_labels[side].get(c) for c in concepts]
        s = names_concept(labels, cosines(embed, labels, [descriptions[c] for c in concepts]), threshold)
        add(f"{side}_names_concept", s.rate, s.n)
        add(f"{side}_names_concept_baseline", s.baseline, s.n * (s.n - 1))
        add(f"{side}_names_concept_constant", s.constant, s.n, s.constant_label)
        d = diversity(sample_labels[side], examples)
        add(f"{side}_labelled", d.labelled, d.n)
        add(f"{side}_distinct", d.distinct, d.n)
        add(f"{side}_top_count", d.top_count, d.n, d.top)
        add(f"{side}_echo", d.echo, d.n)
    return rows


def example_rows(variant: Variant, descriptions: Mapping[str, str], embed: Embed,
                 threshold: float) -> list[dict[str, Any]]:
    """One row per variant: how many of its example labels name some shipped concept (a copied example that names a
    concept would inflate the rate)."""
    ex = list(variant.examples)
    cos = cosines(embed, ex, list(descriptions.values()))
    naming = [e for e, row in zip(ex, cos, strict=True) if bool((row >= threshold).any())]
    return [{"labeler": "", "variant": variant.name, "method": "", "metric": "examples_naming_a_concept",
             "value": len(naming), "n": len(ex), "text": "; ".join(naming)}]


# ----------------------------------------------------------------------------------------------- labelling
def evidence(method: FeatureMethod, features: Sequence[int], ctx: Context,
             settings: LabelSettings) -> dict[int, tuple[list[TopToken], list[tuple[str, float]]]]:
    """{feature: (top tokens, + sign vocabulary)} as `bench.feature_labels` builds them; memoised on the context,
    so every labeler and variant sees the same evidence."""
    key = ("labeler_choice", id(method), tuple(features), settings.n_top, settings.window, settings.local_window,
           settings.n_vocab)
    if key in ctx.memo:
        return ctx.memo[key]
    feats = list(features)
    tops, vocab = gather_evidence(method, feats, ctx, settings)
    out = {f: (list(tops[j]), list(vocab[j]["+"])) for j, f in enumerate(feats)}
    ctx.memo[key] = out
    return out


def label_with(method: FeatureMethod, features: Sequence[int], ctx: Context, labeler: str,
               variant: Variant) -> dict[int, tuple[str | None, str | None]]:
    """{feature: (input label, output label of the + sign)} written by the local `labeler` with `variant`'s
    templates under the offline judge, with `bench.feature_labels`'s prompts and parsing (the - sign is not
    written: it is not scored here); answers are cached in the judge cache."""
    settings = LabelSettings(labeler=labeler)
    ev = evidence(method, features, ctx, settings)
    prompts, tags, jobs = [], [], []
    for f in features:
        tin, tout = variant.sets[f % len(variant.sets)]
        tops, vocab = ev[f]
        if tops:
            jobs.append((f, 0))
            prompts.append(_prompt(tin, "_local", examples=render_tokens(tops[: settings.n_show], "_local")))
            tags.append(tin.tag)
        jobs.append((f, 1))
        prompts.append(_prompt(tout, "_local", tokens=render_vocab(vocab[: settings.n_vocab_show], "_local")))
        tags.append(tout.tag)
    w = writer(ctx.judge, labeler, ctx.device, settings.max_new_tokens)
    out: dict[int, list[str | None]] = {f: [None, None] for f in features}
    for (f, k), a in zip(jobs, complete_grouped(w, prompts, tags), strict=True):
        out[f][k] = parse_label(a, "_local")
    return {f: (a, b) for f, (a, b) in out.items()}


def measure(ctx: Context, methods: Mapping[str, FeatureMethod], labelers: Sequence[str],
            variant_names: Sequence[str], embed: Embed, threshold: float, n_sample: int = 30) -> pd.DataFrame:
    """The tidy frame (COLUMNS) of every labeler x variant x method, plus each variant's example check."""
    table = variants()
    unknown = sorted(set(variant_names) - set(table))
    if unknown:
        raise ValueError(f"unknown prompt variant(s) {unknown}; valid: {', '.join(table)}")
    descriptions = {c: ctx.concepts.descriptions.get(c, c) for c in ctx.concepts.concepts}
    rows: list[dict[str, Any]] = []
    for v in variant_names:
        rows += example_rows(table[v], descriptions, embed, threshold)
    plan = {}
    for name, method in methods.items():
        best = {c: m.feature for c, m in match_concepts(method, ctx).items()}
        plan[name] = (best, select_features(method.directions_.shape[0], n_sample, ctx.seed))
    for labeler in labelers:
        for v in variant_names:
            for name, method in methods.items():
                best, sample = plan[name]
                t0 = time.perf_counter()
                got = label_with(method, sorted(set(best.values()) | set(sample)), ctx, labeler, table[v])
                secs = time.perf_counter() - t0
                concept_labels = {side: {c: got[f][k] for c, f in best.items()} for k, side in enumerate(SIDES)}
                sample_labels = {side: [got[f][k] for f in sample] for k, side in enumerate(SIDES)}
                part = score_rows(labeler, v, name, concept_labels, descriptions, sample_labels,
                                  table[v].examples, embed, threshold)
                part.append({"labeler": labeler, "variant": v, "method": name, "metric": "seconds",
                             "value": round(secs, 1), "n": len(got), "text": ""})
                rows += part
                log.info("%s / %s / %s: %d features labelled in %.0fs", labeler, v, name, len(got), secs)
    return pd.DataFrame(rows, columns=COLUMNS)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (labeler, variant, method): names-the-concept rates with both baselines (another concept's
    description; the most common label as a constant), distinct / echo counts and the top label with its count."""
    f = frame[frame["method"] != ""]
    out = []
    for (labeler, variant, method), g in f.groupby(["labeler", "variant", "method"], sort=False):
        by = g.set_index("metric")
        row: dict[str, Any] = {"labeler": labeler, "variant": variant, "method": method}
        for side in SIDES:
            row[f"{side} names"] = (f"{by.value[f'{side}_names_concept']:.2f} (base "
                                    f"{by.value[f'{side}_names_concept_baseline']:.2f}, constant "
                                    f"{by.value[f'{side}_names_concept_constant']:.2f})")
            n = int(by.n[f"{side}_distinct"])
            row[f"{side} distinct"] = f"{int(by.value[f'{side}_distinct'])}/{n}"
            row[f"{side} echo"] = f"{int(by.value[f'{side}_echo'])}/{n}"
            row[f"{side} top"] = f"{by.text[f'{side}_top_count']} ({int(by.value[f'{side}_top_count'])})"
        out.append(row)
    return pd.DataFrame(out)


def ranking(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (labeler, variant), means over methods: lift = names rate - baseline (input, output), distinct and echo
    shares of the sample; sorted by the mean lift (the choice), best first."""
    f = frame[frame["method"] != ""].pivot_table(index=["labeler", "variant", "method"], columns="metric",
                                                 values="value")
    n = frame[frame["metric"] == "input_distinct"].set_index(["labeler", "variant", "method"])["n"]
    out = pd.DataFrame({
        "input_lift": f["input_names_concept"] - f["input_names_concept_baseline"],
        "output_lift": f["output_names_concept"] - f["output_names_concept_baseline"],
        "distinct": (f["input_distinct"] + f["output_distinct"]) / (2 * n),
        "echo": (f["input_echo"] + f["output_echo"]) / (2 * n),
        "seconds": f["seconds"],
    }).groupby(level=["labeler", "variant"]).agg({"input_lift": "mean", "output_lift": "mean", "distinct": "mean",
                                                   "echo": "mean", "seconds": "sum"})
    out["lift"] = (out["input_lift"] + out["output_lift"]) / 2
    return out.sort_values(["lift", "distinct"], ascending=False).round(3).reset_index()


# ----------------------------------------------------------------------------------------------- setup
def setup(cfg: RunConfig, layer: str | int) -> tuple[Context, dict[str, FeatureMethod], Any]:
    """The default run's context at one layer (the runner's activation cache and fit cache), every method of
    `cfg` fitted (or loaded from the fit cache) as the runner fits it, and the offline judge."""
    from bench.data import ConceptData
    from bench.judge import make_judge
    from bench.models import load
    from bench.runner import Run, _ModelData, make_method
    from bench.sites import n_layers, resolve_layers

    run = Run(cfg, Path("results") / "labeler_choice", dry_run=True)  # the run's methods, caches; writes nothing
    concepts = ConceptData.load(cfg.concepts, cfg.concept_columns, cfg.seed)
    model_id = cfg.models[0]
    model, tok, prov = load(model_id, run.device)
    (lay,) = resolve_layers([layer], n_layers(model))
    methods = {m: make_method(m, cfg, lay) for m in run.methods}
    data = _ModelData(run, model, tok, model_id, prov["revision"], concepts,
                      list(dict.fromkeys(m.site for m in methods.values())))
    fits = FitCache()
    keys = {}
    for name, method in methods.items():
        keys[name] = fits.fit(name, method, data.acts("train", method.site).cap(cfg.max_fit_tokens, cfg.seed)).key
    judge = make_judge("offline", device=run.device)
    ctx = Context(model, tok, model_id, lay, concepts, data.acts, cfg.seed, lambda row: None, judge=judge,
                  device=run.device)
    log.info("layer %d: %s", lay, ", ".join(f"{m} ({k})" for m, k in keys.items()))
    return ctx, methods, judge


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", default="middle", help="layer (int, or early / middle / late); default middle")
    ap.add_argument("--out", default=str(OUT), help=f"the CSV (default {OUT})")
    ap.add_argument("--labelers", default=",".join(CANDIDATES), help="comma-separated local model ids")
    ap.add_argument("--variants", default="shipped,far,zero,rotated", help="comma-separated prompt variants")
    ap.add_argument("--n-sample", type=int, default=30, help="features sampled per method for diversity")
    ap.add_argument("--config", default=None, help="run config (default: the default run's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from tasks.labeling import Labeling

    cfg = RunConfig.load(args.config)
    ctx, methods, judge = setup(cfg, int(args.layer) if args.layer.lstrip("-").isdigit() else args.layer)
    threshold = Labeling().concept_threshold
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for v in [x for x in args.variants.split(",") if x]:  # the CSV is rewritten after each pair: partial is usable
        for labeler in [x for x in args.labelers.split(",") if x]:
            parts.append(measure(ctx, methods, [labeler], [v], judge.embed, threshold, args.n_sample))
            frame = pd.concat(parts).drop_duplicates(["labeler", "variant", "method", "metric"])
            frame.insert(0, "layer", ctx.layer)
            frame.to_csv(out, index=False)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    log.info("layer %d, threshold %.2f; per method:\n%s", ctx.layer, threshold, summary(frame).to_string(index=False))
    log.info("ranking (means over methods; lift = names rate - baseline):\n%s", ranking(frame).to_string(index=False))
    log.info("wrote %s (%d rows)", out, len(frame))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

