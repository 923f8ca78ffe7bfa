"""Regenerate every measured number in README.md from files committed in the repository.

README.md marks each generated block with a pair of HTML comments:

    <!-- numbers:NAME -->
    ...generated Markdown...
    <!-- /numbers:NAME -->

`BLOCKS[NAME]` renders the block from committed records (results/...), data (bench/data/...) or benchmark
outputs (results/perf/...). Nothing inside a block is typed by hand.

    python scripts/readme_numbers.py           # rewrite the blocks in README.md
    python scripts/readme_numbers.py --check   # exit 1 and name the blocks that drift (tests/test_readme.py)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN = ROOT / "results" / "default"  # `bench run` (no arguments): the feature-centric protocol, default model
CONCEPTS_RUN = ROOT / "results" / "concepts"  # `bench run --preset concepts`: the concept-centric protocol
DIM_RESID_RUN = ROOT / "results" / "dim-resid"  # DiM at the residual stream, detection (the site comparison)
_BLOCK = re.compile(r"(<!-- numbers:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /numbers:(?P=name) -->)", re.S)


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _cell(r: pd.Series, digits: int = 2) -> str:
    text = _fmt(r["mean"], digits)
    if not np.isnan(r["ci_low"]):
        text += f" [{_fmt(r['ci_low'], digits)}, {_fmt(r['ci_high'], digits)}]"
    return text


def _frame(*dirs: Path) -> pd.DataFrame:
    from bench.results import load

    return load([str(d) for d in dirs])


def _markdown(table: pd.DataFrame, numparse: bool = True) -> str:
    return table.to_markdown(index=False, disable_numparse=not numparse) + "\n"


BLOCKS: dict[str, Callable[[], str]] = {}


def block(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        BLOCKS[name] = fn
        return fn

    return register


def render(text: str) -> tuple[str, list[str]]:
    """`text` with every known block regenerated, and the names of the blocks whose content changed."""
    changed: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise KeyError(f"README block {name!r} has no generator; known: {', '.join(sorted(BLOCKS))}")
        body = BLOCKS[name]()
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return _BLOCK.sub(sub, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if a block drifts")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text(encoding="utf-8")
    new, changed = render(text)
    missing = sorted(set(BLOCKS) - set(m.group("name") for m in _BLOCK.finditer(text)))
    if missing:
        sys.stderr.write(f"README lacks block(s) {', '.join(missing)}\n")
    if args.check:
        if changed or missing:
            sys.stderr.write(f"README numbers drift from the committed records: {', '.join(changed)}; "
                             "run `python scripts/readme_numbers.py`\n")
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    sys.stdout.write(f"updated {len(changed)} block(s): {', '.join(changed) or '(none)'}\n")
    return 0


# ----------------------------------------------------------------------------------------------- blocks
# Each reads committed files only.

MAIN = [  # (task, metric, row title) of the concept-centric run's main table
    ("detection", "auroc", "detection AUROC"),
    ("steering", "score", "steering score (harmonic mean, 0-2)"),
    ("steering", "concept", "steering concept rating (0-2)"),
    ("steering", "score_base", "steering score at alpha = 0"),
    ("labeling", "label_f1", "label F1 (per feature)"),
]


def _layers(summ: pd.DataFrame) -> list[int]:
    return sorted({int(x) for x in summ["layer"]})


@block("concepts-table")
def concepts_table() -> str:
    """The concept-centric run: test-split means over concepts with bootstrap 95% CIs, per method and layer."""
    return _table(CONCEPTS_RUN, MAIN)


def _comparisons(run: Path, keep: set[tuple[str, str]], two_sample: bool, width: bool = False) -> str:
    """The rows of `bench.report.paired` for the (task, metric) pairs in `keep`, as a Markdown table; n is the
    number of shared concepts, or "features of a vs b" for two-sample comparisons; `width` adds the CI's width."""
    from bench.report import paired

    table = paired(_frame(run))
    table = table[[(t, m) in keep for t, m in zip(table["task"], table["metric"], strict=True)]]
    rows = [{"task: metric": f"{r.task}: {r.metric}", "layer": int(r.layer), "a − b": f"{r.a} − {r.b}",
             **({"features": f"{int(r.n)} vs {int(r.n_b)}"} if two_sample else {"n": int(r.n)}),
             "difference [95% CI]": f"{r.diff:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]",
             **({"CI width": f"{r.ci_high - r.ci_low:.2f}"} if width else {}), "p": _p(r.p_value),
             ("P(a > b)" if two_sample else "a wins"): f"{r.win_rate:.0%}"} for r in table.itertuples()]
    return _markdown(pd.DataFrame(rows), numparse=not width)  # keep "0.20" and "0.004" as written


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


