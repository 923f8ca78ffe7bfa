"""GPU checks (`pytest -m gpu`; skipped without CUDA): SNMF on CUDA against the CPU in float64, collection from a
bfloat16 model, steering while decoding, SAE training on the GPU, and a model split over cuda:0 and the CPU by a
device map giving the single-device collection, steering and projections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from bench.activations import ActivationCache, collect
from bench.cli import main
from bench.features import steering_target, vocab_projection
from bench.hooks import steer
from bench.models import load
from bench.results import read_jsonl
from bench.sites import Site
from bench.steer import Sampling, prompt_ids, sample
from tests.conftest import FIXTURE_CONCEPTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = "cuda"
TEXTS = [f"the {w} sat on the mat near the river and we ate {f} at a cafe" for w, f in
         [("cat", "croissants"), ("dog", "bread"), ("bird", "soup"), ("fish", "rice"), ("cow", "cake"),
          ("horse", "fruit"), ("sheep", "cheese"), ("goat", "pasta")]]
GREEDY = Sampling(max_new_tokens=8, temperature=0.0)


def _prompts(tok: Any) -> list[list[int]]:
    return [prompt_ids(tok, t) for t in TEXTS[:4]]


def test_snmf_on_cuda_equals_the_cpu_in_float64() -> None:
    from methods.snmf import SNMF
    from tests.test_snmf import make_acts, matched_cos, planted

    x, _, _ = planted(d=120, k=6, n=1500, s=8)
    acts = make_acts(x)
    params = {"n_features": 6, "sparsity": 0.07, "max_iter": 60, "patience": 60, "seed": 1}
    ref = SNMF(device="cpu", dtype="float64", **params).fit(acts)
    f64 = SNMF(device=CUDA, dtype="float64", **params).fit(acts)
    assert f64.directions_.device.type == "cpu", "fitted directions come back to the CPU"
    torch.testing.assert_close(f64.directions_, ref.directions_, atol=1e-6, rtol=1e-5)
    assert f64.fit_metrics_["n_iter"] == ref.fit_metrics_["n_iter"]
    assert f64.fit_metrics_["loss"] == pytest.approx(ref.fit_metrics_["loss"], rel=1e-9)
    torch.testing.assert_close(f64.encode(x[:300]), ref.encode(x[:300]), atol=1e-5, rtol=1e-4)
    f32 = SNMF(device=CUDA, dtype="float32", **params).fit(acts)  # the default dtype, to its own precision
    assert matched_cos(f32.directions_, ref.directions_).min() > 0.999
    assert f32.fit_metrics_["rel_error"] == pytest.approx(ref.fit_metrics_["rel_error"], rel=1e-3)


def test_collection_from_a_bfloat16_model() -> None:
    """A bfloat16 model on the GPU collects the float32 CPU model's tokens and, to bfloat16 precision, its values,
    into a bfloat16 store (and into float32 in memory)."""
    sites = [Site(0, "mlp"), Site(1, "resid"), Site(1, "mlp_out")]
    model, tok, _ = load("tiny:llama")
    ref = collect(model, tok, TEXTS, sites, batch_size=3, max_len=32)
    bf16 = load("tiny:llama", CUDA)[0].to(torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    stored = ActivationCache(shard_tokens=40).get(bf16, tok, "tiny:llama", "bf16", TEXTS, sites, batch_size=3,
                                                  max_len=32, dtype=torch.bfloat16)
    in_memory = collect(bf16, tok, TEXTS, sites, batch_size=3, max_len=32)
    for site in sites:
        want = ref[site]["x"]  # [n_tokens, d_site] float32
        acts = stored[site]
        assert acts.streams and acts.x.dtype == torch.bfloat16 and acts.x.device.type == "cpu"
        for col in ("prompt_idx", "position", "token_ids"):
            assert torch.equal(getattr(acts, col), ref[site][col]), col
            assert torch.equal(in_memory[site][col], ref[site][col]), col
        assert in_memory[site]["x"].dtype == torch.float32
        for got in (acts.x.float(), in_memory[site]["x"]):
            assert float((got - want).norm() / want.norm()) < 0.05, site


def test_steering_while_decoding_on_cuda_equals_the_cpu() -> None:
    """`sample` (per-row vectors, KV cache) and Hugging Face `generate` inside `steer` decode on the GPU the CPU's
    greedy tokens; the vectors change them, and nothing is left hooked after the block."""
    model, tok, _ = load("tiny:gpt2")
    gpu = load("tiny:gpt2", CUDA)[0]
    prompts, site = _prompts(tok), Site(1, "resid")
    vectors = 6.0 * F.normalize(torch.randn(len(prompts), 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    pad = tok.pad_token_id
    on_cpu = sample(model, prompts, GREEDY, site=site, vectors=vectors, pad_id=pad, device="cpu")
    on_gpu = sample(gpu, prompts, GREEDY, site=site, vectors=vectors, pad_id=pad, device=CUDA)
    assert on_gpu == on_cpu
    plain = sample(gpu, prompts, GREEDY, pad_id=pad, device=CUDA)
    assert plain != on_gpu, "the steering vectors changed nothing"
    assert plain == sample(model, prompts, GREEDY, pad_id=pad, device="cpu")

    ids = torch.tensor([prompts[0]])
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": pad, "attention_mask": torch.ones_like(ids)}
    with steer(model, site, vectors[0]), torch.no_grad():
        want = model.generate(ids, **kw)
    with steer(gpu, Site(1, "resid"), vectors[0]), torch.no_grad():  # a CPU vector: the hook moves it
        got = gpu.generate(ids.to(CUDA), **{**kw, "attention_mask": kw["attention_mask"].to(CUDA)})
    assert got.cpu().tolist() == want.tolist()
    with torch.no_grad():
        after = gpu.generate(ids.to(CUDA), **{**kw, "attention_mask": kw["attention_mask"].to(CUDA)})
        unsteered = model.generate(ids, **kw)
    assert after.cpu().tolist() == unsteered.tolist() != want.tolist(), "the steering hook outlived its block"


def test_sae_training_on_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A TopK SAE trained on the GPU recovers a planted dictionary as well as the CPU's training does."""
    pytest.importorskip("sae_lens")
    from scipy.optimize import linear_sum_assignment

    from methods.sae import SparseAutoencoder
    from tests.test_sae import make_acts, planted

    x, atoms = planted()
    acts = make_acts(x, Site(0, "mlp"))
    params = {"d_sae": 48, "k": 3, "n_steps": 1000, "batch_size": 256, "lr": 3e-3, "dead_feature_window": 50}
    fits = {}
    for device in (CUDA, "cpu"):
        monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path / device))  # the cache key leaves the device out
        fits[device] = SparseAutoencoder(device=device, **params).fit(acts)
        assert fits[device].fit_metrics_["cache_hit"] == 0
    gpu, cpu = fits[CUDA], fits["cpu"]
    assert gpu.directions_.device.type == "cuda"
    cos = atoms @ F.normalize(gpu.directions_.cpu(), dim=-1).T
    rows, cols = linear_sum_assignment(-cos.numpy())
    assert cos[rows, cols].mean() > 0.9
    m, c = gpu.fit_metrics_, cpu.fit_metrics_
    assert m["l0"] == 3 and m["explained_variance"] > 0.85
    assert m["explained_variance"] == pytest.approx(c["explained_variance"], abs=0.03)
    z = gpu.encode(x[:64].to(CUDA))
    assert z.device.type == "cuda" and ((z != 0).sum(-1) <= 3).all()


