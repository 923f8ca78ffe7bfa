"""Feature trees of a recursive SNMF (`methods/snmf_deep.py`), as the reference's hierarchical tutorial builds them.

Edges come from the coefficient matrices between levels: Y_{l+1} [r_{l+1}, r_l] says how much of coarse feature j
each finer feature i uses. Parent j keeps the children i with Y[j, i] >= `ratio` x max_i Y[j, i] (the reference:
0.15), at most `max_children` (4) of them, largest first; a parent left with fewer than `min_children` (2) keeps
none (the reference stops such a branch). A finer feature may have several parents, so the "tree" of a layer is a
forest over levels that can share nodes; its JSON lists every node once with its parents and children.

Nodes are named by the concept of the hierarchical concept data (a child such as Monday, or a parent category such
as days) they detect best: max-pooled codes per sentence, AUROC (the labels of `bench/hierarchy.py`; no LLM). Each
node also carries its top contexts and its neuron support (the non-zeros of its column of Z). The feature browser
shows the tree (`bench.browser_tree`).
"""

from __future__ import annotations

import json
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.activations import Activations
from bench.feature_evidence import TextIndex, marked, top_codes
from bench.features import auroc_matrix, pooled_codes

log = logging.getLogger(__name__)
RATIO, MAX_CHILDREN, MIN_CHILDREN = 0.15, 4, 2  # the reference's tutorial: minimal_activation, top_k_factors


def edges(coef: Tensor, ratio: float = RATIO, max_children: int = MAX_CHILDREN,
          min_children: int = MIN_CHILDREN) -> list[list[int]]:
    """Children of every parent from coefficients [r_parent, r_child] >= 0: per row, the columns with a value
    >= ratio x the row's max (and > 0), largest first, at most `max_children`; [] when fewer than `min_children`."""
    if not 0 <= ratio <= 1 or max_children < 1 or min_children < 0:
        raise ValueError(f"ratio={ratio}, max_children={max_children}, min_children={min_children}; valid: "
                         "0 <= ratio <= 1, max_children >= 1, min_children >= 0")
    out = []
    for row in coef.float():
        top = float(row.max()) if row.numel() else 0.0
        order = torch.argsort(row, descending=True, stable=True).tolist()
        keep = [i for i in order if top > 0 and row[i] > 0 and row[i] >= ratio * top][:max_children]
        out.append(keep if len(keep) >= min_children else [])
    return out


class LevelView:
    """One level of a fitted `DeepSNMF` as a feature method (encode = that level's codes), for labels and contexts."""

    def __init__(self, method: Any, level: int, fine_tuned: bool = False) -> None:
        self.method, self.level, self.fine_tuned = method, level, fine_tuned
        self.site = method.site
        self.directions_ = method.directions_of(level, fine_tuned)

    def encode(self, x: Tensor) -> Tensor:
        return self.method.codes(x, self.level, self.fine_tuned)


@dataclass
class Tree:
    """Every node of every level (id "L<level>:<feature>") and the edges between consecutive levels."""

    nodes: dict[str, dict[str, Any]]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        roots = [k for k, n in self.nodes.items() if not n["parents"] and n["children"]]
        return {**self.meta, "roots": roots, "nodes": list(self.nodes.values())}

    @classmethod
    def read(cls, path: Path) -> Tree:
        """The tree that `write` wrote to `path` (tree.json)."""
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls({n["id"]: n for n in data["nodes"]}, {k: v for k, v in data.items() if k not in ("nodes", "roots")})

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def node_id(level: int, feature: int) -> str:
    return f"L{level}:{feature}"


