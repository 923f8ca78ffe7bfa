"""A static HTML feature browser for run directories and feature trees: `bench report DIR... --browser`.

Everything comes from the directories: records.jsonl (scores, matched concepts) and samples.jsonl. Concept-centric
tasks: the labeling task's contexts with per-token activations, output tokens, labels and judge answers; the steering
task's generations. Feature-centric tasks (the paper's): `feature_label` rows (input-side label, output-side label per
sign, top activating tokens with contexts, vocabulary lists), `feature_steering` generations (per sign and KL target:
alpha, reached KL, texts and ratings) and `feature_detection` sentences with the feature's responses (S_CD). A
hierarchy output of `bench analyze hierarchy` (a folder with tree.json) adds its feature tree (`bench.browser_tree`).

The pages are jinja2 templates shipped as package data (`bench/templates/*.html.j2`, autoescaped, with browser.css
and browser.js, copied from there into every site; `bench.pages`). The site needs no server and no network:

    browser/index.html            every (model, layer, method) with its mean scores, and every feature tree
    browser/<unit>.html           one page per unit: a compact, filterable, sortable feature list
    browser/data/<unit>-<k>.js    feature detail panes (pre-rendered HTML) in chunks of `chunk` features, loaded on
                                  demand by a <script> tag
    browser/browser.css, browser.js

Opening `<unit>.html#f=12` shows feature 12.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from bench.pages import copy_static, environment, write_panes
from bench.pages import num as _num
from bench.results import load, read_jsonl, unique_dirs

log = logging.getLogger(__name__)
Unit = tuple[str, str, int, str]  # (run_id, model, layer, method)
KINDS = ("labeling", "steering", "feature_label", "feature_steering", "feature_detection")
FEATURE_TASKS = ("feature_labels", "feature_steering", "feature_detection")


def write_browser(dirs: Sequence[str | Path], out: Path, chunk: int = 100) -> Path:
    """Write the browser for run directories and hierarchy outputs `dirs` into `out` (replacing a previous one);
    return index.html."""
    from bench import browser_tree

    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    trees = browser_tree.find(dirs)
    runs = [d for d in unique_dirs(dirs) if (d / "records.jsonl").is_file() or not browser_tree.find([d])]
    frame = load(runs) if runs else pd.DataFrame()
    if runs and frame.empty:
        raise ValueError(f"no records in {', '.join(map(str, runs))}; run `bench run` first")
    samples = _samples(runs)
    units = _units(frame, samples) if runs else {}
    many_runs = len({u[0] for u in units}) > 1
    env = environment()
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    copy_static(out)
    slugs = {u: _slug(u, many_runs) for u in units}
    summaries = []
    for unit, info in units.items():
        recs = _unit_records(frame, unit)
        features = _features(unit, recs, samples)
        summary = _summary(unit, info, features, recs, slugs[unit])
        summaries.append(summary)
        _write_unit(env, out, unit, summary, features, slugs, chunk)
    tree_pages = browser_tree.write(env, out, trees, chunk)
    index = out / "index.html"
    index.write_text(env.get_template("index.html.j2").render(
        title="featbench feature browser", summaries=summaries, many_runs=many_runs, trees=tree_pages,
        concept_centric=any(s["concept_centric"] for s in summaries),
        feature_centric=any(s["feature_centric"] for s in summaries)), encoding="utf-8")
    log.info("browser: %d units, %d features, %d feature trees in %s", len(units),
             sum(s["n"] for s in summaries), len(tree_pages), out)
    return index


# ----------------------------------------------------------------------------------------------- data
def _samples(dirs: Sequence[str | Path]) -> dict[Unit, dict[str, list[dict[str, Any]]]]:
    """samples.jsonl rows by unit and kind (`KINDS`)."""
    out: dict[Unit, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for d in dirs:
        run_id = _run_id(Path(d))
        for row in read_jsonl(Path(d) / "samples.jsonl"):
            if row.get("kind") in KINDS:
                out[(run_id, row["model"], int(row["layer"]), row["method"])][row["kind"]].append(row)
    return out


def _run_id(d: Path) -> str:
    config = d / "config.json"
    return json.loads(config.read_text()).get("run_id", d.name) if config.exists() else d.name


def _units(frame: pd.DataFrame, samples: dict[Unit, Any]) -> dict[Unit, dict[str, Any]]:
    units: dict[Unit, dict[str, Any]] = {}
    for (run_id, model, layer, method), g in frame.groupby(["run_id", "model", "layer", "method"], sort=True):
        units[(str(run_id), str(model), int(layer), str(method))] = {"site": str(g["site"].iloc[0])}
    for unit in samples:
        units.setdefault(unit, {"site": ""})
    return dict(sorted(units.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3], kv[0][0])))


def _unit_records(frame: pd.DataFrame, unit: Unit) -> pd.DataFrame:
    run_id, model, layer, method = unit
    return frame[(frame["run_id"] == run_id) & (frame["model"] == model) & (frame["layer"] == layer)
                 & (frame["method"] == method)]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _features(unit: Unit, recs: pd.DataFrame,
              samples: dict[Unit, dict[str, list[dict[str, Any]]]]) -> dict[int, dict[str, Any]]:
    """feature -> details: labeling row, matched concepts with detection AUROC, steering pairs, and the
    feature-centric labels (`fc_label`), steering groups (`fc_steering`) and detection (`fc_detection`)."""
    rows = samples.get(unit, {})
    feats: dict[int, dict[str, Any]] = {}

    def feat(f: int) -> dict[str, Any]:
        return feats.setdefault(f, {"feature": f, "matched": []})

    for row in rows.get("labeling", []):
        keep = {k: v for k, v in row.items() if k not in ("model", "layer", "method", "task", "kind", "site")}
        feats[int(row["feature"])] = {**keep, "labeling": True, "matched": list(row.get("matched", []))}
    if "feature" in recs:
        det = recs[(recs["task"] == "detection") & recs["feature"].notna()]
        for r in det.itertuples():
            f = feat(int(r.feature))
            m = next((m for m in f["matched"] if m["concept"] == r.concept), None)
            if m is None:
                m = {"concept": r.concept}
                f["matched"].append(m)
            m["train_auroc" if r.split == "train" else "test_auroc"] = _num(r.value)
    _concept_steering(rows.get("steering", []), feat)
    for row in rows.get("feature_label", []):
        feat(int(row["feature"]))["fc_label"] = row
    _feature_steering(recs, rows.get("feature_steering", []), feats, feat)
    _feature_detection(recs, rows.get("feature_detection", []), feat)
    return dict(sorted(feats.items()))


def _concept_steering(steering: list[dict[str, Any]], feat: Any) -> None:
    """The concept-centric steering task's chosen-alpha generations next to alpha = 0, per (feature, concept)."""
    by_key: dict[tuple[int, str], dict[str, Any]] = {}
    base = {(r["concept"], r["instruction"]): r for r in steering
            if r.get("split") == "test" and not r.get("alpha")}
    for r in steering:
        if r.get("split") != "test" or not r.get("chosen") or not r.get("alpha"):
            continue
        entry = by_key.setdefault((int(r["feature"]), r["concept"]), {
            "concept": r["concept"], "alpha": r["alpha"], "factor": r.get("factor"), "kl_target": r.get("kl_target"),
            "pairs": []})
        b = base.get((r["concept"], r["instruction"]), {})
        entry["pairs"].append({"instruction": r["instruction"], "steered": r.get("output"), "score": r.get("score"),
                               "ratings": r.get("ratings"), "base": b.get("output"), "score_base": b.get("score"),
                               "ratings_base": b.get("ratings")})
    for (feature, _), entry in by_key.items():
        f = feat(feature)
        f.setdefault("steering", []).append(entry)
        if not any(m["concept"] == entry["concept"] for m in f["matched"]):
            f["matched"].append({"concept": entry["concept"]})


