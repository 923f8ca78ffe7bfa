"""The recursive hierarchy analysis: tree edge rules, neuron groups on a hand example, their permutation null, the
neuron-group intervention on tiny models, the hierarchical concept data and its column mapping, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.feature_tree import edges
from bench.hier_concepts import HierConcepts
from bench.hierarchy_recursive import PRESETS, settings
from bench.models import load
from bench.neuron_groups import Family, group_table, groups, intervene, level_overlap
from bench.sites import Site, site_dim


def test_edges_keep_children_above_the_ratio_at_most_four() -> None:
    coef = torch.tensor([[1.0, 0.16, 0.14, 0.0, 0.5, 0.3, 0.2],  # 6 above 0.15: keep the 4 largest
                         [0.0, 0.0, 2.0, 0.29, 0.31, 0.0, 0.0],  # 0.15 x 2 = 0.3: 0.31 stays, 0.29 goes
                         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # nothing
                         [0.0, 1.0, 0.0, 0.1, 0.0, 0.0, 0.0]])  # one child only: the reference stops the branch
    assert edges(coef) == [[0, 4, 5, 6], [2, 4], [], []]
    assert edges(coef, min_children=1)[3] == [1]
    assert edges(coef, ratio=0.15, max_children=2)[0] == [0, 4]
    assert edges(torch.tensor([[1.0, 0.15]]))[0] == [0, 1], "the threshold is inclusive (>=), as the reference's"
    with pytest.raises(ValueError, match="ratio"):
        edges(coef, ratio=1.5)


def test_core_and_exclusive_neurons_on_a_hand_example() -> None:
    sup = torch.tensor([[1, 1, 1, 0, 0, 0, 1],
                        [1, 1, 0, 1, 0, 0, 1],
                        [1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    g = groups(sup)
    assert g.core.nonzero().squeeze(1).tolist() == [0, 1]
    assert [row.nonzero().squeeze(1).tolist() for row in g.exclusive] == [[2], [3], [4, 5]]  # 6 is shared by two
    assert g.shared.nonzero().squeeze(1).tolist() == [0, 1, 6] and g.union.sum() == 7
    (row,) = group_table([("L2:0", ["L1:0", "L1:1", "L1:2"], sup)], n_perm=99, seed=0).to_dict("records")
    assert row["core"] == 2 and row["shared"] == 3 and row["exclusive_mean"] == pytest.approx(4 / 3)
    assert row["union"] == 7
    assert 1 / 100 <= row["core_p"] <= 1 and row["n_perm"] == 99


def test_the_null_keeps_sizes_and_separates_shared_from_random_supports() -> None:
    gen = torch.Generator().manual_seed(0)
    d = 1000
    shared = torch.randperm(d, generator=gen)[:10]
    nested = torch.zeros(4, d, dtype=torch.bool)
    nested[:, shared] = True
    for i in range(4):
        nested[i, torch.randperm(d, generator=gen)[:10]] = True
    rand = torch.zeros(4, d, dtype=torch.bool)
    for i in range(4):
        rand[i, torch.randperm(d, generator=gen)[:20]] = True
    t = group_table([("nested", list("abcd"), nested), ("random", list("abcd"), rand)], n_perm=199, seed=1)
    nest, rnd = t.iloc[0], t.iloc[1]
    assert nest["core"] >= 10 and nest["core_p"] == 1 / 200 and nest["sibling_jaccard_p"] == 1 / 200
    assert rnd["core"] == 0 and rnd["core_p"] > 0.5 and rnd["sibling_jaccard_p"] > 0.05
    assert nest["core_null"] < 1 and rnd["core_null_hi"] <= 1
    jac, stats = level_overlap(torch.cat([nested, rand]), [(0, 1), (2, 3), (0, 2)], n_perm=99, seed=0)
    assert jac.shape == (8, 8) and torch.allclose(jac, jac.T) and torch.allclose(jac.diagonal(), torch.ones(8))
    assert stats["n_sibling_pairs"] == 3 and stats["sibling_jaccard"] > stats["null_hi"] and stats["p"] == 1 / 100


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_intervention_raises_the_token_a_group_writes(arch: str) -> None:
    """A group whose neurons write a token's unembedding raises that token's logit far above random neuron sets."""
    model, tok, _ = load(f"tiny:{arch}")
    site = Site(1, "mlp")
    d = site_dim(model, site)
    down = model.transformer.h[1].mlp.c_proj.weight.T if arch == "gpt2" else model.model.layers[1].mlp.down_proj.weight
    target = tok(" the", add_special_tokens=False)["input_ids"][0]
    unembed = model.get_output_embeddings().weight[target].detach()  # [d_model]
    score = (down.detach().T @ unembed) if arch == "gpt2" else (unembed @ down.detach())  # [d_mlp] per neuron
    col = torch.zeros(2, d)
    top = score.topk(6).indices
    col[0, top[:3]], col[1, top[3:]] = score[top[:3]], score[top[3:]]  # two children, no shared neurons
    col[:, score.abs().argsort()[:1]] = 0.5  # one shared, harmless neuron: the core
    fam = Family("L2:0", "p", ["L1:0", "L1:1"], ["a", "b"], col, [target, -1])
    t = intervene(model, tok, site, [fam], ["a b c", "the cat sat"], scale=5.0, alpha=1.0, n_null=19, seed=0)
    assert list(t["group"]) == ["core", "exclusive", "exclusive"] and (t["child"] == "L1:0").all()  # shared == core
    own = t[(t["group"] == "exclusive") & t["own"]].iloc[0]
    assert own["group_size"] == 3 and own["logit_change"] > own["null_hi"] and own["p"] == 1 / 20
    assert t["token"].iloc[0] == tok.decode([target])
    with pytest.raises(ValueError, match="MLP hidden state"):
        intervene(model, tok, Site(1, "resid"), [fam], ["a"], scale=1.0)


def test_hierarchical_concepts_ship_and_map_columns(tmp_path: Path) -> None:
    data = HierConcepts.load()
    assert len(data.parents) == 7 and len(data.children) >= 40
    assert data.parent_of["Monday"] == "days" and data.token_of["Monday"] == "Monday"
    assert data.frame.groupby("concept").size().min() >= 6
    labels = data.labels()
    assert labels.shape == (len(data.frame), len(data.names)) and (labels.sum(1) == 2).all()
    rows = [{"prompt": f"I like {w} a lot {i}", "label": w, "category": cat, "word": w.lower()}
            for w, cat in (("Apple", "fruit"), ("Pear", "fruit"), ("Oak", "tree")) for i in range(4)]
    path = tmp_path / "mine.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    mine = HierConcepts.load(path, "text=prompt,concept=label,parent=category,token=word")
    assert mine.parent_of == {"Apple": "fruit", "Pear": "fruit", "Oak": "tree"} and mine.token_of["Oak"] == "oak"
    assert set(mine.frame["split"]) <= {"train", "dev", "test"}
    with pytest.raises(ValueError, match="no column 'kind'"):
        HierConcepts.load(path, "text=prompt,concept=label,parent=kind")
    grouped = tmp_path / "paper.json"  # the paper's format: {concept: [texts]}, no parents
    grouped.write_text(json.dumps({"body": ["a body", "the body", "his body"], "a hand": ["a hand", "my hand", "a"]}))
    paper = HierConcepts.load(grouped)
    assert paper.parent_of == {"body": "body", "a hand": "a hand"}


def test_presets_and_overrides() -> None:
    paper = PRESETS["paper-hierarchy"]
    assert paper.model == "gpt2-large" and paper.layer == "8" and paper.ranks == (400, 200, 100, 50)
    assert paper.max_iter == 3000 and paper.tol == 1e-6 and paper.tol_mode == "absolute"
    assert paper.fine_tune_steps == 2500 and paper.fine_tune_lr == 1e-3 and paper.sparsity == 0.01
    s = settings(None, ranks=(8, 4), model=None)
    assert s.ranks == (8, 4) and s.model == PRESETS["cpu"].model
    with pytest.raises(ValueError, match="unknown preset 'gpu'; known: cpu, paper-hierarchy"):
        settings("gpu")


def test_cli_runs_the_recursive_analysis_on_a_tiny_model(tmp_path: Path) -> None:
    out, figs = tmp_path / "out", tmp_path / "figs"
    assert main(["analyze", "hierarchy", "--model", "tiny:gpt2", "--layer", "1", "--ranks", "12,6,3", "--sparsity",
                 "0.2", "--max-iter", "20", "--fine-tune-steps", "5", "--out", str(out), "--figures", str(figs)]) == 0
    tree = json.loads((out / "tree.json").read_text())
    assert tree["ranks"] == [12, 6, 3] and len(tree["nodes"]) == 21 and tree["edge_ratio"] == 0.15
    node = tree["nodes"][0]
    assert {"id", "label", "auroc", "support", "top_contexts", "parents", "children"} <= set(node)
    by_id = {n["id"]: n for n in tree["nodes"]}
    for n in tree["nodes"]:
        assert len(n["children"]) <= 4
        for c in n["children"]:
            assert {"id": n["id"], "weight": c["weight"]} in by_id[c["id"]]["parents"]
            assert by_id[c["id"]]["level"] == n["level"] - 1
    groups_t = pd.read_csv(out / "neuron_groups.csv")
    assert len(groups_t) == sum(1 for n in tree["nodes"] if n["children"])
    inter = pd.read_csv(out / "intervention.csv")
    assert {"parent", "group", "group_size", "child", "token", "logit_change", "null_mean", "p"} <= set(inter.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["ranks"] == [12, 6, 3] and summary["wall_seconds"] > 0
    page = (out / "browser" / "tiny_gpt2-L1-tree.html").read_text()  # more in tests/test_browser_tree.py
    assert 'href="tiny_gpt2-L1-tree-level3.html#f=0"' in page and 'href="tiny_gpt2-L1-tree-level1.html#f=0"' in page
    assert {p.name for p in figs.iterdir()} == {"tree.png", "neuron_groups.png", "intervention.png"}