def build(method: Any, acts: Activations, names: list[str], prompt_labels: Tensor, tokenizer: Any,
          meta: dict[str, Any], n_top: int = 8, window: int = 8, ratio: float = RATIO,
          max_children: int = MAX_CHILDREN) -> Tree:
    """The tree of a fitted `DeepSNMF` on `acts` (the fit tokens): prompt_labels [n_prompts, len(names)] bool name
    the nodes; the per-level (pre-fine-tune) factors give edges and supports, as in the reference."""
    index = TextIndex(acts)
    nodes: dict[str, dict[str, Any]] = {}
    for level in range(1, len(method.ranks) + 1):
        view = LevelView(method, level)
        auc = auroc_matrix(pooled_codes(view, acts), prompt_labels)  # [c, r]
        best = auc.argmax(0)
        r = view.directions_.shape[0]
        vals, idx = top_codes(view, acts, range(r), n_top)
        for f in range(r):
            support = view.directions_[f].nonzero().squeeze(1).tolist()
            ctx = []
            for v, i in zip(vals[f].tolist(), idx[f].tolist(), strict=True):
                if i < 0 or v <= 0:
                    continue
                tok, text, span = index.context(i, window, tokenizer)
                ctx.append({"token": tok, "context": marked(text, span, tok), "code": round(v, 4)})
            nodes[node_id(level, f)] = {
                "id": node_id(level, f), "level": level, "feature": f, "label": names[int(best[f])],
                "auroc": round(float(auc[int(best[f]), f]), 4), "support": support, "top_contexts": ctx,
                "parents": [], "children": []}
    for level, coef in enumerate(method.coefficients_, start=2):
        for j, kids in enumerate(edges(coef, ratio, max_children)):
            parent = nodes[node_id(level, j)]
            for i in kids:
                child = nodes[node_id(level - 1, i)]
                weight = round(float(coef[j, i] / coef[j].max()), 4)
                parent["children"].append({"id": child["id"], "weight": weight})
                child["parents"].append({"id": parent["id"], "weight": weight})
    return Tree(nodes, {**meta, "ranks": list(method.ranks), "edge_ratio": ratio, "max_children": max_children})


def subtrees(tree: Tree, n: int) -> list[str]:
    """The `n` roots with the most descendants (ties: lower id first)."""
    def size(k: str, seen: set[str]) -> int:
        seen.add(k)
        return 1 + sum(size(c["id"], seen) for c in tree.nodes[k]["children"] if c["id"] not in seen)

    roots = [k for k, v in tree.nodes.items() if not v["parents"] and v["children"]]
    return sorted(roots, key=lambda k: (-size(k, set()), k))[:n]


def figure(tree: Tree, roots: list[str], title: str = ""):  # noqa: ANN201 - matplotlib Figure
    """The subtrees under `roots` side by side: one row per level (coarse on top), nodes labelled with their concept
    and top tokens, edges from the coefficients (width by the coefficient / row max)."""
    import matplotlib.pyplot as plt

    from bench.figures import _style

    _style()
    pos: dict[str, tuple[float, float]] = {}
    x = [0.0]

    def place(k: str, depth: int) -> None:
        kids = [c["id"] for c in tree.nodes[k]["children"] if c["id"] not in pos]
        if not kids:
            pos[k] = (x[0], -depth)
            x[0] += 1
            return
        for c in kids:
            place(c, depth + 1)
        xs = [pos[c][0] for c in kids]
        pos[k] = ((min(xs) + max(xs)) / 2, -depth)

    for r in roots:
        place(r, 0)
        x[0] += 0.6
    width = max(x[0], 1)
    depth = max((-y for _, y in pos.values()), default=0)
    fig, ax = plt.subplots(figsize=(min(2.0 * width + 1, 40), 2.3 * (1 + depth)))
    for k, (x0, y0) in pos.items():
        for c in tree.nodes[k]["children"]:
            if c["id"] in pos:
                x1, y1 = pos[c["id"]]
                ax.plot([x0, x1], [y0, y1], color="#1b9e77", lw=0.8 + 2.5 * c["weight"], alpha=0.7, zorder=1)
    for k, (x0, y0) in pos.items():
        n = tree.nodes[k]
        toks = []
        for t in n["top_contexts"]:
            s = t["token"].strip()
            if s and s not in toks:
                toks.append(s)
        text = f"{k}\n{n['label']} ({n['auroc']:.2f})\n" + textwrap.fill(", ".join(toks[:4]), 18)
        ax.text(x0, y0, text, ha="center", va="center", fontsize=7, zorder=3,
                bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "#555555", "lw": 0.6})
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(min((y for _, y in pos.values()), default=0) - 0.6, 0.6)
    ax.set_axis_off()
    ax.set_title(title or "feature trees: nodes = concept (AUROC) and top tokens; edges from the coefficients")
    fig.tight_layout()
    return fig

