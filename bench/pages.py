"""The pages of the feature browser: the jinja2 environment of its templates, their filters, the static files and
the detail-pane data files. The templates, browser.css and browser.js are package data (`bench/templates/`): the one
source of every page's markup, style and script, copied into each site that `bench.browser` writes."""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

STATIC = ("browser.css", "browser.js")


def environment() -> jinja2.Environment:
    """The jinja2 environment of the browser's templates (package data of `bench`), autoescaping HTML."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("bench", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "html.j2"]),
                             undefined=jinja2.ChainableUndefined)  # optional sample fields render as nothing
    env.filters.update(fmt=_fmt, pct=_pct, rating=_rating, yesno=_yesno, quoted=_quoted, pretty=_pretty)
    env.globals.update(pieces=_pieces, marked=_marked, heat=_heat)
    return env


def copy_static(out: Path) -> None:
    """browser.css and browser.js from the package's templates into the site `out`."""
    for name in STATIC:
        (out / name).write_text(resources.files("bench").joinpath("templates", name).read_text("utf-8"), "utf-8")


def write_panes(env: jinja2.Environment, out: Path, slug: str, feats: dict[int, dict[str, Any]], chunk: int) -> None:
    """The detail panes of `feats` (feature.html.j2) as `out/data/<slug>-<k>.js`, `chunk` features a file."""
    detail = env.get_template("feature.html.j2")
    ordered = list(feats)
    for k in range(0, max(len(ordered), 1), chunk):
        part = {f: detail.render(f=f, d=feats[f]) for f in ordered[k : k + chunk]}
        blob = json.dumps(part, ensure_ascii=False, separators=(",", ":"))
        (out / "data" / f"{slug}-{k // chunk}.js").write_text(f"FB.add({json.dumps(slug)},{k // chunk},{blob});\n",
                                                               encoding="utf-8")


def num(value: Any) -> float | None:
    """`value` as a float; None when it is missing, not a number or NaN."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


# ----------------------------------------------------------------------------------------------- template helpers
def _fmt(v: Any, digits: int = 2) -> str:
    v = num(v)
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v: Any) -> str:
    v = num(v)
    return "–" if v is None else f"{v:.0%}"


def _rating(v: Any) -> str:
    """A judge rating; None is unscored (no parseable answer, or an unlabelled side)."""
    v = num(v)
    return "unscored" if v is None else f"{v:.0f}" if v == int(v) else f"{v:.2f}"


def _yesno(v: Any) -> str:
    return "–" if v is None else "yes" if v else "no"


def _quoted(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


def _pretty(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, indent=1, default=str)


def _heat(act: Any, top: Any) -> str:
    """Background alpha of a token with activation `act` when the strongest one has `top`; "" for none."""
    a, m = num(act), num(top)
    x = max(0.0, min(1.0, a / m)) if a is not None and m and m > 0 else 0.0
    return f"{0.08 + 0.8 * x:.3f}" if x > 0 else ""


def _pieces(s: dict[str, Any], top: Any) -> list[dict[str, Any]]:
    """The tokens of a labeling context with their highlight; leading spaces stay outside the highlight."""
    out = []
    acts = s.get("acts") or []
    for i, tok in enumerate(s.get("tokens") or []):
        lead = re.match(r"\s*", tok).group(0)
        if lead and len(lead) < len(tok):
            tok = tok[len(lead):]
        else:
            lead = ""
        act = acts[i] if i < len(acts) else None
        out.append({"lead": lead, "tok": tok, "act": act, "alpha": _heat(act, top), "peak": i == s.get("peak")})
    return out


def _marked(t: dict[str, Any]) -> dict[str, str]:
    """A top token's context split around the token (its `span`, else its first occurrence)."""
    context, token = str(t.get("context") or ""), str(t.get("token") or "")
    a, b = (list(t.get("span") or (0, 0)) + [0, 0])[:2]
    if not (0 <= a < b <= len(context)):
        a = context.find(token.strip()) if token.strip() else -1
        b = a + len(token.strip())
    if a < 0:
        return {"before": context + " ", "token": token, "after": ""}
    lead = len(context[a:b]) - len(context[a:b].lstrip())  # a leading space stays outside the highlight
    a = a + lead if a + lead < b else a
    return {"before": context[:a], "token": context[a:b], "after": context[b:]}