# ----------------------------------------------------------------------------------------------- device maps
# tiny:llama with its second half mapped to the CPU: accelerate offloads those weights (kept on the CPU, moved to
# cuda:0 to run), so this checks the offload path and the mixed placement of parameters, not compute on two devices
SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
         "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


def test_a_model_split_over_cuda_and_cpu_equals_the_single_device_path() -> None:
    single, tok, _ = load("tiny:llama", CUDA)
    split, _, _ = load("tiny:llama", CUDA, device_map=SPLIT)
    assert any(p.device.type == "cuda" for p in split.parameters())
    assert any(p.device.type != "cuda" for p in split.parameters()), "the map put everything on the GPU"
    sites = [Site(0, "mlp"), Site(1, "mlp"), Site(1, "resid"), Site(1, "mlp_out")]
    want = collect(single, tok, TEXTS, sites, batch_size=3, max_len=32)
    got = collect(split, tok, TEXTS, sites, batch_size=3, max_len=32)
    for site in sites:
        for col in ("prompt_idx", "position", "token_ids"):
            assert torch.equal(got[site][col], want[site][col])
        torch.testing.assert_close(got[site]["x"], want[site]["x"], atol=1e-5, rtol=1e-4)

    prompts = _prompts(tok)
    g = torch.Generator().manual_seed(1)
    for site in sites:
        vectors = 6.0 * F.normalize(torch.randn(len(prompts), want[site]["x"].shape[1], generator=g), dim=-1)
        a = sample(single, prompts, GREEDY, site=site, vectors=vectors, pad_id=tok.pad_token_id, device=CUDA)
        b = sample(split, prompts, GREEDY, site=site, vectors=vectors, pad_id=tok.pad_token_id, device=CUDA)
        assert a == b, site
        batch = {k: v.to(CUDA) for k, v in tok(TEXTS[:2], return_tensors="pt", padding=True).items()}
        with steer(single, site, vectors[0]), torch.no_grad():
            la = single(**batch).logits
        with steer(split, site, vectors[0]), torch.no_grad():
            lb = split(**batch).logits
        torch.testing.assert_close(lb.to(la.device), la, atol=1e-4, rtol=1e-4)

    dirs = torch.randn(5, want[Site(1, "mlp")]["x"].shape[1], generator=g)
    for site in (Site(0, "mlp"), Site(1, "mlp"), Site(1, "resid")):
        d = dirs if site.kind == "mlp" else dirs[:, :32]
        ids_a, vals_a = vocab_projection(single, site, d, 5)
        ids_b, vals_b = vocab_projection(split, site, d, 5)
        assert torch.equal(ids_a, ids_b)
        torch.testing.assert_close(vals_a, vals_b, atol=1e-4, rtol=1e-4)
        ta, tb = steering_target(single, site, d), steering_target(split, site, d)
        assert ta[0] == tb[0]
        torch.testing.assert_close(ta[1].cpu(), tb[1].cpu())


