"""Which local model labels features in the concept-centric `labeling` task under the offline judge (issue #14)?

`bench.labeler_choice` chose the feature-centric tasks' labeler; this compares candidates for the `labeling` task
(`tasks/labeling.py`, templates `labeling_{input,output}_local.txt`) from finished runs of that task alone, one run
directory per labeler, e.g.

    python -m bench run --preset concepts --tasks labeling --out /tmp/lab_smollm2 -T labeling.labeler=smollm2-135m-gguf
    python -m bench run --preset concepts --tasks labeling --out /tmp/lab_gemma -T labeling.labeler=gemma-3-270m-gguf
    python -m bench.labeling_labeler_choice /tmp/lab_smollm2 /tmp/lab_gemma  # -> bench/data/labeling_labeler_choice.csv

(the runs reuse the fit cache; the labels are in each run's samples.jsonl). Per labeler, layer and method:

- `label_accuracy`, `label_f1`: the task's detection scores, means over scored features (0.5 = chance accuracy).
- `{input,output}_names_concept`: for each concept its best-matched feature's label names the concept, i.e.
  cos(label, description) >= the task's `concept_threshold` under the offline judge's embedder (an unlabelled
  feature names nothing; as the task's `label_names_concept` records, with None counted as 0).
  `_baseline`: the same label against every *other* concept's description (mean over c != c' pairs: what an
  uninformative label reaches), `_constant`: the most common label against every description
  (`bench.labeler_choice.names_concept`).
- `{input,output}_labelled / _distinct / _top_count / _echo` over every feature the task labelled (matched and
  sampled): labels present, distinct labels, the count of the most common one, and labels that copy a few-shot
  example of the local templates (`bench.labeler_choice.diversity`).

Then per labeler (layer = method = "all"): `mean_lift`, the mean over layers, methods, both sides and concepts of
(names its concept - names another concept); for each challenger `lift_diff` against the incumbent (`INCUMBENT`,
the default before this measurement) with a 95% bootstrap CI over concepts (`lift_diff_ci_low`,
`lift_diff_ci_high`; the same concepts and features for both labelers: the fits and the matching are shared, so the
difference is paired); and `chosen` (1 for the labeler the task should default to, else 0): the challenger with
the largest `lift_diff` whose CI lies above 0, else the incumbent. The rule was fixed before the measurement;
`tests/test_labeling_labeler_choice.py` checks that `Labeling().labeler` is the labeler chosen in the committed
CSV (measured on all three layers of the concepts preset; README block `labeling-labeler-choice`).

Columns: labeler, layer, method, metric, value, n. Times are not in it: a run's seconds depend on the judge cache
(labels written before are not written again) and on the machine's load.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.labeler_choice import Embed, cosines, diversity, example_labels, names_concept
from bench.results import read_jsonl

log = logging.getLogger(__name__)
INCUMBENT = "smollm2-135m-gguf"  # the labeling task's default labeler before this measurement
OUT = Path(__file__).resolve().parent / "data" / "labeling_labeler_choice.csv"
COLUMNS = ["labeler", "layer", "method", "metric", "value", "n"]
SIDES = {"input": "label", "output": "output_label"}  # CSV side -> samples field
ALL = "all"


def template_examples() -> list[str]:
    """The example labels of the labeling task's local few-shot templates (a copy of one is an echo)."""
    from bench.judges.templates import load_template

    out: list[str] = []
    for name in ("labeling_input_local", "labeling_output_local"):
        out += example_labels(load_template(name))
    return list(dict.fromkeys(out))


def _labeler(run: Path, records: list[dict[str, Any]]) -> str:
    names = {r["task_params"].get("labeler") for r in records if r.get("task") == "labeling"}
    if len(names) != 1 or None in names:
        raise ValueError(f"{run}: expected labeling records of one labeler, found {sorted(map(str, names))}")
    return str(names.pop())


