"""The paper's third claim: specific neuron combinations are reused across semantically related features.

SNMF is fitted at several k on the same MLP activations. Each feature is a sparse set of neurons (the
non-zeros of its column of Z); each feature at level k is linked to the feature of the next coarser level
whose neuron set overlaps it most (Jaccard). Each feature is named by the concept it detects best (train
AUROC). The claim predicts that linked features share neurons far beyond chance and that a child's concept
is related to its parent's (same concept, or same kind: topic, language, form, ...) more often than under
randomly permuted links.

Nulls. The overlap statistic is the mean over children of the max Jaccard over parents; its null is the same
statistic after a random permutation of the neuron indices of the parent level (`n_perm` seeded draws). That
keeps every feature's support size and the overlaps within each level and breaks only the alignment between
levels (a max over parents of random supports is far above the Jaccard of one random pair). The concept
statistics' null permutes the links. Every p-value is (1 + #null >= observed) / (1 + n_perm), one-sided.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from bench.activations import Activations
from bench.features import auroc_matrix, pooled_codes

log = logging.getLogger(__name__)
PERM_BATCH = 64  # permuted parent levels per matrix product


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Jaccard overlap of neuron sets: masks a [k1, d], b [k2, d] (bool) -> [k1, k2]."""
    a, b = a.float(), b.float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def p_value(null: np.ndarray, observed: float) -> float:
    """One-sided permutation p-value (1 + #(null >= observed)) / (1 + n_perm); never 0."""
    return float((1 + np.sum(null >= observed)) / (1 + len(null)))


def overlap_test(child: Tensor, parent: Tensor, n_perm: int, seed: int = 0) -> dict[str, float]:
    """Mean over children of the max Jaccard over parents for masks child [k1, d], parent [k2, d] (bool), against
    the same statistic with the parent level's neurons permuted (`n_perm` draws).

    Returns observed (`mean_jaccard`), `null_jaccard` (null mean), `null_lo`/`null_hi` (its 2.5% and 97.5%
    quantiles), `jaccard_ratio` (observed / null mean) and `jaccard_p`."""
    if n_perm < 1:
        raise ValueError(f"n_perm={n_perm}; valid: >= 1")
    observed = float(jaccard(child, parent).max(1).values.mean())
    g = torch.Generator().manual_seed(seed)
    c, p = child.float(), parent.float()  # [k1, d], [k2, d]
    size_c, size_p = c.sum(1), p.sum(1)  # support sizes are invariant under the permutation
    null = []
    for start in range(0, n_perm, PERM_BATCH):
        b = min(PERM_BATCH, n_perm - start)
        perms = torch.stack([torch.randperm(p.shape[1], generator=g) for _ in range(b)])  # [b, d]
        inter = torch.einsum("id,bjd->bij", c, p[:, perms].transpose(0, 1))  # [b, k1, k2]
        union = size_c[None, :, None] + size_p[None, None, :] - inter
        null.append((inter / union.clamp(min=1)).max(2).values.mean(1))
    draws = torch.cat(null).numpy()
    lo, hi = np.quantile(draws, [0.025, 0.975])
    mean = float(draws.mean())
    return {"mean_jaccard": observed, "null_jaccard": mean, "null_lo": float(lo), "null_hi": float(hi),
            "jaccard_ratio": observed / mean if mean > 0 else float("inf"), "jaccard_p": p_value(draws, observed)}


@dataclass
class Hierarchy:
    """Links between levels: one row per feature (level k, feature i) -> parent at the next coarser level."""

    links: pd.DataFrame  # k, feature, concept, concept_auroc, n_neurons, parent_k, parent, parent_concept, jaccard
    coherence: pd.DataFrame  # per level pair: overlap vs its null; observed and permuted same-concept/-kind rates


def link_levels(levels: dict[int, tuple[Tensor, list[str], Tensor]], concept_kinds: dict[str, str],
                seed: int = 0, n_perm: int = 1000) -> Hierarchy:
    """Link each level (k -> (masks [k, d] bool, concept per feature, its AUROC [k])) to the next coarser one."""
    ks = sorted(levels)
    rng = np.random.default_rng(seed)
    rows, coherence = [], []
    for fine, coarse in zip(ks[1:], ks[:-1], strict=True):
        mask_f, concepts_f, auc_f = levels[fine]
        mask_c, concepts_c, _ = levels[coarse]
        jac = jaccard(mask_f, mask_c)  # [fine, coarse]
        parent = jac.argmax(1)
        for i in range(fine):
            rows.append({"k": fine, "feature": i, "concept": concepts_f[i], "concept_auroc": float(auc_f[i]),
                         "n_neurons": int(mask_f[i].sum()), "parent_k": coarse, "parent": int(parent[i]),
                         "parent_concept": concepts_c[int(parent[i])], "jaccard": float(jac[i, parent[i]])})
        kind_f = np.array([concept_kinds.get(c, c) for c in concepts_f], dtype=object)
        kind_c = np.array([concept_kinds.get(c, c) for c in concepts_c], dtype=object)
        same_f, same_c = np.array(concepts_f, dtype=object), np.array(concepts_c, dtype=object)
        links = parent.numpy()
        perms = np.stack([rng.permutation(links) for _ in range(n_perm)])  # [n_perm, fine]
        same, kind = float(np.mean(same_f == same_c[links])), float(np.mean(kind_f == kind_c[links]))
        perm_same, perm_kind = (same_f == same_c[perms]).mean(1), (kind_f == kind_c[perms]).mean(1)
        overlap = overlap_test(mask_f, mask_c, n_perm, seed + fine)
        coherence.append({"k": fine, "parent_k": coarse, **overlap, "same_concept": same,
                          "same_concept_permuted": float(perm_same.mean()), "same_concept_p": p_value(perm_same, same),
                          "same_kind": kind, "same_kind_permuted": float(perm_kind.mean()),
                          "same_kind_p": p_value(perm_kind, kind), "n_perm": n_perm})
    return Hierarchy(pd.DataFrame(rows), pd.DataFrame(coherence))