def test_bench_run_with_a_device_map_on_cuda_gives_the_records_of_the_plain_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    args = ["run", "--models", "tiny:llama", "--layers", "1", "--methods", "dim", "--tasks", "detection,steering",
            "--concepts", str(FIXTURE_CONCEPTS), "--judge", "fake", "--device", CUDA,
            "-T", "steering.max_new_tokens=4", "-T", "steering.n_dev=1", "-T", "steering.n_test=2",
            "-T", "steering.factors=1,4"]
    for name, extra in {"plain": [], "split": ["--device-map", json.dumps(SPLIT)]}.items():
        monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path / f"cache-{name}"))
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
    rows = {name: [r for r in read_jsonl(tmp_path / name / "records.jsonl") if not r["metric"].endswith("seconds")]
            for name in ("plain", "split")}
    assert len(rows["plain"]) == len(rows["split"]) > 0
    for a, b in zip(rows["plain"], rows["split"], strict=True):
        assert (a["task"], a["metric"], a["concept"], a["split"]) == (b["task"], b["metric"], b["concept"], b["split"])
        if a["value"] is None or b["value"] is None:
            assert a["value"] == b["value"]
        else:
            assert b["value"] == pytest.approx(a["value"], rel=1e-3, abs=1e-4), (a["task"], a["metric"])
