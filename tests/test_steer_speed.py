"""`bench perf steer_speed` runs end to end on a tiny model and writes what the README table is generated from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_steer_speed_prints_both_ratios_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "steer.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "steer_speed.py"), "--model", "tiny:gpt2",
                          "--layer", "1", "--batch", "4", "--new-tokens", "3", "--features", "2",
                          "--per-feature-rows", "2", "--repeats", "1", "--json", str(out)],
                         capture_output=True, text=True, check=False, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-3].startswith("sampling: ") and lines[-3].endswith("x generate")
    assert lines[-2].startswith("sampling, same layout: ") and lines[-2].endswith("x generate")
    assert lines[-1].startswith("calibration: ") and lines[-1].endswith("x per-feature")
    got = json.loads(out.read_text())
    assert got["calibration_rows"] == 2 * 2 * 7 and got["per_feature_rows_timed"] == 2
    assert got["per_feature_s"] == got["per_feature_s_per_row"] * 28 and got["new_tokens_total"] == 12
    assert min(got["generate_stock_s"], got["generate_s"], got["sample_s"], got["batched_s"]) > 0
