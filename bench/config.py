"""RunConfig: a frozen, serialisable description of a run, from TOML files and CLI flags."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from importlib.resources import files
from pathlib import Path
from typing import Any

from bench.sites import Site


def shipped_config(name: str) -> Path:
    """Path of a config shipped in `bench/configs/` (`default`, `smoke`, ...)."""
    path = Path(str(files("bench").joinpath("configs", f"{name}.toml")))
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.toml"))
        raise ValueError(f"no shipped config {name!r}; shipped: {', '.join(known)}")
    return path


@dataclass(frozen=True)
class RunConfig:
    """What to run. Empty `methods`/`tasks` mean every registered one."""

    models: tuple[str, ...] = ("gemma-3-270m-gguf",)
    layers: tuple[int | str, ...] = ("early", "middle", "late")
    methods: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    concepts: str | None = None  # path or hub name; None = the shipped concept data
    concept_columns: Mapping[str, str] = field(default_factory=dict)  # {"text": "prompt", "concept": "label"}
    method: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # {"snmf": {"n_features": 64}}
    task: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # {"detection": {"pool": "mean"}}
    seed: int = 0
    max_len: int = 64  # tokens per text
    batch_size: int = 16
    max_fit_tokens: int | None = 50_000  # cap on the tokens a method is fitted on (seeded subset)
    device: str = "auto"  # auto | cpu | cuda[:i]
    # None: the whole model on `device` | auto | balanced | balanced_low_0 | sequential | {module: device}: accelerate
    # places the layers over the devices as the weights load (a model larger than one device)
    device_map: str | Mapping[str, str | int] | None = None
    judge: str = "offline"  # offline | fake | openai:<model> | hf:<path or id>
    judge_base_url: str | None = None
    judge_templates: str | None = None  # a directory of rubric files that replace the shipped ones (same names)
    # where units run (never changes a record; a resume may change them): bench.executors
    executor: str = "local"  # local: this process | ray: Ray actors, one (model, layer) group per call
    ray_address: str | None = None  # ray only: None = start a local cluster | auto | ray://host:10001 | host:6379
    workers: int = 0  # ray: actors at once (0 = as many as the cluster's CPUs, or GPUs, allow)
    gpus_per_worker: float = 0.0  # ray: num_gpus of each actor
    cpus_per_worker: float = 1.0  # ray: num_cpus of each actor (and its torch threads)

    def __post_init__(self) -> None:
        """Every value's type and range (names of methods, tasks and models are resolved by `bench.preflight`)."""
        for name in ("models", "methods", "tasks"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"bad {name} {_show(value)}: expected a list of non-empty names")
        if not self.models:
            raise ValueError("models is empty; name at least one, e.g. --models gemma-3-270m-gguf or tiny:gpt2")
        if not self.layers or not all(_is_int(v) or v in LAYER_NAMES for v in self.layers):
            raise ValueError(f"bad layers {_show(self.layers)}: expected a non-empty list of integers or "
                             f"{', '.join(LAYER_NAMES)}, e.g. --layers 0,middle")
        for name, low in (("seed", 0), ("max_len", 1), ("batch_size", 1), ("max_fit_tokens", 1)):
            value = getattr(self, name)
            if not (_is_int(value) and value >= low) and not (name == "max_fit_tokens" and value is None):
                none = " (or absent for no cap)" if name == "max_fit_tokens" else ""
                raise ValueError(f"bad {name} {_show(value)}: expected an integer >= {low}{none}")
        if not (isinstance(self.device, str) and DEVICE.fullmatch(self.device)):
            raise ValueError(f"bad device {_show(self.device)}: expected auto, cpu, cuda, cuda:<index> or mps")
        check_device_map(self.device_map)
        if self.concepts is not None and not (isinstance(self.concepts, str) and self.concepts.strip()):
            raise ValueError(f"bad concepts {_show(self.concepts)}: expected a file path or hub dataset name")
        from bench.data import parse_columns

        if not isinstance(self.concept_columns, Mapping):
            raise ValueError(f"bad concept_columns {_show(self.concept_columns)}: expected a table such as "
                             "{text = \"prompt\", concept = \"label\"} or --concept-columns text=prompt,concept=label")
        parse_columns(self.concept_columns)
        for name in ("method", "task"):
            table = getattr(self, name)
            if not (isinstance(table, Mapping) and all(isinstance(v, Mapping) for v in table.values())):
                raise ValueError(f"bad {name} table {_show(table)}: expected {{name: {{field: value}}}}, e.g. "
                                 f"[{name}.{'snmf' if name == 'method' else 'detection'}] in TOML")
        check_judge(self.judge, self.judge_base_url)
        if self.executor not in EXECUTORS:
            raise ValueError(f"bad executor {_show(self.executor)}: expected one of {', '.join(EXECUTORS)}")
        if self.ray_address is not None and not (isinstance(self.ray_address, str) and self.ray_address.strip()):
            raise ValueError(f"bad ray_address {_show(self.ray_address)}: expected an address (auto, host:port or "
                             "ray://host:port); it is read only with --executor ray")
        if not (_is_int(self.workers) and self.workers >= 0):
            raise ValueError(f"bad workers {_show(self.workers)}: expected an integer >= 0 (0 = as many as fit)")
        for name in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"bad {name} {_show(value)}: expected a number >= 0")
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0:
            raise ValueError("cpus_per_worker and gpus_per_worker are both 0: a worker needs one or the other")
        if self.judge_templates is not None:
            if not (isinstance(self.judge_templates, str) and self.judge_templates.strip()):
                raise ValueError(f"bad judge_templates {_show(self.judge_templates)}: expected a directory path")
            if self.judge.partition(":")[0] == "offline":
                raise ValueError("judge_templates is set but the judge is offline, which reads no rubric; use "
                                 "--judge fake | openai:<model> | hf:<path or id> with --judge-templates")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)} in {source}; valid: {', '.join(sorted(known))}")
        data = dict(data)
        for name in ("models", "layers", "methods", "tasks"):
            if name in data:
                value = data[name]
                if isinstance(value, str):
                    parts = [v.strip() for v in value.split(",")]
                    if "" in parts:
                        every = " (omit it for every registered one)" if name in ("methods", "tasks") else ""
                        raise ValueError(f"bad {name} {value!r}: an empty name; give a comma list without empty "
                                         f"entries{every} (in {source})")
                    value = parts
                elif not isinstance(value, list | tuple):
                    raise ValueError(f"bad {name} {value!r}: expected a list or a comma-separated string (in {source})")
                data[name] = tuple(value)
        if isinstance(data.get("device_map"), str):
            data["device_map"] = parse_device_map(data["device_map"])
        if isinstance(data.get("concept_columns"), str):
            from bench.data import parse_columns

            data["concept_columns"] = parse_columns(data["concept_columns"])
        if "layers" in data:
            data["layers"] = tuple(int(x) if isinstance(x, str) and x.strip().lstrip("-").isdigit() else x
                                   for x in data["layers"])
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{e} (in {source})") from None

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """A TOML file (None = the shipped default), then `overrides` on top (the CLI's flags win)."""
        path = Path(path) if path else shipped_config("default")
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path, "rb") as f:
            data = tomllib.load(f)
        data, flagged = merge(data, overrides or {}, str(path))
        return cls.from_dict(data, source=f"the flags and {path}" if flagged else str(path))

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """This config with CLI-style `overrides` on top, as `load` applies them to a file."""
        data, _ = merge(self.to_dict(), overrides, "the flags")
        return RunConfig.from_dict(data, source="the flags")


