"""Figures of `bench analyze hierarchy` from its records: neuron-group sizes against their null, and the
intervention's logit changes against random neuron sets. (The tree figure is `bench.feature_tree.figure`.)"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.figures import _style


def groups(table: pd.DataFrame):  # noqa: ANN201 - matplotlib Figure
    """Per parent (x, sorted by core size): core size and siblings' mean Jaccard, each with the null's mean and
    97.5% quantile (random supports of the same sizes)."""
    import matplotlib.pyplot as plt

    _style()
    t = table.sort_values(["core", "sibling_jaccard"], ascending=False).reset_index(drop=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    x = np.arange(len(t))
    for ax, (obs, mean, hi, title) in zip(axes, [
            ("core", "core_null", "core_null_hi", "core: neurons shared by all children"),
            ("sibling_jaccard", "sibling_jaccard_null", "sibling_jaccard_null_hi", "siblings' mean Jaccard")],
            strict=True):
        ax.fill_between(x, 0, t[hi], color="#bbbbbb", alpha=0.6, step="mid", label="null, 97.5% quantile")
        ax.plot(x, t[mean], color="#555555", lw=1, label="null mean")
        ax.scatter(x, t[obs], s=10, color="#d95f02", zorder=3, label="observed")
        ax.set_xlabel(f"parent (n = {len(t)}), sorted")
        ax.set_title(title)
    axes[0].set_ylabel("neurons")
    axes[1].set_ylabel("Jaccard")
    axes[0].legend(fontsize=7)
    share = (t["core_p"] < 0.05).mean() if len(t) else float("nan")
    fig.suptitle(f"neuron groups of each tree parent's children vs random supports (core p < 0.05 for {share:.0%})")
    fig.tight_layout()
    return fig


def intervention(table: pd.DataFrame, max_panels: int = 6):  # noqa: ANN201 - matplotlib Figure
    """One heatmap per parent: rows = amplified neuron group (core, shared, each child's exclusive neurons), columns =
    the children's tokens; cells = logit change minus the null mean of random neuron sets (* = p < 0.05)."""
    import matplotlib.pyplot as plt

    _style()
    parents = list(dict.fromkeys(table["parent"]))[:max_panels] if len(table) else []
    n = max(len(parents), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False)
    lim = float(np.nanmax(np.abs(table["logit_change"] - table["null_mean"]))) if len(table) else 1.0
    for ax in axes.flat[len(parents):]:
        ax.set_axis_off()
    for ax, p in zip(axes.flat, parents, strict=False):
        t = table[table["parent"] == p]
        pooled = t["group"].isin(["core", "shared"])
        t = t.assign(row=np.where(pooled, t["group"], "excl. " + t["group_child"].astype(str)),
                     col=t["child"] + " " + t["token"].str.strip(), eff=t["logit_change"] - t["null_mean"])
        row_order = ["core", "shared", *[r for r in dict.fromkeys(t["row"]) if r not in ("core", "shared")]]
        row_order = [r for r in row_order if r in set(t["row"])]
        col_order = list(dict.fromkeys(t["col"]))
        grid = t.pivot_table(index="row", columns="col", values="eff").reindex(index=row_order, columns=col_order)
        pv = t.pivot_table(index="row", columns="col", values="p").reindex(index=row_order, columns=col_order)
        im = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            if not np.isnan(v):
                star = "*" if pv.iat[i, j] < 0.05 else ""
                ax.text(j, i, f"{v:+.2f}{star}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(col_order)), col_order, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(row_order)), row_order, fontsize=7)
        ax.set_title(f"{p} ({t['parent_label'].iloc[0]})", fontsize=9)
        ax.grid(False)
    if parents:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="logit change − null mean")
    fig.suptitle("amplifying a parent's neuron groups: change of each child's token logit vs random neuron sets",
                 y=1.02)
    return fig
