"""Where a run's units are computed: Ray actors, one (model, layer) group per call, over a shared cache directory.

`bench run --executor ray [--ray-address ADDR]` starts (or joins, with an address such as `auto` or
`ray://head:10001`) a Ray cluster and runs each (model, layer) group of pending units in a `Worker` inside a Ray
actor that keeps its model loaded between groups. The actors need `num_gpus = gpus_per_worker` and `num_cpus =
cpus_per_worker` (run settings); `workers` of them run at once (0: as many as the cluster's CPUs, or GPUs when
`gpus_per_worker` > 0, allow, at most one per group). Every actor reads and writes the same featbench cache
(`$FEATBENCH_CACHE`; on a cluster, a shared file system mounted at the same path on every node): activations, fits,
labels and judge answers are written atomically and keyed by content, so concurrent writers agree.

The driver (`bench.runner.Run`) stays the only writer of records.jsonl, samples.jsonl and units.jsonl: it appends
each unit's rows as the groups come back, in the order of the plan, so a finished run's files equal those of the
local executor (up to timings), and a killed driver resumes with `--resume` like any run (the groups it had not yet
written are computed again, mostly from the caches).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.activations import cache_root
from bench.config import RunConfig

log = logging.getLogger(__name__)
Group = tuple[str, int, list[tuple[str, list[str]]]]


class GroupActor:
    """A Ray actor's state: one `bench.runner.Worker`, its model kept loaded between groups."""

    def __init__(self, cfg: dict[str, Any], run_id: str, methods: list[str], tasks: list[str], threads: int,
                 cache: str | None) -> None:
        import torch

        from bench.runner import Worker

        if cache:
            os.environ["FEATBENCH_CACHE"] = cache  # the driver's cache, wherever the actor runs
        torch.set_num_threads(max(1, threads))
        self.worker = Worker(RunConfig.from_dict(cfg), run_id, methods, tasks)

    def group(self, model_id: str, layer: int, pending: list[tuple[str, list[str]]]) -> tuple[dict[str, Any], list]:
        """(model provenance, [UnitResult]) of one (model, layer) group; activations only at this layer's sites."""
        units = list(self.worker.group(model_id, layer, pending, [layer]))
        return self.worker.provenance(model_id), units


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """`cfg` with its file settings (concept data, rubric directory) made absolute when they name local paths, so an
    actor started in another working directory reads the same files (hub names stay as they are)."""
    fix = {k: str(Path(v).resolve()) for k in ("concepts", "judge_templates")
           if isinstance(v := getattr(cfg, k), str) and Path(v).exists()}
    return dataclasses.replace(cfg, **fix) if fix else cfg


def ray_groups(cfg: RunConfig, run_id: str, methods: list[str], tasks: list[str], groups: list[Group]
               ) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(model id, provenance, UnitResult) of every unit of `groups`, computed by Ray actors, yielded in plan order."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ModuleNotFoundError("--executor ray needs Ray: pip install 'featbench[ray]'") from None
    if not groups:
        return
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=True)
    resources = ray.cluster_resources()
    per = "GPU" if cfg.gpus_per_worker > 0 else "CPU"
    need = cfg.gpus_per_worker if cfg.gpus_per_worker > 0 else cfg.cpus_per_worker
    fits = int(resources.get(per, 0) // need) if need > 0 else len(groups)
    if fits < 1:
        raise ValueError(f"the Ray cluster has {resources.get(per, 0)} {per}(s); one worker needs {need} "
                         f"(gpus_per_worker={cfg.gpus_per_worker}, cpus_per_worker={cfg.cpus_per_worker})")
    if cfg.workers > fits:
        log.warning("ray: workers=%d but the cluster fits %d; running %d", cfg.workers, fits, fits)
    n = min(cfg.workers or fits, fits, len(groups))
    log.info("ray: %d group(s) on %d actor(s) (%s per actor: %s); cluster: %s", len(groups), n, per, need,
             {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")})
    actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(GroupActor)
    threads = max(1, int(cfg.cpus_per_worker))
    cache = str(cache_root())  # the driver's cache, as an absolute path, wherever an actor starts
    shipped = absolute_paths(cfg).to_dict()
    pool = ActorPool([actor.remote(shipped, run_id, methods, tasks, threads, cache) for _ in range(n)])
    for (model_id, _, _), (prov, units) in zip(groups, pool.map(lambda a, g: a.group.remote(*g), groups),
                                                 strict=True):
        for unit in units:
            yield model_id, prov, unit
