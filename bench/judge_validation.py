"""Validation of the offline judge against hand labels: raw signals, cross-validated thresholds, agreement.

Hand labels (0-2 for concept, instruction, fluency, rated with the rubrics of `tasks/prompts/steering_*.txt`):
- `bench/data/judge_validation.jsonl`: the original 112 rows, `source` "written" (84 texts written by hand) or
  "gemma-3-270m" (28 generations of the default model); sets `written` and `generated`.
- `bench/data/judge_validation_steered.jsonl`: generations of the steering task on the default model (dim
  features, a sweep of factors including alpha = 0), read and rated one by one; set `steered`. Each row keeps
  its provenance (layer, site, method, feature, factor, alpha, split, run seed, prompt, run config with its
  command) and `rater`. Generations use the run seed on dev, seed + 1 on test, seed + 2 for alpha = 0; an
  alpha = 0 row is unsteered, so its layer is only the unit it was recorded in.

The offline grader (`bench.judge.OfflineGrader`) turns six raw signals into ratings with `OfflineThresholds`:
`concept_cos` and `instruction_cos` (MiniLM cosines), `excess` (mean token NLL under the unsteered default model
minus the median NLL of neutral text) and the repetition measures `content`, `compression`, `distinct`.
`compute_signals` measures them with the real models (minutes on a CPU) into
`bench/data/judge_validation_signals.csv`; `agreement_table` recomputes every number from that file and the
labels in about a second.

Agreement per aspect and per set: exact agreement and quadratic-weighted Cohen's kappa (0 for any constant
rating) of the judge with the shipped thresholds (set by hand on the original rows, so in-sample there) and
with thresholds fitted by k-fold cross-validation (seeded, folds stratified by set; each fold's thresholds
fitted on the other folds by a grid search maximising kappa, ties to the candidate nearest the shipped ones),
next to the majority-class baseline (the most frequent hand label of the training folds, scored on the
held-out fold; over all sets, and within the row's own set).

    python -m bench.judge_validation             # the table from the committed signals (Markdown)
    python -m bench.judge_validation --signals   # remeasure the signals with the real models first
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from itertools import combinations_with_replacement

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score
from sklearn.model_selection import StratifiedKFold

from bench.data import ConceptData, package_data
from bench.judge import ASPECTS, OfflineGrader, OfflineThresholds, repetition

log = logging.getLogger(__name__)
LABEL_FILES = ("judge_validation.jsonl", "judge_validation_steered.jsonl")
SIGNALS_FILE = "judge_validation_signals.csv"
EXPECTED_FILE = "judge_validation_agreement.csv"
SETS = ("written", "generated", "steered")
SIGNALS = ("concept_cos", "instruction_cos", "excess", "content", "compression", "distinct")
FLUENCY_PARTS = ("excess", "content", "compression", "distinct")
SCORER = "gemma-3-270m-gguf"  # the model whose NLL the fluency signal is measured under (the default model)
# Candidate thresholds of the grid search, per OfflineThresholds field: round numbers spanning each signal.
GRIDS = {"concept": np.round(np.arange(-0.10, 0.801, 0.02), 2),
         "instruction": np.round(np.arange(-0.10, 0.801, 0.02), 2),
         "excess": np.round(np.arange(-1.0, 8.01, 0.25), 2),
         "content": np.round(np.arange(0.0, 1.001, 0.02), 2),
         "compression": np.round(np.arange(0.0, 1.001, 0.02), 2),
         "distinct": np.round(np.arange(0.0, 1.001, 0.02), 2)}


# ----------------------------------------------------------------------------------------------- data
def load_labels() -> pd.DataFrame:
    """Every hand-labelled row: `uid` (file-unique key), `set`, `concept`, `description`, `instruction`,
    `output`, `<aspect>_rating` (0/1/2) and, for steered rows, their provenance columns."""
    frames = []
    for name in LABEL_FILES:
        rows = [json.loads(line) for line in package_data(name).read_text(encoding="utf-8").splitlines() if line]
        frame = pd.DataFrame(rows)
        if name == LABEL_FILES[0]:
            frame["set"] = np.where(frame["source"] == "written", "written", "generated")
            frame["uid"] = "v1-" + frame["id"].astype(str)
        else:
            frame["set"] = "steered"
            frame["uid"] = "steered-" + frame["id"].astype(str)
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    if out["uid"].duplicated().any():
        raise ValueError(f"duplicate validation ids: {sorted(out.loc[out['uid'].duplicated(), 'uid'])}")
    for aspect in ASPECTS:
        bad = sorted(set(out[f"{aspect}_rating"]) - {0, 1, 2})
        if bad:
            raise ValueError(f"{aspect}_rating values {bad} in the validation labels; valid: 0, 1, 2")
    return out


def load_signals() -> pd.DataFrame:
    """The committed raw signals (`bench/data/judge_validation_signals.csv`), one row per `uid`."""
    return pd.read_csv(package_data(SIGNALS_FILE))


def compute_signals(labels: pd.DataFrame, model_id: str = SCORER, device: str = "cpu",
                    grader: OfflineGrader | None = None) -> pd.DataFrame:
    """The offline grader's raw signals for each labelled row, measured as `OfflineGrader` measures them:
    MiniLM cosines of the response to the concept's reference (mean embedding of its train texts) and to the
    instruction, NLL excess under `model_id` (unsteered) over the median NLL of neutral text, and the
    repetition measures. Returns one row per `uid` with `nll`, `base_nll`, `empty` and the six SIGNALS."""
    import torch

    from bench.judge import Item
    from bench.models import load

    grader = grader or OfflineGrader(device=device)
    train = ConceptData.load().split("train").frame
    examples = {c: tuple(train.loc[train["concept"] == c, "text"]) for c in labels["concept"].unique()}
    items = [Item(r.instruction, r.description, r.output, examples[r.concept]) for r in labels.itertuples()]
    log.info("judge validation: embedding %d responses", len(items))
    resp = grader.embed([it.response for it in items])  # [n, 384]
    refs = torch.stack([grader._reference(it) for it in items])  # [n, 384]
    concept_cos = (resp * refs).sum(-1)
    instruction_cos = (resp * grader.embed([it.instruction for it in items])).sum(-1)
    log.info("judge validation: NLL of %d responses under %s", len(items), model_id)
    model, tok, _ = load(model_id, device=device)
    base = grader.baseline_nll(model_id, model, tok)
    nll = grader.nll([it.response or " " for it in items], model, tok)
    reps = pd.DataFrame([repetition(it.response) for it in items])
    out = pd.DataFrame({"uid": labels["uid"].to_numpy(), "scorer": model_id,
                        "empty": [not it.response.strip() for it in items],
                        "concept_cos": concept_cos.numpy(), "instruction_cos": instruction_cos.numpy(),
                        "nll": nll, "base_nll": base, "excess": np.asarray(nll) - base})
    return pd.concat([out, reps[list(FLUENCY_PARTS[1:])]], axis=1).round(6)


# ----------------------------------------------------------------------------------------------- ratings
def _step(values: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
    """< lo -> 0, < hi -> 1, else 2, as `bench.judge._step`; broadcasts over candidate thresholds."""
    return np.where(values < lo, 0, np.where(values < hi, 1, 2))


def judge_ratings(signals: pd.DataFrame, th: OfflineThresholds) -> pd.DataFrame:
    """The offline grader's three ratings from raw signals under thresholds `th` (an empty response rates 0):
    [n rows] x (concept, instruction, fluency)."""
    s = {k: signals[k].to_numpy(dtype=float) for k in SIGNALS}
    fluency = np.minimum.reduce([2 - _step(s["excess"], *th.excess),
                                 *(_step(s[k], *getattr(th, k)) for k in FLUENCY_PARTS[1:])])
    out = pd.DataFrame({"concept": _step(s["concept_cos"], *th.concept),
                        "instruction": _step(s["instruction_cos"], *th.instruction), "fluency": fluency},
                       index=signals.index)
    out.loc[signals["empty"].to_numpy(dtype=bool)] = 0
    return out


def _pairs(grid: np.ndarray) -> np.ndarray:
    """Every (lo, hi) with lo <= hi from `grid`: [n_pairs, 2]."""
    return np.array(list(combinations_with_replacement(grid.tolist(), 2)))


def kappa_grid(preds: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Quadratic-weighted Cohen's kappa of each row of `preds` ([p, n] ratings 0/1/2) against `gold` ([n]): [p].
    The same number as `kappa` (sklearn), vectorised over candidate thresholds for the grid search; 0 where
    the expected disagreement is 0 (a constant prediction of a constant gold)."""
    levels = np.arange(3)
    weight = (levels[:, None] - levels[None]) ** 2 / 4.0  # [3, 3]
    observed = ((gold[None, None, :, None] == levels[None, :, None, None])
                & (preds[:, None, :, None] == levels[None, None, None, :])).sum(2)  # [p, 3 gold, 3 pred]
    expected = observed.sum(2)[:, :, None] * observed.sum(1)[:, None, :] / len(gold)
    num, den = (weight * observed).sum((1, 2)), (weight * expected).sum((1, 2))
    return np.where(den > 0, 1 - num / np.where(den > 0, den, 1.0), 0.0)