def unit_scores(rows: Sequence[dict[str, Any]], embed: Embed, threshold: float,
                examples: Sequence[str]) -> tuple[dict[str, tuple[float, int]], dict[str, dict[str, float]]]:
    """The metrics of one (layer, method) unit from its samples rows: {metric: (value, n)}, and per side
    {concept: lift} (names its concept - mean over other concepts), the per-concept terms of rate - baseline."""
    best: dict[str, tuple[str, dict[str, Any]]] = {}  # concept -> (description, row of its best feature)
    for r in rows:
        for m in r["matched"]:
            best[m["concept"]] = (m.get("description") or m["concept"], r)
    concepts = sorted(best)
    out: dict[str, tuple[float, int]] = {}
    lifts: dict[str, dict[str, float]] = {}
    for side, key in SIDES.items():
        labels = [best[c][1][key] for c in concepts]
        cos = cosines(embed, labels, [best[c][0] for c in concepts])
        s = names_concept(labels, cos, threshold)
        n = len(concepts)
        out[f"{side}_names_concept"] = (s.rate, n)
        out[f"{side}_names_concept_baseline"] = (s.baseline, n * (n - 1))
        out[f"{side}_names_concept_constant"] = (s.constant, n)
        hit = (cos >= threshold).float().numpy() * np.array([x is not None for x in labels], dtype=float)[:, None]
        off = (hit.sum(1) - np.diag(hit)) / (n - 1)
        lifts[side] = {c: float(hit[i, i] - off[i]) for i, c in enumerate(concepts)}
        d = diversity([r[key] for r in rows], examples)
        for metric, value in (("labelled", d.labelled), ("distinct", d.distinct), ("top_count", d.top_count),
                              ("echo", d.echo)):
            out[f"{side}_{metric}"] = (float(value), d.n)
    return out, lifts


def read_run(run: Path, embed: Embed, threshold: float, examples: Sequence[str]
             ) -> tuple[str, list[dict[str, Any]], dict[tuple[int, str, str], dict[str, float]]]:
    """(labeler, CSV rows, {(layer, method, side): {concept: lift}}) of one labeling run directory."""
    records = [r for r in read_jsonl(run / "records.jsonl") if r.get("task") == "labeling"]
    labeler = _labeler(run, records)
    samples = [s for s in read_jsonl(run / "samples.jsonl") if s.get("kind") == "labeling"]
    rows: list[dict[str, Any]] = []
    lifts: dict[tuple[int, str, str], dict[str, float]] = {}

    def add(layer: Any, method: str, metric: str, value: float, n: int) -> None:
        rows.append({"labeler": labeler, "layer": layer, "method": method, "metric": metric,
                     "value": round(float(value), 4), "n": int(n)})

    units = sorted({(int(s["layer"]), s["method"]) for s in samples})
    if not units:
        raise ValueError(f"{run}: no labeling samples in samples.jsonl")
    for layer, method in units:
        unit = [s for s in samples if (int(s["layer"]), s["method"]) == (layer, method)]
        recs = pd.DataFrame([r for r in records if (int(r["layer"]), r["method"]) == (layer, method)])
        for metric in ("label_accuracy", "label_f1"):
            v = recs.loc[recs["metric"] == metric, "value"].dropna()
            add(layer, method, metric, v.mean() if len(v) else float("nan"), len(v))
        scores, unit_lifts = unit_scores(unit, embed, threshold, examples)
        for metric, (value, n) in scores.items():
            add(layer, method, metric, value, n)
        for side, by in unit_lifts.items():
            lifts[(layer, method, side)] = by
    every = [v for by in lifts.values() for v in by.values()]
    add(ALL, ALL, "mean_lift", float(np.mean(every)), len(every))
    return labeler, rows, lifts