def _sign(value: Any) -> int | None:
    v = _num(value)
    return None if v is None else (1 if v > 0 else -1)


def _feature_steering(recs: pd.DataFrame, rows: list[dict[str, Any]], feats: dict[int, dict[str, Any]],
                      feat: Any) -> None:
    """`fc_steering`: per sign (+ first) the best scores and, per KL target, alpha, reached KL, the mean ratings and
    the generations; targets no alpha reached come from the records."""
    cells: dict[tuple[int, int, float], dict[str, Any]] = {}
    best: dict[tuple[int, int], dict[str, Any]] = {}
    if "feature" in recs:
        got = recs[(recs["task"] == "feature_steering") & recs["feature"].notna()]
        for r in got.itertuples():
            f, s, target = int(r.feature), _sign(r.sign), _num(r.kl_target)
            if s is None:
                continue
            if r.metric in ("best_input_score", "best_output_score", "score"):
                b = best.setdefault((f, s), {})
                b[r.metric] = _num(r.value)
                if r.metric != "score":
                    b[r.metric.replace("_score", "_target")] = target
            elif target is not None:
                cells.setdefault((f, s, target), {"means": {}})["means"][r.metric] = _num(r.value)
    for row in rows:
        key = (int(row["feature"]), _sign(row.get("sign")) or 1, float(row["kl_target"]))
        cell = cells.setdefault(key, {"means": {}})
        cell.setdefault("samples", []).append(row)
        cell.setdefault("alpha", row.get("alpha"))
        cell.setdefault("kl", row.get("kl"))
    groups: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for (f, s, target), cell in sorted(cells.items()):
        means = cell["means"]
        reached = means.pop("reached", None)
        groups[(f, s)].append({
            "kl_target": target, "reached": bool(reached) if reached is not None else bool(cell.get("samples")),
            "alpha": means.pop("alpha", None) if cell.get("alpha") is None else cell["alpha"],
            "kl": means.pop("kl", None) if cell.get("kl") is None else cell["kl"],
            "means": {k: v for k, v in means.items() if k not in ("alpha", "kl")}, "samples": cell.get("samples", [])})
    for (f, s) in sorted(set(groups) | set(best), key=lambda k: (k[0], -k[1])):
        label = feats.get(f, {}).get("fc_label")
        sample = next((r for t in groups.get((f, s), []) for r in t["samples"]), None)
        if label is not None:
            inp, out = label.get("input_label"), label.get("output_label_pos" if s > 0 else "output_label_neg")
        else:
            inp, out = ((sample or {}).get("labels") or {}).get("input"), ((sample or {}).get("labels") or {}).get(
                "output")
        feat(f).setdefault("fc_steering", []).append({
            "sign": s, "sign_text": "+" if s > 0 else "−", "input_label": inp, "output_label": out,
            "targets": groups.get((f, s), []), **{"best_input_score": None, "best_output_score": None,
                                                  "score": None, "best_input_target": None,
                                                  "best_output_target": None, **best.get((f, s), {})}})


