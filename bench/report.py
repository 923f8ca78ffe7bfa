"""Tables from the records frame: configurations and their labels, the leaderboard, the headline of a run and
paired comparisons between configurations. Figures live in `bench.figures`.

A configuration is everything that changes a number: model, model_source, layer, site, method with its params,
task with its task_params, and judge. The run seed is not part of it (nor the method's `seed` field, which the
run seed fills): the records of several seeds of one configuration are averaged per concept first, and the
bootstrap then resamples concepts, so n is the number of concepts whatever the number of seeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.results import normalize

log = logging.getLogger(__name__)

CONFIG_FIELDS = ("model", "model_source", "layer", "site", "method", "params", "task", "task_params", "judge")
MAIN_METRICS = {"detection": "auroc", "steering": "score", "labeling": "label_f1"}  # unless a task declares one
ABBREV = {"n_features": "k", "d_sae": "d", "sparsity": "sp", "normalize": "norm", "architecture": "arch",
          "l1_coefficient": "l1", "max_iter": "iter", "calibration": "cal", "max_concepts": "concepts"}
SUMMARY_COLUMNS = ["task", "metric", "label", "method", "model", "layer", "mean", "ci_low", "ci_high", "n_scored",
                   "coverage", "n_seeds", "seeds", "site", "model_source", "judge", "params", "task_params"]
PAIRED_COLUMNS = ["task", "metric", "model", "layer", "design", "a", "b", "n", "n_b", "mean_a", "mean_b", "diff",
                  "ci_low", "ci_high", "p_value", "win_rate"]
PAIRED = "paired"  # scored on the same concepts: paired bootstrap, sign-flip permutation
INDEPENDENT = "independent"  # each configuration's own features: two-sample bootstrap, label permutation
_HEADER = "(test split; per concept the mean over seeds, then the mean over concepts with a bootstrap 95% CI; n scored)"


def canonical(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _text(value: Any) -> str:
    """A record field as text; missing (None, NaN) is ''."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (NaN, NaN for fewer than two values)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_boot, len(values)), replace=True).mean(axis=1)
    lo, hi = np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------- configurations

def configurations(frame: pd.DataFrame) -> pd.DataFrame:
    """The records with more columns: `config` (canonical JSON of CONFIG_FIELDS), its readable `label` (unique
    among the configurations of one (task, model, layer)), `item` (what seeds are averaged over: the concept;
    for a record without one, its seed and feature), `by_concept` (the item is a concept) and a numeric `value`."""
    if {"config", "label", "item", "by_concept"} <= set(frame.columns):
        return frame  # already done
    f = normalize(frame).reset_index(drop=True)
    col = {c: f[c].tolist() for c in (*CONFIG_FIELDS, "concept", "seed", "feature")}
    params = [{k: v for k, v in p.items() if k != "seed"} for p in col["params"]]
    configs = [canonical([_text(m), _text(src), _text(la), _text(si), _text(me), p, _text(t), tp, _text(j)])
               for m, src, la, si, me, p, t, tp, j in zip(col["model"], col["model_source"], col["layer"], col["site"],
                                                          col["method"], params, col["task"], col["task_params"],
                                                          col["judge"], strict=True)]
    by_concept = [_text(c) != "" for c in col["concept"]]
    items = [_text(c) if ok else f"seed {_text(s)} feature {_text(ft)}"
             for c, ok, s, ft in zip(col["concept"], by_concept, col["seed"], col["feature"], strict=True)]
    f = f.assign(config=configs, item=items, by_concept=by_concept, value=pd.to_numeric(f["value"], errors="coerce"))
    first = np.flatnonzero(~f["config"].duplicated().to_numpy())
    firsts = f.iloc[first]
    descriptors = {f.at[i, "config"]: _descriptor(f.loc[i], params[i]) for i in first}
    return f.assign(label=f["config"].map(_labels(firsts, descriptors)).astype(object))


