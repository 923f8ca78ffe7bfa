"""`bench analyze hierarchy`: the paper's third claim as the paper tests it, end to end on one (model, layer).

1. Fit the recursive SNMF (`methods/snmf_deep.py`) on the MLP hidden state of the hierarchical concept sentences
   (every split: the fit is unsupervised; the labels only name nodes).
2. Build the feature tree (`bench.feature_tree`): nodes named by the concept they detect best, edges from the
   coefficients; write tree.json, a figure and the feature browser of the tree (`out/browser/`, as
   `bench report OUT --browser` writes it).
3. Neuron groups of every parent (`bench.neuron_groups`): core/exclusive sizes and sibling overlap against the
   permutation null; per level, the overlap matrix and sibling overlap against its null.
4. The intervention on the parents whose children name tokens: amplify the core, then each child's exclusive
   neurons, and record each child's token logit change against random neuron sets of the same size.

Presets: `cpu` (the default: the embedded Gemma-3-270M, middle layer, ranks 100-50-25, sized for 2 CPU cores) and
`paper-hierarchy` (the reference's settings: GPT-2-large layer 8, ranks 400-200-100-50, 3,000 iterations with an
absolute tol of 1e-6 and patience 100, sparsity 0.01, 2,500 Adam steps at lr 1e-3; for a GPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from bench import feature_tree, neuron_groups
from bench.browser import write_browser
from bench.hier_concepts import HierConcepts
from bench.neuron_groups import Family

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Everything `bench analyze hierarchy` needs besides the concept data (a preset, then flags)."""

    model: str = "gemma-3-270m-gguf"
    layer: str = "middle"
    ranks: tuple[int, ...] = (100, 50, 25)
    sparsity: float = 0.01
    max_iter: int = 300
    patience: int = 50
    tol: float = 1e-4
    tol_mode: str = "relative"
    fine_tune_steps: int = 300
    fine_tune_lr: float = 1e-3
    max_len: int = 64
    n_perm: int = 1000  # permutation draws of the neuron-group nulls
    alpha: float = 1.0  # intervention norm, in units of the mean norm of the MLP hidden state
    n_null: int = 20  # random neuron sets per group
    n_prompts: int = 6  # neutral prompts the logit changes are averaged over
    max_parents: int = 4  # parents with token-named children that get the intervention
    seed: int = 0
    device: str = "auto"


PRESETS = {
    "cpu": Settings(),
    "paper-hierarchy": Settings(model="gpt2-large", layer="8", ranks=(400, 200, 100, 50), max_iter=3000,
                                patience=100, tol=1e-6, tol_mode="absolute", fine_tune_steps=2500, max_len=128,
                                n_prompts=32, max_parents=12, n_null=100),
}


def settings(preset: str | None, **overrides: Any) -> Settings:
    """A preset (default `cpu`) with the given non-None overrides; ValueError naming the known presets."""
    name = preset or "cpu"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def families(tree: feature_tree.Tree, method: Any, concepts: HierConcepts, tokenizer: Any,
             max_parents: int) -> list[Family]:
    """Parents whose children are named by at least two distinct child concepts (their tokens), the most such
    children of one category first (a "days" parent over weekdays), then the most children with tokens."""
    scored = []
    for node in tree.nodes.values():
        kids = [tree.nodes[c["id"]] for c in node["children"]]
        named = [k["label"] for k in kids if k["label"] in concepts.token_of and k["label"] in concepts.parent_of]
        if len(set(named)) < 2:
            continue
        by_cat: dict[str, set[str]] = {}
        for n in named:
            by_cat.setdefault(concepts.parent_of[n], set()).add(n)
        scored.append((-max(len(v) for v in by_cat.values()), -len(set(named)), node["level"], node["feature"], node))
    out = []
    for *_, node in sorted(scored, key=lambda s: s[:4])[:max_parents]:
        kids = [tree.nodes[c["id"]] for c in node["children"]]
        cols = torch.stack([method.directions_of(k["level"])[k["feature"]] for k in kids])
        toks = [_token_id(tokenizer, concepts.token_of[k["label"]]) if k["label"] in concepts.token_of else -1
                for k in kids]
        out.append(Family(node["id"], node["label"], [k["id"] for k in kids], [k["label"] for k in kids], cols, toks))
    return out