def lift_difference(a: dict[Any, dict[str, float]], b: dict[Any, dict[str, float]], n_boot: int = 2000,
                    seed: int = 0) -> tuple[float, float, float, int]:
    """Mean of a - b over the shared (unit, side, concept) lifts and its 95% bootstrap CI, resampling concepts
    (a concept's terms across units and sides stay together): (diff, ci_low, ci_high, n terms)."""
    keys = sorted(set(a) & set(b), key=str)
    concepts = sorted({c for k in keys for c in set(a[k]) & set(b[k])})
    if not keys or not concepts:
        raise ValueError("the two runs share no (layer, method, side, concept) to compare")
    diff = np.full((len(concepts), len(keys)), np.nan)  # [concept, unit x side]
    for j, k in enumerate(keys):
        for i, c in enumerate(concepts):
            if c in a[k] and c in b[k]:
                diff[i, j] = a[k][c] - b[k][c]
    total, count = np.nansum(diff, 1), (~np.isnan(diff)).sum(1)  # per concept
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(concepts), size=(n_boot, len(concepts)))
    boot = total[idx].sum(1) / count[idx].sum(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(total.sum() / count.sum()), float(lo), float(hi), int(count.sum())


def compare(runs: Sequence[str | Path], embed: Embed, threshold: float, examples: Sequence[str] | None = None,
            incumbent: str = INCUMBENT, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The tidy frame (COLUMNS) of the labeling runs `runs` (one labeler each, the incumbent among them)."""
    examples = template_examples() if examples is None else examples
    rows: list[dict[str, Any]] = []
    lifts: dict[str, dict[Any, dict[str, float]]] = {}
    for run in runs:
        labeler, part, by = read_run(Path(run), embed, threshold, examples)
        if labeler in lifts:
            raise ValueError(f"two runs with the labeler {labeler!r}")
        lifts[labeler] = by
        rows += part
    if incumbent not in lifts:
        raise ValueError(f"no run of the incumbent labeler {incumbent!r} among {sorted(lifts)}")
    winner, best = incumbent, 0.0
    for labeler in lifts:
        if labeler == incumbent:
            continue
        diff, lo, hi, n = lift_difference(lifts[labeler], lifts[incumbent], n_boot, seed)
        for metric, value in (("lift_diff", diff), ("lift_diff_ci_low", lo), ("lift_diff_ci_high", hi)):
            rows.append({"labeler": labeler, "layer": ALL, "method": ALL, "metric": metric, "value": round(value, 4),
                         "n": n})
        if lo > 0 and diff > best:
            winner, best = labeler, diff
    for labeler in lifts:
        rows.append({"labeler": labeler, "layer": ALL, "method": ALL, "metric": "chosen",
                     "value": float(labeler == winner), "n": len(lifts)})
    return pd.DataFrame(rows, columns=COLUMNS)


def chosen(frame: pd.DataFrame) -> str:
    """The labeler the frame chooses (its `chosen` row with value 1)."""
    pick = frame[(frame["metric"] == "chosen") & (frame["value"] == 1)]["labeler"].tolist()
    if len(pick) != 1:
        raise ValueError(f"expected one chosen labeler, found {pick}")
    return str(pick[0])


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (labeler, layer, method): accuracy, F1, names rates with the off-concept baseline, distinct
    and echoed labels."""
    f = frame[frame["method"].astype(str) != ALL]
    out = []
    for (labeler, layer, method), g in f.groupby(["labeler", "layer", "method"], sort=False):
        by = g.set_index("metric")
        row: dict[str, Any] = {"labeler": labeler, "layer": layer, "method": method,
                               "accuracy": f"{by.value['label_accuracy']:.2f}", "F1": f"{by.value['label_f1']:.2f}"}
        for side in SIDES:
            row[f"{side} names"] = (f"{by.value[f'{side}_names_concept']:.2f} "
                                    f"(base {by.value[f'{side}_names_concept_baseline']:.2f})")
            n = int(by.n[f"{side}_distinct"])
            row[f"{side} distinct"] = f"{int(by.value[f'{side}_distinct'])}/{n}"
            row[f"{side} echo"] = f"{int(by.value[f'{side}_echo'])}/{n}"
        out.append(row)
    return pd.DataFrame(out)


def overall(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per labeler: means over layers and methods of accuracy and F1, distinct and echo shares (of the
    labelled features, both sides), the mean lift, and the difference to the incumbent with its CI."""
    f = frame[frame["method"].astype(str) != ALL]
    tot = frame[frame["method"].astype(str) == ALL].pivot_table(index="labeler", columns="metric", values="value")
    out = []
    for labeler, g in f.groupby("labeler", sort=False):
        w = g.pivot_table(index=["layer", "method"], columns="metric", values="value")
        n = g[g["metric"] == "input_distinct"].set_index(["layer", "method"])["n"]
        t = tot.loc[labeler]
        means = {"accuracy": w["label_accuracy"].mean(), "F1": w["label_f1"].mean(),
                 "distinct share": ((w["input_distinct"] + w["output_distinct"]) / (2 * n)).mean(),
                 "echo share": ((w["input_echo"] + w["output_echo"]) / (2 * n)).mean(), "mean lift": t["mean_lift"]}
        row = {"labeler": labeler, **{k: f"{v:.3f}" for k, v in means.items()}}
        row["lift − incumbent [95% CI]"] = (f"{t['lift_diff']:+.4f} [{t['lift_diff_ci_low']:+.4f}, "
                                            f"{t['lift_diff_ci_high']:+.4f}]" if "lift_diff" in t and
                                            not np.isnan(t["lift_diff"]) else "")
        row["chosen"] = "yes" if t["chosen"] == 1 else ""
        out.append(row)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="labeling run directories, one per labeler")
    ap.add_argument("--out", default=str(OUT), help=f"the CSV (default {OUT})")
    ap.add_argument("--incumbent", default=INCUMBENT, help=f"the labeler kept unless beaten (default {INCUMBENT})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from bench.judge import make_judge
    from tasks.labeling import Labeling

    judge = make_judge("offline", device="cpu")
    frame = compare(args.runs, judge.embed, Labeling().concept_threshold, incumbent=args.incumbent)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    log.info("per unit:\n%s", summary(frame).to_string(index=False))
    log.info("overall:\n%s", overall(frame).to_string(index=False))
    log.info("wrote %s (%d rows); chosen: %s", out, len(frame), chosen(frame))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
