"""`bench report DIR...`: leaderboard, paired and feature tables, figures and the feature browser of run directories.
A hierarchy output of `bench analyze hierarchy` (a folder with tree.json and no records) joins the browser."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from bench.browser_tree import find
from bench.results import load, unique_dirs

log = logging.getLogger(__name__)


def report(dirs: Sequence[str | Path], out: str | None = None, figures: str | None = None,
           browser: bool = False) -> str:
    """Write every table (and the figures, the browser when asked) for `dirs`; return the leaderboard's Markdown
    ("" when `dirs` are hierarchy outputs only)."""
    trees = [d for d in unique_dirs(dirs) if not (d / "records.jsonl").is_file() and find([d])]
    if trees and not browser:
        raise ValueError(f"{trees[0]} holds a feature tree (tree.json of `bench analyze hierarchy`) and no "
                         "records.jsonl; add --browser to browse it")
    tree_paths = {d.resolve() for d in trees}
    runs = [d for d in dirs if Path(d).resolve() not in tree_paths]  # as given: load() notes repeated names
    if not runs:
        if figures:
            raise ValueError("--figures draws the records of run directories; the figures of a hierarchy output "
                             "come from `bench analyze hierarchy --figures DIR`")
        log.info("feature browser: %s", _browser(trees, Path(out or trees[0])))
        return ""
    from bench.feature_report import write_feature_tables
    from bench.report import write_leaderboard

    frame = load(runs)  # each directory once; skips (and logs) malformed lines and directories without records
    runs = [d for d in unique_dirs(runs) if (d / "records.jsonl").is_file()]
    target = Path(out or figures or runs[0])
    board = write_leaderboard(frame, target)
    log.info("wrote %s, %s and paired.md/.csv", target / "leaderboard.md", target / "leaderboard.csv")
    for path in write_feature_tables(frame, runs, target):
        log.info("wrote %s", path)
    if figures:
        from bench.figures import write_figures
        from bench.report import write_latex

        figs = write_figures(frame, Path(figures))
        log.info("wrote %d figure files and %s", len(figs), write_latex(frame, Path(figures)))
    if browser:
        log.info("feature browser: %s", _browser([*runs, *trees], Path(out or runs[0])))
    return board


def _browser(dirs: Sequence[Path], out: Path) -> Path:
    from bench.browser import write_browser

    return write_browser(dirs, out / "browser")
