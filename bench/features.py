"""Harness-side feature logic shared by every method: pooled codes, concept matching, steering vectors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor

from bench.activations import Activations
from bench.protocols import Context, FeatureMethod
from bench.sites import Site, arch_of, layers_of, to_module

ENCODE_CHUNK = 4096  # tokens per encode() call of the batched helpers


def encoded(method: FeatureMethod, acts: Activations, features: Sequence[int] | None = None,
            chunk: int = ENCODE_CHUNK) -> Iterator[tuple[int, Tensor]]:
    """`method.encode` over `acts` in batches of `chunk` tokens, streamed from the store when `acts` are on disk:
    (first token index, codes [<=chunk, n_features] float32 on the CPU, or only the columns `features`). Callers
    reduce each batch (pool, max, top-k), so no [n_tokens, n_features] tensor exists."""
    cols = None if features is None else torch.as_tensor(list(features), dtype=torch.long)
    start = 0
    for x in acts.iter_chunks(chunk):
        z = method.encode(x)
        yield start, (z if cols is None else z[:, cols]).float().cpu()
        start += len(x)


def running_topk(method: FeatureMethod, acts: Activations, features: Sequence[int], k: int,
                 chunk: int = ENCODE_CHUNK) -> tuple[Tensor, Tensor]:
    """The `k` largest codes of each of `features` over `acts`, descending, by a running top-k over batches:
    (values [f, k'], token indices into `acts` [f, k']) with k' = min(k, len(acts))."""
    vals = torch.full((len(features), 0), float("-inf"))
    idx = torch.zeros(len(features), 0, dtype=torch.long)
    for start, z in encoded(method, acts, features, chunk):
        here = torch.arange(start, start + len(z)).expand(len(features), -1)  # [f, b], no copy
        vals, pick = torch.cat([vals, z.T], 1).topk(min(k, vals.shape[1] + len(z)), dim=1)
        idx = torch.cat([idx, here], 1).gather(1, pick)
    return vals, idx


def pooled_codes(method: FeatureMethod, acts: Activations, how: str = "max", chunk: int = ENCODE_CHUNK) -> Tensor:
    """Encode tokens in chunks (streamed from the store) and pool per prompt: [n_prompts, n_features] (max or mean
    over tokens)."""
    if how not in ("max", "mean"):
        raise ValueError(f"unknown pooling {how!r}; valid: max, mean")
    out: Tensor | None = None
    counts = torch.bincount(acts.prompt_idx, minlength=acts.n_prompts).clamp(min=1)[:, None].float()
    for start, z in encoded(method, acts, None, chunk):  # z [chunk, k]
        idx = acts.prompt_idx[start : start + len(z), None].expand_as(z)
        if out is None:
            fill = float("-inf") if how == "max" else 0.0
            out = torch.full((acts.n_prompts, z.shape[1]), fill)
        out.scatter_reduce_(0, idx, z, reduce="amax" if how == "max" else "sum", include_self=True)
    assert out is not None, "no tokens to encode"
    if how == "mean":
        return out / counts
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)  # a prompt with no kept tokens scores 0


def auroc_matrix(scores: Tensor, labels: Tensor) -> Tensor:
    """AUROC of every feature for every concept: scores [n, k], labels [n, c] bool -> [c, k].

    Mann-Whitney form with average ranks for ties, so it equals sklearn's roc_auc_score column by column."""
    ranks = torch.from_numpy(rankdata(scores.double().numpy(), axis=0))  # [n, k]
    y = labels.double()  # [n, c]
    n_pos = y.sum(0)[:, None]  # [c, 1]
    n_neg = len(y) - n_pos
    u = y.T @ ranks - n_pos * (n_pos + 1) / 2  # [c, k]
    return (u / (n_pos * n_neg).clamp(min=1)).float()


@dataclass(frozen=True)
class Match:
    """The feature chosen for a concept and its train-split AUROC."""

    concept: str
    feature: int
    train_auroc: float


def match_concepts(method: FeatureMethod, ctx: Context, pool: str = "max") -> dict[str, Match]:
    """Each concept -> the feature with the best train-split AUROC (a supervised method's own feature).

    Memoised on the context, so every task of a unit uses the same matching."""
    key = ("match", id(method), pool)
    if key in ctx.memo:
        return ctx.memo[key]
    train = ctx.acts("train", method.site)
    concepts = ctx.concepts.concepts
    labels = ctx.concepts.split("train").labels()  # [n_prompts, c]
    auc = auroc_matrix(pooled_codes(method, train, pool), labels)  # [c, k]
    own = getattr(method, "concepts_", None)
    matches = {}
    for i, c in enumerate(concepts):
        # a supervised method's own feature, else the best train AUROC (first index among ties)
        f = own.index(c) if own is not None and c in own else int(torch.argmax(auc[i]))
        matches[c] = Match(c, f, float(auc[i, f]))
    ctx.memo[key] = matches
    return matches


