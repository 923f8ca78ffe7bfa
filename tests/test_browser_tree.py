"""The feature tree of `bench analyze hierarchy` in the feature browser: `bench report HDIR --browser` (alone, and
next to a run directory) gives every recursive-SNMF feature a page with its label, top contexts and neuron support,
whose parent and child links, like the tree page's, resolve to existing pages and features."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from markupsafe import escape

from bench.cli import main
from tests.test_browser import CHROMIUM, _chromium, _chunks


@pytest.fixture(scope="module")
def hier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recursive hierarchy analysis (ranks 12, 6, 3) of tiny:gpt2 layer 1."""
    out = tmp_path_factory.mktemp("hier") / "recursive"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(["analyze", "hierarchy", "--model", "tiny:gpt2", "--layer", "1", "--ranks", "12,6,3",
                     "--sparsity", "0.2", "--max-iter", "20", "--fine-tune-steps", "5", "--out", str(out)]) == 0
    return out


def _links(html: str) -> list[tuple[str, str]]:
    """(page, fragment) of every local link."""
    return [(m.group(1), m.group(2) or "") for m in re.finditer(r'href="([^"#:]*)(?:#([^"]*))?"', html)]


def _resolves(site: Path, page: str, fragment: str) -> bool:
    """`page` exists in `site` and shows `fragment`: a feature row (f=N) or an element id."""
    if not page or not (site / page).is_file():
        return False
    text = (site / page).read_text(encoding="utf-8")
    if fragment.startswith("f="):
        return f'data-f="{fragment[2:]}"' in text
    return not fragment or f'id="{fragment}"' in text


def test_tree_features_get_pages_linked_to_their_parents_and_children(hier_dir: Path, tmp_path: Path) -> None:
    assert main(["report", str(hier_dir), "--browser", "--out", str(tmp_path)]) == 0
    site = tmp_path / "browser"
    tree = json.loads((hier_dir / "tree.json").read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in tree["nodes"]}
    assert sum(1 for n in nodes.values() if n["children"]) > 0, "the tiny fit has a tree"
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="tiny_gpt2-L1-tree.html"' in index and "Feature trees" in index
    assert {p.name for p in site.glob("*.html")} == {"index.html", "tiny_gpt2-L1-tree.html",
                                                     *(f"tiny_gpt2-L1-tree-level{lv}.html" for lv in (1, 2, 3))}
    assert (site / "browser.css").is_file() and (site / "browser.js").is_file()
    panes = _chunks(site)
    for n in nodes.values():
        slug = f"tiny_gpt2-L1-tree-level{n['level']}"
        assert f'data-f="{n["feature"]}"' in (site / f"{slug}.html").read_text(encoding="utf-8")
        pane = panes[f"{slug}-0"][str(n["feature"])]
        assert f"Feature {n['feature']} · {n['id']}" in pane and str(escape(n["label"])) in pane
        assert f"Neuron support: {len(n['support'])} neurons" in pane
        assert all(f"<span>{i}</span>" in pane for i in n["support"])
        if n["top_contexts"]:
            top = n["top_contexts"][0]
            assert f"Top {len(n['top_contexts'])} contexts" in pane and f"{top['code']:.3f}" in pane
            assert f"<mark>{escape(top['context'].split('[[')[1].split(']]')[0])}</mark>" in pane.replace(
                re.search(r"<mark[^>]*>", pane).group(0), "<mark>")
        links = _links(pane)
        for edge, kind in [(p, "parents") for p in n["parents"]] + [(c, "children") for c in n["children"]]:
            other = nodes[edge["id"]]
            target = (f"tiny_gpt2-L1-tree-level{other['level']}.html", f"f={other['feature']}")
            assert target in links, f"{n['id']} does not link its {kind[:-1]} {other['id']}"
        for page, fragment in links:
            assert _resolves(site, page, fragment), f"{n['id']}: {page}#{fragment} does not resolve"
    page = (site / "tiny_gpt2-L1-tree.html").read_text(encoding="utf-8")
    for root in tree["roots"]:
        assert f'id="{root}"' in page
    links = _links(page)
    assert {(f"tiny_gpt2-L1-tree-level{n['level']}.html", f"f={n['feature']}") for n in nodes.values()} <= set(links)
    for p, fragment in links:
        assert _resolves(site, p, fragment), f"tree page: {p}#{fragment} does not resolve"
    level = (site / "tiny_gpt2-L1-tree-level2.html").read_text(encoding="utf-8")
    assert all(_resolves(site, p, f) for p, f in _links(level) if p)


def test_analyze_writes_the_browser_and_report_joins_trees_with_runs(hier_dir: Path, tmp_path: Path) -> None:
    own = hier_dir / "browser"
    assert (own / "tiny_gpt2-L1-tree.html").is_file() and (own / "index.html").is_file()
    run = tmp_path / "run"
    run.mkdir()
    rec = {"run_id": "r", "model": "tiny:gpt2", "layer": 1, "site": "mlp@1", "method": "dim", "task": "detection",
           "metric": "auroc", "value": 0.7, "concept": "a", "split": "test"}
    (run / "records.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
    assert main(["report", str(run), str(hier_dir.parent), "--browser", "--out", str(tmp_path / "both")]) == 0
    index = (tmp_path / "both" / "browser" / "index.html").read_text(encoding="utf-8")
    assert 'href="tiny_gpt2-L1-dim.html"' in index and 'href="tiny_gpt2-L1-tree.html"' in index
    assert (tmp_path / "both" / "leaderboard.md").is_file()
    assert main(["report", str(hier_dir)]) == 2, "a tree without records needs --browser"


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_tree_feature_page_renders_in_headless_chromium(hier_dir: Path, tmp_path: Path) -> None:
    tree = json.loads((hier_dir / "tree.json").read_text(encoding="utf-8"))
    n = next(n for n in tree["nodes"] if n["parents"] and n["children"])
    page = hier_dir / "browser" / f"tiny_gpt2-L1-tree-level{n['level']}.html"
    url = f"{page.as_uri()}#f={n['feature']}"
    text = re.sub(r"<[^>]+>", " ", _chromium(url, tmp_path, "--dump-dom"))
    assert f"Feature {n['feature']} · {n['id']}" in text and "Neuron support" in text
    assert n["parents"][0]["id"] in text and n["children"][0]["id"] in text
