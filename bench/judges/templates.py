"""Prompt templates: the versioned rubrics and prompts in `tasks/prompts/` (package data), the user's rubric files
(`--judge-templates DIR`) and their checks."""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Template:
    """A prompt template from `tasks/prompts/<name>.txt`: `# key: value` header lines, then the body with
    `{field}` slots. The version is part of every cache key, so editing a template means bumping it."""

    name: str
    version: str
    body: str

    def render(self, **fields: str) -> str:
        """The body with its `{field}` slots filled."""
        return self.body.format(**fields)

    @property
    def tag(self) -> str:
        """`name@version`, the cache-key version of the prompts rendered from this template."""
        return f"{self.name}@{self.version}"


def load_template(name: str, directory: str | Path | None = None) -> Template:
    """The template `tasks/prompts/<name>.txt` (it must declare `# version: ...`), or, when `directory` holds
    `<name>.txt`, the user's file (`--judge-templates`; leading `#` lines are its optional header). A user file's
    version is its header's (or "user") plus a hash of its text, so editing it never reuses cached answers."""
    user = Path(directory) / f"{name}.txt" if directory else None
    path = user if user is not None and user.is_file() else Path(str(files("tasks").joinpath("prompts", f"{name}.txt")))
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise ValueError(f"no prompt template {name!r}; known: {', '.join(known)}")
    header: dict[str, str] = {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    while lines and lines[0].startswith("#"):
        key, _, value = lines.pop(0).lstrip("#").partition(":")
        header[key.strip()] = value.strip()
    if path == user:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        header["version"] = f"{header.get('version', 'user')}+{digest}"
    if "version" not in header:
        raise ValueError(f"prompt template {path} lacks a '# version: N' header line")
    return Template(name, header["version"], "\n".join(lines).strip() + "\n")


# the rating templates (rubrics) of the graders, with the slots each must use; `--judge-templates DIR` swaps them
RUBRICS: dict[str, tuple[str, ...]] = {
    "steering_concept": ("concept", "response"), "steering_instruction": ("instruction", "response"),
    "steering_fluency": ("response",), "feature_concept": ("concept", "response"), "feature_fluency": ("response",),
}


def check_templates(directory: str | Path, needed: Sequence[str] = ()) -> None:
    """ValueError (one line) unless `directory` exists, holds `<name>.txt` for every rubric in `needed`, and every
    rubric file in it (names of RUBRICS; no other `.txt` names) uses exactly its rubric's `{slots}`."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(f"--judge-templates {folder}: no such directory")
    present = {p.stem: p for p in folder.glob("*.txt")}
    unknown = sorted(set(present) - set(RUBRICS))
    if unknown:
        raise ValueError(f"--judge-templates {folder}: unknown rubric file(s) {', '.join(u + '.txt' for u in unknown)}"
                         f"; valid names: {', '.join(n + '.txt' for n in RUBRICS)}")
    missing = [n for n in needed if n not in present]
    if missing:
        raise ValueError(f"--judge-templates {folder}: the run's tasks need {', '.join(n + '.txt' for n in missing)}"
                         f" (present: {', '.join(sorted(p + '.txt' for p in present)) or 'none'})")
    for name in present:
        body = load_template(name, folder).body
        try:
            slots = {f for _, f, _, _ in string.Formatter().parse(body) if f is not None}
        except ValueError as e:
            raise ValueError(f"--judge-templates {present[name]}: not a template ({e}); write literal braces as "
                             "{{ and }}") from None
        if slots != set(RUBRICS[name]):
            raise ValueError(f"--judge-templates {present[name]}: uses slots {sorted(slots)}; {name} needs exactly "
                             f"{', '.join('{' + s + '}' for s in RUBRICS[name])}")


def needed_rubrics(tasks: Sequence[Any]) -> list[str]:
    """The rubrics the given task classes rate with (their `rubrics` class attribute, for judged tasks)."""
    return list(dict.fromkeys(r for t in tasks if getattr(t, "needs_judge", False) for r in getattr(t, "rubrics", ())))
