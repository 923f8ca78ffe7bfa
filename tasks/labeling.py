"""Labeling: is a feature interpretable from the inputs that activate it and the tokens it writes? (the paper's
second claim; scored as SAEBench / delphi detection).

Protocol, per (model, layer, method):
1. Features: every feature matched to a concept (`bench.features.match_concepts`, as detection and steering)
   plus a seeded sample of `max_features` others (every feature when the dictionary is that small).
2. Input side: the feature's activation on every token of the concept data (train, dev, test) and the neutral
   corpus; per prompt its peak token. The `n_top` prompts with the highest positive peak are the top contexts,
   `window` tokens either side of the peak (the paper: 25 contexts, +-15 tokens). The labeler sees the `n_label`
   highest (`label_window` tokens either side, tokens at >= half the context's peak marked <<so>>) and writes a
   one-sentence label. A feature that is never positive is `dead`: no label, unscored.
3. Output side: the direction through the rest of the model to the vocabulary (`bench.features.vocab_projection`);
   the labeler labels the `n_output_tokens` most promoted tokens; the most suppressed are kept for the browser.
4. Scoring (detection): the judge sees only the input label and a shuffled mix of up to `n_score` held-out top
   contexts (ranks n_label..n_top, never shown to the labeler) and `n_score` random contexts (prompts outside
   the top n_top) and says on which the feature is active: accuracy and F1 per feature. For each matched
   feature and concept, whether the input label and the output label name the concept's description.

Back ends. An LLM judge (`--judge fake | openai:<model> | hf:<id>`) writes the labels and scores them with the
templates `tasks/prompts/labeling_{input,output,detection,concept}.txt`. With the offline judge (the default) a
local model, `labeler` (SmolLM2-135M-Instruct; kept over gemma-3-270m by measurement on the concepts preset,
`bench.labeling_labeler_choice` and bench/data/labeling_labeler_choice.csv), writes the labels by completing the
few-shot templates `labeling_{input,output}_local.txt` (it follows examples, not instructions), and the offline
judge's sentence embeddings (all-MiniLM-L6-v2) score them: a context counts as active when cos(label, context) >=
`threshold` (0.15: the best fixed threshold when each concept's description is the label and its train texts vs
the rest are the contexts, accuracy 0.86); a label names a concept when cos(label, description) >= `concept_threshold`
(0.28: agrees with a hand reading on 46 of 48 (label, concept) pairs of the default model's middle layer).
Labels, judge answers and cosines are cached in the judge's SQLite cache, so a rerun makes no calls.

Records (test split), `feature` = the feature's index: `label_accuracy`, `label_f1` per labelled feature
(`concept` = its best-matched concept, else None); `label_names_concept` and `output_label_names_concept` (1/0)
per matched (feature, concept). None = unscored. Every context with its per-token activations, the output tokens,
labels and judge answers go to samples.jsonl (`kind: labeling`) for `bench report --browser`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench import Activations, Context, FeatureMethod, Score, register_task
from bench.features import Match, match_concepts, vocab_projection
from bench.judge import JudgeCache, TemplateGrader, load_template
from bench.labeler import LocalLabeler, clean_label  # noqa: F401 - LocalLabeler re-exported (moved to bench)
from bench.labeler import can_complete as _can_complete
from bench.labeler import complete_grouped as _complete
from bench.labeler import local_labeler as _local_labeler
from bench.labeler import shared_head as _shared_head  # noqa: F401 - re-exported (moved to bench)

log = logging.getLogger(__name__)
SOURCES = ("train", "dev", "test", "neutral")  # where top contexts are searched: concept splits + neutral text
MARK = 0.5  # tokens at >= MARK x the context's peak are marked <<so>> for the labeler
COSINE_VERSION = "labeling-cosine-v1"


@dataclass(frozen=True)
class Snippet:
    """A window of one prompt around the feature's peak token: token strings and the feature's activation on
    each (`acts`), `peak` = index of the peak token in `tokens`."""

    split: str
    row: int  # row of the prompt in its split
    tokens: list[str]
    acts: list[float]
    peak: int

    def text(self, width: int, mark: bool = False) -> str:
        """The window cut to `width` tokens either side of the peak, on one line; with `mark`, runs of tokens at
        >= MARK x the peak activation wrapped in << >>."""
        lo, hi = max(0, self.peak - width), self.peak + width + 1
        tokens, acts = self.tokens[lo:hi], self.acts[lo:hi]
        top = max(acts, default=0.0)
        out, run = [], []
        for tok, a in zip(tokens, acts, strict=True):
            if mark and top > 0 and a >= MARK * top:
                run.append(tok)
                continue
            if run:
                out.append(_wrap("".join(run)))
                run = []
            out.append(tok)
        if run:
            out.append(_wrap("".join(run)))
        return re.sub(r"\s+", " ", "".join(out)).strip()


def _wrap(text: str) -> str:
    lead = text[: len(text) - len(text.lstrip())]
    return f"{lead}<<{text.strip()}>>"


@register_task("labeling")
@dataclass
class Labeling:
    """Label features from their top-activating contexts and promoted tokens; score the labels by detection."""

    max_features: int = 8  # features labelled besides the matched ones (seeded sample; >= dictionary size: all)
    n_top: int = 25  # top-activating contexts kept per feature (the paper: 25)
    window: int = 15  # tokens either side of the peak kept per context (the paper: 15)
    n_label: int = 10  # top contexts shown to the labeler
    label_window: int = 5  # tokens either side of the peak shown to the labeler and the judge
    n_score: int = 5  # held-out top contexts, and as many random ones, per feature for detection scoring
    n_output_tokens: int = 10  # vocabulary tokens per sign on the output side
    labeler: str = "smollm2-135m-gguf"  # the local model that labels when --judge is offline (measured choice:
    # bench.labeling_labeler_choice; tests/test_labeling_labeler_choice.py ties it to the committed CSV)
    max_new_tokens: int = 10  # label length (tokens) for the local labeler
    batch_size: int = 16  # prompts per generate() call of the local labeler
    threshold: float = 0.15  # offline scorer: active when cos(label, context) >= threshold
    concept_threshold: float = 0.28  # offline scorer: names the concept when cos(label, description) >= this
    pool: str = "max"  # token pooling when matching features to concepts (as detection)
    sources: tuple[str, ...] = SOURCES  # where top and random contexts come from: concept splits and/or neutral

    needs_judge: ClassVar[bool] = True

    def requires(self, cfg: Any) -> tuple[str, ...]:
        """For `bench.preflight`: the local labeler's model, which writes the labels under the offline judge."""
        return (f"model:{self.labeler}",) if cfg.judge == "offline" else ()

    def __post_init__(self) -> None:
        for name in ("n_top", "n_label", "n_score", "n_output_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"labeling.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_features", "window", "label_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"labeling.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_label > self.n_top:
            raise ValueError(f"labeling.n_label={self.n_label} must not exceed labeling.n_top={self.n_top}")
        if self.label_window > self.window:
            raise ValueError(f"labeling.label_window={self.label_window} must not exceed "
                             f"labeling.window={self.window}")
        bad = sorted(set(self.sources) - set(SOURCES))
        if bad or not self.sources:
            raise ValueError(f"labeling.sources {list(self.sources)} has unknown or no entries {bad}; "
                             f"valid: {', '.join(SOURCES)}")
        for name in ("threshold", "concept_threshold"):
            if not -1 <= getattr(self, name) <= 1:
                raise ValueError(f"labeling.{name} is a cosine, valid: -1..1; got {getattr(self, name)}")

    def cost(self, n_concepts: int, n_instructions: int) -> dict[str, float]:
        """Upper bounds per unit (matched features may coincide): labels written, judge items."""
        n = self.max_features + n_concepts
        return {"label_generations": 2.0 * n, "label_judge_items": n * 2.0 * self.n_score + 2.0 * n_concepts}

    # ------------------------------------------------------------------------------------------- run
    def run(self, method: FeatureMethod, ctx: Context) -> Iterator[Score]:
        if ctx.judge is None:
            raise ValueError("the labeling task needs a judge: --judge offline | fake | openai:<model> | hf:<id>")
        t0 = time.perf_counter()
        writer, scorer, style = self._back_ends(ctx)
        calls0, hits0 = writer.calls, writer.cache.hits
        matches = match_concepts(method, ctx, self.pool)
        matched: dict[int, list[Match]] = {}
        for m in sorted(matches.values(), key=lambda m: -m.train_auroc):
            matched.setdefault(m.feature, []).append(m)
        features = self._features(method.directions_.shape[0], matched, ctx.seed)
        toks = _Tokens.gather(method, ctx, features, self.sources)
        picks = [self._pick(f, j, toks, ctx.seed) for j, f in enumerate(features)]
        toks.keep(method, [(p, j) for j, (top, mixed) in enumerate(picks) for p in [*top, *(q for q, _ in mixed)]],
                  self.window)
        ids, vals = vocab_projection(ctx.model, method.site, method.directions_[features], self.n_output_tokens)
        t_data = time.perf_counter()

        rows = [self._feature_row(f, j, toks, ctx, matched.get(f, []), *picks[j]) for j, f in enumerate(features)]
        for row, i, v in zip(rows, ids, vals, strict=True):
            row["promoted"] = [[_piece(ctx.tokenizer, int(t)), float(x)] for t, x in zip(i[0], v[0], strict=True)]
            row["suppressed"] = [[_piece(ctx.tokenizer, int(t)), float(x)] for t, x in zip(i[1], v[1], strict=True)]

        live = [r for r in rows if not r["dead"]]
        in_tpl, out_tpl = load_template(f"labeling_input{style}"), load_template(f"labeling_output{style}")
        in_prompts = [in_tpl.render(contexts=self._contexts(r)).rstrip() for r in live]
        quote = _show if not style else lambda t: t.strip() or repr(t)
        out_prompts = [out_tpl.render(tokens=", ".join(quote(t) for t, _ in r["promoted"])).rstrip() for r in rows]
        tags = [in_tpl.tag] * len(in_prompts) + [out_tpl.tag] * len(rows)
        answers = _complete(writer, in_prompts + out_prompts, tags)
        for r, a in zip(live, answers[: len(in_prompts)], strict=True):
            r["answers"]["label"], r["label"] = a, clean_label(a)
        for r, a in zip(rows, answers[len(in_prompts) :], strict=True):
            r["answers"]["output_label"], r["output_label"] = a, clean_label(a)
        t_label = time.perf_counter()

        scorer.detect(rows, self.label_window)
        scorer.names(rows, ctx.concepts.descriptions)
        for r in rows:
            r.update(_detection_scores(r))
            ctx.samples({"kind": "labeling", "site": str(method.site), "labeler": writer.name,
                         "scorer": scorer.name, **r})
            best = r["matched"][0]["concept"] if r["matched"] else None
            yield Score("label_accuracy", r["accuracy"], concept=best, feature=r["feature"])
            yield Score("label_f1", r["f1"], concept=best, feature=r["feature"])
            for m in r["matched"]:
                c = m["concept"]
                yield Score("label_names_concept", r["names_concept"].get(c), concept=c, feature=r["feature"])
                yield Score("output_label_names_concept", r["output_names_concept"].get(c), concept=c,
                            feature=r["feature"])
        log.info("labeling %s: %d features (%d dead) in %.1fs (data %.1fs, labels %.1fs, scoring %.1fs); "
                 "labeler %s: %d written, %d cache hits", method.site, len(rows), len(rows) - len(live),
                 time.perf_counter() - t0, t_data - t0, t_label - t_data, time.perf_counter() - t_label,
                 writer.name, writer.calls - calls0, writer.cache.hits - hits0)

    # ------------------------------------------------------------------------------------------- parts
    def _back_ends(self, ctx: Context) -> tuple[Any, _Scorer, str]:
        """(label writer with a cached `complete(prompts, version)`, scorer, template suffix) for the run's judge:
        an LLM judge labels with the instruction templates; under the offline judge the local labeler completes
        the few-shot templates `labeling_*_local`."""
        judge = ctx.judge
        if _can_complete(judge):
            return judge, _JudgeScorer(judge), ""
        if not hasattr(judge, "embed"):
            raise ValueError(f"judge {getattr(judge, 'name', judge)!r} can neither complete prompts nor embed "
                             "texts; use --judge offline | fake | openai:<model> | hf:<id>")
        local = _local_labeler(self.labeler, ctx.device, self.max_new_tokens, self.batch_size)
        return (TemplateGrader(local, judge.cache), _EmbeddingScorer(judge, self.threshold, self.concept_threshold),
                "_local")

    def _contexts(self, row: dict[str, Any]) -> str:
        """The labeler's view of a feature: its `n_label` top contexts, numbered, peak tokens marked."""
        top = row["top"][: self.n_label]
        return "\n".join(f"{k + 1}. {Snippet(**s).text(self.label_window, mark=True)}" for k, s in enumerate(top))

    def _features(self, n_features: int, matched: dict[int, list[Match]], seed: int) -> list[int]:
        rest = [f for f in range(n_features) if f not in matched]
        sample = rest if self.max_features >= len(rest) else random.Random(seed).sample(rest, self.max_features)
        return sorted(set(matched) | set(sample))

    def _pick(self, feature: int, col: int, toks: _Tokens, seed: int) -> tuple[list[int], list[tuple[int, bool]]]:
        """The feature's top prompts (highest positive peak first) and its shuffled scoring set of (prompt, truth):
        held-out top prompts and as many random prompts outside the top."""
        peak = toks.peak_val[:, col]  # [n_prompts]
        order = torch.argsort(-peak, stable=True).tolist()
        top = [p for p in order[: self.n_top] if peak[p] > 0]
        rng = random.Random(f"{seed}:{feature}")
        held = top[self.n_label :]
        pos = rng.sample(held, min(self.n_score, len(held)))
        top_set = set(top) | set(order[: self.n_top])
        others = [p for p in range(len(peak)) if p not in top_set and toks.n_tokens(p) > 0]
        neg = rng.sample(others, min(self.n_score, len(others))) if pos else []
        mixed = [(p, True) for p in pos] + [(p, False) for p in neg]
        rng.shuffle(mixed)
        return top, mixed

    def _feature_row(self, feature: int, col: int, toks: _Tokens, ctx: Context, matches: list[Match],
                     top: list[int], mixed: list[tuple[int, bool]]) -> dict[str, Any]:
        """The feature's contexts and scoring set as a samples row (labels and scores filled in later)."""
        peak = toks.peak_val[:, col]  # [n_prompts]
        descriptions = ctx.concepts.descriptions
        return {
            "feature": feature, "dead": not top, "max_act": float(peak[top[0]]) if top else None,
            "matched": [{"concept": m.concept, "train_auroc": m.train_auroc,
                         "description": descriptions.get(m.concept, m.concept)} for m in matches],
            "top": [asdict(toks.snippet(p, col, self.window, ctx.tokenizer)) for p in top],
            "scoring": [{**asdict(toks.snippet(p, col, self.window, ctx.tokenizer)), "truth": t} for p, t in mixed],
            "label": None, "output_label": None, "answers": {},
        }


# ----------------------------------------------------------------------------------------------- token data
@dataclass
class _Tokens:
    """The chosen features' per-prompt peaks over the concept splits and the neutral corpus, and their activations on
    only the tokens of the windows `keep` asked for; tokens grouped by prompt in position order (the token index).

    Never holds [n_tokens, n_chosen]: `gather` encodes one chunk of tokens at a time and keeps running per-prompt
    maxima; `keep` encodes again only the chunks that hold a wanted window (the same chunks, so the same values)."""

    token_ids: Tensor  # [n_tokens] in token-index order
    starts: Tensor  # [n_prompts + 1] offsets of each prompt's tokens
    where: list[tuple[str, int]]  # [n_prompts] (split, row in the split)
    peak_val: Tensor  # [n_prompts, n_chosen] max over the prompt's tokens (-inf for a prompt without tokens)
    peak_at: Tensor  # [n_prompts, n_chosen] token index of the first token at that max
    pieces: dict[int, list[str]]  # prompt -> token strings (filled on demand)
    parts: list[tuple[Activations, Tensor]]  # per split with tokens: (its activations, token index of each row)
    features: list[int]
    chunk: int
    kept_at: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [m] token indices, sorted
    kept_z: Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [m, n_chosen] activations on those tokens

    @classmethod
    def gather(cls, method: FeatureMethod, ctx: Context, features: list[int], sources: Sequence[str] = SOURCES,
               chunk: int = 4096) -> _Tokens:
        tids, counts, vals, ats, parts, where, n = [], [], [], [], [], [], 0
        k = len(features)
        for split in tqdm(sources, desc="labeling: encode", unit="split", leave=False):
            acts = ctx.acts(split, method.site)
            if len(acts) == 0:
                where += [(split, i) for i in range(acts.n_prompts)]
                vals.append(torch.full((acts.n_prompts, k), float("-inf")))
                ats.append(torch.full((acts.n_prompts, k), torch.iinfo(torch.long).max))
                counts.append(torch.zeros(acts.n_prompts, dtype=torch.long))
                continue
            order = torch.argsort(acts.prompt_idx * (int(acts.position.max()) + 1) + acts.position, stable=True)
            index = torch.empty_like(order)
            index[order] = torch.arange(len(order)) + n  # token index of each row of acts
            val = torch.full((acts.n_prompts, k), float("-inf"))  # [n_split_prompts, n_chosen]
            at = torch.full((acts.n_prompts, k), torch.iinfo(torch.long).max)
            for start, x in zip(range(0, len(acts), chunk), acts.iter_chunks(chunk), strict=True):
                z = method.encode(x)[:, features].float().cpu()  # [<=chunk, n_chosen]
                _merge_peaks(val, at, z, acts.prompt_idx[start : start + len(z)], index[start : start + len(z)])
            tids.append(acts.token_ids[order])
            counts.append(torch.bincount(acts.prompt_idx, minlength=acts.n_prompts))
            vals.append(val)
            ats.append(at)
            parts.append((acts, index))
            where += [(split, i) for i in range(acts.n_prompts)]
            n += len(acts)
        if not parts:
            raise ValueError(f"labeling: no tokens at {method.site} in any of {', '.join(sources)}")
        starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(counts).cumsum(0)])
        peak_at = torch.cat(ats).clamp(max=n)  # n for a prompt without tokens
        return cls(torch.cat(tids), starts, where, torch.cat(vals), peak_at, {}, parts, features, chunk)

    def keep(self, method: FeatureMethod, wanted: Sequence[tuple[int, int]], window: int) -> None:
        """Encode (again) the tokens within `window` of the peak of each wanted (prompt, feature column) and keep
        their activations for `snippet`: [m, n_chosen] for the m tokens of the union of the windows."""
        need = torch.zeros(len(self.token_ids), dtype=torch.bool)  # [n_tokens]
        for prompt, col in wanted:
            lo, hi = self._window(prompt, col, window)
            need[lo:hi] = True
        at, zs = [], []
        for acts, index in self.parts:
            for start in range(0, len(acts), self.chunk):
                rows = torch.arange(start, min(start + self.chunk, len(acts)))
                sel = need[index[rows]]
                if bool(sel.any()):  # the same chunk as in gather, so encode gives the same values
                    z = method.encode(acts.take(rows))[:, self.features].float().cpu()
                    at.append(index[rows][sel])
                    zs.append(z[sel])
        if at:
            kept_at = torch.cat(at)
            order = torch.argsort(kept_at)
            self.kept_at, self.kept_z = kept_at[order], torch.cat(zs)[order]

    def _window(self, prompt: int, col: int, window: int) -> tuple[int, int]:
        at = int(self.peak_at[prompt, col])
        return max(int(self.starts[prompt]), at - window), min(int(self.starts[prompt + 1]), at + window + 1)

    def n_tokens(self, prompt: int) -> int:
        return int(self.starts[prompt + 1] - self.starts[prompt])

    def snippet(self, prompt: int, col: int, window: int, tokenizer: Any) -> Snippet:
        """Prompt `prompt`'s tokens within `window` of feature column `col`'s peak (kept by `keep`)."""
        start, end = int(self.starts[prompt]), int(self.starts[prompt + 1])
        if prompt not in self.pieces:
            self.pieces[prompt] = pieces(tokenizer, self.token_ids[start:end].tolist())
        lo, hi = self._window(prompt, col, window)
        want = torch.arange(lo, hi)
        pos = torch.searchsorted(self.kept_at, want).clamp(max=max(len(self.kept_at) - 1, 0))
        if len(want) and (not len(self.kept_at) or not torch.equal(self.kept_at[pos], want)):
            raise RuntimeError(f"labeling: the window of prompt {prompt}, column {col} was not kept")
        split, row = self.where[prompt]
        acts = [float(f"{a:.4g}") for a in self.kept_z[pos, col].tolist()]  # 4 significant digits
        at = int(self.peak_at[prompt, col])
        return Snippet(split, row, self.pieces[prompt][lo - start : hi - start], acts, at - lo)