def _best(pairs: np.ndarray, preds: np.ndarray, gold: np.ndarray, current: tuple[float, float]) -> tuple[float, float]:
    """The (lo, hi) of `pairs` ([p, 2]) whose predictions (`preds` [p, n]) have the highest quadratic-weighted
    kappa against `gold` ([n]); ties go to the pair nearest `current`."""
    score = kappa_grid(preds, gold)
    tied = np.flatnonzero(score >= score.max() - 1e-9)
    dist = np.abs(pairs[tied] - np.asarray(current)[None]).sum(1)
    lo, hi = pairs[tied[np.argmin(dist)]]
    return float(lo), float(hi)


def fit_thresholds(signals: pd.DataFrame, gold: pd.DataFrame, start: OfflineThresholds | None = None,
                   max_passes: int = 4) -> OfflineThresholds:
    """Thresholds maximising quadratic-weighted kappa with `gold` (columns `<aspect>_rating`) on these rows (exact
    agreement as the objective collapses instruction to "never 2" on this data): a grid search
    per cosine, and coordinate ascent over the four fluency parts (the rating is their minimum), starting from
    and breaking ties towards `start` (the shipped defaults)."""
    th = start or OfflineThresholds()
    nonempty = ~signals["empty"].to_numpy(dtype=bool)  # empty responses rate 0 whatever the thresholds
    for aspect, column in (("concept", "concept_cos"), ("instruction", "instruction_cos")):
        pairs = _pairs(np.union1d(GRIDS[aspect], getattr(th, aspect)))  # the start is a candidate: no step back
        values = signals[column].to_numpy(dtype=float)[nonempty]
        preds = _step(values[None], pairs[:, :1], pairs[:, 1:])
        th = replace(th, **{aspect: _best(pairs, preds, gold[f"{aspect}_rating"].to_numpy()[nonempty],
                                          getattr(th, aspect))})
    fgold = gold["fluency_rating"].to_numpy()[nonempty]
    s = {k: signals[k].to_numpy(dtype=float)[nonempty] for k in FLUENCY_PARTS}
    for _ in range(max_passes):
        before = th
        for part in FLUENCY_PARTS:
            others = [2 - _step(s["excess"], *th.excess)] if part != "excess" else []
            others += [_step(s[k], *getattr(th, k)) for k in FLUENCY_PARTS[1:] if k != part]
            rest = np.minimum.reduce(others)  # [n]
            pairs = _pairs(np.union1d(GRIDS[part], getattr(th, part)))
            own = _step(s[part][None], pairs[:, :1], pairs[:, 1:])  # [p, n]
            if part == "excess":
                own = 2 - own
            th = replace(th, **{part: _best(pairs, np.minimum(own, rest[None]), fgold, getattr(th, part))})
        if th == before:
            break
    return th


