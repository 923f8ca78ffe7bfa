"""The feature trees of `bench analyze hierarchy` in the feature browser (`bench report DIR --browser`).

A hierarchy output is a folder with tree.json (one (model, layer) each, `bench.feature_tree`); a folder given to the
browser counts when it holds one itself or in a subfolder. Each tree adds to the site:

    browser/<model>-L<layer>-tree.html                the tree: every root with its descendants, coarsest first
    browser/<model>-L<layer>-tree-level<l>.html       the features of level l: a filterable, sortable list
    browser/data/<...>-tree-level<l>-<k>.js          their detail panes: label and AUROC, parents and children
                                                      (links to their pages), neuron support and top contexts

Opening `<model>-L<layer>-tree-level2.html#f=5` shows node L2:5; `<model>-L<layer>-tree.html#L3:0` a root.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from bench.feature_tree import Tree
from bench.pages import write_panes


def find(dirs: Sequence[str | Path]) -> list[Path]:
    """The tree.json files in `dirs` and their direct subfolders, each once, in the order given."""
    found: dict[Path, Path] = {}
    for d in map(Path, dirs):
        for p in sorted({*d.glob("tree.json"), *d.glob("*/tree.json")}):
            found.setdefault(p.resolve(), p)
    return list(found.values())


def write(env: jinja2.Environment, out: Path, paths: Sequence[Path], chunk: int) -> list[dict[str, Any]]:
    """The pages of the trees in `paths` in the site `out`; their rows of the index."""
    trees = [Tree.read(p) for p in paths]
    bases = [_clean(f"{t.meta.get('model', 'model')}-L{t.meta.get('layer', '')}-tree") for t in trees]
    summaries = []
    for i, (path, tree) in enumerate(zip(paths, trees, strict=True)):
        slug = bases[i] if bases.count(bases[i]) == 1 else _clean(f"{bases[i]}-{path.parent.name}-{i}")
        summaries.append(_write_tree(env, out, tree, slug, chunk, str(path.parent)))
    return summaries


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _write_tree(env: jinja2.Environment, out: Path, tree: Tree, slug: str, chunk: int,
                source: str) -> dict[str, Any]:
    """The tree page, one list page per level and the nodes' detail panes; the tree's row of the index."""
    nodes = tree.nodes
    levels = [{"level": lv, "slug": f"{slug}-level{lv}"}
              for lv in sorted({n["level"] for n in nodes.values()}, reverse=True)]
    href = {k: f"{slug}-level{n['level']}.html#f={n['feature']}" for k, n in nodes.items()}
    roots = sorted((k for k, n in nodes.items() if not n["parents"] and n["children"]),
                   key=lambda k: (-nodes[k]["level"], nodes[k]["feature"]))
    first_root: dict[str, str] = {}  # node -> the first root above it: its place on the tree page
    for r in roots:
        for k in _descendants(tree, r):
            first_root.setdefault(k, r)

    def link(edge: dict[str, Any]) -> dict[str, Any]:
        n = nodes[edge["id"]]
        return {"id": n["id"], "label": n["label"], "weight": edge["weight"], "href": href[n["id"]]}

    title = f"feature tree: {tree.meta.get('model', '')} layer {tree.meta.get('layer', '')}"
    for lv in levels:
        members = sorted((n for n in nodes.values() if n["level"] == lv["level"]), key=lambda n: n["feature"])
        panes = {}
        for n in members:  # feature.html.j2 shows `tree` (the node, its links) and `top_tokens`
            node = {**{k: n[k] for k in ("id", "level", "label", "auroc", "support")},
                    "parents": [link(p) for p in n["parents"]], "children": [link(c) for c in n["children"]],
                    "tree_href": f"{slug}.html" + (f"#{first_root[n['id']]}" if n["id"] in first_root else "")}
            panes[n["feature"]] = {"feature": n["feature"], "tree": node,
                                   "top_tokens": [_top(t) for t in n["top_contexts"]]}
        write_panes(env, out, lv["slug"], panes, chunk)
        rows = [{"f": n["feature"], "chunk": i // chunk, "label": n["label"], "auroc": n["auroc"],
                 "neurons": len(n["support"]), "parents": " ".join(p["id"] for p in n["parents"]),
                 "children": " ".join(c["id"] for c in n["children"])} for i, n in enumerate(members)]
        page = env.get_template("level.html.j2").render(
            title=f"recursive SNMF level {lv['level']} · {tree.meta.get('model', '')} · layer "
                  f"{tree.meta.get('layer', '')}", unit_slug=lv["slug"], tree_slug=slug, levels=levels,
            level=lv["level"], meta=tree.meta, rows=rows)
        (out / f"{lv['slug']}.html").write_text(page, encoding="utf-8")
    loose = [n for n in sorted(nodes.values(), key=lambda n: (-n["level"], n["feature"]))
             if not n["parents"] and not n["children"]]
    linked = {k: {**n, "href": href[k]} for k, n in nodes.items()}
    page = env.get_template("tree.html.j2").render(title=title, meta=tree.meta, levels=levels, roots=roots,
                                                   nodes=linked, loose=[linked[n["id"]] for n in loose])
    (out / f"{slug}.html").write_text(page, encoding="utf-8")
    return {"slug": slug, "model": tree.meta.get("model", ""), "layer": tree.meta.get("layer", ""),
            "site": tree.meta.get("site", ""), "ranks": tree.meta.get("ranks", []), "n": len(nodes),
            "parents": sum(1 for n in nodes.values() if n["children"]), "levels": levels, "source": source}


def _descendants(tree: Tree, root: str) -> list[str]:
    """`root` and every node below it, each once."""
    out: dict[str, None] = {}
    stack = [root]
    while stack:
        k = stack.pop()
        if k not in out:
            out[k] = None
            stack.extend(c["id"] for c in tree.nodes[k]["children"])
    return list(out)


def _top(t: dict[str, Any]) -> dict[str, Any]:
    """A top context of a tree node ("... [[token]] ...", its code) as the browser's top-token rows: the context
    without the brackets and the token's span in it."""
    context = str(t.get("context") or "")
    a, b = context.find("[["), context.find("]]")
    if 0 <= a < b:
        context, span = context[:a] + context[a + 2 : b] + context[b + 2 :], [a, b - 2]
    else:
        span = [0, 0]
    return {"token": t.get("token", ""), "context": context, "span": span, "activation": t.get("code")}
