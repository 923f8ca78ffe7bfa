"""The two plug-in interfaces: `FeatureMethod` (methods/) and `Task` (tasks/), plus the `Context` a task gets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from torch import Tensor

from bench.sites import Site

if TYPE_CHECKING:
    from torch import nn

    from bench.activations import Activations
    from bench.data import ConceptData
    from bench.results import Score


@runtime_checkable
class FeatureMethod(Protocol):
    """A feature method: hyperparameters are dataclass fields, learned state ends in `_`, `fit` returns self.

    Optional members the harness uses when present:
    - `concepts_: list[str]`: the concept each feature was built for (supervised methods such as DiM);
      detection then matches concept c to its own feature instead of searching by AUROC.
    - `fit_metrics_: dict[str, float]`: numbers about the fit (loss, explained variance, seconds, ...),
      recorded once per unit under the task name `fit`.
    """

    site: Site  # where activations are read and where steering is added
    directions_: Tensor  # [n_features, d_site], set by fit

    def fit(self, acts: Activations) -> Self: ...

    def encode(self, x: Tensor) -> Tensor:  # [n, d_site] -> [n, n_features]
        ...


@dataclass
class Context:
    """What a task gets besides the method: the model, data, caches and writers of the current unit."""

    model: nn.Module
    tokenizer: Any
    model_id: str
    layer: int
    concepts: ConceptData
    acts: Callable[[str, Site], Activations]  # ("train"|"dev"|"test"|"neutral", site) -> cached activations
    seed: int
    samples: Callable[[dict[str, Any]], None]  # append one row to samples.jsonl
    judge: Any = None  # a bench.judge grader/judge built once per run from `--judge`, for tasks that need one
    instructions: Any = None  # pandas frame of steering instructions: `text`, `split` (dev/test)
    device: str = "cpu"
    memo: dict[Any, Any] = field(default_factory=dict)  # per-unit results shared by tasks (e.g. concept matches)
    fit_key: str = ""  # content key of the fitted features (bench.fits): keys artifacts shared between tasks
    labels: Callable[..., dict[int, Any]] | None = None  # (method, features) -> {feature: FeatureLabel}


class Task(Protocol):
    """A task scores one fitted method in one context; it never names methods.

    A task class may set `needs_judge = True`; the runner then builds the run's judge (`--judge`) once and
    passes it as `ctx.judge`, and stamps its name on the task's records."""

    def run(self, method: FeatureMethod, ctx: Context) -> Iterator[Score]: ...