@block("concepts-paired")
def concepts_paired() -> str:
    """Paired differences between methods on the main metrics of detection and steering."""
    return _comparisons(CONCEPTS_RUN, {("detection", "auroc"), ("steering", "score"), ("steering", "concept")},
                        two_sample=False)


@block("labels")
def labels_table() -> str:
    """Labeling at the middle layer of the default run: label accuracy and F1 (means over labelled features) and
    whether a matched feature's input/output label names its concept (means over concepts)."""
    from bench.report import summary

    summ = summary(_frame(CONCEPTS_RUN))
    summ = summ[summ["task"] == "labeling"]
    middle = _layers(summ)[len(_layers(summ)) // 2]
    names = {"label_accuracy": "label accuracy (features)", "label_f1": "label F1 (features)",
             "label_names_concept": "input label names its concept (concepts)",
             "output_label_names_concept": "output label names its concept (concepts)"}
    rows = []
    for label, g in summ[summ["layer"] == middle].groupby("label", sort=True):
        by = g.set_index("metric")
        rows.append({"method": label, **{title: _cell(by.loc[m]) for m, title in names.items() if m in by.index}})
    return f"Layer {middle}:\n\n" + _markdown(pd.DataFrame(rows))


def _table(run: Path, rows_spec: list[tuple[str, str, str]]) -> str:
    """Rows (metric title, method), columns layers: test-split means with bootstrap 95% CIs, and n per layer."""
    from bench.report import summary

    summ = summary(_frame(run))
    layers = _layers(summ)
    rows = []
    for task, metric, title in rows_spec:
        part = summ[(summ["task"] == task) & (summ["metric"] == metric)]
        for i, (label, g) in enumerate(part.groupby("label", sort=True)):
            cells = {f"L{la}": _cell(r) for la in layers for _, r in g[g["layer"] == la].iterrows()}
            rows.append({"metric": title if i == 0 else "", "method": label, **cells,
                         "n": "/".join(str(int(n)) for n in g.sort_values("layer")["n_scored"])})
    return _markdown(pd.DataFrame(rows).fillna(""))


FEATURE_MAIN = [  # (task, metric, row title) of the default (feature-centric) run's main table
    ("feature_steering", "score", "steering score (mean of best input and output score, 0-2)"),
    ("feature_steering", "best_input_score", "best input score (0-2)"),
    ("feature_steering", "best_output_score", "best output score (0-2)"),
    ("feature_detection", "s_cd_positive", "share of features with S_CD > 0"),
    ("feature_labels", "labelled", "share of labels present"),
]


@block("default-table")
def default_table() -> str:
    """The default run: per method and layer, means over features with bootstrap 95% CIs."""
    return _table(DEFAULT_RUN, FEATURE_MAIN)


@block("default-kl")
def default_kl() -> str:
    """The default run's steering score per KL target (means over features and layers' rows)."""
    from bench.feature_report import by_kl_target

    t = by_kl_target(_frame(DEFAULT_RUN))
    t = t.assign(side=t["metric"].str.replace("_score", ""), cell=[_cell(r) for _, r in t.iterrows()])
    wide = t.pivot(index=["layer", "side", "label"], columns="kl_target", values="cell").fillna("")
    wide.columns = [f"KL {c:g}" for c in wide.columns]
    wide = wide.reset_index().rename(columns={"label": "method"})
    f = _frame(DEFAULT_RUN)
    reached = f[(f["task"] == "feature_steering") & (f["metric"] == "reached")]
    counts = reached.groupby(["layer", "method", "kl_target"])["value"].agg(lambda v: f"{int(v.sum())}/{len(v)}")
    counts = counts.unstack("kl_target")
    counts.columns = [f"KL {c:g}" for c in counts.columns]
    return (_markdown(wide) + "\nCells (feature × sign) whose target the bisection reached; the means above are "
            "over the reached cells only:\n\n" + _markdown(counts.reset_index()))


@block("default-paired")
def default_paired() -> str:
    """Comparisons between methods in the default run (two-sample: each method has its own features)."""
    return _comparisons(DEFAULT_RUN, {("feature_steering", "score"), ("feature_detection", "s_cd")}, two_sample=True,
                        width=True)


@block("default-size")
def default_size() -> str:
    """The default run's sample, counted from its records and samples: per method and layer, the features sampled
    (steered), those with an input label, a steering score and an S_CD (a feature without a label, or whose
    sentences give no S_CD, stays unscored), signs, KL targets, continuations per (feature, sign, target), their
    length (the task's `max_new_tokens`, from the records) and the generations judged."""
    recs = pd.read_json(DEFAULT_RUN / "records.jsonl", lines=True, dtype=False)
    recs["value"] = pd.to_numeric(recs["value"], errors="coerce")
    steer = recs[recs["task"] == "feature_steering"]
    samples = pd.read_json(DEFAULT_RUN / "samples.jsonl", lines=True)
    gens = samples[samples["kind"] == "feature_steering"]
    rows = []
    for (method, layer), g in steer.groupby(["method", "layer"], sort=True):
        mine = gens[(gens["method"] == method) & (gens["layer"] == layer)]
        per_cell = mine.groupby(["feature", "sign", "kl_target"]).size()
        own = recs[(recs["method"] == method) & (recs["layer"] == layer)]

        def scored(task: str, metric: str, own: pd.DataFrame = own) -> int:
            sel = own[(own["task"] == task) & (own["metric"] == metric) & own["value"].notna()]
            if metric.endswith("labelled"):
                sel = sel[sel["value"] > 0]
            return int(sel["feature"].nunique())

        tokens = {int(p["max_new_tokens"]) for p in g["task_params"] if isinstance(p, dict) and "max_new_tokens" in p}
        rows.append({"method": method, "layer": int(layer), "features sampled": int(g["feature"].dropna().nunique()),
                     "with an input label": scored("feature_labels", "input_labelled"),
                     "with a steering score": scored("feature_steering", "score"),
                     "with S_CD": scored("feature_detection", "s_cd"),
                     "signs": int(g["sign"].dropna().nunique()), "KL targets": int(g["kl_target"].dropna().nunique()),
                     "continuations per cell": int(per_cell.max()) if len(per_cell) else 0,
                     "tokens each": ", ".join(str(t) for t in sorted(tokens)),
                     "generations judged": len(mine)})
    return _markdown(pd.DataFrame(rows))


@block("default-labels")
def default_labels() -> str:
    """Example labels of the default run at its middle layer: the first three features of each method."""
    from bench.feature_report import example_labels, labels_markdown

    labels = example_labels([DEFAULT_RUN])
    layers = sorted({int(x) for x in labels["layer"]})
    return labels_markdown(labels[labels["layer"] == layers[len(layers) // 2]], per_method=3)


def _runtime(run: Path) -> str:
    import json

    starts = json.loads((run / "env.json").read_text())["starts"]
    rows = [{"start": s["started"], "status": s.get("status", ""), "wall": f"{s['seconds'] / 60:.1f} min",
             "CPU time": f"{s['cpu_seconds'] / 60:.1f} min" if "cpu_seconds" in s else "n/a",
             "load avg at start / end": (f"{s['load_avg_start'][0]:.1f} / {s['load_avg_end'][0]:.1f}"
                                         if "load_avg_end" in s else "n/a"),
             "cores": s.get("cpu_count", "n/a"),
             "commit": (s.get("featbench_commit") or "")[:7] + (" + uncommitted changes" if s.get("dirty") else "")}
            for s in starts if "seconds" in s]
    return _markdown(pd.DataFrame(rows))


@block("default-runtime")
def default_runtime() -> str:
    """Wall and CPU time of each start of the default run (env.json), then the units' seconds per task and method
    (units.jsonl; a fit unit's seconds are only its record-writing, the fit itself is in its `fit_seconds`)."""
    from bench.results import read_jsonl

    units = pd.DataFrame(read_jsonl(DEFAULT_RUN / "units.jsonl"))
    parts = units["unit"].str.split("|", expand=True)
    units["method"], units["task"] = parts[2], parts[3]
    fits = _frame(DEFAULT_RUN)
    fits = fits[(fits["task"] == "fit") & (fits["metric"] == "fit_seconds")].groupby("method")["value"].sum()
    table = units[units["task"] != "fit"].pivot_table(index="task", columns="method", values="seconds", aggfunc="sum")
    table.loc["fit"] = fits
    table["all methods"] = table.sum(axis=1)
    n_layers = parts[1].nunique()
    table = table.reset_index().rename(columns={"task": f"seconds ({n_layers} layer{'s' * (n_layers > 1)})"})
    return _runtime(DEFAULT_RUN) + "\n" + table.to_markdown(index=False, floatfmt=".0f") + "\n"


@block("concepts-runtime")
def concepts_runtime() -> str:
    """Wall and CPU time of each start of the concept-centric run (env.json)."""
    return _runtime(CONCEPTS_RUN)


@block("dim-sites")
def dim_sites() -> str:
    """DiM detection AUROC at the MLP hidden state (the concept run) and at the residual stream, paired."""
    from bench.report import paired, summary

    frame = _frame(CONCEPTS_RUN, DIM_RESID_RUN)
    frame = frame[(frame["method"] == "dim") & (frame["task"] == "detection")]
    summ = summary(frame)
    summ = summ[summ["metric"] == "auroc"]
    rows = [{"configuration": label, **{f"L{int(r.layer)}": _cell(pd.Series(r._asdict()))
                                         for r in g.itertuples()}} for label, g in summ.groupby("label")]
    table = paired(frame)
    table = table[table["metric"] == "auroc"]
    diffs = [{"layer": int(r.layer), "a − b": f"{r.a} − {r.b}", "n": int(r.n),
              "difference [95% CI]": f"{r.diff:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]",
              "p": _p(r.p_value)} for r in table.itertuples()]
    return _markdown(pd.DataFrame(rows)) + "\n" + _markdown(pd.DataFrame(diffs))


HIERARCHY = ROOT / "results" / "hierarchy"


@block("hierarchy")
def hierarchy_table() -> str:
    """`bench analyze hierarchy --ks 10,20,50 --out results/hierarchy`: the committed coherence table."""
    t = pd.read_csv(HIERARCHY / "hierarchy_coherence.csv")
    return t.to_markdown(index=False, floatfmt=".3f") + "\n"


RECURSIVE = HIERARCHY / "recursive"


@block("hierarchy-recursive-fit")
def hierarchy_recursive_fit() -> str:
    """`bench analyze hierarchy --out results/hierarchy/recursive`: the recursive SNMF fit and the run's time."""
    import json

    s = json.loads((RECURSIVE / "summary.json").read_text())
    m, st = s["fit_metrics"], s["settings"]
    levels = " · ".join(f"level {i + 1}: k = {r}, rel. error {m[f'rel_error_level{i + 1}']:.3f}"
                        for i, r in enumerate(st["ranks"]))
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items())
    return (f"{s['model']} layer {s['layer']}, {s['n_tokens']:,} tokens of {s['n_sentences']} sentences; {levels}.\n"
            f"Stacked reconstruction MSE {m['stack_mse_before']:.4g} before and {m['stack_mse_after']:.4g} after "
            f"{st['fine_tune_steps']} fine-tuning steps (lr {st['fine_tune_lr']:g}). Tree: {s['n_nodes']} nodes, "
            f"{s['n_parents']} parents with 2-4 children, {s['n_families']} parents tested by intervention. "
            f"Wall time {s['wall_seconds'] / 60:.1f} min, CPU time {s['cpu_seconds'] / 60:.1f} min, {s['threads']} "
            f"threads ({secs}).\n")


@block("hierarchy-recursive-groups")
def hierarchy_recursive_groups() -> str:
    """Neuron groups per level of the parent: core and sibling overlap against the permutation null."""
    g = pd.read_csv(RECURSIVE / "neuron_groups.csv")
    g["level"] = g["parent"].str.extract(r"L(\d+):")[0].astype(int)
    rows = [{"parent level": int(lv), "parents": len(t), "children (mean)": f"{t['n_children'].mean():.1f}",
             "support (mean)": f"{t['support_mean'].mean():.1f}",
             "core: observed / null": f"{t['core'].mean():.2f} / {t['core_null'].mean():.2f}",
             "core p < 0.05": f"{(t['core_p'] < 0.05).mean():.0%}",
             "shared (≥ 2): observed / null": f"{t['shared'].mean():.2f} / {t['shared_null'].mean():.2f}",
             "shared p < 0.05": f"{(t['shared_p'] < 0.05).mean():.0%}",
             "exclusive: observed / null": f"{t['exclusive_mean'].mean():.1f} / {t['exclusive_null'].mean():.1f}",
             "sibling Jaccard: observed / null": f"{t['sibling_jaccard'].mean():.3f} / "
                                                 f"{t['sibling_jaccard_null'].mean():.3f}",
             "sibling Jaccard p < 0.05": f"{(t['sibling_jaccard_p'] < 0.05).mean():.0%}"}
            for lv, t in g.groupby("level", sort=False)]
    o = pd.read_csv(RECURSIVE / "level_overlap.csv").dropna(subset=["p"])
    lv_rows = [{"level": int(r.level), "features": int(r.n_features), "sibling pairs": int(r.n_sibling_pairs),
                "sibling Jaccard": f"{r.sibling_jaccard:.3f}", "other pairs": f"{r.other_jaccard:.3f}",
                "null mean [97.5%]": f"{r.null_jaccard:.3f} [{r.null_hi:.3f}]", "p": _p(r.p)}
               for r in o.itertuples()]
    return _markdown(pd.DataFrame(rows)) + "\n" + _markdown(pd.DataFrame(lv_rows))


def _intervention() -> list[dict]:
    """Per tested parent (intervention.csv): its rows by group and, per exclusive group with an own token, whether
    that token rose most (effect = logit change minus the null mean of random neuron sets) and the chance of that."""
    t = pd.read_csv(RECURSIVE / "intervention.csv", keep_default_na=False, na_values=[""])
    t["eff"] = t["logit_change"] - t["null_mean"]
    out = []
    for p, g in t.groupby("parent", sort=False):
        excl = g[g["group"] == "exclusive"]
        owned = [grp for _, grp in excl.groupby("group_child") if (grp["own"].astype(str) == "True").any()]
        out.append({"parent": p, "label": g["parent_label"].iloc[0], "core": g[g["group"] == "core"],
                    "shared": g[g["group"] == "shared"], "exclusive": excl,
                    "tokens": list(dict.fromkeys(g["token"].str.strip())),
                    "wins": [int(grp["eff"].idxmax() in set(grp.index[grp["own"].astype(str) == "True"]))
                             for grp in owned], "chance": [1 / len(grp) for grp in owned]})
    return out


@block("hierarchy-recursive-intervention")
def hierarchy_recursive_intervention() -> str:
    """Per tested parent: the core group's effect on its children's tokens, and whether each exclusive group
    raises its own child's token most (logit change minus the null mean of random neuron sets)."""
    rows = []
    for r in _intervention():
        core, shared, excl, wins = r["core"], r["shared"], r["exclusive"], r["wins"]
        own, sib = excl[excl["own"].astype(str) == "True"], excl[excl["sibling"].astype(str) == "True"]
        rows.append({"parent": f"{r['parent']} ({r['label']})", "children (tokens)": ", ".join(r["tokens"]),
                     "core size": int(core["group_size"].iloc[0]) if len(core) else 0,
                     "core: mean effect": f"{core['eff'].mean():+.3f}" if len(core) else "–",
                     "core: tokens p < 0.05": f"{(core['p'] < 0.05).sum()}/{len(core)}" if len(core) else "–",
                     "shared size": int(shared["group_size"].iloc[0]) if len(shared) else "–",
                     "shared: mean effect": f"{shared['eff'].mean():+.3f}" if len(shared) else "–",
                     "shared: tokens p < 0.05": f"{(shared['p'] < 0.05).sum()}/{len(shared)}" if len(shared) else "–",
                     "exclusive: own / sibling effect": (f"{own['eff'].mean():+.3f} / {sib['eff'].mean():+.3f}"
                                                         if len(own) else "–"),
                     "own token raised most": f"{sum(wins)}/{len(wins)}" if wins else "–"})
    return _markdown(pd.DataFrame(rows))


def _both(values: pd.Series, digits: int) -> str:
    """The values, rounded, each once: "0.005", or "0.005 and 0.006"."""
    return " and ".join(dict.fromkeys(f"{v:.{digits}f}" for v in values))


@block("hierarchy-recursive-findings")
def hierarchy_recursive_findings() -> str:
    """The numbers the prose on the recursive analysis rests on: the fine-tuning's gain, sibling overlap against the
    null, how well nodes detect their concept, how pure the families are, and the intervention's counts."""
    import json

    from bench.hier_concepts import HierConcepts

    s = json.loads((RECURSIVE / "summary.json").read_text())
    tree = {n["id"]: n for n in json.loads((RECURSIVE / "tree.json").read_text())["nodes"]}
    g = pd.read_csv(RECURSIVE / "neuron_groups.csv")
    g["level"] = g["parent"].str.extract(r"L(\d+):")[0].astype(int)
    by = g.groupby("level", sort=True).mean(numeric_only=True).iloc[::-1]  # coarse parents first
    o = pd.read_csv(RECURSIVE / "level_overlap.csv").dropna(subset=["p"])
    auc = np.array([n["auroc"] for n in tree.values()])
    m = s["fit_metrics"]
    parent_of = HierConcepts.load().parent_of
    inter = _intervention()
    tested = [r["parent"] for r in inter]
    purity = []  # (distinct child concepts of the commonest category, children, parent) per tree parent
    for k, n in tree.items():
        kids = [tree[c["id"]]["label"] for c in n["children"]]
        cats = pd.Series([parent_of[x] for x in dict.fromkeys(kids) if x in parent_of], dtype=object)
        if len(kids):
            purity.append((int(cats.value_counts().max()) if len(cats) else 0, len(kids), k))
    most, n_kids, best = min(purity, key=lambda x: (-x[0], tested.index(x[2]) if x[2] in tested else len(tested),
                                                     x[2]))
    pure = sum(1 for d, n, _ in purity if d == n and d >= 2)
    shared = pd.concat([r["shared"] for r in inter])
    core = pd.concat([r["core"] for r in inter])
    wins, chance = [w for r in inter for w in r["wins"]], [c for r in inter for c in r["chance"]]
    levels = " and ".join(f"{r.sibling_jaccard:.3f} at level {int(r.level)}" for r in o.itertuples())
    return (f"- Fine-tuning: stacked reconstruction MSE down {m['stack_mse_before'] / m['stack_mse_after']:.1f}×.\n"
            f"- Siblings: Jaccard {levels}, against {_both(o['null_jaccard'], 3)} under the null; neurons in two or "
            "more siblings " + " and ".join(f"{r.shared:.1f} (level-{lv} parents)" for lv, r in by.iterrows())
            + f" on average, against {_both(by['shared_null'], 1)}; a core in all children "
            + " and ".join(f"{r.core:.2f}" for _, r in by.iterrows()) + " neurons on average.\n"
            f"- Node labels: {((auc >= 0.7) & (auc < 0.9)).mean():.0%} of the {len(auc)} nodes detect their best "
            f"concept with AUROC 0.7-0.9, {(auc >= 0.9).sum()} with 0.9 or more (median {np.median(auc):.2f}).\n"
            f"- Families: {pure} of {len(purity)} parents have all children in one category; the most children of "
            f"one category under a parent is {most} of {n_kids} ({best}: "
            f"{', '.join(tree[c['id']]['label'] for c in tree[best]['children'])}).\n"
            f"- Intervention on {len(inter)} parents: amplifying shared neurons raised a sibling's token beyond "
            f"random neuron sets for {(shared['p'] < 0.05).sum()}/{len(shared)} tokens (p < 0.05), the core (where "
            f"not empty) for {(core['p'] < 0.05).sum()}/{len(core)}; a child's exclusive neurons raised its own "
            f"token most in {sum(wins)} of {len(wins)} groups, against {sum(chance):.1f} by chance.\n")


@block("hierarchy-data")
def hierarchy_data() -> str:
    """The shipped hierarchical concept data: children, categories, sentences."""
    from bench.hier_concepts import HierConcepts

    c = HierConcepts.load()
    per = c.frame.groupby("concept").size()
    each = f"{per.min()}" if per.min() == per.max() else f"{per.min()}-{per.max()}"
    return (f"{len(c.children)} children under {len(c.parents)} categories ({', '.join(c.parents)}), {each} "
            f"sentences each, {len(c.frame)} in all.\n")


PERF = ROOT / "results" / "perf"
_IMPLS = {"featbench": "featbench `snmf`", "fb-mkl": "featbench `snmf`, dense product on torch's default kernel",
          "plain": "the reference's structure, written plainly", "reference": "the paper's `factorization/seminmf.py`"}


@block("perf-snmf")
def perf_snmf() -> str:
    """`bench perf snmf_speed ... --json results/perf/snmf_speed.json`: best of the repeats per implementation."""
    import json

    got = json.loads((PERF / "snmf_speed.json").read_text())
    base = got["best"]["featbench"]
    rows = [{"implementation": _IMPLS.get(impl, impl), "s / iteration": f"{r['s_per_iter']:.3f}",
             "CPU s / iteration": f"{got['cpu_s_per_iter'][impl]:.3f}",
             "× featbench": f"{r['s_per_iter'] / base['s_per_iter']:.1f}",
             f"loss after {got['settings']['iters']} iterations": f"{r['loss']:,.0f}",
             "peak RSS increase": f"{r['peak_bytes'] / 2**20:.0f} MiB"} for impl, r in got["best"].items()]
    st = got["settings"]
    head = (f"n = {got['n']:,} tokens, d = {got['d']:,}, k = {st['k']}, sparsity {st['sparsity']}, "
            f"{st['threads'] or 'default'} thread(s), best of {st['repeats']}:\n\n")
    return head + _markdown(pd.DataFrame(rows))


@block("perf-steer")
def perf_steer() -> str:
    """`bench perf steer_speed --json results/perf/steer_speed.json`: sampling and calibration against baselines."""
    import json

    g = json.loads((PERF / "steer_speed.json").read_text())
    st = g["settings"]
    what = f"sampling, batch {st['batch']} × {st['new_tokens']} tokens"
    stock = ([{"what": what, "baseline": "`generate` (stock model)", "baseline s": f"{g['generate_stock_s']:.1f}",
               "featbench s": f"{g['sample_s']:.1f}", "ratio": f"{g['generate_stock_s'] / g['sample_s']:.2f}×"}]
             if "generate_stock_s" in g else [])  # benchmark outputs before the stock baseline was added
    rows = [*stock, {"what": what, "baseline": "`generate` (featbench's unembedding layout)",
             "baseline s": f"{g['generate_s']:.1f}", "featbench s": f"{g['sample_s']:.1f}",
             "ratio": f"{g['generate_s'] / g['sample_s']:.2f}×"},
            {"what": f"calibration, {st['features']} features × 7 targets × 2 signs", "baseline": "per feature",
             "baseline s": f"{g['per_feature_s']:.0f} (timed on {g['per_feature_rows_timed']} rows)",
             "featbench s": f"{g['batched_s']:.1f}", "ratio": f"{g['per_feature_s'] / g['batched_s']:.1f}×"}]
    head = f"{st['model']} layer {g['layer']}, {g['threads']} threads, {st['device']}:\n\n"
    return head + _markdown(pd.DataFrame(rows), numparse=False)


@block("perf-linear")
def perf_linear() -> str:
    """`bench perf linear_layout --json results/perf/linear_layout.json`: the unembedding's CPU matmul layout."""
    import json

    g = json.loads((PERF / "linear_layout.json").read_text())
    rows = [{"rows × d_in → d_out": f"{r['rows']} × {r['d_in']:,} → {r['d_out']:,}",
             "F.linear ms": f"{r['linear_s'] * 1e3:.1f}", "featbench ms": f"{r['fast_s'] * 1e3:.1f}",
             "ratio": f"{r['linear_s'] / r['fast_s']:.2f}×", "max abs difference": f"{r['max_abs_diff']:.3g}"}
            for r in g["shapes"]]
    sizes = [{"rows of W per product": f"{b['chunk']:,}" + (" (featbench)" if b["chunk"] == g["chunk"] else ""),
              **{f"{k.split('_')[1]} rows, ms": f"{v * 1e3:.1f}" for k, v in b.items() if k.startswith("rows_")}}
             for b in g["chunks"]]
    (s0, s1), (c0, c1) = g["model_step_s"], g["model_score_s"]
    model = [{"forward of gemma-3-270m": "32 rows × 6 tokens, last position's logits", "stock s": f"{s0:.3f}",
              "featbench s": f"{s1:.3f}", "ratio": f"{s0 / s1:.2f}×"},
             {"forward of gemma-3-270m": "16 rows × 30 tokens, every position's logits", "stock s": f"{c0:.3f}",
              "featbench s": f"{c1:.3f}", "ratio": f"{c0 / c1:.2f}×"}]
    head = (f"torch {g['torch']}, {g['threads']} threads; largest logit difference between the two model "
            f"forwards: {g['logit_max_abs_diff']:.3g}\n\n")
    return (head + _markdown(pd.DataFrame(rows)) + "\n" + _markdown(pd.DataFrame(sizes), numparse=False) + "\n"
            + _markdown(pd.DataFrame(model)))


@block("perf-memory")
def perf_memory() -> str:
    """`bench perf fit_memory --json results/perf/fit_memory.json`: peak RSS of streamed fits against data size."""
    import json

    g = json.loads((PERF / "fit_memory.json").read_text())
    st = g["settings"]
    rows = [{"method": r["method"], "tokens": f"{r['n_tokens']:,}", "x (float32)": f"{r['gib_x']:.1f} GiB",
             "peak RSS": f"{r['peak_rss_mib'] / 1024:.2f} GiB", "seconds": f"{r['seconds']:.0f}",
             "note": "refused by the limit: x loaded whole" if r["error"] else
             ("streamed" if r["streamed"] else "x loaded whole")} for r in g["rows"]]
    sizes = sorted({r["n_tokens"] for r in g["rows"]})
    growth = [{"method": m, f"peak RSS growth {sizes[0]:,} → {sizes[-1]:,} tokens":
               "-" if v["growth"] is None else f"{v['growth']:+.1%}",
               "target (< 4 GiB, < +25%)": "met" if v["meets_target"] else "missed"} for m, v in g["summary"].items()]
    head = (f"d = {st['d']:,}, SNMF k = {st['k']} ({st['iters']} iterations), DiM over {8} concepts; each fit in a "
            f"fresh process under RLIMIT_DATA {st['limit_gb']:g} GiB; {st['cpus']} CPUs, {st['mem_total_gib']:g} GiB "
            "RAM:\n\n")
    return head + _markdown(pd.DataFrame(rows)) + "\n" + _markdown(pd.DataFrame(growth))


@block("judge-validation")
def judge_validation() -> str:
    """Agreement of the offline judge with hand labels (committed signals and labels; cross-validated)."""
    from bench.judge_validation import agreement_table

    t = agreement_table()
    names = {"majority_exact": "majority class", "set_majority_exact": "majority of its set",
             "shipped_exact": "judge exact", "shipped_kappa": "judge κ (quadratic)", "cv_exact": "CV exact",
             "cv_kappa": "CV κ"}
    t = t.rename(columns=names)
    for c in names.values():
        t[c] = t[c].map(lambda v: f"{v:.2f}")
    return t.to_markdown(index=False, disable_numparse=True) + "\n"


@block("judge-validation-feature")
def judge_validation_feature() -> str:
    """Agreement of the offline judge's feature-concept rating with hand ratings of (label, text) pairs of the
    default run (committed signals and labels; cross-validated), then the hand × judge counts."""
    from bench.judge_validation_feature import agreement_table, label_counts

    t = agreement_table()
    names = {"n": "labelled pairs", "pairs": "pairs represented", "majority_exact": "majority class",
             "shipped_exact": "judge exact", "shipped_kappa": "judge κ (quadratic)", "cv_exact": "CV exact",
             "cv_kappa": "CV κ"}
    t = t.rename(columns=names)
    for c in list(names.values())[2:]:
        t[c] = t[c].map(lambda v: f"{v:.2f}")
    t["estimate"] = t["estimate"].map({"sample": "labelled pairs as drawn", "run": "whole run (weighted)"})
    counts = [label_counts(weighted=w).rename_axis("hand \\ judge").reset_index() for w in (False, True)]
    return (t.to_markdown(index=False, disable_numparse=True)
            + "\n\nHand rating (rows) × judge rating with the shipped thresholds (columns), labelled pairs:\n\n"
            + _markdown(counts[0]) + "\nThe same weighted to the whole run (estimated pairs):\n\n"
            + _markdown(counts[1]))


@block("labeler-choice")
def labeler_choice() -> str:
    """The offline labeler and prompt chosen by measurement (bench/data/labeler_choice.csv, written by
    `python -m bench.labeler_choice`): per method, how often the label of a concept's best feature names the
    concept against the off-concept baseline, and distinct labels / echoed examples among sampled features."""
    from bench.labeler_choice import ranking, summary

    frame = pd.read_csv(ROOT / "bench" / "data" / "labeler_choice.csv", keep_default_na=False)
    layer = int(frame["layer"].iloc[0])
    names = {"input_lift": "input lift", "output_lift": "output lift", "distinct": "distinct share",
             "echo": "echo share", "lift": "mean lift"}
    rank = ranking(frame).drop(columns="seconds").rename(columns=names)  # seconds depend on the cache and load
    head = (f"Layer {layer}, names the concept = cos(label, description) >= 0.28 (base: against other concepts' "
            "descriptions; constant: the most common label against every description):\n\n")
    return (head + summary(frame).to_markdown(index=False, disable_numparse=True)
            + "\n\nMeans over methods, best first (lift = names rate − base):\n\n"
            + rank.to_markdown(index=False) + "\n")


@block("labeling-labeler-choice")
def labeling_labeler_choice() -> str:
    """The labeling task's offline labeler chosen by measurement (bench/data/labeling_labeler_choice.csv, written by
    `python -m bench.labeling_labeler_choice RUN_DIR...` from one labeling run per labeler): per labeler the means
    over layers and methods and the lift difference to the incumbent with its bootstrap CI, then per unit."""
    from bench.labeling_labeler_choice import OUT, overall, summary
    from tasks.labeling import Labeling

    frame = pd.read_csv(OUT)
    head = (f"Names the concept = cos(label, description) >= {Labeling().concept_threshold}; lift = names its "
            "concept − names another concept, mean over layers, methods, both sides and concepts; distinct and echo "
            "shares of all labelled features; the CI resamples concepts:\n\n")
    return (head + overall(frame).to_markdown(index=False, disable_numparse=True)
            + "\n\nPer layer and method (base: the label against other concepts' descriptions):\n\n"
            + summary(frame).to_markdown(index=False, disable_numparse=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