def _feature_detection(recs: pd.DataFrame, rows: list[dict[str, Any]], feat: Any) -> None:
    """`fc_detection`: S_CD, the two means, and the activating and neutral sentences with their responses."""
    scores: dict[int, dict[str, float | None]] = defaultdict(dict)
    if "feature" in recs:
        got = recs[(recs["task"] == "feature_detection") & recs["feature"].notna()]
        for r in got.itertuples():
            scores[int(r.feature)][str(r.metric)] = _num(r.value)
    for row in rows:
        f = int(row["feature"])
        sentences = {}
        for mode in ("activating", "neutral"):
            texts = row.get(f"{mode}_sentences") or []
            stats = {s: row.get(f"{mode}_{s}") or [] for s in ("cosine", "r2", "corr", "mse")}
            sentences[mode] = [{"text": t, **{s: v[i] if i < len(v) else None for s, v in stats.items()}}
                               for i, t in enumerate(texts)]
        means = {m: _mean([s["cosine"] for s in sentences[m]]) for m in ("activating", "neutral")}
        got = scores.get(f, {})
        feat(f)["fc_detection"] = {
            "label": row.get("label"), "s_cd": got.get("s_cd", row.get("s_cd")), "sentences": sentences,
            "mean_activating": got.get("mean_activating", means["activating"]),
            "mean_neutral": got.get("mean_neutral", means["neutral"])}
    for f, got in scores.items():
        d = feat(f)
        d.setdefault("fc_detection", {"label": (d.get("fc_label") or {}).get("input_label"), "s_cd": got.get("s_cd"),
                                      "mean_activating": got.get("mean_activating"),
                                      "mean_neutral": got.get("mean_neutral"),
                                      "sentences": {"activating": [], "neutral": []}})


