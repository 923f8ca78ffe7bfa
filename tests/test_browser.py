"""`bench report --browser`: the static feature browser of small runs (the concept-centric tasks, and the paper's
feature-centric ones), its templates as package data, its data files, HTML escaping, and (when Chromium is
installed: `apt-get install -y chromium`) the rendered page in headless Chromium."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from markupsafe import escape

from bench.browser import environment, write_browser
from bench.cli import main
from bench.results import read_jsonl
from tests.conftest import FIXTURE_CONCEPTS
from tests.test_labeling import fake_grader

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with detection, steering and labeling for dim and snmf, judged by the fake labeling judge."""
    out = tmp_path_factory.mktemp("run") / "r"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr("bench.judge.make_judge", lambda spec, **_: fake_grader())
        assert main(["run", "--models", "tiny:llama", "--layers", "0,1", "--methods", "dim,snmf",
                     "--tasks", "detection,steering,labeling", "-M", "snmf.n_features=8", "-M", "snmf.max_iter=20",
                     "-T", "labeling.max_features=2", "-T", "labeling.sources=train,test",
                     "-T", "steering.max_new_tokens=4", "-T", "steering.factors=[1.0]",
                     "--concepts", str(FIXTURE_CONCEPTS), "--judge", "fake", "--out", str(out)]) == 0
    return out


def _chunks(folder: Path) -> dict[str, dict[str, str]]:
    """Feature detail panes of every data/*.js file: {file stem: {feature: HTML}}."""
    out = {}
    for p in sorted((folder / "data").glob("*.js")):
        m = re.fullmatch(r'FB\.add\("([^"]+)",(\d+),(.*)\);\n', p.read_text(encoding="utf-8"), re.DOTALL)
        assert m, f"{p.name} is not a FB.add(...) call"
        out[p.stem] = json.loads(m.group(3))
    return out


def test_report_browser_writes_linked_pages_with_everything_in_the_run(run_dir: Path) -> None:
    assert main(["report", str(run_dir), "--browser"]) == 0
    site = run_dir / "browser"
    index = (site / "index.html").read_text(encoding="utf-8")
    pages = sorted(p.name for p in site.glob("*.html") if p.name != "index.html")
    assert pages == ["tiny_llama-L0-dim.html", "tiny_llama-L0-snmf.html", "tiny_llama-L1-dim.html",
                     "tiny_llama-L1-snmf.html"]
    assert all(f'href="{p}"' in index for p in pages)
    page = (site / "tiny_llama-L1-snmf.html").read_text(encoding="utf-8")
    for link in ("index.html", "tiny_llama-L1-dim.html", "tiny_llama-L0-snmf.html"):
        assert f'href="{link}"' in page
    assert "http://" not in page + index and "https://" not in page + index, "no external resources"
    rows = [r for r in read_jsonl(run_dir / "samples.jsonl") if r.get("kind") == "labeling" and r["method"] == "snmf"
            and r["layer"] == 1]
    for r in rows:
        assert f'data-f="{r["feature"]}"' in page
        if r["label"]:
            assert r["label"] in page
    details = _chunks(site)["tiny_llama-L1-snmf-0"]
    assert {int(f) for f in details} >= {r["feature"] for r in rows}
    for r in rows:
        pane = details[str(r["feature"])]
        assert f"<h2>Feature {r['feature']}" in pane
        if r["label"]:
            assert str(escape(r["label"])) in pane
    steered = [p for p in details.values() if "Steering toward" in p]
    assert steered, "matched features carry their steering samples"
    assert "unsteered (alpha 0)" in steered[0] and re.search(r"at alpha (\d+\.\d+)", steered[0])
    assert float(re.search(r"at alpha (\d+\.\d+)", steered[0]).group(1)) > 0
    top = next(p for p in details.values() if "contexts (darker = more active)" in p)
    assert 'class="t' in top and 'style="background: rgba(255, 120, 0' in top, "activating tokens are highlighted"
    assert "Output side: tokens the direction promotes" in top and "… and suppresses" in top


def test_browser_splits_details_into_chunks(run_dir: Path, tmp_path: Path) -> None:
    write_browser([run_dir], tmp_path / "b", chunk=2)
    chunks = _chunks(tmp_path / "b")
    dim = {k: v for k, v in chunks.items() if k.startswith("tiny_llama-L0-dim-")}
    assert len(dim) == 2 and all(len(v) <= 2 for v in dim.values())  # 3 dim features (one per concept)
    page = (tmp_path / "b" / "tiny_llama-L0-dim.html").read_text(encoding="utf-8")
    assert page.count('data-chunk="1"') == 1
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        write_browser([run_dir], tmp_path / "c", chunk=0)


