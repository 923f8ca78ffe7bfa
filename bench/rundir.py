"""A run directory's files: its lock (one writer), torn-line repair, atomic writes and env.json's starts."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import IO, Any

import torch

log = logging.getLogger(__name__)


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def environment(device: str) -> dict[str, Any]:
    """One start of a run for env.json: featbench commit and dirty tree, time, host, pid, versions, hardware."""
    import importlib.metadata as md

    from bench.fastlinear import enabled as fast_linear_enabled

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    top = _git("rev-parse", "--show-toplevel")  # only a checkout of featbench itself has a featbench commit
    ours = top is not None and Path(top).resolve() == Path(__file__).resolve().parent.parent
    status = _git("status", "--porcelain", "--untracked-files=no") if ours else None
    return {
        "featbench_commit": _git("rev-parse", "HEAD") if ours else None,
        "dirty": None if status is None else bool(status),  # uncommitted changes to tracked files
        "started": utc_now(),
        "host": platform.node(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: version(p) for p in ("featbench", "torch", "transformers", "sae-lens", "datasets",
                                               "scikit-learn", "openai", "gguf")},
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "threads": torch.get_num_threads(),
        "fast_linear": fast_linear_enabled(),  # bench.fastlinear: the CPU unembedding layout (float rounding)
        "models": {},
    }


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def lock_run_dir(out: Path) -> IO[str]:
    """Create `out` and take its lock `<out>/.lock` (an OS lock that the kernel releases when the process ends,
    killed or not), writing our pid into it; a one-line ValueError naming the holder's pid if it is held."""
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".lock", "a+", encoding="utf-8")  # noqa: SIM115 - held open for the life of the Run
    except OSError as e:
        raise ValueError(f"cannot write the run directory {out}: {e.strerror or e}; choose a writable --out") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"run directory {out} is in use by another bench process (pid {holder}); wait for it to "
                         f"end or choose another --out") from None
    except OSError as e:
        f.close()
        raise ValueError(f"cannot lock the run directory {out}: {e.strerror or e}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def repair_tail(path: Path) -> int:
    """Cut a torn last line (a crash mid-append) so the next append starts on a line of its own; -> bytes cut."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = pos = f.seek(0, os.SEEK_END)
        keep = 0
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                keep = pos - step + i + 1
                break
            pos -= step
        if keep == size:
            return 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("resume: cut a torn last line (%d bytes) from %s", size - keep, path.name)
    return size - keep


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_env(out: Path) -> dict[str, Any]:
    """env.json of run directory `out` as {"starts": [...]} (a file from before starts were kept: one start)."""
    path = out / "env.json"
    try:
        env = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        log.warning("env.json of %s is unreadable; starting a new one", out)
        env = {}
    return env if "starts" in env else {"starts": [env] if env else []}


def write_env(out: Path, env: dict[str, Any]) -> None:
    write_atomic(out / "env.json", json.dumps(env, indent=2, default=str))
