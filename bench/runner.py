"""The run loop: units (model, layer, method, task), records on disk, done markers, exact resume, one writer."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from bench import registry
from bench.activations import ActivationCache, Activations
from bench.config import RunConfig, build, check_params
from bench.data import ConceptData, load_lines
from bench.feature_concepts import feature_concepts
from bench.feature_labels import label_features, settings_from
from bench.features import steering_sites
from bench.fits import Fit, FitCache, params_json
from bench.models import describe, load
from bench.protocols import Context, FeatureMethod
from bench.results import Score, append_jsonl, read_jsonl, to_record
from bench.rundir import environment, lock_run_dir, read_env, repair_tail, utc_now, write_atomic, write_env
from bench.sites import Site, resolve_layers

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def new_run_id(cfg: RunConfig) -> str:
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:6]
    return f"{dt.datetime.now():%Y%m%d-%H%M%S}-{digest}"


def method_spec(name: str, cfg: RunConfig) -> tuple[Any, dict[str, Any]]:
    """(registered factory, parameters) of run method `name`: a registered method, or an alias whose table names
    one in `method` (`[method.sae-act] method = "sae"` runs sae-lens training as a second method `sae-act`)."""
    params = dict(cfg.method.get(name, {}))
    base = params.pop("method", name)
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"bad {name}.method {base!r}: expected the name of a registered method")
    if base != name and base not in registry.METHODS:
        registry.discover()
        if base not in registry.METHODS:
            raise ValueError(f"{name}.method names unknown method {base!r}; registered: "
                             f"{', '.join(sorted(registry.METHODS))}")
    return registry.lookup(registry.METHODS, "method", base), params


def make_method(name: str, cfg: RunConfig, layer: int) -> FeatureMethod:
    """The run's method `name` (registered, or an alias: `method_spec`) with the run's parameters, at `layer` (the
    run's seed and device fill the method's `seed` and `device` fields unless set with -M)."""
    factory, params = method_spec(name, cfg)
    names = {f.name for f in dataclasses.fields(factory)}
    params.setdefault("seed", cfg.seed) if "seed" in names else None
    params.setdefault("device", resolve_device(cfg.device)) if "device" in names else None
    method = build(factory, params, "method", name)
    if hasattr(method, "at_layer"):
        return method.at_layer(layer)
    return dataclasses.replace(method, site=dataclasses.replace(method.site, layer=layer))


def make_task(name: str, cfg: RunConfig) -> Any:
    return build(registry.lookup(registry.TASKS, "task", name), dict(cfg.task.get(name, {})), "task", name)


def selected(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """The method and task names of the run, with their parameters validated against the registry."""
    registry.discover()
    methods = list(cfg.methods) or sorted(registry.METHODS)
    tasks = list(cfg.tasks) or sorted(registry.TASKS)
    for name in sorted(set(methods) | set(cfg.method)):  # a misspelt name in -M fails too
        factory, params = method_spec(name, cfg)
        check_params(factory, params, "method", name)
        source = params.get("features_of")
        if source is not None and source not in methods and source not in set(registry.METHODS) | set(cfg.method):
            raise ValueError(f"{name}.features_of names unknown method {source!r}; run methods: {', '.join(methods)}")
    for name in sorted(set(tasks) | set(cfg.task)):
        check_params(registry.lookup(registry.TASKS, "task", name), cfg.task.get(name, {}), "task", name)
    return methods, tasks


def typed(cfg: RunConfig) -> RunConfig:
    """`cfg` with every method and task parameter coerced to its field's type and stored as its JSON value, so
    that a run's config.json holds what ran (`-T feature_steering.max_features=24` as 24, not "24"). An alias's
    `method` key stays; a factory that is not a dataclass keeps its values as given."""
    registry.discover()
    method = {}
    for name, params in cfg.method.items():
        factory, given = method_spec(name, cfg)
        method[name] = {**params, **check_params(factory, given, "method", name)}
    task = {name: check_params(registry.lookup(registry.TASKS, "task", name), params, "task", name)
            for name, params in cfg.task.items()}
    return dataclasses.replace(cfg, **json.loads(json.dumps({"method": method, "task": task}, default=str)))


def feature_sources(methods: list[str], cfg: RunConfig) -> list[str]:
    """The methods that `features_of` of the run's methods name and the run does not list (fitted for them)."""
    named = [method_spec(m, cfg)[1].get("features_of") for m in methods]
    return list(dict.fromkeys(n for n in named if n and n not in methods))