def analyze(acts: Activations, concept_kinds: dict[str, str], ks: list[int], seed: int = 0,
            max_iter: int = 200, sparsity: float = 0.01, n_perm: int = 1000) -> Hierarchy:
    """Fit SNMF at every k in `ks` (ascending) on `acts` (labelled, `mlp` site) and link the levels."""
    from methods.snmf import SNMF

    if acts.labels is None or acts.concepts is None:
        raise ValueError("the hierarchy analysis needs labelled concept activations")
    ks = sorted(set(ks))
    if len(ks) < 2:
        raise ValueError(f"need at least two values of k to link levels, got {ks}")
    if n_perm < 1:
        raise ValueError(f"n_perm={n_perm}; valid: >= 1")
    prompt_labels = torch.zeros(acts.n_prompts, len(acts.concepts), dtype=torch.bool)
    prompt_labels[acts.prompt_idx] = acts.labels
    levels = {}
    for k in ks:
        method = SNMF(site=acts.site, n_features=k, sparsity=sparsity, max_iter=max_iter, seed=seed).fit(acts)
        auc = auroc_matrix(pooled_codes(method, acts), prompt_labels)  # [c, k]
        best = auc.argmax(0)
        levels[k] = (method.directions_ != 0, [acts.concepts[int(c)] for c in best], auc.max(0).values)
        log.info("k=%d: fitted, relative error %.3f", k, method.fit_metrics_.get("rel_error", float("nan")))
    return link_levels(levels, concept_kinds, seed, n_perm)


def figure(h: Hierarchy, max_nodes: int = 60):  # noqa: ANN201 - matplotlib Figure
    """A tree: one row per k (coarse on top), nodes labelled with their concept, edges to parents with
    width by neuron overlap; children are ordered under their parents."""
    import matplotlib.pyplot as plt

    from bench.report import _style

    _style()
    links = h.links
    ks = sorted(set(links["parent_k"]) | set(links["k"]))
    fig, ax = plt.subplots(figsize=(min(4 + 0.25 * max(ks), 24), 1.6 * len(ks) + 1))
    order: dict[int, list[int]] = {ks[0]: list(range(ks[0]))}
    for k in ks[1:]:
        lk = links[links["k"] == k]
        pos = {f: i for i, f in enumerate(order[lk["parent_k"].iloc[0]])}
        order[k] = lk.assign(o=lk["parent"].map(pos)).sort_values(["o", "jaccard"], ascending=[True, False])[
            "feature"].tolist()
    xy = {}
    for row, k in enumerate(ks):
        feats = order[k][:max_nodes]
        for j, f in enumerate(feats):
            xy[(k, f)] = ((j + 0.5) / len(feats), len(ks) - 1 - row)
    concept_of = {(r.k, r.feature): r.concept for r in links.itertuples()}
    concept_of.update({(r.parent_k, r.parent): r.parent_concept for r in links.itertuples()})
    for r in links.itertuples():
        if (r.k, r.feature) in xy and (r.parent_k, r.parent) in xy:
            (x0, y0), (x1, y1) = xy[(r.k, r.feature)], xy[(r.parent_k, r.parent)]
            ax.plot([x0, x1], [y0, y1], color="#1b9e77", alpha=0.6, lw=0.5 + 4 * r.jaccard)
    for (k, f), (x, y) in xy.items():
        ax.scatter([x], [y], s=12, color="#333333", zorder=3)
        ax.text(x, y - 0.08, concept_of.get((k, f), ""), rotation=90, ha="center", va="top", fontsize=6)
    ax.set_yticks(range(len(ks)), [f"k={k}" for k in reversed(ks)])
    ax.set_xticks([])
    ax.set_ylim(-1, len(ks) - 0.5)
    ax.grid(False)
    ax.set_title("SNMF features across k: links to the most-overlapping parent (line width = neuron Jaccard)")
    fig.tight_layout()
    return fig


def write(h: Hierarchy, out: Path) -> list[Path]:
    """hierarchy_links.csv, hierarchy_coherence.csv (the table), hierarchy.png and hierarchy.pdf."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    h.links.to_csv(out / "hierarchy_links.csv", index=False)
    h.coherence.to_csv(out / "hierarchy_coherence.csv", index=False)
    fig = figure(h)
    paths = [out / "hierarchy_links.csv", out / "hierarchy_coherence.csv"]
    for ext in ("png", "pdf"):
        fig.savefig(out / f"hierarchy.{ext}", bbox_inches="tight")
        paths.append(out / f"hierarchy.{ext}")
    plt.close(fig)
    return paths