# ----------------------------------------------------------------------------------------------- agreement
def kappa(gold: np.ndarray, pred: np.ndarray) -> float:
    """Quadratic-weighted Cohen's kappa on the 0/1/2 scale: 0 for a constant prediction, NaN (undefined) when
    the hand labels are constant."""
    if len(np.unique(gold)) < 2:
        return float("nan")
    if len(np.unique(pred)) == 1:
        return 0.0  # observed = expected disagreement; sklearn gives 0 up to rounding
    return float(cohen_kappa_score(gold, pred, labels=[0, 1, 2], weights="quadratic"))


def _mode(values: pd.Series) -> int:
    """The most frequent value (ties to the lowest)."""
    if values.empty:
        raise ValueError("a training fold has no rows of a set; use fewer folds")
    return int(values.value_counts().sort_index().idxmax())


def cross_validate(labels: pd.DataFrame, signals: pd.DataFrame, folds: int = 5,
                   seed: int = 0) -> tuple[pd.DataFrame, list[OfflineThresholds]]:
    """Held-out predictions for every row: `<aspect>_cv` (thresholds fitted on the other folds) and
    `<aspect>_majority` (the most frequent label of the other folds; ties to the lower label) and
    `<aspect>_set_majority` (the same within the row's own set: a baseline that knows the set). Folds are
    seeded and stratified by set. Returns the predictions (index of `labels`) and each fold's thresholds."""
    if folds < 2:
        raise ValueError(f"folds={folds}; cross-validation needs at least 2")
    sig = signals.set_index("uid").loc[labels["uid"]].reset_index()
    kinds = ("cv", "majority", "set_majority")
    out = pd.DataFrame(index=labels.index, columns=[f"{a}_{k}" for a in ASPECTS for k in kinds], dtype=float)
    fitted = []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(np.zeros(len(labels)), labels["set"].to_numpy()):
        th = fit_thresholds(sig.iloc[train], labels.iloc[train])
        fitted.append(th)
        pred = judge_ratings(sig.iloc[test], th)
        for aspect in ASPECTS:
            out.iloc[test, out.columns.get_loc(f"{aspect}_cv")] = pred[aspect].to_numpy()
            gold = labels[f"{aspect}_rating"]
            out.iloc[test, out.columns.get_loc(f"{aspect}_majority")] = _mode(gold.iloc[train])
            for name in labels["set"].iloc[test].unique():
                rows = test[(labels["set"].iloc[test] == name).to_numpy()]
                own = gold.iloc[train][(labels["set"].iloc[train] == name).to_numpy()]
                out.iloc[rows, out.columns.get_loc(f"{aspect}_set_majority")] = _mode(own)
    return out.astype(int), fitted


