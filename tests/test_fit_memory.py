"""`bench perf fit_memory` runs end to end on a small store and writes what the README table is generated from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_fit_memory_reports_peak_rss_per_size_and_growth(tmp_path: Path) -> None:
    out = tmp_path / "mem.json"
    env = {**os.environ, "FEATBENCH_MEMORY_BUDGET": "16K"}  # the 48-96 kB stores stream, as large ones do
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fit_memory.py"), "--sizes", "3000,6000",
                          "--d", "4", "--shard-tokens", "1000", "--per-text", "50", "--iters", "2", "--k", "3",
                          "--dir", str(tmp_path), "--json", str(out)],
                         capture_output=True, text=True, check=False, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(out.read_text())
    assert [(r["method"], r["n_tokens"]) for r in got["rows"]] == [("snmf", 3000), ("snmf", 6000), ("dim", 3000),
                                                                   ("dim", 6000)]
    assert all(r["error"] is None and r["peak_rss_mib"] > r["base_rss_mib"] > 0 for r in got["rows"])
    assert all(r["streamed"] for r in got["rows"] if r["method"] == "snmf"), "SNMF never loads x"
    for method in ("snmf", "dim"):
        peaks = [r["peak_rss_mib"] for r in got["rows"] if r["method"] == method]
        assert got["summary"][method]["growth"] == peaks[1] / peaks[0] - 1
        assert got["summary"][method]["meets_target"] == (peaks[1] / peaks[0] - 1 < 0.25 and peaks[1] < 4096)
    assert "growth" in res.stdout and not list(tmp_path.glob("fit_memory-*")), "the temp store is removed"
