"""The steering engine: a KV-cached, steered sampling loop and batched KL calibration of steering strengths.

- `sample()` decodes many rows at once, each row with its own steering vector at one site (`bench.hooks.steer`
  with a [b, 1, d] vector), so one batch packs features, signs, KL targets and samples. Its next-token
  distribution is Hugging Face `generate`'s for the same settings: logits / temperature, then top-k, then top-p
  over the survivors, then a multinomial draw (greedy argmax at temperature 0). Top-p runs on the top-k survivors
  only, never on a sort of the whole vocabulary. Left padding with absolute position ids from the attention mask,
  optional stop per row on EOS, seeded.
- `calibrate()` bisects the steering strength alpha of many rows (direction, KL target) at once, as the paper's
  reference code does per row (`bisect_one`): KL(p_unsteered || q_steered) of the next-token distribution at the
  prompt's last token, alpha in [1, 2000], 20 halvings, |KL - target| < 0.01, the last midpoint within tolerance
  wins, and a target never hit is unreached (NaN), never replaced. Each step is one batched forward over the
  prompts with an alpha per row; rows that share a direction and a midpoint (every target's first steps) are
  computed once.
- `mean_kl()` / `geometric_kl_alphas()`: the concept-centric task's KL calibration (geometric bisection of one alpha per
  direction and target), reduced per batch of (vector, prompt) rows: never a [rows, prompts, vocab] tensor.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.hooks import capture_layer, replay_prefix, steer
from bench.sites import Site

log = logging.getLogger(__name__)
EPS = 1e-8  # the reference's KL smoothing: sum p * (log(p + eps) - log(q + eps))


# ----------------------------------------------------------------------------------------------- prompts
def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with the model's BOS first where the model has one, as TransformerLens's `to_tokens`
    (the paper's reference) gives for every model: tokenizers that add no BOS themselves (GPT-2) get it
    prepended."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def positions(mask: Tensor) -> Tensor:
    """Absolute position ids [b, t] of left-padded rows from their attention mask [b, t]: 0, 1, ... from each row's
    first real token (padding gets 0), so a padded row sees the positions it would see alone (as `generate`)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Token rows left-padded to one length: (ids [b, t], attention mask [b, t])."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, t - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, t - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _steered(model: Any, site: Site | None, vectors: Tensor | None) -> Any:
    """`steer` with per-row vectors [b, d] (as [b, 1, d]), or no hook."""
    if site is None or vectors is None:
        return contextlib.nullcontext()
    return steer(model, site, vectors[:, None, :])


# ----------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Sampling:
    """Decoding settings, as `generate`'s: `temperature` 0 = greedy; `top_k` 0 and `top_p` 1 = off."""

    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: int = 30
    top_p: float = 1.0
    stop_at_eos: bool = False  # the reference decodes exactly max_new_tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.top_k < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling {self}: expected max_new_tokens >= 1, top_k >= 0, temperature >= 0 and "
                             "0 < top_p <= 1")


def next_token_distribution(logits: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor]:
    """The sampling distribution over candidates of logits [b, V] (float): (token ids [b, k], probabilities [b, k]);
    filtered-out candidates have probability 0. Equals `generate`'s Temperature, TopK then TopP warpers followed by
    a softmax: top-k keeps every token tied with the k-th logit, top-p keeps the smallest set of the top-k
    survivors whose probability exceeds top_p (at least one)."""
    scores = logits / sampling.temperature if sampling.temperature not in (0.0, 1.0) else logits
    vocab = scores.shape[-1]
    k = vocab if sampling.top_k == 0 else min(sampling.top_k, vocab)
    if k == vocab and sampling.top_p >= 1.0:
        return torch.arange(vocab, device=scores.device).expand_as(scores), torch.softmax(scores, -1)
    vals, ids = scores.topk(min(k + 1, vocab), dim=-1)  # [b, k + 1], descending
    if k < vocab and bool((vals[:, k] == vals[:, k - 1]).any()):  # HF keeps every score >= the k-th: ties
        ties = (scores >= vals[:, k - 1 : k]).sum(-1)  # [b]
        vals, ids = scores.topk(int(ties.max()), dim=-1)
        vals = vals.masked_fill(torch.arange(vals.shape[1], device=vals.device) >= ties[:, None], -math.inf)
    else:
        vals, ids = vals[:, :k], ids[:, :k]
    if sampling.top_p < 1.0:
        cum = torch.softmax(vals.flip(-1), -1).cumsum(-1).flip(-1)  # ascending cumulative mass, back in our order
        drop = cum <= 1 - sampling.top_p
        drop[:, 0] = False  # the most likely token always stays
        vals = vals.masked_fill(drop, -math.inf)
    return ids, torch.softmax(vals, -1)


