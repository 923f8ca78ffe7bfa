"""Labels of individual features, the artifact the paper's feature-centric tasks share (arXiv 2506.10920).

Tasks use these names:

- `LabelSettings`: how labels are made (top contexts, context window, vocabulary list lengths, labeler).
- `FeatureLabel`: one feature's input-side label, output-side labels per sign, and the evidence shown to the
  labeler. A label of None means unlabelled (the labeler answered that the list has no theme, or gave no
  parseable answer); it is recorded as such, never dropped silently.
- `select_features(n_features, max_features, seed)`: every feature, or a seeded sample; the same arguments
  give the same features in every task, so feature_labels, feature_steering and feature_detection agree.
- `ctx.labels(method, features)` (set by the runner, bound to the run's `feature_labels` task settings)
  returns {feature: FeatureLabel}; results are cached on disk per (ctx.fit_key, feature, settings, labeler),
  so the second task that asks pays nothing.

How (the reference's `experiments/snmf_interp/`): the evidence comes from `bench.feature_evidence` (top tokens of
the fit data with +-`window` tokens of context; the direction's top vocabulary per sign). An LLM judge (`--judge
fake | openai:<model> | hf:<id>`) writes the labels from the templates `feature_label_{input,output}`: the
`n_show` top tokens as token, context and activation, highest first; the `n_vocab_show` top tokens of one sign
with their scores, one label per sign. The label is the text after `Results:` (no `Results:`: unlabelled, as the
reference); the output side may answer NO THEME (the reference's TRASH): unlabelled. Under the offline judge the
local model `labeler` completes the few-shot templates `feature_label_{input,output}_local` (the first line it
writes). Deviation: the reference labels SAE and DiM outputs from the first character of each token (its quirk);
here every method shows whole tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.activations import cache_root
from bench.feature_evidence import TextIndex, marked, top_codes, vocab_lists
from bench.judge import load_template
from bench.labeler import can_complete, clean_label, complete_grouped, writer, writer_name

log = logging.getLogger(__name__)
LABELS_VERSION = 4  # bump when the evidence, the prompts or the parsing change (part of the store key)
SIGNS = ("+", "-")
_NO_THEME = re.compile(r"^\W*(no[ _-]?theme|trash|none|n/?a|no (clear )?(connection|pattern|concept))\W*$", re.I)
_RESULTS = re.compile(r"results?\s*:\s*(.*)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class LabelSettings:
    """How features are labelled (defaults: the reference's run scripts)."""

    n_top: int = 25  # top activating tokens per feature (input side)
    window: int = 15  # tokens of context either side, from the same text
    n_show: int = 10  # of those, shown to the labeler (token, context, activation)
    n_vocab: int = 75  # vocabulary tokens per sign (output side)
    n_vocab_show: int = 25  # of those, shown to the labeler with their scores
    labeler: str = "gemma-3-270m-gguf"  # local model labelling under the offline judge (bench.labeler_choice)
    max_new_tokens: int = 16  # label length (tokens) of the local labeler
    local_window: int = 5  # tokens either side of a top token shown to the local labeler (short prompts)
    batch_size: int = 64  # prompts per decoding batch of the local labeler (decoding steps are bound by reading
    # the unembedding, so one batch of every prompt of a unit costs little more than a batch of 16)

    def __post_init__(self) -> None:
        for name in ("n_top", "n_show", "n_vocab", "n_vocab_show", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"feature_labels.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("window", "local_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"feature_labels.{name} must be >= 0, got {getattr(self, name)}")
        for shown, kept in (("n_show", "n_top"), ("n_vocab_show", "n_vocab")):
            if getattr(self, shown) > getattr(self, kept):
                raise ValueError(f"feature_labels.{shown}={getattr(self, shown)} must not exceed "
                                 f"feature_labels.{kept}={getattr(self, kept)}")


@dataclass(frozen=True)
class TopToken:
    token: str
    context: str
    activation: float
    prompt: int  # row of the text it came from
    position: int
    span: tuple[int, int] = (0, 0)  # where the token sits in `context` (characters; (0, 0) = unknown)
    near: str = ""  # a shorter context (`local_window` tokens either side) with the token marked [[like this]]


@dataclass(frozen=True)
class FeatureLabel:
    """One feature's labels and the evidence behind them."""

    feature: int
    input: str | None  # None = unlabelled
    output: dict[str, str | None]  # {"+": label of the promoted tokens, "-": of the suppressed ones}
    top_tokens: tuple[TopToken, ...] = ()
    vocab: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)  # sign -> ((token, score), ...)
    answers: dict[str, str | None] = field(default_factory=dict)  # the labeler's raw answers: input, +, -

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> FeatureLabel:
        tops = tuple(TopToken(**{**t, "span": tuple(t.get("span", (0, 0)))}) for t in row["top_tokens"])
        vocab = {s: tuple((str(t), float(v)) for t, v in pairs) for s, pairs in row["vocab"].items()}
        return cls(int(row["feature"]), row["input"], dict(row["output"]), tops, vocab, dict(row.get("answers", {})))