def merge(data: Mapping[str, Any], overrides: Mapping[str, Any], source: str) -> tuple[dict[str, Any], bool]:
    """`overrides` (None = unset; `method`/`task` tables merged field by field) on top of config `data`:
    (merged data, whether anything was overridden)."""
    data = dict(data)
    for table in ("method", "task"):
        merged: dict[str, dict[str, Any]] = {}
        for src in (data.get(table, {}), overrides.get(table, {})):
            if not isinstance(src, Mapping) or not all(isinstance(v, Mapping) for v in src.values()):
                raise ValueError(f"bad {table} table {src!r} in {source}: expected [{table}.<name>] tables of "
                                 "field = value")
            for name, params in src.items():
                merged.setdefault(name, {}).update(params)
        data[table] = merged
    flags = {k: v for k, v in overrides.items() if v is not None and k not in ("method", "task")}
    data.update(flags)
    return data, bool(flags) or any(overrides.get(t) for t in ("method", "task"))


LAYER_NAMES = ("early", "middle", "late")
EXECUTORS = ("local", "ray")
EXECUTION = ("executor", "ray_address", "workers", "gpus_per_worker", "cpus_per_worker")  # never change a record
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies
DEVICE_MAP_HELP = (f"expected {', '.join(DEVICE_MAPS)} or a table {{module: device}} of cpu, mps, cuda, cuda:<i> "
                   "or a GPU index, e.g. --device-map auto or --device-map '{\"\": \"cpu\"}'")