def _choose(logits: Tensor, sampling: Sampling, gen: torch.Generator) -> Tensor:
    """Next tokens [b] from logits [b, V]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    ids, probs = next_token_distribution(logits, sampling)
    return ids.gather(-1, torch.multinomial(probs, 1, generator=gen))[:, 0]


def sample(model: Any, prompts: Sequence[Sequence[int]], sampling: Sampling, *, site: Site | None = None,
           vectors: Tensor | None = None, seed: int = 0, batch_size: int = 64, pad_id: int = 0,
           eos_id: int | None = None, device: str | torch.device = "cpu") -> list[list[int]]:
    """New tokens of every row: prompt token ids (BOS included) -> up to `max_new_tokens` ids (cut after EOS when
    `stop_at_eos`). Row i is steered by vectors[i] ([n, d_site]) at `site`, at every position (prompt and new
    tokens). Rows are batched by prompt length (less padding); one seeded generator serves the whole call."""
    if vectors is not None and len(vectors) != len(prompts):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(vectors)} steering vectors")
    gen = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        vec = None if vectors is None else vectors[idx].to(device)
        for i, row in zip(idx, _decode(model, [prompts[i] for i in idx], site, vec, sampling, gen, pad_id, eos_id,
                                       device), strict=True):
            out[i] = row
    return out


def _decode(model: Any, rows: list[Sequence[int]], site: Site | None, vectors: Tensor | None, sampling: Sampling,
            gen: torch.Generator, pad_id: int, eos_id: int | None, device: str | torch.device) -> list[list[int]]:
    """One batch: a full steered forward over the left-padded prompts, then one token per step on the KV cache."""
    ids, mask = left_pad(rows, pad_id, device)
    pos = positions(mask)
    stop = sampling.stop_at_eos and eos_id is not None
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    new: list[Tensor] = []
    with _steered(model, site, vectors), torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        name = _cache_name(model)
        for step in range(sampling.max_new_tokens):
            tok = _choose(out.logits[:, -1].float(), sampling, gen)  # [b]
            if stop:
                tok = tok.masked_fill(done, pad_id)
                done |= tok == eos_id
            new.append(tok)
            if step == sampling.max_new_tokens - 1 or (stop and bool(done.all())):
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            pos = pos[:, -1:] + 1
            cache = getattr(out, "cache", None)
            cache = out.past_key_values if cache is None else cache
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                        logits_to_keep=1, **{name: cache})
    tokens = torch.stack(new, 1).tolist()  # [b, steps]
    if stop:
        tokens = [r[: r.index(eos_id) + 1] if eos_id in r else r for r in tokens]
    return tokens


def _cache_name(model: Any) -> str:
    """The forward argument that takes the KV cache: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# ----------------------------------------------------------------------------------------------- KL calibration
@dataclass(frozen=True)
class Bisection:
    """The reference's alpha search: midpoint bisection in [low, high], exactly `steps` halvings, a midpoint whose
    KL is within `tolerance` (absolute, nats) of the target is a hit and the last hit wins."""

    low: float = 1.0
    high: float = 2000.0
    steps: int = 20
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        if not (0 <= self.low < self.high and self.steps >= 1 and self.tolerance > 0):
            raise ValueError(f"bad bisection {self}: expected 0 <= low < high, steps >= 1, tolerance > 0")


@dataclass(frozen=True)
class Calibration:
    """Per row: `alpha` [r] (float64, NaN = target not reached within tolerance) and the KL there, `kl` [r]."""

    alpha: Tensor
    kl: Tensor

    @property
    def reached(self) -> Tensor:  # [r] bool
        return ~torch.isnan(self.alpha)


