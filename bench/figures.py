"""Figures from the records frame: each is a function frame -> matplotlib Figure (None when the frame has no
records for it). Lines, boxes and rows are configurations (`bench.report` labels); colours are fixed per method
name, and configurations of one method differ by marker and line style."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.report import configurations, item_means, main_metric, paired, summary

log = logging.getLogger(__name__)

_PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
METHOD_COLORS = {"snmf": "#1b9e77", "sae": "#d95f02", "dim": "#7570b3", "dim-snmf": "#7570b3", "sae-act": "#e6ab02"}
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_LINES = ["-", "--", ":", "-."]


def method_color(name: str) -> str:
    """A fixed colour per method name, the same in every figure (unknown names hash into the palette)."""
    if name in METHOD_COLORS:
        return METHOD_COLORS[name]
    return _PALETTE[3 + zlib.crc32(name.encode()) % (len(_PALETTE) - 3)]


def _looks(summ: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """label -> plot style: the method's colour; a marker and line style per configuration of that method."""
    looks = {}
    pairs = summ[["label", "method"]].drop_duplicates().sort_values("label")
    for _, g in pairs.groupby("method", sort=True):
        for i, (label, method) in enumerate(zip(g["label"], g["method"], strict=True)):
            looks[label] = {"color": method_color(method), "marker": _MARKERS[i % len(_MARKERS)],
                            "linestyle": _LINES[i % len(_LINES)]}
    return looks


def _style() -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"figure.dpi": 120, "axes.spines.top": False, "axes.spines.right": False,
                                "axes.grid": True, "grid.alpha": 0.3, "font.size": 9, "legend.frameon": False})


def _panels(n: int, width: float = 4.2, height: float = 3.4):  # noqa: ANN202
    import matplotlib.pyplot as plt

    _style()
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def fig_metric_by_layer(frame: pd.DataFrame, task: str, metric: str, ylabel: str, title: str):  # noqa: ANN201
    """One panel per model: the test-split mean of `metric` over concepts per layer, a line per configuration,
    with bootstrap 95% CIs as bands. Returns a Figure, or None without such records."""
    summ = summary(frame)
    summ = summ[(summ["task"] == task) & (summ["metric"] == metric)]
    if summ.empty:
        return None
    looks = _looks(summ)
    models = sorted(summ["model"].unique())
    fig, axes = _panels(len(models), 4.2, 3.2)
    for ax, model in zip(axes, models, strict=True):
        for label, g in summ[summ["model"] == model].groupby("label"):
            g = g.sort_values("layer")
            ax.plot(g["layer"], g["mean"], label=label, **looks[label])
            ax.fill_between(g["layer"], g["ci_low"], g["ci_high"], color=looks[label]["color"], alpha=0.15)
        ax.set_title(model)
        ax.set_xlabel("layer (index)")
        ax.set_ylabel(ylabel)
        ax.legend(title="configuration")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def fig_detection(frame: pd.DataFrame):  # noqa: ANN201
    return fig_metric_by_layer(frame, "detection", "auroc", "test AUROC (0.5 = chance)",
                               "Concept detection: matched feature's AUROC per layer")


def fig_steering(frame: pd.DataFrame):  # noqa: ANN201
    return fig_metric_by_layer(frame, "steering", "score", "harmonic mean of concept, instruction, fluency (0-2)",
                               "Steering at the chosen factor (test instructions)")


