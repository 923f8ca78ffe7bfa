"""`bench run | report | list | cache`: the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bench import registry

if TYPE_CHECKING:
    from bench.config import RunConfig

log = logging.getLogger("bench")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="Compare interpretability feature methods.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run methods x tasks on models x layers, then print the leaderboard")
    r.add_argument("--config", help="TOML config (default: the shipped default.toml); flags override it")
    r.add_argument("--preset", help="a shipped config by name: default, smoke, ...")
    r.add_argument("--models", help="comma list: hub ids, local paths, gemma-3-270m-gguf, tiny:<arch>")
    r.add_argument("--layers", help="comma list of ints or early/middle/late")
    r.add_argument("--methods", help="comma list of registered methods (default: all)")
    r.add_argument("--tasks", help="comma list of registered tasks (default: all)")
    r.add_argument("--concepts", help="concept data: JSONL/JSON/CSV/parquet path or hub dataset name")
    r.add_argument("--concept-columns", dest="concept_columns", metavar="OURS=THEIRS,...",
                   help="which file columns hold text, concept, split, ...: e.g. text=prompt,concept=label")
    r.add_argument("-M", dest="method_params", action="append", default=[], metavar="METHOD.FIELD=VALUE")
    r.add_argument("-T", dest="task_params", action="append", default=[], metavar="TASK.FIELD=VALUE")
    r.add_argument("--seed", type=int)
    r.add_argument("--device", help="auto | cpu | cuda")
    r.add_argument("--device-map", dest="device_map", metavar="MAP",
                   help="spread a model too large for one device over several (accelerate): auto | balanced | "
                        "balanced_low_0 | sequential | a JSON {module: device}; default none")
    r.add_argument("--max-fit-tokens", type=int, dest="max_fit_tokens")
    r.add_argument("--judge", help="offline | fake | openai:<model> | hf:<path or id>")
    r.add_argument("--judge-base-url", dest="judge_base_url")
    r.add_argument("--judge-templates", dest="judge_templates", metavar="DIR",
                   help="directory of rubric files (feature_concept.txt, ...) that replace the shipped ones")
    r.add_argument("--out", help="run directory (default: results/<run_id>)")
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR, skipping finished units")
    r.add_argument("--executor", choices=["local", "ray"], help="where units run: this process (default) or Ray actors")
    r.add_argument("--ray-address", dest="ray_address", metavar="ADDR",
                   help="join this Ray cluster (auto, host:port, ray://host:port); default: start a local one")
    r.add_argument("--workers", type=int, help="ray: actors at once (default 0: as many as the cluster allows)")
    r.add_argument("--gpus-per-worker", type=float, dest="gpus_per_worker", help="ray: GPUs per actor (default 0)")
    r.add_argument("--cpus-per-worker", type=float, dest="cpus_per_worker", help="ray: CPUs per actor (default 1)")
    r.add_argument("--dry-run", action="store_true", help="list the units and the estimated cost, run nothing")
    r.add_argument("--show-config", action="store_true", help="print the resolved config as TOML-ish JSON and exit")

    rep = sub.add_parser("report", help="leaderboard tables from run directories")
    rep.add_argument("dirs", nargs="+", help="run directories (with --browser also `bench analyze hierarchy` outputs)")
    rep.add_argument("--out", help="where to write tables (default: the first run directory)")
    rep.add_argument("--figures", metavar="DIR", help="also write every figure (PNG, PDF) and LaTeX tables to DIR")
    rep.add_argument("--browser", action="store_true",
                     help="also write a static HTML feature browser (and any feature trees) to <out>/browser/")

    ls = sub.add_parser("list", help="list registered methods, tasks or known models")
    ls.add_argument("what", choices=["methods", "tasks", "models"])

    a = sub.add_parser("analyze", help="analyses beyond the leaderboard")
    a.add_argument("what", choices=["hierarchy"])
    a.add_argument("--preset", help="cpu (default) | paper-hierarchy (GPT-2-large layer 8, the reference's settings)")
    a.add_argument("--model", help="model id (default: the preset's)")
    a.add_argument("--layer", help="an int or early/middle/late (default: the preset's)")
    a.add_argument("--ranks", help="recursive SNMF sizes per level, finest first, comma list (e.g. 400,200,100,50)")
    a.add_argument("--fine-tune-steps", type=int, dest="fine_tune_steps")
    a.add_argument("--sparsity", type=float, help="fraction of d_mlp kept per feature (default: the preset's, 0.01)")
    a.add_argument("--ks", help="instead: the cross-k analysis (flat SNMF at each k, Jaccard links), comma list")
    a.add_argument("--concepts", help="concept data (default: shipped; hierarchical for the recursive analysis)")
    a.add_argument("--concept-columns", dest="concept_columns", metavar="OURS=THEIRS,...",
                   help="file columns: text, concept, split, parent, token (e.g. text=prompt,concept=label)")
    a.add_argument("--max-iter", type=int, dest="max_iter")
    a.add_argument("--seed", type=int)
    a.add_argument("--device")
    a.add_argument("--out", help="default: results/hierarchy/recursive (results/hierarchy with --ks)")
    a.add_argument("--figures", metavar="DIR", help="also write the PNG figures to DIR")

    pf = sub.add_parser("perf", help="run a speed benchmark of benchmarks/ (source checkout): ratios vs a baseline")
    pf.add_argument("name", nargs="?", help="benchmark name (file stem in benchmarks/); omit to list them")
    pf.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")

    c = sub.add_parser("cache", help="show or clear the featbench cache")
    c.add_argument("action", choices=["info", "clear"])
    return p


def _run(args: argparse.Namespace) -> int:
    from bench import preflight
    from bench.config import EXECUTION, RunConfig, parse_params, shipped_config
    from bench.report import write_leaderboard
    from bench.results import load, read_jsonl
    from bench.runner import Run, new_run_id, typed

    overrides = {k: getattr(args, k) for k in ("models", "layers", "methods", "tasks", "concepts", "concept_columns",
                                                "seed", "device", "device_map", "max_fit_tokens", "judge",
                                                "judge_base_url", "judge_templates", "executor", "ray_address",
                                                "workers", "gpus_per_worker", "cpus_per_worker")}
    overrides["method"] = parse_params(args.method_params, "-M")
    overrides["task"] = parse_params(args.task_params, "-T")
    path = args.config or (shipped_config(args.preset) if args.preset else None)
    if args.resume:
        out = Path(args.resume)
        cfg = _stored_config(out)
        given = RunConfig.load(path, overrides) if path else cfg.with_overrides(overrides)
        bad = preflight.conflicts(cfg, given)
        if args.out and Path(args.out).resolve() != out.resolve():
            bad.append(f"out: stored {str(out)!r} vs given {args.out!r}")
        if bad:
            raise ValueError(f"--resume {out}: flags conflict with its config.json: {'; '.join(bad)}; drop them to "
                             "resume, or start a new run with --out")
        cfg = dataclasses.replace(cfg, **{k: getattr(given, k) for k in EXECUTION})  # where it runs may change
    else:
        cfg = typed(RunConfig.load(path, overrides))  # config.json stores typed values, not the strings typed
    if args.show_config:
        sys.stdout.write(json.dumps(cfg.to_dict(), indent=2) + "\n")
        return 0
    if not args.resume:
        out = Path(args.out) if args.out else Path("results") / new_run_id(cfg)
    preflight.check(cfg, None if args.dry_run else out)  # every value, file and package, before any work
    if cfg.judge_templates:
        from bench.judge import check_templates, needed_rubrics
        from bench.runner import selected

        check_templates(cfg.judge_templates, needed_rubrics([registry.TASKS[t] for t in selected(cfg)[1]]))
    if args.dry_run:
        import pandas as pd

        run = Run(cfg, out, resume=False, dry_run=True)
        if args.resume:
            run.done = {u["unit"] for u in read_jsonl(out / "units.jsonl")}
        plan = pd.DataFrame(run.plan())
        sys.stdout.write(plan.to_markdown(index=False) + "\n\n")
        cost = run.estimate()
        sys.stdout.write("\n".join(f"{k}: {v:,.1f}" for k, v in cost.items()) + "\n")
        return 0
    run_dir = Run(cfg, out, resume=bool(args.resume)).execute()
    log.info("records in %s", run_dir / "records.jsonl")
    from bench.report import headline

    frame = load([run_dir])
    write_leaderboard(frame, run_dir)  # the full tables go to files; the run ends with the headline
    sys.stdout.write(f"{headline(frame)}\nfull leaderboard: {run_dir / 'leaderboard.md'} (and .csv); paired "
                     f"comparisons: {run_dir / 'paired.md'}\n")
    return 0


def _stored_config(out: Path) -> RunConfig:
    from bench.config import RunConfig

    if not (out / "config.json").exists():
        raise FileNotFoundError(f"--resume {out}: no config.json there; is it a featbench run directory?")
    try:
        saved = json.loads((out / "config.json").read_text())
        saved.pop("run_id")
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"--resume {out}: its config.json is not a featbench run config ({e})") from None
    return RunConfig.from_dict(saved, source=str(out / "config.json"))


def _report(args: argparse.Namespace) -> int:
    from bench.report_command import report

    sys.stdout.write(report(args.dirs, args.out, args.figures, args.browser))
    return 0


def _list(args: argparse.Namespace) -> int:
    from bench.models import DEFAULT_MODEL, EMBEDDED, TINY_ARCHS

    registry.discover()
    if args.what == "models":
        lines = [f"{k}{' (default)' if k == DEFAULT_MODEL else ''}: {v.note} [pip package {v.package}]"
                 for k, v in EMBEDDED.items()]
        lines += [f"tiny:{a}: random 2-layer model for tests" for a in TINY_ARCHS]
        lines.append("any Hugging Face causal LM id or local path of a supported architecture")
    else:
        table = registry.METHODS if args.what == "methods" else registry.TASKS
        lines = [f"{name}: {(table[name].__doc__ or '').strip().splitlines()[0]}" for name in sorted(table)]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    if args.ks is None:
        from bench.hier_concepts import HierConcepts
        from bench.hierarchy_recursive import run, settings

        ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else None
        s = settings(args.preset, model=args.model, layer=args.layer, ranks=ranks, max_iter=args.max_iter,
                     sparsity=args.sparsity, fine_tune_steps=args.fine_tune_steps, seed=args.seed, device=args.device)
        concepts = HierConcepts.load(args.concepts, args.concept_columns, seed=s.seed)
        out = Path(args.out or "results/hierarchy/recursive")
        summary = run(s, concepts, out, Path(args.figures) if args.figures else None)
        sys.stdout.write(f"{summary['n_nodes']} nodes, {summary['n_parents']} parents, {summary['n_families']} "
                         f"intervention families in {summary['wall_seconds']:.0f} s; records in {out}\n")
        return 0
    from bench import hierarchy
    from bench.activations import ActivationCache
    from bench.data import ConceptData
    from bench.models import load
    from bench.runner import resolve_device
    from bench.sites import Site, n_layers, resolve_layers

    concepts = ConceptData.load(args.concepts)
    model, tok, prov = load(args.model or "gemma-3-270m-gguf", resolve_device(args.device or "auto"))
    layer = resolve_layers([args.layer or "middle"], n_layers(model))[0]
    train = concepts.split("train")
    site = Site(layer, "mlp")
    acts = ActivationCache().get(model, tok, args.model, prov["revision"], train.texts, [site])[site]
    acts = acts.with_labels(train.labels(), concepts.concepts)
    kinds = dict(zip(concepts.frame["concept"], concepts.frame.get("kind", concepts.frame["concept"]), strict=True))
    ks = [int(k) for k in args.ks.split(",")]
    result = hierarchy.analyze(acts, kinds, ks, seed=args.seed or 0, max_iter=args.max_iter or 200)
    paths = hierarchy.write(result, Path(args.out or "results/hierarchy"))
    sys.stdout.write(result.coherence.to_markdown(index=False, floatfmt=".3f") + "\n")
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return 0


def _perf(args: argparse.Namespace) -> int:
    import runpy

    folder = next((p / "benchmarks" for p in (Path.cwd(), Path(__file__).resolve().parent.parent)
                   if (p / "benchmarks").is_dir()), None)
    if folder is None:
        raise FileNotFoundError("no benchmarks/ folder: `bench perf` runs from a source checkout of featbench")
    known = sorted(p.stem for p in folder.glob("*.py"))
    if not args.name:
        sys.stdout.write("\n".join(known) + "\n")
        return 0
    if args.name not in known:
        raise ValueError(f"unknown benchmark {args.name!r}; known: {', '.join(known)}")
    sys.argv = [str(folder / f"{args.name}.py"), *args.args]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from bench.activations import cache_root

    root = cache_root()
    if args.action == "clear":
        shutil.rmtree(root, ignore_errors=True)
        log.info("removed %s", root)
        return 0
    for sub in sorted(p for p in root.glob("*") if p.is_dir()) if root.exists() else []:
        size = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file())
        sys.stdout.write(f"{sub}: {size / 2**20:.1f} MiB\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = {"run": _run, "report": _report, "list": _list, "analyze": _analyze, "perf": _perf,
               "cache": _cache}[args.command]
    try:
        return command(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        if args.verbose or os.environ.get("FEATBENCH_DEBUG"):
            raise
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; continue with `bench run --resume <run dir>`")
        return 130