JUDGE_SPECS = "offline | fake | openai:<model> | hf:<path or id>"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def parse_device_map(value: str) -> str | dict[str, Any] | None:
    """A `--device-map` string: none, a strategy name, or a JSON object {module: device}."""
    if value.strip().lower() in ("none", "null", ""):
        return None
    if not value.lstrip().startswith("{"):
        return value
    try:
        table = json.loads(value)
    except ValueError as e:
        raise ValueError(f"bad device_map {value!r}: not a JSON object ({e.msg}); {DEVICE_MAP_HELP}") from None
    return table


def check_device_map(value: Any) -> None:
    """ValueError unless `value` is None, one of DEVICE_MAPS, or a non-empty {module name: device} table."""
    if value is None or (isinstance(value, str) and value in DEVICE_MAPS):
        return
    if isinstance(value, Mapping) and value and all(
            isinstance(k, str) and ((_is_int(v) and v >= 0) or (isinstance(v, str) and v != "auto" and
                                                                DEVICE.fullmatch(v))) for k, v in value.items()):
        return
    raise ValueError(f"bad device_map {_show(value)}: {DEVICE_MAP_HELP}")


def check_judge(spec: Any, base_url: Any = None) -> None:
    """ValueError unless `spec` is a judge spec (offline, fake, openai:<model>, hf:<id>) and `base_url` an
    http(s) URL given only with an openai judge."""
    kind, colon, arg = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not ((kind in ("offline", "fake") and not colon) or (kind in ("openai", "hf") and arg.strip())):
        raise ValueError(f"bad judge {_show(spec)}: expected {JUDGE_SPECS}")
    if base_url is None:
        return
    if kind != "openai":
        raise ValueError(f"--judge-base-url is set but --judge is {spec!r}; use --judge openai:<model> with it")
    url = urllib.parse.urlsplit(base_url) if isinstance(base_url, str) else None
    if url is None or url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"bad judge_base_url {_show(base_url)}: expected an http(s) URL such as "
                         "http://127.0.0.1:8000/v1")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_params(items: list[str], flag: str) -> dict[str, dict[str, str]]:
    """`["snmf.n_features=64"]` -> `{"snmf": {"n_features": "64"}}` (values coerced later, per field type)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, param = key.partition(".")
        if not (eq and dot and name and param):
            raise ValueError(f"bad {flag} {item!r}; expected NAME.FIELD=VALUE, e.g. {flag} snmf.n_features=64")
        out.setdefault(name, {})[param] = value
    return out


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a CLI string into a value of annotation `tp` (int, float, bool, str, Site, Optional, ...)."""
    origin = typing.get_origin(tp)
    options = typing.get_args(tp) if origin in (typing.Union, types.UnionType) else (tp,)
    if not isinstance(value, str):
        simple = {int: _is_int, float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
                  bool: lambda v: isinstance(v, bool), type(None): lambda v: v is None}
        if all(o in simple for o in options) and not any(simple[o](value) for o in options):
            raise ValueError(f"bad value {value!r} for {name}: expected {_type_name(tp)}")
        return value
    if type(None) in options and value.lower() in ("none", "null", ""):
        return None
    for option in options:
        try:
            if option is str:
                return value
            if option is bool:
                if value.lower() in ("true", "1", "yes", "false", "0", "no"):
                    return value.lower() in ("true", "1", "yes")
                continue
            if option is Site:
                return Site.parse(value)
            if option in (int, float):
                return option(value)
            if typing.get_origin(option) in (tuple, list):
                items = json.loads(value) if value.startswith("[") else _split(value)
                args = [a for a in typing.get_args(option) if a is not Ellipsis]
                item_type = args[0] if args else str
                return typing.get_origin(option)(_coerce(str(i), item_type, name) for i in items)
        except (ValueError, TypeError):
            continue
    if any(o is str for o in options):
        return value
    raise ValueError(f"bad value {value!r} for {name}: expected {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_params(factory: Callable[..., Any], params: Mapping[str, Any], kind: str, name: str) -> dict[str, Any]:
    """`params` checked against the factory's dataclass fields and coerced to their types."""
    if not dataclasses.is_dataclass(factory):
        return dict(params)
    hints = typing.get_type_hints(factory)
    valid = {f.name for f in fields(factory) if f.init}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(
            f"unknown {kind} parameter(s) {', '.join(f'{name}.{u}' for u in unknown)}; "
            f"valid for {name}: {', '.join(sorted(valid)) or '(none)'}"
        )
    return {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in params.items()}


def build(factory: Callable[..., Any], params: Mapping[str, Any], kind: str, name: str) -> Any:
    """Call a registered factory with `params` checked and coerced (see `check_params`)."""
    return factory(**check_params(factory, params, kind, name))
