"""The LLM grader: `TemplateGrader` renders the rubric templates for an LLM judge (the `LLMJudge` protocol) and
parses its answers; every completion goes through the judge cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bench.judges.cache import JudgeCache
from bench.judges.ratings import ASPECTS, FeatureRatings, Item, Ratings, parse_feature_ratings, parse_ratings
from bench.judges.templates import check_templates, load_template

if TYPE_CHECKING:
    from bench.protocols import Context


class LLMJudge(Protocol):
    """A model that completes prompts. `complete` returns None for a prompt whose call failed."""

    name: str  # e.g. "openai:gpt-4o-mini"; stamped on records
    model: str
    params: Mapping[str, Any]  # decoding parameters (part of the cache key)
    calls: int  # prompts sent to the back end

    def complete(self, prompts: list[str]) -> list[str | None]: ...

    # optional: `stream(prompts) -> Iterator[tuple[int, str | None]]`, (index, answer) in completion order


class TemplateGrader:
    """Rates steering items with an LLM judge and the templates `steering_{concept,instruction,fluency}`, and
    (label, text) pairs with `feature_{concept,fluency}`; `templates_dir` swaps in the user's rubric files."""

    templates = {a: f"steering_{a}" for a in ASPECTS}
    feature_templates = {"concept": "feature_concept", "fluency": "feature_fluency"}

    def __init__(self, judge: LLMJudge, cache: JudgeCache | None = None,
                 templates_dir: str | Path | None = None) -> None:
        self.judge, self.cache = judge, cache or JudgeCache()
        self.name, self.model = judge.name, judge.model
        if templates_dir is not None:
            check_templates(templates_dir)
        self._templates = {a: load_template(t, templates_dir) for a, t in self.templates.items()}
        self._feature = {a: load_template(t, templates_dir) for a, t in self.feature_templates.items()}

    @property
    def calls(self) -> int:
        """Prompts sent to the judge (not served from the cache)."""
        return self.judge.calls

    def complete(self, prompts: list[str], version: str | Sequence[str] = "") -> list[str | None]:
        """Cached completions of `prompts`; `version` (the template's name@version, one or one per prompt) is part
        of each cache key. Missing answers go to the judge in one call; each is stored as it arrives."""
        params = dict(self.judge.params)
        versions = [version] * len(prompts) if isinstance(version, str) else list(version)
        keys = [JudgeCache.key(self.name, p, params, v) for p, v in zip(prompts, versions, strict=True)]
        send = getattr(self.judge, "stream", None) or self.judge.complete  # streamed answers are stored one by one
        return self.cache.through(keys, self.name, versions, lambda idx: send([prompts[i] for i in idx]))

    def rate(self, items: Sequence[Item], ctx: Context | None = None) -> list[Ratings]:
        """Rate steering items for concept, instruction and fluency, in one cached batch (`ctx` is unused)."""
        prompts, versions = [], []
        for tpl in self._templates.values():  # aspect-major: prompts[a * n + i]
            prompts += [tpl.render(concept=it.concept, instruction=it.instruction, response=it.response)
                        for it in items]
            versions += [tpl.tag] * len(items)
        flat = self.complete(prompts, versions)
        n = len(items)
        return parse_ratings({a: flat[k * n : (k + 1) * n] for k, a in enumerate(self._templates)})

    def rate_features(self, items: Sequence[tuple[str | None, str]],
                      ctx: Context | None = None) -> list[FeatureRatings]:
        """Rate (label, text) pairs for concept (against the label; a None label is unscored, not sent) and fluency
        (one prompt per distinct text), in one cached batch."""
        con, flu = self._feature["concept"], self._feature["fluency"]
        labelled = [i for i, (label, _) in enumerate(items) if label is not None]
        prompts = [con.render(concept=items[i][0], response=items[i][1]) for i in labelled]
        prompts += [flu.render(response=text) for _, text in items]
        flat = self.complete(prompts, [con.tag] * len(labelled) + [flu.tag] * len(items))
        concept = dict(zip(labelled, flat[: len(labelled)], strict=True))
        return parse_feature_ratings(concept, flat[len(labelled) :])
