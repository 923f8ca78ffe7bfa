"""Neuron groups of a feature tree and the intervention that tests the paper's third claim.

Groups. For a parent and its children (tree edges), from the supports of the children's columns of Z (bool masks):
`core` = the neurons in every child's support, `shared` = those in two or more (the core when there are two
children), `exclusive[c]` = those in child c's support and no sibling's. Their
sizes are compared with a null of random supports of the same sizes (each child's neuron indices permuted
independently, `n_perm` seeded draws): the same statistic (core size; mean pairwise Jaccard of the siblings) under
the null, with a one-sided p-value (1 + #null >= observed) / (1 + n_perm). Per level, the Jaccard overlap matrix of
all features and the mean overlap of sibling pairs against the same permutation null.

Intervention. For a parent whose children name tokens (e.g. weekdays under a "days" parent), add to the MLP hidden
state (the down-projection's input, every position; `bench.hooks.steer`) a vector on one neuron group: the group's
values in the children's columns (the mean over the children for `core` and `shared`, the child's own for
`exclusive`), scaled to
`alpha` x the mean norm of the hidden state. The effect on each child's token is the change of its logit at the
prompt's last position, centred by the mean change over the vocabulary (logits are shift-invariant), averaged over
neutral prompts. The null: `n_null` random neuron sets of the same size, drawn outside the siblings' supports, with the
group's values permuted onto them (same norm).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from bench.hierarchy import PERM_BATCH, jaccard, p_value
from bench.hooks import steer
from bench.sites import Site
from bench.steer import left_pad, positions, prompt_ids

log = logging.getLogger(__name__)
GROUP_COLUMNS = ("parent", "children", "n_children", "support_mean", "union", "core", "core_null", "core_null_hi",
                 "core_p", "shared", "shared_null", "shared_p", "exclusive_mean", "exclusive_null",
                 "sibling_jaccard", "sibling_jaccard_null", "sibling_jaccard_null_hi", "sibling_jaccard_p", "n_perm")
INTERVENTION_COLUMNS = ("parent", "parent_label", "group", "group_child", "group_size", "child", "child_label", "token",
                        "own", "sibling", "logit_change", "null_mean", "null_sd", "null_hi", "p", "n_null", "alpha")


@dataclass(frozen=True)
class Groups:
    """Neuron groups of one parent's children (masks over d neurons)."""

    core: Tensor  # [d] bool
    shared: Tensor  # [d] bool: in at least two children's supports (the core included)
    exclusive: Tensor  # [m, d] bool, one row per child
    union: Tensor  # [d] bool


def groups(supports: Tensor) -> Groups:
    """Children's supports [m, d] bool -> core (in all), shared (in two or more), exclusive (in one only), union."""
    s = supports.bool()
    count = s.sum(0)
    return Groups(core=s.all(0), shared=count >= 2, exclusive=s & (count == 1)[None], union=s.any(0))


def _random_masks(sizes: Tensor, d: int, n: int, g: torch.Generator) -> Tensor:
    """n draws of random neuron sets with the given sizes [m]: [n, m, d] bool."""
    k = int(sizes.max()) if len(sizes) else 0
    idx = torch.rand(n, len(sizes), d, generator=g).topk(k, dim=-1).indices  # [n, m, k] distinct random neurons
    keep = (torch.arange(k)[None, :] < sizes[:, None]).expand(n, -1, -1)  # the first sizes[i] of row i
    return torch.zeros(n, len(sizes), d, dtype=torch.bool).scatter_(-1, idx, keep)


def _sibling_jaccard(masks: Tensor) -> Tensor:
    """Mean pairwise Jaccard of sibling masks [..., m, d] -> [...]."""
    f = masks.float()
    inter = f @ f.transpose(-1, -2)
    size = f.sum(-1)
    union = size[..., :, None] + size[..., None, :] - inter
    jac = inter / union.clamp(min=1)
    m = masks.shape[-2]
    off = ~torch.eye(m, dtype=torch.bool)
    return jac[..., off].mean(-1)