def select_features(n_features: int, max_features: int, seed: int) -> list[int]:
    """Every feature (max_features = 0 or >= n_features), else a seeded sample of `max_features`, sorted."""
    if max_features <= 0 or max_features >= n_features:
        return list(range(n_features))
    return sorted(random.Random(seed).sample(range(n_features), max_features))


def settings_from(params: Mapping[str, Any]) -> LabelSettings:
    """The LabelSettings among a task's parameters (the run's `[task.feature_labels]` table; others ignored)."""
    from bench.config import check_params

    names = {f.name for f in dataclasses.fields(LabelSettings)}
    return LabelSettings(**check_params(LabelSettings, {k: v for k, v in params.items() if k in names},
                                        "task", "feature_labels"))


# ----------------------------------------------------------------------------------------------- labelling
def label_features(method: Any, features: Sequence[int], ctx: Any,
                   settings: LabelSettings | None = None) -> dict[int, FeatureLabel]:
    """{feature: FeatureLabel} for `features` of the fitted `method`, from the store when it has them."""
    settings = settings or LabelSettings()
    n = method.directions_.shape[0]
    feats = sorted({int(f) for f in features})
    bad = [f for f in feats if not 0 <= f < n]
    if bad:
        raise ValueError(f"features {bad[:5]} out of range: the method has {n} features")
    if ctx.judge is None:
        raise ValueError("feature labels need a writer: run with --judge offline | fake | openai:<model> | hf:<id>")
    style = "" if can_complete(ctx.judge) else "_local"
    templates = {side: load_template(f"feature_label_{side}{style}") for side in ("input", "output")}
    store, fit_key = LabelStore(), getattr(ctx, "fit_key", "")  # no fit key (a bare context): no store
    key = store.key(fit_key, settings, writer_name(ctx.judge, settings.labeler), _params(ctx.judge),
                    [t.tag for t in templates.values()]) if fit_key else ""
    found = store.get(key, feats) if key else {}
    todo = [f for f in feats if f not in found]
    if todo:
        fresh = _label(method, todo, ctx, settings, templates, style)
        if key:
            store.put(key, fresh.values())
        found.update(fresh)
    log.info("labels of %d features at %s: %d from the store, %d written", len(feats), method.site,
             len(feats) - len(todo), len(todo))
    return {f: found[f] for f in feats}


def _params(judge: Any) -> dict[str, Any]:
    """The decoding parameters of an LLM judge (part of the store key); {} for the offline judge."""
    inner = getattr(judge, "judge", judge)
    return json.loads(json.dumps(dict(getattr(inner, "params", {}) or {}), default=str)) if can_complete(judge) else {}


def gather_evidence(method: Any, feats: list[int], ctx: Any, s: LabelSettings
                    ) -> tuple[list[tuple[TopToken, ...]], list[dict[str, tuple[tuple[str, float], ...]]]]:
    """Per feature of `feats`: its top activating tokens over the fit data (codes <= 0 dropped) and its
    vocabulary projection per sign, (token text, score), as the labeler is shown them."""
    acts = ctx.acts("train", method.site)
    vals, idx = top_codes(method, acts, feats, s.n_top)  # [f, n_top]
    texts = TextIndex(acts)
    tops: list[tuple[TopToken, ...]] = []
    for row_v, row_i in zip(vals.tolist(), idx.tolist(), strict=True):
        row = []
        for v, i in zip(row_v, row_i, strict=True):
            if v > 0 and i >= 0:  # codes <= 0 are discarded (reference)
                tok, context, span = texts.context(i, s.window, ctx.tokenizer)
                near = marked(*texts.context(i, s.local_window, ctx.tokenizer)[1:], tok)
                row.append(TopToken(tok, context, float(v), int(acts.prompt_idx[i]), int(acts.position[i]), span,
                                    near))
        tops.append(tuple(row))
    ids, scores = vocab_lists(ctx.model, method.site, method.directions_[feats], s.n_vocab)  # [f, 2, n_vocab]
    vocab = [{sign: tuple((ctx.tokenizer.decode([t]), round(float(v), 4))
                          for t, v in zip(ids[j, k].tolist(), scores[j, k].tolist(), strict=True))
              for k, sign in enumerate(SIGNS)} for j in range(len(feats))]
    return tops, vocab