def _metric_mean(recs: pd.DataFrame, task: str, metric: str) -> float | None:
    if recs.empty:
        return None
    return _mean([_num(v) for v in recs[(recs["task"] == task) & (recs["metric"] == metric)]["value"]])


def _summary(unit: Unit, info: dict[str, Any], feats: dict[int, dict[str, Any]], recs: pd.DataFrame,
             slug: str) -> dict[str, Any]:
    run_id, model, layer, method = unit
    names = [v for f in feats.values() for v in (f.get("names_concept") or {}).values()]
    fc_labels = [f["fc_label"] for f in feats.values() if f.get("fc_label")]
    return {"unit": unit, "run_id": run_id, "model": model, "layer": layer, "method": method, "site": info["site"],
            "slug": slug, "n": len(feats),
            "labelled": sum(1 for f in feats.values()
                            if f.get("label") or (f.get("fc_label") or {}).get("input_label")),
            "concept_centric": any(f.get("labeling") or f.get("matched") or f.get("steering") for f in feats.values()),
            "feature_centric": any(f.get(k) for f in feats.values() for k in ("fc_label", "fc_steering",
                                                                             "fc_detection")),
            "accuracy": _mean([f.get("accuracy") for f in feats.values()]),
            "f1": _mean([f.get("f1") for f in feats.values()]),
            "names": _mean(names),
            "labels_present": _metric_mean(recs, "feature_labels", "labelled") or _mean(
                [sum(r.get(k) is not None for k in ("input_label", "output_label_pos", "output_label_neg")) / 3
                 for r in fc_labels]),
            "steering_score": _metric_mean(recs, "feature_steering", "score"),
            "s_cd_positive": _metric_mean(recs, "feature_detection", "s_cd_positive"),
            "labeler": next((f["labeler"] for f in feats.values() if f.get("labeler")), ""),
            "scorer": next((f["scorer"] for f in feats.values() if f.get("scorer")), "")}


def _slug(unit: Unit, with_run: bool) -> str:
    run_id, model, layer, method = unit
    text = f"{model}-L{layer}-{method}" + (f"-{run_id}" if with_run else "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


# ----------------------------------------------------------------------------------------------- pages
def _row(f: int, d: dict[str, Any], i: int, chunk: int) -> dict[str, Any]:
    """The unit list's row of feature `f`."""
    fc = d.get("fc_label")
    label = d.get("label") or (("(dead: never active)" if d.get("dead") else None) if d.get("labeling") else None)
    if not label and fc is not None:
        label = fc.get("input_label") or "unlabelled"
    output = d.get("output_label")
    if not output and fc is not None:
        output = f"+ {fc.get('output_label_pos') or 'unlabelled'} · − {fc.get('output_label_neg') or 'unlabelled'}"
    scores = [g["score"] for g in d.get("fc_steering", [])]
    return {"f": f, "chunk": i // chunk, "input": label or "–", "output": output or "–",
            "accuracy": d.get("accuracy"), "f1": d.get("f1"),
            "concepts": ", ".join(m["concept"] for m in d.get("matched", [])),
            "steering": _mean(scores), "s_cd": (d.get("fc_detection") or {}).get("s_cd")}


def _write_unit(env: jinja2.Environment, out: Path, unit: Unit, summary: dict[str, Any],
                feats: dict[int, dict[str, Any]], slugs: dict[Unit, str], chunk: int) -> None:
    run_id, model, layer, method = unit
    slug = slugs[unit]
    write_panes(env, out, slug, feats, chunk)
    siblings = [{"slug": s, "text": f"{other[3]} L{other[2]}"} for other, s in slugs.items()
                if other[0] == run_id and other[1] == model and (other[2] == layer) != (other[3] == method)]
    page = env.get_template("unit.html.j2").render(
        title=f"{method} · {model} · layer {layer}", unit_slug=slug, s=summary, siblings=siblings,
        rows=[_row(f, d, i, chunk) for i, (f, d) in enumerate(feats.items())],
        has_steering=any(d.get("fc_steering") for d in feats.values()),
        has_detection=any(d.get("fc_detection") for d in feats.values()))
    (out / f"{slug}.html").write_text(page, encoding="utf-8")