class KLProbe:
    """KL(p_unsteered || q_steered) of the next-token distribution after the last token of each prompt, averaged
    over the prompts, for many (direction, alpha) pairs per batched forward: `probe(dir_index [u], alpha [u])`
    -> KL [u] (float64). Steering adds alpha * directions[i] ([m, d_site]) at every position of `site`."""

    def __init__(self, model: Any, site: Site, prompts: Sequence[Sequence[int]], directions: Tensor,
                 batch_size: int = 64, pad_id: int = 0, device: str | torch.device = "cpu",
                 skip_prefix: bool = True) -> None:
        self.model, self.site, self.batch_size, self.device = model, site, batch_size, device
        self.directions = directions.float().to(device)  # [m, d]
        self.ids, self.mask = left_pad(prompts, pad_id, device)  # [P, t]
        self.forwards = 0  # batched forward passes, for benchmarks
        # Steering at layer L leaves layers 0 .. L-1 as they are: record layer L-1's output on the prompts once
        # and start every steered forward at L (`bench.hooks.replay_prefix`).
        self.prefix = site.layer if skip_prefix else 0
        with capture_layer(model, self.prefix - 1) if self.prefix else contextlib.nullcontext({}) as got:
            base = self._logp(self.ids, self.mask, None)  # [P, V]
        self.recorded = got.get("out")
        self.p = base.exp()
        self.log_p = (self.p + EPS).log()

    def _logp(self, ids: Tensor, mask: Tensor, vectors: Tensor | None, rows: Tensor | None = None) -> Tensor:
        """Next-token log-probabilities [b, V] after prompts ids [b, t]; `rows` [b] (prompt index of each row)
        replays the recorded prefix."""
        self.forwards += 1
        replay = (replay_prefix(self.model, self.prefix, self.recorded, rows) if rows is not None and
                  self.recorded is not None else contextlib.nullcontext())
        with _steered(self.model, self.site, vectors), replay, torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                                logits_to_keep=1).logits[:, -1]
        return torch.log_softmax(logits.float(), -1)

    def __call__(self, dir_index: Tensor, alpha: Tensor) -> Tensor:
        n_p = len(self.ids)
        pair = torch.arange(len(alpha)).repeat_interleave(n_p)  # rows pair-major: [u * P]
        prompt = torch.arange(n_p).repeat(len(alpha))
        out = torch.empty(len(pair), dtype=torch.float64)
        for start in range(0, len(pair), self.batch_size):
            sl = slice(start, start + self.batch_size)
            pr, pp = pair[sl], prompt[sl]
            vec = self.directions[dir_index[pr].to(self.device)] * alpha[pr].float().to(self.device)[:, None]
            q = self._logp(self.ids[pp], self.mask[pp], vec, pp.to(self.ids.device)).exp()  # [rows, V]
            p = self.p[pp]
            out[sl] = (p * (self.log_p[pp] - (q + EPS).log())).sum(-1).double().cpu()
        return out.view(len(alpha), n_p).mean(1)


def bisect(kl_of: Callable[[Tensor, Tensor], Tensor], dir_index: Tensor, targets: Tensor,
           bisection: Bisection = Bisection()) -> Calibration:
    """The reference's bisection for every row (dir_index [r], target [r]) at once: each step evaluates
    `kl_of(dir_index [u], alpha [u])` once on the distinct (direction, midpoint) pairs of that step."""
    r = len(targets)
    targets = targets.double()
    lo, hi = torch.full((r,), float(bisection.low), dtype=torch.float64), torch.full((r,), float(bisection.high),
                                                                                    dtype=torch.float64)
    alpha = torch.full((r,), math.nan, dtype=torch.float64)
    kl_hit = alpha.clone()
    for _ in range(bisection.steps):
        mid = (lo + hi) / 2.0
        pairs, inverse = torch.unique(torch.stack([dir_index.double(), mid], 1), dim=0, return_inverse=True)
        kl = kl_of(pairs[:, 0].long(), pairs[:, 1]).double()[inverse]  # [r]
        hit = (kl - targets).abs() < bisection.tolerance
        alpha, kl_hit = torch.where(hit, mid, alpha), torch.where(hit, kl, kl_hit)
        below = kl < targets
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return Calibration(alpha, kl_hit)


def bisect_one(kl_fn: Callable[[float], float], target: float,
               bisection: Bisection = Bisection()) -> tuple[float | None, float | None]:
    """The reference's per-target bisection (`find_alpha_for_kl_targets`), one forward per step: (alpha, KL there)
    of the last midpoint within tolerance, or (None, None) when no midpoint was."""
    low, high = float(bisection.low), float(bisection.high)
    found: tuple[float | None, float | None] = (None, None)
    for _ in range(bisection.steps):
        mid = (low + high) / 2.0
        kl = kl_fn(mid)
        if abs(kl - target) < bisection.tolerance:
            found = (mid, kl)
        if kl < target:
            low = mid
        else:
            high = mid
    return found