def agreement_table(labels: pd.DataFrame | None = None, signals: pd.DataFrame | None = None,
                    thresholds: OfflineThresholds | None = None, folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Agreement of the offline judge with the hand labels, one row per (aspect, set) with set in written,
    generated, steered, all: `n`, `majority_exact` and `set_majority_exact` (baselines, cross-validated: the
    most frequent label of the training folds, over all sets or within the row's set), `shipped_exact` and
    `shipped_kappa` (the thresholds `thresholds`, default the shipped `OfflineThresholds()`), `cv_exact` and
    `cv_kappa` (thresholds fitted on the other folds). Defaults: the committed labels and signals."""
    labels = load_labels() if labels is None else labels
    signals = load_signals() if signals is None else signals
    missing = sorted(set(labels["uid"]) - set(signals["uid"]))
    if missing:
        raise ValueError(f"no signals for {len(missing)} labelled rows (e.g. {missing[:3]}); rerun "
                         "`python -m bench.judge_validation --signals`")
    sig = signals.set_index("uid").loc[labels["uid"]].reset_index()
    shipped = judge_ratings(sig, thresholds or OfflineThresholds()).set_index(labels.index)
    cv, _ = cross_validate(labels, signals, folds, seed)
    rows = []
    for aspect in ASPECTS:
        for name in (*[s for s in SETS if (labels["set"] == s).any()], "all"):
            mask = (labels["set"] == name).to_numpy() if name != "all" else np.ones(len(labels), bool)
            gold = labels.loc[mask, f"{aspect}_rating"].to_numpy()
            ship, held = shipped.loc[mask, aspect].to_numpy(), cv.loc[mask, f"{aspect}_cv"].to_numpy()
            rows.append({"aspect": aspect, "set": name, "n": int(mask.sum()),
                         **{f"{k}_exact": float((cv.loc[mask, f"{aspect}_{k}"].to_numpy() == gold).mean())
                            for k in ("majority", "set_majority")},
                         "shipped_exact": float((ship == gold).mean()), "shipped_kappa": kappa(gold, ship),
                         "cv_exact": float((held == gold).mean()), "cv_kappa": kappa(gold, held)})
    return pd.DataFrame(rows).round(4)


def label_counts(labels: pd.DataFrame | None = None) -> pd.DataFrame:
    """How often each hand label occurs, per aspect and set: rows (aspect, set), columns 0, 1, 2."""
    labels = load_labels() if labels is None else labels
    long = labels.melt(id_vars="set", value_vars=[f"{a}_rating" for a in ASPECTS], var_name="aspect")
    long["aspect"] = long["aspect"].str.removesuffix("_rating")
    return long.groupby(["aspect", "set"])["value"].value_counts().unstack(fill_value=0)


def cli_parser(module: str, doc: str | None, signals_help: str, expected_file: str) -> argparse.ArgumentParser:
    """The command line shared by the judge-validation modules: --signals, --write-expected, --folds, --seed,
    --device."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").splitlines()[0])
    parser.add_argument("--signals", action="store_true", help=signals_help)
    parser.add_argument("--write-expected", action="store_true",
                        help=f"write the table to bench/data/{expected_file} (the drift test compares against it)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = cli_parser("bench.judge_validation", __doc__,
                      f"remeasure the raw signals with MiniLM and {SCORER} and write bench/data/{SIGNALS_FILE}",
                      EXPECTED_FILE).parse_args(argv)
    labels = load_labels()
    if args.signals:
        compute_signals(labels, device=args.device).to_csv(package_data(SIGNALS_FILE), index=False)
    table = agreement_table(labels, folds=args.folds, seed=args.seed)
    if args.write_expected:
        table.to_csv(package_data(EXPECTED_FILE), index=False)
    fitted = fit_thresholds(load_signals().set_index("uid").loc[labels["uid"]].reset_index(), labels)
    sys.stdout.write(table.to_markdown(index=False, floatfmt=".2f") + "\n\n")
    sys.stdout.write(f"thresholds fitted on all {len(labels)} rows: {json.dumps(asdict(fitted))}\n")
    sys.stdout.write(f"shipped thresholds: {json.dumps(asdict(OfflineThresholds()))}\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