def _merge_peaks(val: Tensor, at: Tensor, z: Tensor, prompt: Tensor, index: Tensor) -> None:
    """Fold a chunk into running per-prompt maxima, in place: `val` [n_prompts, k] the max so far, `at` the
    smallest token index at it; `z` [b, k] the chunk's activations, `prompt` and `index` [b] each row's prompt and
    token index."""
    u, inv = torch.unique(prompt, return_inverse=True)
    idx = inv[:, None].expand_as(z)
    big = torch.iinfo(torch.long).max
    cmax = torch.full((len(u), z.shape[1]), float("-inf")).scatter_reduce_(0, idx, z, "amax")  # [n_u, k]
    first = torch.where(z == cmax[inv], index[:, None], big)
    cat = torch.full((len(u), z.shape[1]), big).scatter_reduce_(0, idx, first, "amin")
    old, old_at = val[u], at[u]
    at[u] = torch.where(cmax > old, cat, torch.where(cmax == old, torch.minimum(old_at, cat), old_at))
    val[u] = torch.maximum(old, cmax)


def pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Token strings of `ids` with their spacing, so that joining them gives the decoded text (each token is
    decoded after its predecessor and the predecessor's text removed)."""
    out = []
    for i, t in enumerate(ids):
        prev = tokenizer.decode(ids[i - 1 : i]) if i else ""
        both = tokenizer.decode([*ids[i - 1 : i], t]) if i else tokenizer.decode([t])
        out.append(both[len(prev) :] if both.startswith(prev) else tokenizer.decode([t]))
    return out


def _piece(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _show(token: str) -> str:
    return json.dumps(token.strip() or token, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------- back ends
_ACTIVE = re.compile(r"active\s*:\s*\**\s*([^\n]*)", re.IGNORECASE)
_YES_NO = re.compile(r"answer\s*:\s*\**\s*(yes|no)\b", re.IGNORECASE)


def parse_active(text: str | None, n: int) -> list[bool] | None:
    """The last `Active: 2, 5` (or `Active: none`) line as n booleans; None when absent or a number is not in 1..n."""
    if text is None:
        return None
    found = _ACTIVE.findall(text)
    if not found:
        return None
    rest = found[-1].strip().strip(".*[]")
    if rest.lower().startswith("none"):
        return [False] * n
    nums = [int(x) for x in re.findall(r"\d+", rest)]
    if not nums or any(not 1 <= x <= n for x in nums):
        return None
    return [k + 1 in nums for k in range(n)]


def parse_yes_no(text: str | None) -> float | None:
    """1.0 for a final `Answer: yes` (or a bare yes), 0.0 for no, None otherwise."""
    if text is None:
        return None
    found = _YES_NO.findall(text)
    word = found[-1].lower() if found else text.strip().strip(".*").lower()
    return {"yes": 1.0, "no": 0.0}.get(word)


def _detection_scores(row: dict[str, Any]) -> dict[str, float | None]:
    """Accuracy and F1 of the judge's active/inactive calls on the scoring set (None when unscored)."""
    preds = row.get("predictions")
    truth = [s["truth"] for s in row["scoring"]]
    if preds is None or not any(truth) or all(truth):
        return {"accuracy": None, "f1": None}
    tp = sum(p and t for p, t in zip(preds, truth, strict=True))
    fp = sum(p and not t for p, t in zip(preds, truth, strict=True))
    fn = sum(t and not p for p, t in zip(preds, truth, strict=True))
    acc = sum(p == t for p, t in zip(preds, truth, strict=True)) / len(truth)
    return {"accuracy": acc, "f1": 2 * tp / (2 * tp + fp + fn)}


class _Scorer:
    """Fills `predictions` (detection) and `names_concept` / `output_names_concept` ({concept: 1/0/None}) in rows."""

    name: str

    def detect(self, rows: list[dict[str, Any]], width: int) -> None: ...

    def names(self, rows: list[dict[str, Any]], descriptions: dict[str, str]) -> None: ...


class _JudgeScorer(_Scorer):
    """An LLM judge with the templates labeling_detection and labeling_concept."""

    def __init__(self, judge: Any) -> None:
        self.judge, self.name = judge, judge.name

    def detect(self, rows: list[dict[str, Any]], width: int) -> None:
        tpl = load_template("labeling_detection")
        todo = [r for r in rows if r["label"] and r["scoring"]]
        prompts = [tpl.render(label=r["label"], n=str(len(r["scoring"])), contexts="\n".join(
            f"{k + 1}. {Snippet(**_snip(s)).text(width)}" for k, s in enumerate(r["scoring"]))) for r in todo]
        for r, a in zip(todo, self.judge.complete(prompts, tpl.tag), strict=True):
            r["answers"]["detection"] = a
            r["predictions"] = parse_active(a, len(r["scoring"]))

    def names(self, rows: list[dict[str, Any]], descriptions: dict[str, str]) -> None:
        tpl = load_template("labeling_concept")
        jobs = [(r, side, m["concept"]) for r in rows for m in r["matched"]
                for side in ("label", "output_label") if r[side]]
        prompts = [tpl.render(label=r[side], concept=descriptions.get(c, c)) for r, side, c in jobs]
        for r in rows:
            r["names_concept"], r["output_names_concept"] = {}, {}
        for (r, side, c), a in zip(jobs, self.judge.complete(prompts, tpl.tag), strict=True):
            key = "names_concept" if side == "label" else "output_names_concept"
            r[key][c] = parse_yes_no(a)
            r["answers"][f"{key}:{c}"] = a


class _EmbeddingScorer(_Scorer):
    """The offline judge's sentence embeddings: cosine against documented thresholds; cosines are cached."""

    def __init__(self, judge: Any, threshold: float, concept_threshold: float) -> None:
        self.judge, self.threshold, self.concept_threshold = judge, threshold, concept_threshold
        self.name = f"{judge.name}/cosine"

    def cosines(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """cos(a, b) for (a, b) pairs, through the judge cache."""
        keys = [JudgeCache.key(self.judge.name, json.dumps(p), {}, COSINE_VERSION) for p in pairs]

        def compute(idx: list[int]) -> list[str | None]:
            a = self.judge.embed([pairs[i][0] for i in idx])
            b = self.judge.embed([pairs[i][1] for i in idx])
            return [f"{c:.6f}" for c in (a * b).sum(-1).tolist()]

        return [float(v) for v in self.judge.cache.through(keys, self.judge.name, COSINE_VERSION, compute)]

    def detect(self, rows: list[dict[str, Any]], width: int) -> None:
        todo = [r for r in rows if r["label"] and r["scoring"]]
        pairs = [(r["label"], Snippet(**_snip(s)).text(width)) for r in todo for s in r["scoring"]]
        cos = iter(self.cosines(pairs))
        for r in todo:
            values = [next(cos) for _ in r["scoring"]]
            r["answers"]["detection"] = [round(c, 4) for c in values]
            r["predictions"] = [c >= self.threshold for c in values]

    def names(self, rows: list[dict[str, Any]], descriptions: dict[str, str]) -> None:
        jobs = [(r, side, m["concept"]) for r in rows for m in r["matched"]
                for side in ("label", "output_label") if r[side]]
        cos = self.cosines([(r[side], descriptions.get(c, c)) for r, side, c in jobs])
        for r in rows:
            r["names_concept"], r["output_names_concept"] = {}, {}
        for (r, side, c), v in zip(jobs, cos, strict=True):
            key = "names_concept" if side == "label" else "output_names_concept"
            r[key][c] = float(v >= self.concept_threshold)
            r["answers"][f"{key}:{c}"] = round(v, 4)


def _snip(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("split", "row", "tokens", "acts", "peak")}