def fig_tradeoff(frame: pd.DataFrame):  # noqa: ANN201
    """Concept score against fluency as the steering factor grows (dev sweep, mean over concepts and layers),
    a line per configuration; the unsteered reference (alpha = 0, test instructions) as a black cross."""
    f = configurations(frame)
    f = f[f["task"] == "steering"]
    sweep = f[f["metric"].isin(["sweep_concept", "sweep_fluency"]) & f["factor"].notna()]
    if sweep.empty or set(sweep["metric"]) != {"sweep_concept", "sweep_fluency"}:
        return None
    looks = _looks(sweep)
    models = sorted(sweep["model"].unique())
    fig, axes = _panels(len(models))
    for ax, model in zip(axes, models, strict=True):
        m = sweep[sweep["model"] == model]
        table = m.pivot_table(index=["label", "factor"], columns="metric", values="value", aggfunc="mean")
        for label, g in table.groupby(level="label"):
            g = g.droplevel("label").sort_index()
            ax.plot(g["sweep_fluency"], g["sweep_concept"], label=label, **looks[label])
            for factor, row in g.iterrows():
                ax.annotate(f"{factor:g}", (row["sweep_fluency"], row["sweep_concept"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        base = f[(f["model"] == model) & f["metric"].isin(["concept_base", "fluency_base"])]
        if len(base):
            means = base.groupby("metric")["value"].mean()
            ax.scatter([means.get("fluency_base")], [means.get("concept_base")], marker="x", color="black",
                       label="alpha = 0")
        ax.set_xlabel("fluency (0-2)")
        ax.set_ylabel("concept score (0-2)")
        ax.set_title(f"{model}: labels = steering factor")
        ax.legend()
    fig.suptitle("Steering trade-off: concept vs fluency as the factor grows")
    fig.tight_layout()
    return fig


def win_rates(frame: pd.DataFrame, metric: str = "score") -> pd.DataFrame:
    """P(row configuration scores higher than column configuration) over shared (model, layer, concept) of the
    steering test split (each concept's mean over seeds); ties count half."""
    m = item_means(frame)
    t = m[(m["task"] == "steering") & (m["metric"] == metric) & m["by_concept"].astype(bool)]
    wide = t.pivot_table(index=["model", "layer", "item"], columns="label", values="value", aggfunc="mean")
    labels = list(wide.columns)
    out = pd.DataFrame(np.nan, index=labels, columns=labels)
    for a in labels:
        for b in labels:
            both = wide[[a, b]].dropna() if a != b else wide.iloc[:0]
            if len(both):
                out.loc[a, b] = float(((both[a] > both[b]) + 0.5 * (both[a] == both[b])).mean())
    return out


def _heatmap(ax, table: pd.DataFrame, cmap: str, vmin: float, vmax: float, fmt: str = "{:.2f}"):  # noqa: ANN001, ANN202
    im = ax.imshow(table.to_numpy(dtype=float), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=60, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.grid(False)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            v = table.iat[i, j]
            if not pd.isna(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7)
    return im


def fig_win_rate(frame: pd.DataFrame):  # noqa: ANN201
    table = win_rates(frame)
    if table.shape[0] < 2:
        return None
    fig, (ax,) = _panels(1, 2.5 + 0.7 * table.shape[1], 2 + 0.6 * table.shape[0])
    fig.colorbar(_heatmap(ax, table, "RdBu", 0, 1), ax=ax, label="win rate (row beats column)")
    ax.set_title("Steering win rate over (model, layer, concept)")
    fig.tight_layout()
    return fig


def fig_concept_heatmap(frame: pd.DataFrame):  # noqa: ANN201
    m = item_means(frame)
    t = m[(m["task"] == "steering") & (m["metric"] == "score") & m["by_concept"].astype(bool)]
    if t.empty:
        return None
    table = t.pivot_table(index="label", columns="item", values="value", aggfunc="mean")
    fig, (ax,) = _panels(1, max(5, 0.45 * table.shape[1] + 2), 1 + 0.5 * table.shape[0])
    fig.colorbar(_heatmap(ax, table, "viridis", 0, 2, "{:.1f}"), ax=ax, label="harmonic mean (0-2)")
    ax.set_title("Steering score per concept (test, mean over models and layers)")
    fig.tight_layout()
    return fig


def fig_labels(frame: pd.DataFrame):  # noqa: ANN201
    """Distribution of per-feature label scores per configuration (box plots), one panel per metric."""
    f = configurations(frame)
    t = f[(f["task"] == "labeling") & f["metric"].isin(["label_accuracy", "label_f1"])].dropna(subset=["value"])
    if t.empty:
        return None
    looks = _looks(t)
    metrics = sorted(t["metric"].unique())
    fig, axes = _panels(len(metrics), max(4.0, 1.2 * t["label"].nunique()), 3.2)
    for ax, metric in zip(axes, metrics, strict=True):
        g = t[t["metric"] == metric]
        labels = sorted(g["label"].unique())
        box = ax.boxplot([g.loc[g["label"] == label, "value"] for label in labels], patch_artist=True)
        for patch, label in zip(box["boxes"], labels, strict=True):
            patch.set_facecolor(looks[label]["color"])
            patch.set_alpha(0.6)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30 if len(labels) > 3 else 0)
        ax.set_ylabel(f"{metric.replace('_', ' ')} per feature")
        ax.set_ylim(0, 1)
    fig.suptitle("Labeling: how well a feature's label predicts where it fires")
    fig.tight_layout()
    return fig


def fig_paired(frame: pd.DataFrame):  # noqa: ANN201
    """Forest plot of the paired differences a - b with their bootstrap 95% CIs, one panel per task at its main
    metric, a row per (model, layer, pair); p-values on the right."""
    table = paired(frame)
    panels = []
    for task, g in table.groupby("task", sort=True):
        metric = main_metric(task, list(dict.fromkeys(g["metric"])))
        panels.append((task, metric, g[g["metric"] == metric]))
    if not panels:
        return None
    height = max(len(g) for *_, g in panels)
    fig, axes = _panels(len(panels), 5.0, 1.2 + 0.35 * height)
    for ax, (task, metric, g) in zip(axes, panels, strict=True):
        y = np.arange(len(g))[::-1]
        err = np.array([g["diff"] - g["ci_low"], g["ci_high"] - g["diff"]]).clip(min=0)
        ax.errorbar(g["diff"], y, xerr=np.nan_to_num(err), fmt="o", color="black", capsize=3)
        ax.axvline(0, color="grey", lw=1)
        where = [f"{m} L{la}" if g["model"].nunique() > 1 else f"L{la}" for m, la in zip(g["model"], g["layer"],
                                                                                         strict=True)]
        ax.set_yticks(y, [f"{a} - {b}, {w}" for a, b, w in zip(g["a"], g["b"], where, strict=True)])
        for yi, p in zip(y, g["p_value"], strict=True):
            text = "" if np.isnan(p) else "p<0.001" if p < 0.001 else f"p={p:.3f}"
            ax.annotate(text, (1.0, yi), xycoords=("axes fraction", "data"), fontsize=7, va="center",
                        xytext=(4, 0), textcoords="offset points")
        ax.set_xlabel(f"paired difference of {metric} (a - b)")
        ax.set_title(f"{task}: {metric}")
    fig.suptitle("Paired differences over shared concepts (bootstrap 95% CI; sign-flip permutation p)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    return fig


def fig_feature_steering(frame: pd.DataFrame):  # noqa: ANN201
    """The paper's steering figure: mean score over features against the KL target, a line per configuration
    with its bootstrap 95% band; a row of panels per (model, layer), input score left, output score right."""
    from bench.feature_report import SIDES, by_kl_target

    table = by_kl_target(frame)
    if table.empty:
        return None
    import matplotlib.pyplot as plt

    _style()
    where = table[["model", "layer"]].drop_duplicates().sort_values(["model", "layer"]).to_numpy().tolist()
    fig, axes = plt.subplots(len(where), 2, figsize=(8.4, 3.0 * len(where)), squeeze=False)
    looks = _looks(table)
    for row, (model, layer) in zip(axes, where, strict=True):
        for ax, side in zip(row, SIDES, strict=True):
            g = table[(table["model"] == model) & (table["layer"] == layer) & (table["metric"] == side)]
            for label, h in g.groupby("label", sort=True):
                h = h.sort_values("kl_target")
                ax.plot(h["kl_target"], h["mean"], label=label, **looks[label])
                ax.fill_between(h["kl_target"], h["ci_low"], h["ci_high"], color=looks[label]["color"], alpha=0.12)
            ax.set_xscale("log")
            targets = sorted(table["kl_target"].unique())
            ax.set_xticks(targets, [f"{t:g}" for t in targets])
            ax.minorticks_off()
            ax.set_xlabel("KL target (nats)")
            ax.set_ylabel(f"{side.replace('_', ' ')} (0-2)")
            ax.set_ylim(0, 2)
            ax.set_title(f"{model} L{layer}: {side.split('_')[0]} side", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Feature-centric steering: harmonic mean of concept and fluency against the KL target")
    fig.tight_layout()
    return fig


def fig_scd(frame: pd.DataFrame):  # noqa: ANN201
    """The paper's concept detection: the distribution of S_CD over features, a box per configuration, one panel
    per (model, layer); the fraction of features with S_CD > 0 over each box."""
    f = configurations(frame)
    t = f[(f["task"] == "feature_detection") & (f["metric"] == "s_cd") & (f["split"] == "test")]
    t = t.dropna(subset=["value"])
    if t.empty:
        return None
    looks = _looks(t)
    where = t[["model", "layer"]].drop_duplicates().sort_values(["model", "layer"]).to_numpy().tolist()
    fig, axes = _panels(len(where), max(3.2, 1.1 * t["label"].nunique()), 3.2)
    for ax, (model, layer) in zip(axes, where, strict=True):
        g = t[(t["model"] == model) & (t["layer"] == layer)]
        labels = sorted(g["label"].unique())
        values = [g.loc[g["label"] == label, "value"].to_numpy(dtype=float) for label in labels]
        box = ax.boxplot(values, patch_artist=True)
        for patch, label in zip(box["boxes"], labels, strict=True):
            patch.set_facecolor(looks[label]["color"])
            patch.set_alpha(0.6)
        for i, v in enumerate(values, start=1):
            ax.annotate(f"{(v > 0).mean():.0%} > 0", (i, 1.0), xycoords=("data", "axes fraction"), ha="center",
                        va="bottom", fontsize=7)
        ax.axhline(0, color="grey", lw=1)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30 if len(labels) > 3 else 0)
        ax.set_ylabel("S_CD per feature")
        ax.set_title(f"{model} L{layer}", fontsize=9, pad=14)
    fig.suptitle("Concept detection: log(mean response to activating / neutral sentences)")
    fig.tight_layout()
    return fig


FIGURES = {
    "detection_auroc_by_layer": fig_detection,
    "steering_score_by_layer": fig_steering,
    "steering_tradeoff": fig_tradeoff,
    "steering_win_rate": fig_win_rate,
    "steering_concept_heatmap": fig_concept_heatmap,
    "labeling_scores": fig_labels,
    "paired_differences": fig_paired,
    "feature_steering_by_kl": fig_feature_steering,
    "feature_detection_scd": fig_scd,
}


def write_figures(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Save every figure that has records as PNG and PDF in `out`; return the paths written."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    frame = configurations(frame)  # once for all figures
    written = []
    for name, make in FIGURES.items():
        fig = make(frame)
        if fig is None:
            log.info("figure %s: no records for it, skipped", name)
            continue
        for ext in ("png", "pdf"):
            fig.savefig(out / f"{name}.{ext}", bbox_inches="tight")
            written.append(out / f"{name}.{ext}")
        plt.close(fig)
    return written