def calibrate(model: Any, site: Site, prompts: Sequence[Sequence[int]], directions: Tensor, dir_index: Tensor,
              targets: Tensor, bisection: Bisection = Bisection(), batch_size: int = 64, pad_id: int = 0,
              device: str | torch.device = "cpu") -> Calibration:
    """Alpha per row (directions[dir_index[j]] ([m, d_site], the signed unit vectors), targets[j] in nats) so that
    steering with alpha * direction at `site` moves the next-token distribution after `prompts` (token ids, BOS
    included; KL averaged over prompts) by the target KL. See `bisect` and `Calibration`."""
    probe = KLProbe(model, site, prompts, directions, batch_size, pad_id, device)
    return bisect(probe, dir_index.long(), targets, bisection)


# ----------------------------------------------------------------------------------------------- mean KL, per batch
def mean_kl(model: Any, site: Site, ids: Tensor, mask: Tensor, base: Tensor, vectors: Tensor, batch_size: int = 32,
            device: str | torch.device = "cpu") -> Tensor:
    """Mean over prompts of KL(unsteered || steered) of the next token after left-padded prompts ids [P, t] (mask
    [P, t]), for each steering vector: vectors [r, d_site] -> [r] (float32). `base` [P, V]: the unsteered
    log-probabilities. Rows (vector, prompt), vector-major, run `batch_size` at a time and each batch is reduced to
    its KLs at once, so memory holds [batch_size, V], never [r, P, V]."""
    n_p, r = len(ids), len(vectors)
    p = base.exp()
    out = torch.empty(r * n_p)
    for start in range(0, r * n_p, batch_size):
        rows = torch.arange(start, min(start + batch_size, r * n_p))
        pair, prompt = rows // n_p, rows % n_p
        vec = vectors[pair][:, None, :].to(device)  # [b, 1, d]
        with steer(model, site, vec), torch.no_grad():
            logits = model(input_ids=ids[prompt.to(ids.device)], attention_mask=mask[prompt.to(mask.device)],
                           position_ids=positions(mask[prompt.to(mask.device)]), use_cache=False).logits
        steered = torch.log_softmax(logits[:, -1].float(), -1).cpu()  # [b, V]
        out[rows] = (p[prompt] * (base[prompt] - steered)).sum(-1)
    return out.view(r, n_p).mean(-1)


def geometric_kl_alphas(model: Any, tokenizer: Any, site: Site, directions: Tensor, targets: Sequence[float],
                        prompts: Sequence[str], norm: float, batch_size: int = 32, device: str = "cpu",
                        iters: int = 10) -> tuple[Tensor, Tensor]:
    """Per direction ([c, d_site], unit rows) and KL target: the alpha where the mean next-token KL(unsteered ||
    steered) at the end of `prompts` reaches the target, by geometric bisection in [norm/64, norm*64] (the
    concept-centric steering task's `calibration=kl`). Every step reduces per batch (`mean_kl`).

    Returns (alphas [c, k], KL reached [c, k]). A target beyond reach gives the bracket's end (logged)."""
    c, k = directions.shape[0], len(targets)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=64).to(device)
    finally:
        tokenizer.padding_side = side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    base = torch.log_softmax(logits[:, -1].float(), -1).cpu()  # [P, V]
    unit = directions.float().cpu().repeat_interleave(k, 0)  # [c*k, d]
    target = torch.tensor(list(targets), dtype=torch.float32).repeat(c)  # [c*k]

    def kl(alpha: Tensor) -> Tensor:  # [c*k] -> [c*k]
        return mean_kl(model, site, ids, mask, base, unit * alpha[:, None], batch_size, device)

    lo, hi = torch.full((c * k,), norm / 64), torch.full((c * k,), norm * 64)
    for _ in range(iters):
        mid = (lo * hi).sqrt()
        below = kl(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    alpha = (lo * hi).sqrt()
    reached = kl(alpha)
    missed = reached < 0.95 * target
    if bool(missed.any()):
        log.warning("steering: %d of %d KL targets not reached (largest %.3g nats, reached %.3g at alpha = 64 x "
                    "mean norm); the site's effect saturates", int(missed.sum()), len(target),
                    float(target[missed].max()), float(reached[missed].max()))
    return alpha.view(c, k), reached.view(c, k)