def mean_norm(acts: Activations, chunk: int | None = None) -> float:
    """Mean L2 norm of the activations at a site (the scale of steering factors), streamed in chunks (default: a
    chunk is at most 1/8 of the memory budget)."""
    total, n = torch.zeros((), dtype=torch.float64), 0
    for x in acts.iter_chunks(chunk or acts.chunk_tokens(itemsize=4)):
        total += x.float().norm(dim=-1).double().sum()
        n += len(x)
    return float(total / n) if n else float("nan")


def max_activations(method: FeatureMethod, acts: Activations, features: list[int], chunk: int = ENCODE_CHUNK
                    ) -> Tensor:
    """The largest activation (`method.encode`) of each of `features` over every token of `acts`: [len(features)].

    axbench's `max_act`, the scale of its steering factors: the maximum over a concept's latent-evaluation
    examples and their tokens (BOS and padding excluded, as `acts` holds them) of the feature's latent value.
    Empty `acts` give -inf."""
    out = torch.full((len(features),), float("-inf"))
    for _, z in encoded(method, acts, features, chunk):  # [chunk, len(features)]
        out = torch.maximum(out, z.amax(0))
    return out


def steering_target(model: torch.nn.Module, site: Site, directions: Tensor) -> tuple[Site, Tensor]:
    """Where to add, and the unit vectors to add, to steer along feature `directions` [n, d_site] read at `site`.

    Usually the site itself. On architectures with a norm between the MLP and the residual stream (Gemma's
    post-feed-forward norm) a vector added at the `mlp` site is normalised away, so the feature is steered
    through its image in the residual stream, as the SNMF paper does for Gemma: unit(norm(W_down d)) at
    `mlp_out`. Returns (site to steer, unit vectors [n, d_target])."""
    paths = arch_of(model)
    if site.kind != "mlp" or paths.mlp_out == paths.mlp:
        return site, F.normalize(directions.float(), dim=-1)
    block = layers_of(model)[site.layer]
    h = directions.to(next(model.parameters()).dtype)  # each module call moves it to that module's device
    with torch.no_grad():
        for m in (block.get_submodule(paths.down), block.get_submodule(paths.mlp_out)):
            h = to_module(m, h)
            h = m(h) - m(torch.zeros_like(h[:1]))  # the direction's own effect, offsets removed
    return Site(site.layer, "mlp_out"), F.normalize(h.float().cpu(), dim=-1)


def steering_sites(model: torch.nn.Module, sites: list[Site]) -> list[Site]:
    """`sites` plus the sites `steering_target` steers them at (their activations give the scale)."""
    paths = arch_of(model)
    extra = [Site(s.layer, "mlp_out") for s in sites if s.kind == "mlp" and paths.mlp_out != paths.mlp]
    return sorted(set(sites) | set(extra), key=lambda s: (s.layer, s.kind))


def steering_vector(method: FeatureMethod, feature: int, alpha: float) -> Tensor:
    """unit(directions_[feature]) * alpha: [d_site]."""
    return F.normalize(method.directions_[feature].float(), dim=0) * alpha


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """scikit-learn's AUROC, or None when a class is missing."""
    from sklearn.metrics import roc_auc_score

    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, scores))


def vocab_projection(model: torch.nn.Module, site: Site, directions: Tensor, k: int = 10,
                     chunk: int = 64) -> tuple[Tensor, Tensor]:
    """The vocabulary tokens each feature direction writes for and against, through the rest of the model.

    `mlp`: the down-projection (and Gemma's post-feed-forward norm), then the final norm and the unembedding;
    `resid` and `mlp_out`: the final norm and the unembedding. Affine offsets are removed (`m(v) - m(0)`), so
    only the direction's own effect counts; a norm applied to the direction alone keeps it up to a scale.

    directions [n, d_site] -> (token ids [n, 2, k], logit effects [n, 2, k]): [:, 0] the k most promoted
    tokens (largest logits, descending), [:, 1] the k most suppressed (most negative logits, ascending)."""
    paths = arch_of(model)
    block = layers_of(model)[site.layer]
    chain = [model.get_submodule(paths.final_norm), model.get_output_embeddings()]
    if site.kind == "mlp":
        after = [block.get_submodule(paths.down)]
        if paths.mlp_out != paths.mlp:  # a norm between the MLP and the residual stream (Gemma)
            after.append(block.get_submodule(paths.mlp_out))
        chain = after + chain
    dtype = next(model.parameters()).dtype
    k = min(k, model.get_output_embeddings().weight.shape[0])
    ids, vals = [], []
    with torch.no_grad():
        for start in range(0, len(directions), chunk):
            h = directions[start : start + chunk].to(dtype)  # [c, d_site], moved per module (device maps)
            for m in chain:
                h = to_module(m, h)
                h = m(h) - m(torch.zeros_like(h[:1]))
            logits = h.float()  # [c, vocab]
            top, bottom = logits.topk(k, dim=-1), (-logits).topk(k, dim=-1)
            ids.append(torch.stack([top.indices, bottom.indices], 1).cpu())
            vals.append(torch.stack([top.values, -bottom.values], 1).cpu())
    if not ids:
        return torch.zeros(0, 2, k, dtype=torch.long), torch.zeros(0, 2, k)
    return torch.cat(ids), torch.cat(vals)