def group_table(parents: Sequence[tuple[str, list[str], Tensor]], n_perm: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per parent (id, children ids, children's supports [m, d] bool): the core and exclusive sizes and the
    siblings' mean Jaccard, each against the null of random supports of the same sizes."""
    if n_perm < 1:
        raise ValueError(f"n_perm={n_perm}; valid: >= 1")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for pid, kids, sup in parents:
        gr = groups(sup)
        sizes = sup.sum(1)
        null = _random_masks(sizes, sup.shape[1], n_perm, g)  # [n_perm, m, d]
        null_core = null.all(1).sum(-1).double().numpy()
        null_excl = (null & (null.sum(1, keepdim=True) == 1)).sum(-1).double().mean(1).numpy()
        null_jac = _sibling_jaccard(null).double().numpy()
        core, excl, jac = int(gr.core.sum()), float(gr.exclusive.sum(1).double().mean()), float(_sibling_jaccard(sup))
        null_shared = (null.sum(1) >= 2).sum(-1).double().numpy()
        shared = int(gr.shared.sum())
        rows.append({"parent": pid, "children": " ".join(kids), "n_children": len(kids),
                     "support_mean": float(sizes.double().mean()), "union": int(gr.union.sum()), "core": core,
                     "core_null": float(null_core.mean()), "core_null_hi": float(np.quantile(null_core, 0.975)),
                     "core_p": p_value(null_core, core), "shared": shared, "shared_null": float(null_shared.mean()),
                     "shared_p": p_value(null_shared, shared), "exclusive_mean": excl,
                     "exclusive_null": float(null_excl.mean()), "sibling_jaccard": jac,
                     "sibling_jaccard_null": float(null_jac.mean()),
                     "sibling_jaccard_null_hi": float(np.quantile(null_jac, 0.975)),
                     "sibling_jaccard_p": p_value(null_jac, jac), "n_perm": n_perm})
    return pd.DataFrame(rows, columns=list(GROUP_COLUMNS))


def level_overlap(supports: Tensor, sibling_pairs: Sequence[tuple[int, int]], n_perm: int = 1000,
                  seed: int = 0) -> tuple[Tensor, dict[str, float]]:
    """The level's Jaccard matrix [r, r] and the mean overlap of sibling pairs vs other pairs, against the null of
    every feature's neuron indices permuted independently (supports [r, d] bool)."""
    jac = jaccard(supports, supports)
    r = len(supports)
    pairs = sorted({(min(a, b), max(a, b)) for a, b in sibling_pairs if a != b})
    sib = torch.zeros(r, r, dtype=torch.bool)
    for a, b in pairs:
        sib[a, b] = True
    upper = torch.triu(torch.ones(r, r, dtype=torch.bool), 1)
    observed = float(jac[sib].mean()) if pairs else float("nan")
    g = torch.Generator().manual_seed(seed)
    used = sorted({f for pair in pairs for f in pair})  # only features in a sibling pair enter the statistic
    sizes, sib_used = supports[used].sum(1), sib[used][:, used]
    draws = []
    for start in range(0, n_perm if pairs else 0, PERM_BATCH):
        rnd = _random_masks(sizes, supports.shape[1], min(PERM_BATCH, n_perm - start), g).float()  # [b, u, d]
        inter = rnd @ rnd.transpose(1, 2)
        union = sizes[None, :, None] + sizes[None, None, :] - inter
        draws += (inter / union.clamp(min=1))[:, sib_used].mean(1).tolist()
    null = np.array(draws)
    stats = {"n_features": r, "n_sibling_pairs": len(pairs), "sibling_jaccard": observed,
             "other_jaccard": float(jac[upper & ~sib].mean()) if r > 1 else float("nan"),
             "null_jaccard": float(null.mean()) if pairs else float("nan"),
             "null_hi": float(np.quantile(null, 0.975)) if pairs else float("nan"),
             "p": p_value(null, observed) if pairs else float("nan"), "n_perm": n_perm}
    return jac, stats


@dataclass(frozen=True)
class Family:
    """A parent and the children whose tokens are measured: child ids, their columns of Z [m, d], token ids."""

    parent: str
    parent_label: str
    children: list[str]
    labels: list[str]
    columns: Tensor  # [m, d]
    tokens: list[int]  # token id per child; -1 = no token (its support still counts)


def _vectors(fam: Family, rng: torch.Generator, n_null: int, norm: float) -> list[tuple[str, str, int, Tensor]]:
    """(group, its child or "", size, vectors [1 + n_null, d]) per group: the group's vector first, then the null's."""
    sup = fam.columns != 0
    gr = groups(sup)
    free = (~gr.union).nonzero().squeeze(1)
    out = []
    specs = [("core", "", gr.core, fam.columns.mean(0))]
    if not torch.equal(gr.shared, gr.core):
        specs.append(("shared", "", gr.shared, fam.columns.mean(0)))
    specs += [("exclusive", fam.children[i], gr.exclusive[i], fam.columns[i]) for i in range(len(fam.children))]
    for name, child, mask, source in specs:
        idx = mask.nonzero().squeeze(1)
        if len(idx) == 0 or len(idx) > len(free):
            continue
        vals = source[idx]
        if float(vals.norm()) == 0:
            continue
        vals = vals / vals.norm() * norm
        vecs = torch.zeros(1 + n_null, len(source))
        vecs[0, idx] = vals
        for k in range(n_null):
            at = free[torch.randperm(len(free), generator=rng)[: len(idx)]]
            vecs[1 + k, at] = vals[torch.randperm(len(vals), generator=rng)]
        out.append((name, child, len(idx), vecs))
    return out


def intervene(model: Any, tokenizer: Any, site: Site, families: Sequence[Family], prompts: Sequence[str],
              scale: float, alpha: float = 1.0, n_null: int = 20, seed: int = 0, batch: int = 64) -> pd.DataFrame:
    """One row per (parent, neuron group, child token): the centred logit change of the token when the group is
    amplified, and its null from random neuron sets of the same size (see the module docstring)."""
    if site.kind != "mlp":
        raise ValueError(f"neuron groups live at the MLP hidden state; got site {site}")
    device = next(model.parameters()).device
    ids, mask = left_pad([prompt_ids(tokenizer, p) for p in prompts], tokenizer.pad_token_id or 0, device)
    base = _logits(model, ids, mask, site, None, batch)  # [P, V]
    rng = torch.Generator().manual_seed(seed)
    rows = []
    for fam in families:
        tok = torch.tensor([t if t >= 0 else 0 for t in fam.tokens])
        for name, child, size, vecs in _vectors(fam, rng, n_null, alpha * scale):
            n_v, n_p = len(vecs), len(ids)
            rows_v = torch.arange(n_v).repeat_interleave(n_p)
            rows_p = torch.arange(n_p).repeat(n_v)
            delta = torch.empty(n_v * n_p, len(tok))
            for s in range(0, len(rows_v), batch):
                sl = slice(s, s + batch)
                logits = _logits(model, ids[rows_p[sl]], mask[rows_p[sl]], site, vecs[rows_v[sl]].to(device), batch)
                d = logits - base[rows_p[sl]]
                delta[sl] = (d[:, tok] - d.mean(-1, keepdim=True)).cpu()
            effect = delta.view(n_v, n_p, len(tok)).mean(1)  # [1 + n_null, m]
            for j, c in enumerate(fam.children):
                if fam.tokens[j] < 0:
                    continue
                obs, null = float(effect[0, j]), effect[1:, j].double().numpy()
                rows.append({"parent": fam.parent, "parent_label": fam.parent_label, "group": name,
                             "group_child": child, "group_size": size, "child": c, "child_label": fam.labels[j],
                             "token": tokenizer.decode([fam.tokens[j]]), "own": child == c,
                             "sibling": child not in ("", c), "logit_change": obs,
                             "null_mean": float(null.mean()) if n_null else float("nan"),
                             "null_sd": float(null.std(ddof=1)) if n_null > 1 else float("nan"),
                             "null_hi": float(np.quantile(null, 0.975)) if n_null else float("nan"),
                             "p": p_value(null, obs) if n_null else float("nan"), "n_null": n_null, "alpha": alpha})
    return pd.DataFrame(rows, columns=list(INTERVENTION_COLUMNS))


def _logits(model: Any, ids: Tensor, mask: Tensor, site: Site, vectors: Tensor | None, batch: int) -> Tensor:
    """Last-position logits [b, V] (float), with per-row vectors [b, d] added at `site` when given."""
    out = []
    for s in range(0, len(ids), batch):
        sl = slice(s, s + batch)
        hook = steer(model, site, vectors[sl, None, :]) if vectors is not None else contextlib.nullcontext()
        with hook, torch.inference_mode():
            out.append(model(input_ids=ids[sl], attention_mask=mask[sl], position_ids=positions(mask[sl]),
                             use_cache=False, logits_to_keep=1).logits[:, -1].float())
    return torch.cat(out)