def _token_id(tokenizer: Any, word: str) -> int:
    """The first token of " word" (the word as it follows a space in a sentence)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else -1


def run(s: Settings, concepts: HierConcepts, out: Path, figures: Path | None = None) -> dict[str, Any]:
    """Run the analysis (module docstring) and write its records to `out` (and its PNGs to `figures`)."""
    from bench.activations import ActivationCache
    from bench.data import load_lines
    from bench.features import mean_norm
    from bench.models import load
    from bench.runner import resolve_device
    from bench.sites import Site, n_layers, resolve_layers
    from methods.snmf_deep import DeepSNMF

    def method_at(site: Site) -> DeepSNMF:
        return DeepSNMF(site=site, ranks=tuple(s.ranks), sparsity=s.sparsity, max_iter=s.max_iter,
                        patience=s.patience, tol=s.tol, tol_mode=s.tol_mode, seed=s.seed, device=s.device,
                        fine_tune_steps=s.fine_tune_steps, fine_tune_lr=s.fine_tune_lr)

    method_at(Site(0, "mlp"))._validate()  # bad ranks, sparsity or steps fail before the model loads
    t0, c0, stages = time.perf_counter(), time.process_time(), {}
    model, tok, prov = load(s.model, resolve_device(s.device))
    layer = resolve_layers([int(s.layer) if str(s.layer).lstrip("-").isdigit() else s.layer], n_layers(model))[0]
    site = Site(layer, "mlp")
    acts = ActivationCache().get(model, tok, s.model, prov["revision"], concepts.texts, [site], max_len=s.max_len)[site]
    stages["activations"] = time.perf_counter() - t0
    method = method_at(site).fit(acts)
    stages["fit"] = time.perf_counter() - t0 - sum(stages.values())
    meta = {"model": s.model, "revision": prov["revision"], "layer": layer, "site": str(site),
            "concepts": concepts.name, "n_tokens": len(acts), "n_sentences": len(concepts.texts)}
    tree = feature_tree.build(method, acts, concepts.names, concepts.labels(), tok, meta)
    out.mkdir(parents=True, exist_ok=True)
    paths = [tree.write(out / "tree.json"), write_browser([out], out / "browser")]
    stages["tree"] = time.perf_counter() - t0 - sum(stages.values())
    group_rows, overlap_rows, matrices = _groups(tree, method, s)
    group_rows.to_csv(out / "neuron_groups.csv", index=False)
    overlap_rows.to_csv(out / "level_overlap.csv", index=False)
    save_file(matrices, str(out / "overlap.safetensors"))
    stages["groups"] = time.perf_counter() - t0 - sum(stages.values())
    fams = families(tree, method, concepts, tok, s.max_parents)
    neutral = load_lines(None, "neutral.jsonl")["text"].tolist()
    pick = np.random.default_rng(s.seed).choice(len(neutral), size=min(s.n_prompts, len(neutral)), replace=False)
    inter = neuron_groups.intervene(model, tok, site, fams, [neutral[i] for i in sorted(pick)], mean_norm(acts),
                                    s.alpha, s.n_null, s.seed)
    inter.to_csv(out / "intervention.csv", index=False)
    stages["intervention"] = time.perf_counter() - t0 - sum(stages.values())
    summary = {**meta, "settings": dataclasses.asdict(s), "fit_metrics": method.fit_metrics_,
               "n_nodes": len(tree.nodes), "n_parents": int(len(group_rows)), "n_families": len(fams),
               "seconds": {k: round(v, 1) for k, v in stages.items()},
               "wall_seconds": round(time.perf_counter() - t0, 1),
               "cpu_seconds": round(time.process_time() - c0, 1), "threads": torch.get_num_threads()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    paths += [out / n for n in ("neuron_groups.csv", "level_overlap.csv", "overlap.safetensors", "intervention.csv",
                                "summary.json")]
    if figures is not None:
        paths += write_figures(out, figures)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return summary


def _groups(tree: feature_tree.Tree, method: Any, s: Settings) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    parents, overlap, matrices = [], [], {}
    for node in sorted(tree.nodes.values(), key=lambda n: (-n["level"], n["feature"])):
        if node["children"]:
            kids = [tree.nodes[c["id"]] for c in node["children"]]
            sup = torch.stack([method.directions_of(k["level"])[k["feature"]] != 0 for k in kids])
            parents.append((node["id"], [k["id"] for k in kids], sup))
    table = neuron_groups.group_table(parents, s.n_perm, s.seed)
    levels = {n["level"]: n for n in tree.nodes.values()}
    for level in sorted(levels):
        feats = [n for n in tree.nodes.values() if n["level"] == level + 1 and n["children"]]
        pairs = [(int(a["id"].split(":")[1]), int(b["id"].split(":")[1]))
                 for n in feats for a in n["children"] for b in n["children"]]
        sup = method.directions_of(level) != 0
        jac, stats = neuron_groups.level_overlap(sup, pairs, s.n_perm if pairs else 0, s.seed + level)
        matrices[f"level{level}"] = jac.contiguous()
        overlap.append({"level": level, **stats})
    return table, pd.DataFrame(overlap), matrices


def write_figures(out: Path, figures: Path) -> list[Path]:
    """tree.png, neuron_groups.png and intervention.png from the records in `out`."""
    import matplotlib.pyplot as plt

    from bench import hierarchy_figures

    figures.mkdir(parents=True, exist_ok=True)
    tree = feature_tree.Tree.read(out / "tree.json")
    figs = {"tree": feature_tree.figure(tree, feature_tree.subtrees(tree, 3),
                                        f"{tree.meta['model']} layer {tree.meta['layer']}: the largest feature trees"),
            "neuron_groups": hierarchy_figures.groups(pd.read_csv(out / "neuron_groups.csv")),
            "intervention": hierarchy_figures.intervention(pd.read_csv(out / "intervention.csv"))}
    paths = []
    for name, fig in figs.items():
        fig.savefig(figures / f"{name}.png", bbox_inches="tight", dpi=110)
        plt.close(fig)
        paths.append(figures / f"{name}.png")
    return paths