def _chromium(url: str, tmp_path: Path, *flags: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=1200,900", "--virtual-time-budget=5000", *flags, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_browser_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    site = run_dir / "browser"
    if not site.exists():
        write_browser([run_dir], site)
    rows = [r for r in read_jsonl(run_dir / "samples.jsonl") if r.get("kind") == "labeling" and r["method"] == "snmf"
            and r["layer"] == 0 and r["matched"] and not r["dead"]]
    f = rows[0]["feature"]
    url = f"{(site / 'tiny_llama-L0-snmf.html').as_uri()}#f={f}"
    dom = _chromium(url, tmp_path, "--dump-dom")
    text = re.sub(r"<[^>]+>", " ", dom)
    assert f"Feature {f}" in text, "the detail pane was rendered from the data chunk"
    assert "Top " in text and "contexts" in text and rows[0]["label"] in text
    assert "Output side" in text and "Detection scoring" in text
    assert "Steering toward" in text and "unsteered (alpha 0)" in text
    assert rows[0]["matched"][0]["concept"] in text
    assert 'style="background: rgba(255, 120, 0' in dom, "activating tokens are highlighted"
    shot = tmp_path / "feature.png"
    _chromium(url, tmp_path, f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 20_000
    index = _chromium((site / "index.html").as_uri(), tmp_path, "--dump-dom")
    assert "featbench feature browser" in index and "tiny_llama-L0-snmf.html" in index


# ------------------------------------------------------------------------------------------ feature-centric tasks
@pytest.fixture(scope="module")
def fc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of the paper's feature-centric tasks (labels, steering at two KL targets, one out of reach, and
    detection) for dim and snmf, judged by the fake judge."""
    out = tmp_path_factory.mktemp("fc") / "r"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(["run", "--models", "tiny:gpt2", "--layers", "1", "--methods", "dim,snmf", "--tasks",
                     "feature_labels,feature_steering,feature_detection", "-M", "snmf.n_features=4",
                     "-M", "snmf.max_iter=20", "-T", "feature_labels.max_features=2",
                     "-T", "feature_steering.max_features=2", "-T", "feature_detection.max_features=2",
                     "-T", "feature_steering.kl_targets=0.002,50.0", "-T", "feature_steering.kl_tolerance=0.001",
                     "-T", "feature_steering.n_samples=1", "-T", "feature_steering.max_new_tokens=4",
                     "--concepts", str(FIXTURE_CONCEPTS), "--judge", "fake", "--out", str(out)]) == 0
    return out


def _kind(run: Path, kind: str, method: str = "snmf") -> list[dict]:
    return [r for r in read_jsonl(run / "samples.jsonl") if r.get("kind") == kind and r["method"] == method]


def test_feature_centric_pages_show_labels_steering_and_detection(fc_run: Path) -> None:
    assert main(["report", str(fc_run), "--browser"]) == 0
    site = fc_run / "browser"
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "labels present" in index and "steering score" in index and "S_CD &gt; 0" in index
    page = (site / "tiny_gpt2-L1-snmf.html").read_text(encoding="utf-8")
    assert ">steer</th>" in page and ">S_CD</th>" in page and ">acc</th>" not in page, "feature-centric columns only"
    panes = _chunks(site)["tiny_gpt2-L1-snmf-0"]
    labels = _kind(fc_run, "feature_label")
    assert labels and {str(r["feature"]) for r in labels} <= set(panes)
    for r in labels:
        pane, f = panes[str(r["feature"])], r["feature"]
        assert f'data-f="{f}"' in page
        for tag, key in (("input label", "input_label"), ("output label +", "output_label_pos"),
                         ("output label −", "output_label_neg")):
            shown = re.search(f'<span class="tag">{re.escape(tag)}</span>(.*?)</p>', pane).group(1)
            assert shown == (str(escape(r[key])) if r[key] else '<span class="unlabelled">unlabelled</span>')
        top = r["top_tokens"][0]
        assert f"Top {len(r['top_tokens'])} activating tokens" in pane and str(escape(top["context"][:5])) in pane
        assert f"{top['activation']:.3f}" in pane and "<mark" in pane
        assert "the vocabulary the direction promotes (+)" in pane and "suppresses (−)" in pane
        assert str(escape(json.dumps(r["vocab_pos"][0][0], ensure_ascii=False))) in pane
    for r in _kind(fc_run, "feature_steering"):
        pane = panes[str(r["feature"])]
        sign = "+" if r["sign"] > 0 else "−"
        block = pane[pane.index(f"<h3>Steering {sign}alpha"):]
        assert f"KL target {r['kl_target']} · alpha {r['alpha']:.2f} · reached KL {r['kl']:.4f}" in block
        assert str(escape(r["continuation"])) in block and str(escape(r["prompt"])) in block
        assert "KL target 50.0 · <span class=\"bad\">not reached</span>" in block, "the unreached target is shown"
        assert "fluency" in block and "judge answers" in block
    for r in _kind(fc_run, "feature_detection"):
        pane = panes[str(r["feature"])]
        head = f"Concept detection: S_CD {r['s_cd']:.3f}" if r["s_cd"] is not None else "Concept detection: S_CD –"
        assert head in pane
        for mode in ("activating", "neutral"):
            for text, cos in zip(r[f"{mode}_sentences"], r[f"{mode}_cosine"], strict=True):
                assert f"<tr><td>{escape(text)}</td><td class=\"n\">{cos:.3f}</td>" in pane


def test_feature_pages_escape_html_and_mark_unlabelled(fc_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    shutil.copytree(fc_run, run, ignore=shutil.ignore_patterns("browser"))
    evil = "<script>alert('x')</script>"
    rows = list(read_jsonl(run / "samples.jsonl"))
    first = {}
    for r in rows:
        if r["method"] != "snmf" or r.get("kind") not in ("feature_label", "feature_steering", "feature_detection"):
            continue
        if first.setdefault(r["kind"], r) is not r:
            continue
        if r["kind"] == "feature_label":
            r["input_label"], r["output_label_neg"] = None, evil
            r["top_tokens"][0]["context"] = evil + " " + r["top_tokens"][0]["context"]
        elif r["kind"] == "feature_steering":
            r["continuation"] = evil
        else:
            r["activating_sentences"][0] = evil
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    write_browser([run], run / "browser")
    panes = _chunks(run / "browser")["tiny_gpt2-L1-snmf-0"]
    joined = "".join(panes.values()) + (run / "browser" / "tiny_gpt2-L1-snmf.html").read_text(encoding="utf-8")
    assert "<script>alert" not in joined
    safe = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    for r in first.values():
        assert safe in panes[str(r["feature"])], r["kind"]
    label_pane = panes[str(first["feature_label"]["feature"])]
    assert '<span class="tag">input label</span><span class="unlabelled">unlabelled</span>' in label_pane
    page = (run / "browser" / "tiny_gpt2-L1-snmf.html").read_text(encoding="utf-8")
    assert '<td class="label">unlabelled</td>' in page


def test_templates_are_package_data() -> None:
    """Every template and static file is matched by pyproject's package-data, so a non-editable install ships it,
    and the browser's jinja2 environment (autoescaping) finds the templates through the package."""
    root = Path(__file__).parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["bench"]
    files = [p.relative_to(root / "bench").as_posix() for p in (root / "bench" / "templates").iterdir()
             if p.is_file()]
    assert {"templates/browser.css", "templates/browser.js"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), f"{name} is not package data"
    env = environment()
    assert {"base.html.j2", "index.html.j2", "unit.html.j2", "feature.html.j2"} <= set(env.list_templates())
    assert "&lt;b&gt;" in env.get_template("base.html.j2").render(title="<b>")
    assert resources.files("bench").joinpath("templates", "browser.js").read_text("utf-8").startswith('"use strict"')


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_feature_centric_page_renders_in_headless_chromium(fc_run: Path, tmp_path: Path) -> None:
    site = tmp_path / "b"
    write_browser([fc_run], site)
    r = _kind(fc_run, "feature_steering")[0]
    dom = _chromium(f"{(site / 'tiny_gpt2-L1-snmf.html').as_uri()}#f={r['feature']}", tmp_path, "--dump-dom")
    text = re.sub(r"<[^>]+>", " ", dom)
    assert f"Feature {r['feature']}" in text and "activating tokens (input side)" in text
    assert "Steering +alpha" in text and "Steering −alpha" in text and "Concept detection: S_CD" in text
