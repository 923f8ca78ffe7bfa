"""Validation of the offline judge's feature-centric concept rating against hand labels.

The feature-centric steering task rates each steered text against a feature's label: `OfflineGrader.rate_features`
(`_label_concept`) gives `_step(cos, *OfflineThresholds().concept)`, where `cos` is the all-MiniLM-L6-v2 cosine
between the embedding of the text and that of the label. This module checks that rating against hand labels, as
`bench.judge_validation` does for the concept-centric aspects.

Hand labels, `bench/data/judge_validation_feature.jsonl`: 120 (label, text) pairs of the committed default run
(`results/default/samples.jsonl` at commit 67c3c50; gemma-3-270m-gguf, layer 9, site mlp@9, methods snmf, sae
and dim-snmf). In that run each of 394 steered texts was rated against the feature's input label and against the
output label of the applied sign: 788 pairs. `draw_pairs` reproduces the draw: every pair the run's judge rated
>= 1 (stratum "judge>=1", 39 pairs, weight 1) and `random.Random(0).sample` of 81 of the 749 pairs it rated 0
(stratum "judge=0", weight 749/81), pairs enumerated in file order with side "input" before "output" per sample,
then shuffled with the same generator (the position after the shuffle is the row's `id`). The set
over-represents judge-positive pairs on purpose; `weight` undoes that for estimates over all 788 pairs.
Each pair's `concept_rating` (0-2) was given by an AI assistant (a Claude subagent), not a human annotator,
blind to the judge's rating and cosine, with the rubric of `tasks/prompts/feature_concept.txt` and a few
clarifications (each row's `rater` field spells them out). The file keeps no judge output: the raw signal
(the cosine, measured as `_label_concept` measures it) is in `bench/data/judge_validation_feature_signals.csv`.

`agreement_table` recomputes everything from the two files in about a second: one row per estimate ("sample":
the 120 rows as they are; "run": weighted by `weight`, an estimate over the run's 788 pairs) with exact
agreement of the majority-class baseline (the most frequent hand label of the training folds, scored on the
held-out fold), exact agreement and quadratic-weighted Cohen's kappa of the shipped thresholds, and the same
with (lo, hi) refitted per fold by a grid search maximising kappa on the training folds (ties to the shipped
thresholds; 5 seeded folds stratified by hand rating). The "run" row fits, scores and takes the majority with
the weights.

    python -m bench.judge_validation_feature                   # the table from the committed signals (Markdown)
    python -m bench.judge_validation_feature --signals         # remeasure the cosines with MiniLM first
    python -m bench.judge_validation_feature --write-expected  # rewrite the table the drift test compares against
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score
from sklearn.model_selection import StratifiedKFold

from bench.data import package_data
from bench.judge import OfflineGrader, OfflineThresholds
from bench.judge_validation import GRIDS, _best, _mode, _pairs, _step, cli_parser, kappa

log = logging.getLogger(__name__)
LABELS_FILE = "judge_validation_feature.jsonl"
SIGNALS_FILE = "judge_validation_feature_signals.csv"
EXPECTED_FILE = "judge_validation_feature_agreement.csv"
SIDES = ("input", "output")
ESTIMATES = ("sample", "run")  # the rows of `agreement_table`: unweighted, and weighted to the whole run
N_ZERO, SEED = 81, 0  # the draw of the committed labels
PROVENANCE = ("model", "layer", "site", "method", "feature", "sign", "kl_target", "run")


# ----------------------------------------------------------------------------------------------- data
def draw_pairs(samples: Sequence[dict[str, Any]], n_zero: int = N_ZERO, seed: int = SEED) -> list[dict[str, Any]]:
    """The validation draw from a run's samples (`samples.jsonl` rows). Every `feature_steering` sample gives one
    (label, text) pair per side (input, then output; a side without a label or a concept rating is skipped, as
    the judge does not score it); every pair the run's judge rated >= 1 is kept (stratum "judge>=1", weight 1)
    and `n_zero` of the pairs it rated 0 are drawn with `random.Random(seed).sample` (stratum "judge=0", weight
    zeros / n_zero); the kept pairs are shuffled with the same generator and numbered: `id` is the position.
    Each pair: `id`, `label`, `side`, `text`, provenance (`model`, `layer`, `site`, `method`, `feature`, `sign`,
    `kl_target`), `judge` (the run's rating), `stratum`, `weight`."""
    sites = {s["fit_key"]: s["site"] for s in samples if s.get("site") and s.get("fit_key")}
    pairs = []
    for s in samples:
        if s.get("kind") != "feature_steering":
            continue
        for side in SIDES:
            label, judge = (s.get("labels") or {}).get(side), (s.get("ratings") or {}).get(f"{side}_concept")
            if label is None or judge is None:
                continue
            pairs.append({"label": label, "side": side, "text": s["text"], "model": s.get("model"),
                          "layer": s.get("layer"), "site": s.get("site") or sites.get(s.get("fit_key")),
                          "method": s.get("method"), "feature": s.get("feature"), "sign": s.get("sign"),
                          "kl_target": s.get("kl_target"), "judge": int(judge)})
    positive = [p | {"stratum": "judge>=1", "weight": 1.0} for p in pairs if p["judge"] >= 1]
    zeros = [p for p in pairs if p["judge"] < 1]
    if not 0 <= n_zero <= len(zeros):
        raise ValueError(f"n_zero={n_zero}; the samples have {len(zeros)} pairs rated 0 (valid: 0..{len(zeros)})")
    rng = random.Random(seed)
    drawn = [p | {"stratum": "judge=0", "weight": len(zeros) / n_zero} for p in rng.sample(zeros, n_zero)]
    chosen = positive + drawn
    rng.shuffle(chosen)
    return [{"id": i, **p} for i, p in enumerate(chosen)]


def load_labels() -> pd.DataFrame:
    """The hand-labelled pairs (`bench/data/judge_validation_feature.jsonl`), one row per `id`: `label`, `side`,
    `text`, `concept_rating` (0/1/2), `note`, `rater`, provenance, `stratum`, `weight`."""
    text = package_data(LABELS_FILE).read_text(encoding="utf-8")
    out = pd.DataFrame([json.loads(line) for line in text.splitlines() if line])
    if out["id"].duplicated().any():
        raise ValueError(f"duplicate ids in {LABELS_FILE}: {sorted(out.loc[out['id'].duplicated(), 'id'])}")
    bad = sorted(set(out["concept_rating"]) - {0, 1, 2})
    if bad:
        raise ValueError(f"concept_rating values {bad} in {LABELS_FILE}; valid: 0, 1, 2")
    return out


def load_signals() -> pd.DataFrame:
    """The committed raw signal (`bench/data/judge_validation_feature_signals.csv`): `id`, `empty`, `cos`."""
    return pd.read_csv(package_data(SIGNALS_FILE))


def compute_signals(labels: pd.DataFrame, grader: OfflineGrader | None = None) -> pd.DataFrame:
    """The judge's raw signal per labelled pair, measured as `OfflineGrader._label_concept` measures it: the dot
    product of the MiniLM embeddings (unit norm) of the text and of the label; `empty` marks a blank text (rated 0
    whatever the cosine). One row per `id`: `id`, `empty`, `cos` (6 decimals)."""
    grader = grader or OfflineGrader()
    texts, names = labels["text"].tolist(), labels["label"].tolist()
    log.info("feature judge validation: embedding %d (label, text) pairs", len(texts))
    cos = (grader.embed(texts) * grader.embed(names)).sum(-1).numpy()
    return pd.DataFrame({"id": labels["id"].to_numpy(), "empty": [not t.strip() for t in texts],
                         "cos": cos}).round(6)


def _aligned(labels: pd.DataFrame, signals: pd.DataFrame) -> pd.DataFrame:
    """`signals` in the order of `labels`; ValueError naming the labelled ids that have no signal."""
    missing = sorted(set(labels["id"]) - set(signals["id"]))
    if missing:
        raise ValueError(f"no signals for {len(missing)} labelled pair(s), ids {missing}; rerun "
                         "`python -m bench.judge_validation_feature --signals`")
    if signals["id"].duplicated().any():
        raise ValueError(f"duplicate ids in the signals: {sorted(signals.loc[signals['id'].duplicated(), 'id'])}")
    return signals.set_index("id").loc[labels["id"]].reset_index()


# ----------------------------------------------------------------------------------------------- ratings
def judge_ratings(signals: pd.DataFrame, concept: tuple[float, float] | None = None) -> np.ndarray:
    """The judge's rating per row under thresholds `concept` (default the shipped ones); a blank text rates 0: [n]."""
    lo, hi = concept or OfflineThresholds().concept
    out = _step(signals["cos"].to_numpy(dtype=float), lo, hi)
    return np.where(signals["empty"].to_numpy(dtype=bool), 0, out)


def kappa_grid_weighted(preds: np.ndarray, gold: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """`bench.judge_validation.kappa_grid` with sample weights: quadratic-weighted kappa of each row of `preds`
    ([p, n] ratings 0/1/2) against `gold` ([n]), rows weighted by `weight` ([n]): [p]; 0 where the expected
    disagreement is 0. Unit weights give `kappa_grid`."""
    levels = np.arange(3)
    cost = (levels[:, None] - levels[None]) ** 2 / 4.0  # [3, 3]
    g = (gold[:, None] == levels[None]).astype(float) * weight[:, None]  # [n, 3]
    p = (preds[..., None] == levels).astype(float)  # [p, n, 3]
    observed = np.einsum("ng,pnk->pgk", g, p)  # [p, 3 gold, 3 pred]
    expected = observed.sum(2)[:, :, None] * observed.sum(1)[:, None, :] / weight.sum()
    num, den = (cost * observed).sum((1, 2)), (cost * expected).sum((1, 2))
    return np.where(den > 0, 1 - num / np.where(den > 0, den, 1.0), 0.0)


def fit_concept(signals: pd.DataFrame, gold: np.ndarray, weight: np.ndarray | None = None) -> tuple[float, float]:
    """The (lo, hi) of the grid (`GRIDS["concept"]` and the shipped pair) whose ratings have the highest
    quadratic-weighted kappa with `gold` on these rows (weighted by `weight` when given), ties to the pair
    nearest the shipped thresholds. Blank texts rate 0 whatever the thresholds and are left out of the fit."""
    shipped = OfflineThresholds().concept
    keep = ~signals["empty"].to_numpy(dtype=bool)
    pairs = _pairs(np.union1d(GRIDS["concept"], shipped))
    preds = _step(signals["cos"].to_numpy(dtype=float)[keep][None], pairs[:, :1], pairs[:, 1:])  # [p, n]
    if weight is None:
        return _best(pairs, preds, gold[keep], shipped)
    score = kappa_grid_weighted(preds, gold[keep], weight[keep])
    tied = np.flatnonzero(score >= score.max() - 1e-9)
    lo, hi = pairs[tied[np.argmin(np.abs(pairs[tied] - np.asarray(shipped)[None]).sum(1))]]
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------- agreement
def weighted_kappa(gold: np.ndarray, pred: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Quadratic-weighted Cohen's kappa (0/1/2) with optional sample weights, by the rules of
    `bench.judge_validation.kappa`: 0 for a constant prediction, NaN when the hand labels are constant."""
    if weight is None:
        return kappa(gold, pred)
    if len(np.unique(gold)) < 2:
        return float("nan")
    if len(np.unique(pred)) == 1:
        return 0.0
    return float(cohen_kappa_score(gold, pred, labels=[0, 1, 2], weights="quadratic", sample_weight=weight))


def _weighted_mode(values: np.ndarray, weight: np.ndarray) -> int:
    """The value with the largest total weight (ties to the lowest)."""
    if len(values) == 0:
        raise ValueError("a training fold has no rows; use fewer folds")
    return int(pd.Series(weight).groupby(values).sum().sort_index().idxmax())


def cross_validate(labels: pd.DataFrame, signals: pd.DataFrame, folds: int = 5, seed: int = 0,
                   weighted: bool = False) -> tuple[pd.DataFrame, list[tuple[float, float]]]:
    """Held-out predictions for every labelled pair: `cv` (thresholds fitted on the other folds) and `majority`
    (the most frequent hand rating of the other folds, ties to the lower rating); with `weighted`, fits and
    majorities use `labels["weight"]`. Folds: `StratifiedKFold(folds, shuffle=True, random_state=seed)` stratified
    by hand rating, the same folds either way. Returns the predictions (index of `labels`) and each fold's (lo, hi)."""
    if folds < 2:
        raise ValueError(f"folds={folds}; cross-validation needs at least 2")
    sig = _aligned(labels, signals)
    gold = labels["concept_rating"].to_numpy(dtype=int)
    weight = labels["weight"].to_numpy(dtype=float) if weighted else None
    out = pd.DataFrame(0, index=labels.index, columns=["cv", "majority"])
    fitted = []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(np.zeros(len(labels)), gold):
        th = fit_concept(sig.iloc[train], gold[train], None if weight is None else weight[train])
        fitted.append(th)
        out.iloc[test, 0] = judge_ratings(sig.iloc[test], th)
        out.iloc[test, 1] = (_mode(pd.Series(gold[train])) if weight is None
                             else _weighted_mode(gold[train], weight[train]))
    return out, fitted


def agreement_table(labels: pd.DataFrame | None = None, signals: pd.DataFrame | None = None, folds: int = 5,
                    seed: int = 0) -> pd.DataFrame:
    """Agreement of the judge's feature-concept rating with the hand ratings, one row per estimate: "sample" (the
    labelled pairs as they are) and "run" (weighted by `weight`: an estimate over all the run's pairs). Columns:
    `n` (labelled pairs), `pairs` (pairs represented: the sum of the weights for "run"), `majority_exact`
    (cross-validated majority-class baseline), `shipped_exact` and `shipped_kappa` (shipped thresholds;
    quadratic-weighted kappa), `cv_exact` and `cv_kappa` (thresholds refitted on the training folds).
    Defaults: the committed labels and signals."""
    labels = load_labels() if labels is None else labels
    signals = load_signals() if signals is None else signals
    sig = _aligned(labels, signals)
    gold = labels["concept_rating"].to_numpy(dtype=int)
    shipped = judge_ratings(sig)
    rows = []
    for name in ESTIMATES:
        weighted = name == "run"
        w = labels["weight"].to_numpy(dtype=float) if weighted else np.ones(len(labels))
        cv, _ = cross_validate(labels, signals, folds, seed, weighted=weighted)
        held, majority = cv["cv"].to_numpy(), cv["majority"].to_numpy()

        def exact(pred: np.ndarray, w: np.ndarray = w) -> float:
            return float(np.average(pred == gold, weights=w))

        rows.append({"estimate": name, "n": len(labels), "pairs": round(float(w.sum())),
                     "majority_exact": exact(majority), "shipped_exact": exact(shipped),
                     "shipped_kappa": weighted_kappa(gold, shipped, w if weighted else None),
                     "cv_exact": exact(held), "cv_kappa": weighted_kappa(gold, held, w if weighted else None)})
    return pd.DataFrame(rows).round(4)


def label_counts(labels: pd.DataFrame | None = None, signals: pd.DataFrame | None = None,
                 weighted: bool = False) -> pd.DataFrame:
    """Hand rating (rows: `hand 0..2`) × the judge's rating under the shipped thresholds (columns: `judge 0..2`):
    counts of labelled pairs, or with `weighted` the sums of their weights (an estimate over all the run's pairs,
    rounded to whole pairs)."""
    labels = load_labels() if labels is None else labels
    signals = load_signals() if signals is None else signals
    judge = judge_ratings(_aligned(labels, signals))
    weight = labels["weight"].to_numpy(dtype=float) if weighted else np.ones(len(labels))
    table = (pd.Series(weight).groupby([labels["concept_rating"].to_numpy(), judge]).sum().unstack()
             .reindex(index=range(3), columns=range(3)).fillna(0).round().astype(int))
    table.index = [f"hand {i}" for i in table.index]
    table.columns = [f"judge {j}" for j in table.columns]
    return table


def main(argv: list[str] | None = None) -> int:
    args = cli_parser("bench.judge_validation_feature", __doc__,
                      f"remeasure the cosines with MiniLM and write bench/data/{SIGNALS_FILE}",
                      EXPECTED_FILE).parse_args(argv)
    labels = load_labels()
    if args.signals:
        compute_signals(labels, OfflineGrader(device=args.device)).to_csv(package_data(SIGNALS_FILE), index=False)
    table = agreement_table(labels, folds=args.folds, seed=args.seed)
    if args.write_expected:
        table.to_csv(package_data(EXPECTED_FILE), index=False)
    sig = _aligned(labels, load_signals())
    gold = labels["concept_rating"].to_numpy(dtype=int)
    sys.stdout.write(table.to_markdown(index=False, floatfmt=".2f") + "\n\n")
    for weighted, what in ((False, "labelled pairs"), (True, "estimated over the run, weighted")):
        sys.stdout.write(f"hand rating x judge rating (shipped thresholds), {what}:\n\n"
                         + label_counts(labels, weighted=weighted).to_markdown() + "\n\n")
    sys.stdout.write(f"concept thresholds fitted on all {len(labels)} pairs: {list(fit_concept(sig, gold))}, "
                     f"weighted: {list(fit_concept(sig, gold, labels['weight'].to_numpy(dtype=float)))}\n")
    sys.stdout.write(f"shipped concept thresholds: {list(OfflineThresholds().concept)}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