def _label(method: Any, feats: list[int], ctx: Any, s: LabelSettings, templates: dict[str, Any],
           style: str) -> dict[int, FeatureLabel]:
    tops, vocab = gather_evidence(method, feats, ctx, s)
    jobs: list[tuple[int, str]] = []  # (row, side) per prompt
    prompts, tags = [], []
    for j in range(len(feats)):
        if tops[j]:
            jobs.append((j, "input"))
            prompts.append(_prompt(templates["input"], style, examples=render_tokens(tops[j][: s.n_show], style)))
            tags.append(templates["input"].tag)
        for sign in SIGNS:
            jobs.append((j, sign))
            prompts.append(_prompt(templates["output"], style,
                                   tokens=render_vocab(vocab[j][sign][: s.n_vocab_show], style)))
            tags.append(templates["output"].tag)
    w = writer(ctx.judge, s.labeler, ctx.device, s.max_new_tokens, s.batch_size)
    answers: list[dict[str, str | None]] = [{} for _ in feats]
    for (j, side), a in zip(jobs, complete_grouped(w, prompts, tags), strict=True):
        answers[j][side] = a
    out = {}
    for j, f in enumerate(feats):
        out[f] = FeatureLabel(f, parse_label(answers[j].get("input"), style),
                              {sign: parse_label(answers[j].get(sign), style) for sign in SIGNS}, tops[j], vocab[j],
                              answers[j])
    return out


def _prompt(template: Any, style: str, **fields: str) -> str:
    """A rendered template; a few-shot completion prompt ends right after its last `Label:` (a trailing newline
    makes the small model start a new line instead of the label)."""
    text = template.render(**fields)
    return text.rstrip() if style else text


def render_tokens(tops: Sequence[TopToken], style: str = "") -> str:
    """The labeler's view of the input side, highest activation first: one line per token with its context and
    activation; in the local (few-shot) style the short contexts with the token marked [[like this]]."""
    tops = sorted(tops, key=lambda t: -t.activation)
    if style:
        return "\n".join(f"- {t.near or marked(t.context, t.span, t.token)}" for t in tops)
    return "\n".join(f"Token: `{t.token}` | Context: `{t.context}` | Activation: {t.activation:.4g}" for t in tops)


def render_vocab(pairs: Sequence[tuple[str, float]], style: str = "") -> str:
    """The labeler's view of one sign's vocabulary list, highest score first."""
    if style:
        return ", ".join(t.strip() or repr(t) for t, _ in pairs)
    return "\n".join(f"Token: `{t}` | Score: {v:.4g}" for t, v in pairs)


def parse_label(answer: str | None, style: str = "") -> str | None:
    """The label in a labeler's answer, or None (unlabelled): the text after `Results:` (its first line, without a
    `- Connection:` prefix) for the instruction templates, where no `Results:` means unlabelled as in the reference;
    the rest of the `Label:` line for the local few-shot templates (a model that breaks the line first wrote no
    label). A no-theme answer (NO THEME, TRASH, none) is unlabelled."""
    if answer is None:
        return None
    if style:
        answer = re.sub(r"^\s*-\s+", "", answer.split("\n", 1)[0])  # a copied list bullet is no part of it
    else:
        m = _RESULTS.search(answer)
        if m is None:
            return None
        answer = re.sub(r"^\W*(connection|label)\s*:\s*", "", m.group(1).strip(), flags=re.IGNORECASE)
    label = clean_label(answer)
    if label is None or _NO_THEME.match(label):
        return None
    return label


# ----------------------------------------------------------------------------------------------- store
class LabelStore:
    """Labels on disk: `<cache>/labels/<key>/<feature>.json`, key = sha256(fit key, settings, writer, its decoding
    parameters, template versions, LABELS_VERSION). Each file is written to a temp file and renamed into place."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_root()) / "labels"

    @staticmethod
    def key(fit_key: str, settings: LabelSettings, writer: str, params: Mapping[str, Any], tags: list[str]) -> str:
        spec = {"fit": fit_key, "settings": asdict(settings), "writer": writer, "params": dict(params),
                "templates": tags, "version": LABELS_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, key: str, features: Sequence[int]) -> dict[int, FeatureLabel]:
        out = {}
        for f in features:
            path = self.root / key / f"{f}.json"
            if path.exists():
                try:
                    out[f] = FeatureLabel.from_json(json.loads(path.read_text(encoding="utf-8")))
                except (ValueError, KeyError, TypeError) as e:  # a damaged file: label that feature again
                    log.warning("label store: %s is unreadable (%s); labelling again", path, e)
        return out

    def put(self, key: str, labels: Any) -> None:
        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        for label in labels:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{label.feature}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(label.to_json(), f)
                os.replace(tmp, folder / f"{label.feature}.json")
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