def unit_key(model: str, layer: int, method: str, task: str) -> str:
    return f"{model}|{layer}|{method}|{task}"


def task_params(task: Any) -> dict[str, Any]:
    """A task's parameters (its dataclass fields) as plain JSON values; {} for a task without fields."""
    return json.loads(json.dumps(dataclasses.asdict(task), default=str)) if dataclasses.is_dataclass(task) else {}


RUN_FILES = ("units.jsonl", "records.jsonl", "samples.jsonl")


class Run:
    """One run directory: results/<run_id>/{config.json, env.json, records.jsonl, samples.jsonl, units.jsonl}.

    A Run (other than a dry run) holds the directory's lock from construction until `execute()` returns or
    `close()`: a second writer of the same directory fails at once with the holder's pid. The Run is the only
    writer of the run's files: units are computed by a `Worker`, in this process (`executor = "local"`) or in Ray
    actors (`executor = "ray"`, `bench.executors`), and each finished unit's samples, records and done marker are
    appended here, in the order of the plan."""

    def __init__(self, cfg: RunConfig, out: Path, resume: bool = False, dry_run: bool = False) -> None:
        self.cfg, self.out, self.resume = cfg, out, resume
        self.methods, self.tasks = selected(cfg)
        self.device = resolve_device(cfg.device)
        self._lock: IO[str] | None = None
        if dry_run:
            self.run_id = out.name
        else:
            self._lock = lock_run_dir(out)
            try:
                self._open(resume)
            except BaseException:
                self.close()
                raise
        self.done = {u["unit"] for u in read_jsonl(out / "units.jsonl")}
        self.cache = ActivationCache()  # for callers that read a run's data in process (bench.labeler_choice)
        self.instructions = load_lines(None, "instructions.jsonl")

    def _open(self, resume: bool) -> None:
        if resume:
            self.run_id = json.loads((self.out / "config.json").read_text())["run_id"]
            for name in RUN_FILES:
                repair_tail(self.out / name)
            self._drop_unfinished()
            return
        if (self.out / "records.jsonl").exists() or (self.out / "units.jsonl").exists():
            raise FileExistsError(f"{self.out} already holds a run; use --resume {self.out} or another --out")
        for name in ("samples.jsonl", "env.json"):  # left by an earlier start that finished no unit
            (self.out / name).unlink(missing_ok=True)
        self.run_id = self.out.name
        write_atomic(self.out / "config.json", json.dumps({"run_id": self.run_id, **self.cfg.to_dict()}, indent=2))

    def close(self) -> None:
        """Release the run directory's lock (the process's exit releases it too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drop_unfinished(self) -> None:
        """Remove records and samples of units that have no done marker (a crash between the two writes)."""
        done = {u["unit"] for u in read_jsonl(self.out / "units.jsonl")}
        for name in ("records.jsonl", "samples.jsonl"):
            path = self.out / name
            rows = read_jsonl(path)
            keep = [r for r in rows if unit_key(r.get("model"), r.get("layer"), r.get("method"), r.get("task"))
                    in done]  # type: ignore[arg-type]
            if len(keep) != len(rows):
                write_atomic(path, "".join(json.dumps(r, default=str, sort_keys=True) + "\n" for r in keep))
                log.info("resume: dropped %d rows of unfinished units from %s", len(rows) - len(keep), name)

    def units(self, model_id: str, layers: list[int]) -> Iterator[tuple[int, str, list[str]]]:
        """(layer, method, pending tasks incl. "fit") for each (layer, method) with work left."""
        for layer in layers:
            for m in self.methods:
                pending = [t for t in ("fit", *self.tasks) if unit_key(model_id, layer, m, t) not in self.done]
                if pending:
                    yield layer, m, pending

    def plan(self) -> list[dict[str, Any]]:
        """Every unit of the run with its state, resolved without loading weights (fails early on bad layers,
        methods, parameters or releases)."""
        rows = []
        for model_id in self.cfg.models:
            info = describe(model_id)
            for layer in resolve_layers(list(self.cfg.layers), info.n_layers):
                for m in self.methods:
                    site = make_method(m, self.cfg, layer).site
                    for t in ("fit", *self.tasks):
                        done = unit_key(model_id, layer, m, t) in self.done
                        rows.append({"model": model_id, "layer": layer, "site": str(site), "method": m, "task": t,
                                     "state": "done" if done else "pending"})
        return rows

    def estimate(self) -> dict[str, float]:
        """Rough cost of the pending work: forward tokens and FLOPs of activation collection, and what the
        tasks declare through an optional `cost(n_concepts, n_instructions) -> dict` (generations, judge calls)."""
        concepts = ConceptData.load(self.cfg.concepts, self.cfg.concept_columns, self.cfg.seed)
        tokens_per_text = min(self.cfg.max_len, 1 + concepts.frame["text"].str.len().mean() / 4)
        total: dict[str, float] = {"forward_tokens": 0.0, "forward_tflop": 0.0}
        pending = [r for r in self.plan() if r["state"] == "pending"]
        for model_id in {r["model"] for r in pending}:
            tokens = len(concepts) * tokens_per_text
            total["forward_tokens"] += tokens
            total["forward_tflop"] += 2 * describe(model_id).n_params * tokens / 1e12
        for r in pending:
            task = make_task(r["task"], self.cfg) if r["task"] != "fit" else None
            for k, v in (task.cost(len(concepts.concepts), len(self.instructions)) if hasattr(task, "cost")
                         else {}).items():
                total[k] = total.get(k, 0.0) + v
        return total

    def execute(self) -> Path:
        """Run every pending unit; safe to kill at any point and continue with `resume=True`.

        Appends this start to env.json (`starts`), with its end time, seconds and status once it ends, and
        releases the run directory's lock when it returns or raises."""
        t0, status = time.perf_counter(), "error"
        try:
            start = {**environment(self.device), "resume": self.resume, "units": 0,
                     "fits": {"fitted": 0, "loaded": 0}, "cpu_count": os.cpu_count(),
                     "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
            cpu0 = _cpu_seconds()
            env = read_env(self.out)
            env["starts"].append(start)
            write_env(self.out, env)
            try:
                self._execute(env, start)
                status = "finished"
            except KeyboardInterrupt:
                status = "interrupted"
                raise
            except BaseException as e:
                status = f"error: {type(e).__name__}: {e}"
                raise
            finally:
                start.update(ended=utc_now(), seconds=round(time.perf_counter() - t0, 3), status=status,
                             cpu_seconds=round(_cpu_seconds() - cpu0, 1),  # this process's user + system time
                             load_avg_end=[round(x, 2) for x in os.getloadavg()])
                write_env(self.out, env)
        finally:
            self.close()
        return self.out

    def groups(self) -> list[tuple[str, int, list[tuple[str, list[str]]]]]:
        """The pending work as (model, layer, [(method, pending tasks incl. "fit")]) groups, in plan order."""
        out = []
        for model_id in self.cfg.models:
            layers = resolve_layers(list(self.cfg.layers), describe(model_id).n_layers)
            for layer in layers:
                pending = [(m, tasks) for la, m, tasks in self.units(model_id, [layer])]
                if pending:
                    out.append((model_id, layer, pending))
        return out

    def _execute(self, env: dict[str, Any], start: dict[str, Any]) -> None:
        self.plan()  # validate every model, layer, method and release before any work
        per_layer = len(self.methods) * (len(self.tasks) + 1)
        total = sum(len(resolve_layers(list(self.cfg.layers), describe(m).n_layers)) for m in self.cfg.models)
        bar = tqdm(total=total * per_layer, initial=len(self.done), desc="units", unit="unit")
        groups = self.groups()
        if self.cfg.executor == "ray":
            from bench.executors import ray_groups

            results = ray_groups(self.cfg, self.run_id, self.methods, self.tasks, groups)
        else:
            results = self._local(groups, bar)
        for model_id, prov, unit in results:
            if model_id not in start["models"]:
                start["models"][model_id] = prov
                write_env(self.out, env)
            self._write(unit, start)
            bar.set_postfix_str(unit.key.replace("|", " "))
            bar.update(1)
        bar.close()

    def _local(self, groups: list[tuple[str, int, list[tuple[str, list[str]]]]], bar: Any
               ) -> Iterator[tuple[str, dict[str, Any], UnitResult]]:
        """Units computed in this process, one at a time (a crash loses at most the unit in progress)."""
        worker = Worker(self.cfg, self.run_id, self.methods, self.tasks)
        for model_id in dict.fromkeys(g[0] for g in groups):
            layers = resolve_layers(list(self.cfg.layers), describe(model_id).n_layers)
            for group_model, layer, pending in groups:
                if group_model != model_id:
                    continue
                for unit in worker.group(model_id, layer, pending, layers, bar.set_postfix_str):
                    yield model_id, worker.provenance(model_id), unit
            worker.unload()

    def _write(self, unit: UnitResult, start: dict[str, Any]) -> None:
        """Append one finished unit: its samples, its records, then its done marker."""
        append_jsonl(self.out / "samples.jsonl", unit.samples)
        append_jsonl(self.out / "records.jsonl", unit.records)
        append_jsonl(self.out / "units.jsonl", [unit.marker])
        self.done.add(unit.key)
        start["units"] += 1
        if unit.fitted_here:
            start["fits"]["loaded" if unit.marker["fit_cached"] else "fitted"] += 1


@dataclass
class UnitResult:
    """What one finished unit appends: samples.jsonl rows, records.jsonl rows and its units.jsonl marker."""

    key: str
    samples: list[dict[str, Any]]
    records: list[dict[str, Any]]
    marker: dict[str, Any]
    fitted_here: bool = False  # the first unit after its method was fitted or loaded (env.json counts fits)


class Worker:
    """Computes the units of (model, layer) groups and returns their rows; writes no run file. One per process:
    the driver's (local executor) or a Ray actor's; it holds one loaded model at a time, the run's judge and the
    shared caches (activations, fits, labels, judge answers: safe for concurrent processes)."""

    def __init__(self, cfg: RunConfig, run_id: str, methods: list[str], tasks: list[str]) -> None:
        self.cfg, self.run_id, self.methods, self.tasks = cfg, run_id, methods, tasks
        self.device = resolve_device(cfg.device)
        self.cache = ActivationCache()
        self.fits = FitCache()
        self.instructions = load_lines(None, "instructions.jsonl")
        self.labels = settings_from(cfg.task.get("feature_labels", {}))  # ctx.labels: shared by feature tasks
        self._concepts: ConceptData | None = None
        self._judge: Any = None
        self._loaded: tuple[str, Any, Any, dict[str, Any]] | None = None  # (model id, model, tokenizer, provenance)
        self._data: _ModelData | None = None

    def judge(self) -> Any:
        """The run's judge (`cfg.judge`), built on first use when a task declares `needs_judge` or a method reads
        another's labelled features."""
        needs = [t for t in self.tasks if getattr(registry.TASKS[t], "needs_judge", False)] or [
            m for m in self.methods if method_spec(m, self.cfg)[1].get("features_of")]
        if needs and self._judge is None:
            from bench.judge import make_judge

            self._judge = make_judge(self.cfg.judge, base_url=self.cfg.judge_base_url, device=self.device,
                                     templates=self.cfg.judge_templates)
        return self._judge

    def _model(self, model_id: str) -> tuple[Any, Any, dict[str, Any]]:
        if self._loaded is None or self._loaded[0] != model_id:
            self.unload()
            model, tok, prov = load(model_id, self.device, self.cfg.device_map)
            self._loaded = (model_id, model, tok, prov)
        return self._loaded[1:]

    def provenance(self, model_id: str) -> dict[str, Any]:
        return self._model(model_id)[2]

    def unload(self) -> None:
        self._loaded, self._data = None, None

    def group(self, model_id: str, layer: int, pending: list[tuple[str, list[str]]], layers: list[int],
              progress: Callable[[str], Any] | None = None) -> Iterator[UnitResult]:
        """The pending units of (model_id, layer), one at a time. Activations are collected at the sites of every
        method at `layers` in one pass (the local executor passes all the run's layers; a Ray actor its own)."""
        model, tok, prov = self._model(model_id)
        if self._concepts is None:
            self._concepts = ConceptData.load(self.cfg.concepts, self.cfg.concept_columns, self.cfg.seed)
        sites = steering_sites(model, [make_method(m, self.cfg, la).site for la in layers
                                       for m in (*self.methods, *feature_sources(self.methods, self.cfg))])
        if self._data is None or not set(sites) <= set(self._data.sites):
            self._data = _ModelData(self, model, tok, model_id, prov["revision"], self._concepts, sites)
        data, source = self._data, _model_source(model_id, prov)
        for name, tasks in pending:
            method = make_method(name, self.cfg, layer)
            fit = self._fit(name, method, data, layer)
            base = {"run_id": self.run_id, "model": model_id, "model_source": source, "layer": layer,
                    "site": str(method.site), "method": name, "params": params_json(method),
                    "seed": self.cfg.seed, "fit_key": fit.key}
            ctx = self._context(data, layer, fit.key)
            for i, task_name in enumerate(tasks):
                if progress is not None:
                    progress(f"{model_id} L{layer} {name} {task_name}")
                unit = self._unit(task_name, method, ctx, base, fit)
                unit.fitted_here = i == 0
                yield unit

    def _context(self, data: _ModelData, layer: int, fit_key: str) -> Context:
        """The context of one (layer, fitted method): model, data, judge, and labels bound to the fit."""
        ctx = Context(data.model, data.tok, data.model_id, layer, data.concepts, data.acts, self.cfg.seed,
                      lambda row: None, judge=self.judge(), instructions=self.instructions, device=self.device,
                      fit_key=fit_key)
        ctx.labels = functools.partial(label_features, ctx=ctx, settings=self.labels)
        return ctx

    def _fit(self, name: str, method: FeatureMethod, data: _ModelData, layer: int, chain: tuple[str, ...] = ()
             ) -> Fit:
        """Fit `method` (run method `name`) from the fit cache or afresh: on the capped train split, or, for a
        method with `features_of`, on the sentences of that method's labelled features (`bench.feature_concepts`)."""
        source = getattr(method, "features_of", None)
        if source is None:
            acts = data.acts("train", method.site).cap(self.cfg.max_fit_tokens, self.cfg.seed)
        else:
            if source in (name, *chain):
                raise ValueError(f"{name}.features_of={source!r} makes a cycle: {' -> '.join((*chain, name, source))}")
            src = make_method(source, self.cfg, layer)
            src_fit = self._fit(source, src, data, layer, (*chain, name))
            made = feature_concepts(src, source, self._context(data, layer, src_fit.key),
                                    make_task("feature_detection", self.cfg))
            acts = data.texts_acts(made.texts, method.site, f"{name} <- {source}").with_labels(made.labels,
                                                                                               made.concepts)
        return self.fits.fit(getattr(type(method), "registry_name", name), method, acts)

    def _unit(self, task_name: str, method: FeatureMethod, ctx: Context, base: dict[str, Any], fit: Fit
              ) -> UnitResult:
        """Run one task (or record the fit): its samples, records and done marker."""
        t0 = time.perf_counter()
        samples: list[dict[str, Any]] = []
        base = {**base, "task": task_name, "task_params": {}, "judge": None}
        ctx.samples = lambda row: samples.append(
            {**{k: base[k] for k in ("model", "layer", "method", "task", "fit_key")}, **row})
        if task_name == "fit":
            metrics = {"fit_seconds": fit.seconds, **getattr(method, "fit_metrics_", {})}
            scores = [Score(k, float(v), split="train") for k, v in metrics.items()]
        else:
            task = make_task(task_name, self.cfg)
            base["task_params"] = task_params(task)
            if getattr(registry.TASKS[task_name], "needs_judge", False):
                base["judge"] = getattr(ctx.judge, "name", None) or getattr(ctx.judge, "model", None)
            torch.manual_seed(self.cfg.seed)
            scores = list(task.run(method, ctx))
        key = unit_key(base["model"], base["layer"], base["method"], task_name)
        marker = {"unit": key, "n_records": len(scores), "fit_key": fit.key,
                  "seconds": round(time.perf_counter() - t0, 2), "fit_cached": fit.cached}
        return UnitResult(key, samples, [to_record(s, **base) for s in scores], marker)


class _ModelData:
    """Activations of the concept splits for one model, collected once for all sites of the run."""

    def __init__(self, run: Any, model: Any, tok: Any, model_id: str, revision: str, concepts: ConceptData,
                 sites: list[Site]) -> None:
        self.run, self.model, self.tok, self.model_id, self.revision = run, model, tok, model_id, revision
        self.concepts, self.sites = concepts, sites
        self.memo: dict[str, dict[Site, Activations]] = {}

    def texts_acts(self, texts: list[str], site: Site, desc: str) -> Activations:
        """Cached activations of arbitrary `texts` at `site` (no labels)."""
        cfg = self.run.cfg
        return self.run.cache.get(self.model, self.tok, self.model_id, self.revision, texts, [site], cfg.batch_size,
                                  cfg.max_len, desc=desc)[site]

    def acts(self, split: str, site: Site) -> Activations:
        """Cached activations at `site` of concept split `split` (labels attached) or of the `neutral` corpus."""
        if split not in self.memo:
            cfg = self.run.cfg
            if split == "neutral":
                texts = load_lines(None, "neutral.jsonl")["text"].tolist()
            else:
                data = self.concepts.split(split)
                texts = data.texts
            got = self.run.cache.get(self.model, self.tok, self.model_id, self.revision, texts, self.sites,
                                     cfg.batch_size, cfg.max_len, desc=f"{self.model_id} {split}")
            if split != "neutral":
                got = {s: a.with_labels(data.labels(), self.concepts.concepts) for s, a in got.items()}
            self.memo[split] = got
        if site not in self.memo[split]:
            raise ValueError(f"site {site} was not collected; collected: {', '.join(map(str, self.sites))}")
        return self.memo[split][site]


def _model_source(model_id: str, prov: dict[str, Any]) -> str:
    if "package" in prov:
        return f"{prov['package']}=={prov['package_version']} sha256:{prov['file_sha256']}"
    return f"{model_id}@{prov['revision']}"


def _cpu_seconds() -> float:
    """User plus system CPU seconds of this process so far (all its threads): unlike wall time, barely moved by
    other processes on the machine."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
