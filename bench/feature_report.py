"""Tables of the paper's feature-centric protocol (arXiv 2506.10920): steering score per KL target, S_CD, labels.

- `by_kl_target(frame)`: per configuration, KL target and side (input / output score), the mean over features
  (each feature the mean over its signs and seeds) with a bootstrap 95% CI over features: the paper's steering
  figure as a table.
- `example_labels(dirs)`: the labels the run gave its features (from the samples of `feature_labels`).
- `write_feature_tables(frame, dirs, out)`: both as Markdown and CSV beside the leaderboard.

The leaderboard (`bench.report`) already carries every feature-centric metric averaged over features; comparisons
between methods are two-sample (`bench.report.paired`, design "independent"), since each method has its own
features.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report import bootstrap_ci, configurations

log = logging.getLogger(__name__)

SIDES = ("input_score", "output_score")
KL_COLUMNS = ["label", "method", "model", "layer", "metric", "kl_target", "mean", "ci_low", "ci_high", "n",
              "reached"]
LABEL_COLUMNS = ["model", "layer", "method", "feature", "input", "output_pos", "output_neg"]


def by_kl_target(frame: pd.DataFrame) -> pd.DataFrame:
    """Test-split feature_steering records -> one row per (configuration, side, KL target): the mean over
    features of the feature's mean over signs and seeds, bootstrap 95% CI over features, n features scored, and
    `reached` (the share of the configuration's feature x sign cells whose alpha reached that target)."""
    f = configurations(frame)
    f = f[(f["task"] == "feature_steering") & (f["split"] == "test") & f["kl_target"].notna()]
    rows = []
    for (_, target), g in f.groupby(["config", "kl_target"], sort=False):
        r = g.iloc[0]
        reached = g.loc[g["metric"] == "reached", "value"]
        for metric in SIDES:
            items = g[g["metric"] == metric].groupby("item")["value"].mean().dropna().to_numpy(dtype=float)
            lo, hi = bootstrap_ci(items)
            rows.append({"label": r["label"], "method": r["method"], "model": r["model"], "layer": r["layer"],
                         "metric": metric, "kl_target": float(target),
                         "mean": float(items.mean()) if len(items) else np.nan, "ci_low": lo, "ci_high": hi,
                         "n": len(items), "reached": float(reached.mean()) if len(reached) else np.nan})
    out = pd.DataFrame(rows, columns=KL_COLUMNS)
    return out.sort_values(["model", "layer", "metric", "label", "kl_target"], kind="stable").reset_index(drop=True)


def kl_markdown(table: pd.DataFrame) -> str:
    """`by_kl_target` as Markdown: per (model, layer, side) a table of configuration x KL target cells."""
    parts = []
    for (model, layer, metric), g in table.groupby(["model", "layer", "metric"], sort=True):
        cells = g.assign(cell=[("unscored" if np.isnan(m) else f"{m:.2f}" + (
            f" [{lo:.2f}, {hi:.2f}]" if not np.isnan(lo) else "")) for m, lo, hi in
            zip(g["mean"], g["ci_low"], g["ci_high"], strict=True)])
        wide = cells.pivot(index="label", columns="kl_target", values="cell").fillna("")
        wide.columns = [f"KL {t:g}" for t in wide.columns]
        wide.index.name = "method"
        parts.append(f"### feature_steering: {metric} by KL target, {model} L{layer} (test split; mean over "
                     "features of each feature's mean over signs, bootstrap 95% CI over features)\n")
        parts.append(wide.to_markdown() + "\n")
    return "\n".join(parts)


def example_labels(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """The feature labels in the samples (`kind: feature_label`) of the run directories, one row per (model,
    layer, method, feature); None = unlabelled. Empty when no directory has such samples."""
    rows = []
    for d in dirs:
        path = Path(d) / "samples.jsonl"
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    s = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(s, dict) or s.get("kind") != "feature_label":
                    continue
                rows.append({"model": s.get("model"), "layer": s.get("layer"), "method": s.get("method"),
                             "feature": s.get("feature"), "input": s.get("input_label"),
                             "output_pos": s.get("output_label_pos"), "output_neg": s.get("output_label_neg")})
    out = pd.DataFrame(rows, columns=LABEL_COLUMNS)
    return out.drop_duplicates(["model", "layer", "method", "feature"], keep="last").reset_index(drop=True)


def labels_markdown(labels: pd.DataFrame, per_method: int = 5) -> str:
    """The first `per_method` labelled features of each (model, layer, method) as one Markdown table."""
    if labels.empty:
        return ""
    shown = labels.sort_values(["model", "layer", "method", "feature"]).groupby(
        ["model", "layer", "method"], sort=False).head(per_method)
    shown = shown.assign(**{c: shown[c].map(lambda v: "(unlabelled)" if v is None or v != v else str(v))
                            for c in ("input", "output_pos", "output_neg")})
    shown = shown.rename(columns={"output_pos": "output (+)", "output_neg": "output (-)"})
    return shown.to_markdown(index=False) + "\n"


def write_feature_tables(frame: pd.DataFrame, dirs: Iterable[str | Path], out: Path) -> list[Path]:
    """Write feature_steering_by_kl.{md,csv} and feature_labels.{md,csv} into `out` when the records (samples)
    have them; return the paths written."""
    written = []
    table = by_kl_target(frame)
    if not table.empty:
        (out / "feature_steering_by_kl.md").write_text(kl_markdown(table))
        table.to_csv(out / "feature_steering_by_kl.csv", index=False)
        written += [out / "feature_steering_by_kl.md", out / "feature_steering_by_kl.csv"]
    labels = example_labels(dirs)
    if not labels.empty:
        (out / "feature_labels.md").write_text(labels_markdown(labels, per_method=len(labels)))
        labels.to_csv(out / "feature_labels.csv", index=False)
        written += [out / "feature_labels.md", out / "feature_labels.csv"]
    return written
