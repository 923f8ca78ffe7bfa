"""README.md stays true: its two set-up commands, and CI runs the test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_gives_two_setup_commands_and_ci_runs_the_test_one() -> None:
    main_job, tests = _quick_start_commands()
    assert "pip install torch==2.13.0" in main_job and main_job.rstrip().endswith("bench run")
    assert "torch==2.13.0" in tests and tests.rstrip().endswith("pytest")
    assert tests in (ROOT / ".ci" / "run").read_text(), ".ci/run must run the README's test command verbatim"


def test_documented_commands_exist() -> None:
    import argparse

    from bench.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    documented = set(re.findall(r"^bench ([a-z]+)", (ROOT / "README.md").read_text(), flags=re.M))
    assert documented and documented <= set(sub.choices), documented - set(sub.choices)


def _numbers():  # noqa: ANN202 - the scripts/readme_numbers.py module
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "scripts" / "readme_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_numbers_are_regenerated_from_committed_records() -> None:
    """Every generated block of README.md equals what scripts/readme_numbers.py makes from committed files."""
    numbers = _numbers()
    text = (ROOT / "README.md").read_text()
    assert set(numbers.BLOCKS) <= set(re.findall(r"<!-- numbers:([a-z0-9-]+) -->", text))
    new, changed = numbers.render(text)
    assert not changed, f"README blocks drift from the records: {changed}; run python scripts/readme_numbers.py"


def test_readme_numbers_check_catches_a_hand_edited_number(tmp_path: Path) -> None:
    numbers = _numbers()
    text = (ROOT / "README.md").read_text()
    head, body = text.split("<!-- numbers:default-table -->\n", 1)
    number = re.search(r"\d\.\d\d", body)
    assert number, "the default table shows numbers"
    other = "9.99" if number.group() != "9.99" else "0.00"
    edited = head + "<!-- numbers:default-table -->\n" + body[: number.start()] + other + body[number.end():]
    assert edited != text
    readme = tmp_path / "README.md"
    readme.write_text(edited)
    assert numbers.main(["--check", "--readme", str(readme)]) == 1
    assert numbers.main(["--readme", str(readme)]) == 0 and readme.read_text() == text


def test_readme_hierarchy_findings_follow_the_records(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The numbers under the recursive hierarchy's prose come from its records: a changed record fails --check."""
    import json
    import shutil

    numbers = _numbers()
    records = tmp_path / "recursive"
    shutil.copytree(numbers.RECURSIVE, records, ignore=shutil.ignore_patterns("browser"))
    summary = json.loads((records / "summary.json").read_text())
    summary["fit_metrics"]["stack_mse_after"] /= 2
    (records / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(numbers, "RECURSIVE", records)
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    _, changed = numbers.render(readme.read_text())
    assert "hierarchy-recursive-findings" in changed and "hierarchy-recursive-fit" in changed
    assert numbers.main(["--check", "--readme", str(readme)]) == 1