def _descriptor(r: pd.Series, params: dict[str, Any]) -> dict[tuple[str, str], str]:
    """What may tell apart configurations of one method at one (model, layer, task), as canonical JSON."""
    d = {("site", "site"): canonical(_text(r["site"]).split("@")[0])}
    d.update({("param", k): canonical(v) for k, v in sorted(params.items()) if k != "site"})
    d.update({("task", k): canonical(v) for k, v in sorted(r["task_params"].items())})
    d[("judge", "judge")] = canonical(_text(r["judge"]))
    d[("source", "src")] = canonical(hashlib.sha1(_text(r["model_source"]).encode()).hexdigest()[:6])
    return d


def _labels(firsts: pd.DataFrame, descriptors: dict[str, dict[tuple[str, str], str]]) -> dict[str, str]:
    """config -> label: the method name, plus what varies between its configurations at one (model, layer, task),
    e.g. `dim@resid`, `snmf(k=100)`."""
    varying: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for (method, *_), group in firsts.groupby(["method", "model", "layer", "task"], sort=False, dropna=False):
        ds = [descriptors[c] for c in group["config"]]
        for key in set().union(*ds):
            if len({d.get(key) for d in ds}) > 1:
                varying[method].add(key)
    labels = {}
    for config, method in zip(firsts["config"], firsts["method"], strict=True):
        d = descriptors[config]
        keys = [k for k in d if k in varying[method]]
        label = _text(method) + (f"@{_short(d[('site', 'site')])}" if ("site", "site") in keys else "")
        parts = [f"{ABBREV.get(k[1], k[1])}={_short(d[k])}" for k in keys if k[0] != "site"]
        labels[config] = label + (f"({', '.join(parts)})" if parts else "")
    for _, group in firsts.groupby(["task", "model", "layer"], sort=False, dropna=False):  # a safety net
        clash = group["config"].map(labels).duplicated(keep=False).to_numpy()
        for config in group["config"][clash]:
            labels[config] += "#" + hashlib.sha1(config.encode()).hexdigest()[:6]
    return labels


def _short(text: str, width: int = 24) -> str:
    """A canonical JSON value as short label text: strings bare ('' is none), floats with %g, long values cut."""
    value = json.loads(text)
    out = (value or "none") if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else canonical(
        value)
    return out if len(out) <= width else out[: width - 1] + "…"


def item_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Test-split records -> one row per (configuration, metric, item): the mean of its scored values over
    seeds (NaN when none is scored), `by_concept`, and the configuration's task, label, method, model, layer."""
    f = configurations(frame)
    test = f[f["split"] == "test"]
    agg = test.groupby(["config", "metric", "item"], sort=False).agg(value=("value", "mean"),
                                                                     by_concept=("by_concept", "first"))
    info = test.drop_duplicates("config").set_index("config")[["task", "label", "method", "model", "layer"]]
    return agg.reset_index().join(info, on="config")


# ---------------------------------------------------------------------------------------------- leaderboard

def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Test-split records -> one row per (configuration, metric): label, mean over concepts (each the mean over
    seeds), bootstrap 95% CI, concepts scored, coverage (scored records / records), seeds and full parameters."""
    f = configurations(frame)
    test = f[f["split"] == "test"]
    rows = []
    for (_, metric), g in test.groupby(["config", "metric"], sort=False):
        items = g.groupby("item", sort=False)["value"].mean()
        values = items.dropna().to_numpy(dtype=float)
        lo, hi = bootstrap_ci(values)
        r = g.iloc[0]
        seeds = sorted({_text(s) for s in g["seed"]})
        rows.append({"task": r["task"], "metric": metric, "label": r["label"], "method": r["method"],
                     "model": r["model"], "layer": r["layer"], "mean": float(values.mean()) if len(values) else np.nan,
                     "ci_low": lo, "ci_high": hi, "n_scored": len(values), "coverage": g["value"].notna().mean(),
                     "n_seeds": len(seeds), "seeds": ",".join(seeds), "site": r["site"],
                     "model_source": r["model_source"], "judge": r["judge"],
                     "params": canonical({k: v for k, v in r["params"].items() if k != "seed"}),
                     "task_params": canonical(r["task_params"])})
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return out.sort_values(["task", "metric", "label", "model", "layer"], kind="stable").reset_index(drop=True)


def _column(summ: pd.DataFrame) -> pd.Series:
    return summ["model"].astype(str) + " L" + summ["layer"].astype(str)


def _pivot(summ: pd.DataFrame, cells: pd.Series, index: list[str] | str = "label") -> pd.DataFrame:
    """Rows `index`, columns "model L<layer>" in (model, layer) order, cells `cells`."""
    g = summ.assign(cell=cells, column=_column(summ))
    table = g.pivot(index=index, columns="column", values="cell")
    order = g.drop_duplicates("column").sort_values(["model", "layer"])["column"]
    table = table[list(order)].fillna("")
    table.columns.name = None
    return table


def _cell(r: pd.Series, n: bool = True) -> str:
    if np.isnan(r["mean"]):
        text = "unscored"
    else:
        text = f"{r['mean']:.3f}" + (f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if not np.isnan(r["ci_low"]) else "")
    if n:
        text += f" n={r['n_scored']}" + (f" ({r['coverage']:.0%} scored)" if r["coverage"] < 1 else "")
    return text


def leaderboard(frame: pd.DataFrame, summ: pd.DataFrame | None = None) -> dict[tuple[str, str], pd.DataFrame]:
    """{(task, metric): table of configuration label x (model, layer) cells "mean [lo, hi] n=N"} (from `summ`,
    the frame's summary, when given)."""
    tables = {}
    for (task, metric), g in (summary(frame) if summ is None else summ).groupby(["task", "metric"], sort=True):
        table = _pivot(g, g.apply(_cell, axis=1))
        table.index.name = "method"
        tables[(task, metric)] = table
    return tables


def write_leaderboard(frame: pd.DataFrame, out: Path) -> str:
    """Write leaderboard.md and leaderboard.csv (tidy summary), paired.md and paired.csv into `out`; return the
    leaderboard's Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    frame = configurations(frame)
    summ = summary(frame)
    parts = []
    for (task, metric), table in leaderboard(frame, summ).items():
        parts.append(f"### {task}: {metric} {_HEADER}\n")
        parts.append(table.to_markdown() + "\n")
    markdown = "\n".join(parts) if parts else "(no test-split records: a run stopped before its first task)\n"
    (out / "leaderboard.md").write_text(markdown)
    summ.to_csv(out / "leaderboard.csv", index=False)
    write_paired(frame, out)
    return markdown


def main_metric(task: str, metrics: list[str]) -> str:
    """The headline metric of `task`: the task class's `main_metric`, else MAIN_METRICS, else the first of
    `metrics` (the task's test-split metrics in record order)."""
    from bench import registry

    declared = getattr(registry.TASKS.get(task), "main_metric", None) or MAIN_METRICS.get(task)
    return declared if declared in metrics else metrics[0]


def headline(frame: pd.DataFrame) -> str:
    """One compact Markdown table: per task its main metric, rows = configuration label, columns = (model,
    layer), cells "mean [lo, hi]"."""
    f = configurations(frame)
    summ = summary(f)
    if summ.empty:
        return "(no test-split records)\n"
    test = f[f["split"] == "test"]
    picked = []
    for task in summ["task"].drop_duplicates():
        metric = main_metric(task, list(dict.fromkeys(test.loc[test["task"] == task, "metric"])))
        picked.append(summ[(summ["task"] == task) & (summ["metric"] == metric)])
    summ = pd.concat(picked)
    summ = summ.assign(task=summ["task"] + ": " + summ["metric"], configuration=summ["label"])
    table = _pivot(summ, summ.apply(_cell, axis=1, n=False), index=["task", "configuration"])
    return table.reset_index().to_markdown(index=False) + "\n"


# ---------------------------------------------------------------------------------------------- paired

def permutation_p(a: np.ndarray, b: np.ndarray, n_perm: int = 9999, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of mean(a - b): the signs of the differences are flipped at random
    (seeded) `n_perm` times and p = (1 + count) / (1 + n_perm), count = flips with |mean| >= the observed |mean|.
    NaN for fewer than two pairs. (numpy: scipy.stats.permutation_test gives the same test ~40x slower, too slow
    for the hundreds of pairs of a report.)"""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)  # [n]
    if len(d) < 2:
        return float("nan")
    observed = abs(d.sum())
    rng = np.random.default_rng(seed)
    count = 0
    for start in range(0, n_perm, 2048):  # chunks keep memory at 2048 x n
        signs = rng.choice([-1.0, 1.0], size=(min(2048, n_perm - start), len(d)))  # [chunk, n]
        count += int(np.count_nonzero(np.abs(signs @ d) >= observed - 1e-9 * max(1.0, observed)))
    return (1 + count) / (1 + n_perm)


def paired(frame: pd.DataFrame, n_perm: int = 9999, seed: int = 0) -> pd.DataFrame:
    """Every pair of configurations at one (model, layer, task, metric), test split.

    Concept-centric records (`design` "paired"): over the concepts both scored, the mean of a and b, the mean
    difference a - b with a paired bootstrap 95% CI (resampling concepts), a two-sided sign-flip permutation
    p-value, the win rate of a (ties half) and n. Feature-centric records (no concept; `design` "independent"):
    each configuration scores its own features (feature 3 of SNMF is not feature 3 of an SAE), so the items are
    two independent samples, each a feature's mean over its records (signs, KL targets, seeds): the difference of
    the means with a two-sample bootstrap CI (features resampled within each configuration), a two-sided label
    permutation p-value, and as win rate the probability that a random feature of a beats one of b (ties half)."""
    m = item_means(frame).dropna(subset=["value"])
    rows = []
    for (task, metric, model, layer), g in m.groupby(["task", "metric", "model", "layer"], sort=True):
        concept = g["by_concept"].astype(bool)
        where = {"task": task, "metric": metric, "model": model, "layer": layer}
        rows += [where | r for r in _paired_rows(g[concept], n_perm, seed)]
        rows += [where | r for r in _independent_rows(g[~concept], n_perm, seed)]
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def _paired_rows(g: pd.DataFrame, n_perm: int, seed: int) -> list[dict[str, Any]]:
    wide = g.pivot(index="item", columns="label", values="value")
    labels = sorted(wide.columns)
    values = wide[labels].to_numpy(dtype=float)  # [concepts, configurations]
    rows = []
    for (i, a), (j, b) in combinations(enumerate(labels), 2):
        both = ~np.isnan(values[:, i]) & ~np.isnan(values[:, j])
        if not both.any():
            continue
        x, y = values[both, i], values[both, j]
        lo, hi = bootstrap_ci(x - y, seed=seed)
        rows.append({"design": PAIRED, "a": a, "b": b, "n": int(both.sum()), "n_b": int(both.sum()),
                     "mean_a": x.mean(), "mean_b": y.mean(), "diff": float((x - y).mean()), "ci_low": lo,
                     "ci_high": hi, "p_value": permutation_p(x, y, n_perm, seed),
                     "win_rate": float(((x > y) + 0.5 * (x == y)).mean())})
    return rows


def _independent_rows(g: pd.DataFrame, n_perm: int, seed: int) -> list[dict[str, Any]]:
    samples = {label: v["value"].to_numpy(dtype=float) for label, v in g.groupby("label", sort=True)}
    rows = []
    for a, b in combinations(sorted(samples), 2):
        x, y = samples[a], samples[b]
        lo, hi = bootstrap_diff_ci(x, y, seed=seed)
        rows.append({"design": INDEPENDENT, "a": a, "b": b, "n": len(x), "n_b": len(y), "mean_a": x.mean(),
                     "mean_b": y.mean(), "diff": float(x.mean() - y.mean()), "ci_low": lo, "ci_high": hi,
                     "p_value": permutation_p_independent(x, y, n_perm, seed),
                     "win_rate": float(((x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])).mean())})
    return rows


def bootstrap_diff_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(x) - mean(y) for independent samples x [n] and y [m], each resampled
    within itself (NaN, NaN when either has fewer than two values)."""
    if len(x) < 2 or len(y) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    diffs = (rng.choice(x, size=(n_boot, len(x))).mean(axis=1)
             - rng.choice(y, size=(n_boot, len(y))).mean(axis=1))  # [n_boot]
    lo, hi = np.percentile(diffs, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def permutation_p_independent(x: np.ndarray, y: np.ndarray, n_perm: int = 9999, seed: int = 0) -> float:
    """Two-sided permutation p-value of mean(x) - mean(y) for independent samples: the pooled values are
    relabelled at random (seeded) `n_perm` times, p = (1 + count) / (1 + n_perm). NaN when either sample is
    empty or both have one value."""
    if len(x) == 0 or len(y) == 0 or len(x) + len(y) < 3:
        return float("nan")
    pooled = np.concatenate([x, y]).astype(float)  # [n + m]
    observed = abs(x.mean() - y.mean())
    rng = np.random.default_rng(seed)
    count = 0
    for start in range(0, n_perm, 2048):
        k = min(2048, n_perm - start)
        perm = rng.permuted(np.broadcast_to(pooled, (k, len(pooled))), axis=1)  # [k, n + m]
        d = np.abs(perm[:, : len(x)].mean(axis=1) - perm[:, len(x):].mean(axis=1))
        count += int(np.count_nonzero(d >= observed - 1e-9 * max(1.0, observed)))
    return (1 + count) / (1 + n_perm)


_DESIGNS = {
    PAIRED: "test split; paired over shared concepts, bootstrap 95% CI of the mean difference, two-sided sign-flip "
            "permutation p, win rate of a with ties half",
    INDEPENDENT: "test split; each configuration's own features, a feature's mean over its signs and KL targets; "
                 "difference of means with a two-sample bootstrap 95% CI, two-sided label permutation p, P(a feature "
                 "of a beats one of b) with ties half; n = features of a vs b"}


def write_paired(frame: pd.DataFrame, out: Path) -> str:
    """Write paired.md (a table per task and metric) and paired.csv into `out`; return the Markdown."""
    table = paired(frame)
    parts = []
    for (task, metric), g in table.groupby(["task", "metric"], sort=True):
        shown = pd.DataFrame({
            "model": g["model"], "layer": g["layer"], "a": g["a"], "b": g["b"],
            "n": [str(n) if d == PAIRED else f"{n} vs {nb}" for d, n, nb in zip(g["design"], g["n"], g["n_b"],
                                                                                 strict=True)],
            "a - b [95% CI]": [f"{d:+.3f} [{lo:+.2f}, {hi:+.2f}]" if not np.isnan(lo) else f"{d:+.3f}"
                               for d, lo, hi in zip(g["diff"], g["ci_low"], g["ci_high"], strict=True)],
            "p": [f"{p:.4f}" if not np.isnan(p) else "" for p in g["p_value"]],
            "a wins": [f"{w:.0%}" for w in g["win_rate"]]})
        parts.append(f"### {task}: {metric} ({_DESIGNS[g['design'].iloc[0]]})\n")
        parts.append(shown.to_markdown(index=False, disable_numparse=True) + "\n")
    markdown = "\n".join(parts) if parts else "(no pairs of configurations at one model, layer and task)\n"
    (out / "paired.md").write_text(markdown)
    table.to_csv(out / "paired.csv", index=False)
    return markdown


def write_latex(frame: pd.DataFrame, out: Path) -> Path:
    """The leaderboard tables as LaTeX (booktabs), one tabular per (task, metric)."""
    parts = []
    for (task, metric), table in leaderboard(frame).items():
        body = table.to_latex(escape=True, caption=f"{task}: {metric} (test split, mean [95\\% CI] n)",
                              label=f"tab:{task}-{metric}")
        parts.append(body)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "leaderboard.tex"
    path.write_text("\n".join(parts))
    return path


def __getattr__(name: str) -> Any:
    """Figures moved to `bench.figures`; their old names here still work."""
    if name in ("FIGURES", "write_figures", "method_color", "win_rates", "_style", "METHOD_COLORS") or name.startswith(
            "fig_"):
        from bench import figures

        return getattr(figures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
