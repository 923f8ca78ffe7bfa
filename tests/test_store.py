"""The streaming activation store: shards round trip, a killed collection resumes from its last complete shard, caps
and labels keep streaming, and fits, labels and KL calibration over the store equal their in-memory versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bench.activations
import bench.collect
from bench.activations import ActivationCache, Activations, collect, load_store
from bench.feature_evidence import top_codes
from bench.features import max_activations, mean_norm, pooled_codes, running_topk
from bench.models import load
from bench.sites import Site
from bench.store import RowSource, ShardWriter
from methods.snmf import SNMF

TEXTS = [f"Sentence number {i} talks about {['cats', 'dogs', 'birds', 'fish'][i % 4]} and more words." * (1 + i % 3)
         for i in range(40)]
SITES = [Site(0, "mlp"), Site(1, "resid")]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpt2():  # noqa: ANN201 - (model, tokenizer)
    model, tok, _ = load("tiny:gpt2")
    return model, tok


def synthetic_store(folder: Path, n: int, d: int, shard_tokens: int, per_text: int = 10, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> Path:
    """A store of n tokens of width d (per_text tokens a text), written through ShardWriter in batches of 3 texts."""
    writer = ShardWriter(folder.with_name(f".{folder.name}.partial"), {"synthetic": seed}, shard_tokens)
    g = torch.Generator().manual_seed(seed)
    step = 3 * per_text
    for start in range(0, n, step):
        b = min(step, n - start)
        tok = torch.arange(start, start + b)
        cols = {"x": torch.randn(b, d, generator=g).relu().to(dtype), "prompt_idx": tok // per_text,
                "position": tok % per_text, "token_ids": tok % 50}
        writer.add(cols, -(-(start + b) // per_text))
    writer.finish(folder, dtype)
    return folder


def store_acts(folder: Path, n: int, per_text: int = 10) -> Activations:
    return load_store(folder, Site(0, "mlp"), "synthetic", [f"t{i}" for i in range(-(-n // per_text))], "k")


def test_shards_round_trip_and_read_any_rows(tmp_path: Path) -> None:
    folder = synthetic_store(tmp_path / "s", 1000, 16, shard_tokens=128)
    meta = json.loads((folder / "meta.json").read_text())
    assert len(meta["shards"]) > 5 and all(s["n_tokens"] <= 128 for s in meta["shards"])
    x = torch.cat([load_file(str(folder / s["file"]))["x"] for s in meta["shards"]])  # plain safetensors files
    acts = store_acts(folder, 1000)
    assert acts.streams and len(acts) == 1000 and acts.d == 16 and acts.nbytes == x.numel() * 4
    assert torch.equal(torch.cat(list(acts.iter_chunks(97))), x)
    assert acts.streams, "iterating does not load x"
    rows = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:300]
    assert torch.equal(RowSource.of(folder).read(rows), x[rows])
    assert torch.equal(acts.prompt_idx, torch.arange(1000) // 10)
    assert torch.equal(acts.x, x) and not acts.streams


def test_half_precision_store(tmp_path: Path) -> None:
    folder = synthetic_store(tmp_path / "s", 300, 8, shard_tokens=64, dtype=torch.bfloat16)
    acts = store_acts(folder, 300)
    assert acts.x.dtype == torch.bfloat16 and acts.nbytes == 300 * 8 * 2
    assert torch.equal(torch.cat(list(store_acts(folder, 300).iter_chunks(50))), acts.x)


def test_cap_subset_and_labels_keep_streaming(tmp_path: Path) -> None:
    acts = store_acts(synthetic_store(tmp_path / "s", 1000, 16, shard_tokens=128), 1000)
    x = store_acts(tmp_path / "s", 1000).x
    labelled = acts.with_labels(torch.eye(4, dtype=torch.bool)[torch.arange(100) % 4], list("abcd"))
    capped = labelled.cap(300, seed=1)
    assert labelled.streams and capped.streams and capped.rows is not None and len(capped) == 300
    idx = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:300].sort().values
    assert torch.equal(torch.cat(list(capped.iter_chunks(64))), x[idx])
    assert torch.equal(capped.prompt_idx, idx // 10) and torch.equal(capped.labels, labelled.labels[idx])
    again = capped.cap(100, seed=2)  # a view of a view
    sub = torch.randperm(300, generator=torch.Generator().manual_seed(2))[:100].sort().values
    assert again.streams and torch.equal(torch.cat(list(again.iter_chunks(33))), x[idx][sub])
    assert torch.equal(capped.x, x[idx]), "x of a view loads only its rows"
    in_memory = Activations(x=x, site=acts.site, model_id="m", prompt_idx=acts.prompt_idx, position=acts.position,
                            token_ids=acts.token_ids, texts=acts.texts, key="k").cap(300, seed=1)
    assert in_memory.key == capped.key and torch.equal(in_memory.x, capped.x)


def test_cache_collects_in_shards_equal_to_collect(gpt2, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    cache = ActivationCache(shard_tokens=80)
    got = cache.get(*gpt2, "tiny:gpt2", "r0", TEXTS, SITES, batch_size=4, max_len=16)
    ref = collect(*gpt2, TEXTS, SITES, batch_size=4, max_len=16)
    for site in SITES:
        assert got[site].streams
        folder = got[site].source
        shards = json.loads((folder / "meta.json").read_text())["shards"]
        assert len(shards) > 3 and max(s["n_tokens"] for s in shards) <= 80
        for col in ("prompt_idx", "position", "token_ids"):
            assert torch.equal(getattr(got[site], col), ref[site][col])
        torch.testing.assert_close(got[site].x, ref[site]["x"], atol=1e-5, rtol=1e-5)  # batches differ: rounding
    again = ActivationCache(shard_tokens=80)
    again.get(*gpt2, "tiny:gpt2", "r0", TEXTS, SITES, batch_size=4, max_len=16)
    assert again.hits == 2 and again.misses == 0


_KILL = """
import os, sys, torch
import bench.store
from bench.activations import ActivationCache
from bench.models import load
from bench.sites import Site
from tests.test_store import TEXTS, SITES
real, count = bench.store.ShardWriter._write_shard, [0]
def write(self, tensors, end):
    real(self, tensors, end)
    count[0] += 1
    if count[0] == int(sys.argv[1]):
        os._exit(9)  # killed: no cleanup runs
bench.store.ShardWriter._write_shard = write
model, tok, _ = load("tiny:gpt2")
ActivationCache(shard_tokens=80).get(model, tok, "tiny:gpt2", "r0", TEXTS, SITES, batch_size=4, max_len=16)
"""


def test_a_killed_collection_resumes_from_its_last_complete_shard(gpt2, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    done = subprocess.run([sys.executable, "-c", _KILL, "5"], cwd=ROOT, env=os.environ, check=False)
    assert done.returncode == 9
    root = bench.activations.cache_root() / "acts"
    partial = sorted(root.glob(".*.partial"))
    assert len(partial) == len(SITES) and not [p for p in root.iterdir() if not p.name.startswith(".")]
    kept = {p: json.loads((p / "manifest.json").read_text())["shards"] for p in partial}
    assert sum(len(s) for s in kept.values()) == 5  # the two sites' writers alternate: 3 and 2 complete shards
    mtimes = {f: f.stat().st_mtime_ns for p, shards in kept.items() for f in (p / s["file"] for s in shards)}
    seen: list[int] = []
    real_read = bench.collect.read
    monkeypatch.setattr(bench.collect, "read", lambda m, batch, sites: (seen.append(len(batch["input_ids"])),
                                                                             real_read(m, batch, sites))[1])
    cache = ActivationCache(shard_tokens=80)
    resumed = cache.get(*gpt2, "tiny:gpt2", "r0", TEXTS, SITES, batch_size=4, max_len=16)
    first_left = min(shards[-1]["texts"][1] for shards in kept.values())
    assert sum(seen) == len(TEXTS) - first_left, "only texts after the last complete shard are collected again"
    for f, t in mtimes.items():
        final = root / f.parent.name[1:].removesuffix(".partial") / f.name
        assert final.stat().st_mtime_ns == t, "complete shards are kept, not rewritten"
    fresh = ActivationCache(root=Path(os.environ["FEATBENCH_CACHE"]) / "other", shard_tokens=80)
    whole = fresh.get(*gpt2, "tiny:gpt2", "r0", TEXTS, SITES, batch_size=4, max_len=16)
    for site in SITES:
        assert torch.equal(resumed[site].x, whole[site].x), "the same windows, the same numbers"
        assert torch.equal(resumed[site].prompt_idx, whole[site].prompt_idx)


def test_snmf_from_the_store_equals_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = synthetic_store(tmp_path / "s", 1200, 40, shard_tokens=256)
    cfg = {"n_features": 6, "max_iter": 25, "seed": 3, "device": "cpu", "dtype": "float64", "sparsity": 0.1}
    monkeypatch.setenv("FEATBENCH_MEMORY_BUDGET", "100K")  # 160 kB of x: it streams by itself, in chunks of 40 tokens
    for init in ("random", "kmeans", "svd"):
        acts = store_acts(folder, 1200).cap(1000, seed=0)
        streamed = SNMF(init=init, **cfg).fit(acts)
        assert acts.streams, "the fit did not load x"
        whole = SNMF(init=init, **cfg).fit(Activations(
            x=acts.x.clone(), site=acts.site, model_id="m", prompt_idx=acts.prompt_idx, position=acts.position,
            token_ids=acts.token_ids, texts=acts.texts))
        torch.testing.assert_close(streamed.directions_, whole.directions_, atol=1e-6, rtol=1e-6)
        assert streamed.fit_metrics_["loss"] == pytest.approx(whole.fit_metrics_["loss"], rel=1e-9)
        torch.testing.assert_close(streamed.top_codes_, whole.top_codes_)
        assert torch.equal(streamed.top_prompt_, whole.top_prompt_)
        assert torch.equal(streamed.top_position_, whole.top_position_)


def test_running_topk_and_batched_encoders_equal_the_full_tensors(tmp_path: Path) -> None:
    acts = store_acts(synthetic_store(tmp_path / "s", 900, 12, shard_tokens=100), 900)
    method = SNMF(n_features=5, max_iter=5, device="cpu").fit(acts)
    del method.top_codes_  # labels from encode, as for any method
    z = method.encode(acts.x)  # [n, k] in memory, the reference
    feats = [4, 0, 2]
    vals, idx = running_topk(method, store_acts(tmp_path / "s", 900), feats, 7, chunk=64)
    full = z[:, feats].T.topk(7, dim=1)
    torch.testing.assert_close(vals, full.values)
    torch.testing.assert_close(z[idx, torch.tensor(feats)[:, None]], full.values)  # the same tokens (ties aside)
    tv, ti = top_codes(method, store_acts(tmp_path / "s", 900), feats, 7)
    assert torch.equal(tv, vals) and torch.equal(ti, idx)
    lazy = store_acts(tmp_path / "s", 900)
    pooled = pooled_codes(method, lazy, "max", chunk=50)
    ref = torch.full((90, 5), float("-inf")).scatter_reduce(0, lazy.prompt_idx[:, None].expand(-1, 5), z, "amax")
    torch.testing.assert_close(pooled, ref)
    torch.testing.assert_close(max_activations(method, lazy, feats, chunk=50), z[:, feats].amax(0))
    assert mean_norm(lazy, chunk=64) == pytest.approx(float(lazy.x.norm(dim=-1).mean()), rel=1e-6)


def test_kl_calibration_per_batch_equals_the_plain_reference() -> None:
    """geometric_kl_alphas (all pairs at once, padded prompts, reduced per batch) gives the alphas and KLs of the
    plain reference (tests/_reference.py: one pair at a time, each prompt alone), whatever the batch size."""
    from bench.steer import geometric_kl_alphas
    from tests._reference import kl_alphas

    model, tok, _ = load("tiny:llama")
    site = Site(1, "resid")
    d = torch.nn.functional.normalize(torch.randn(3, model.config.hidden_size,
                                                  generator=torch.Generator().manual_seed(0)), dim=-1)
    prompts = ["The weather today", "Once upon a time there", "My favourite food is"]
    ref = kl_alphas(model, tok, site, d, [0.05, 0.2], prompts, norm=4.0, iters=6)
    for batch in (1, 4):
        got = geometric_kl_alphas(model, tok, site, d, [0.05, 0.2], prompts, norm=4.0, batch_size=batch, iters=6)
        torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-4)


_MEMORY = """
import re, resource, sys
from pathlib import Path
import torch
from bench.features import mean_norm, pooled_codes
from methods.snmf import SNMF
from tests.test_store import store_acts, synthetic_store

n, d = 400_000, 256  # 400 MB of float32, twice the limit below
folder = synthetic_store(Path(sys.argv[1]) / "s", n, d, shard_tokens=16_384, per_text=100)
acts = store_acts(folder, n, per_text=100)
labels = torch.eye(4, dtype=torch.bool)[torch.arange(acts.n_prompts) % 4]
acts = acts.with_labels(labels, list("abcd"))
data_kb = int(re.search(r"VmData:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
limit = data_kb * 1024 + 200 * 2**20  # what runs now, plus 200 MB
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
try:
    torch.empty(n, d)
    sys.exit("the limit does not bite")
except (MemoryError, RuntimeError):
    pass
m = SNMF(n_features=8, max_iter=2, device="cpu").fit(acts)  # streams: over memory_budget() (64M here)
capped = acts.cap(300_000, seed=0)
m2 = SNMF(n_features=8, max_iter=1, device="cpu").fit(capped)
assert acts.streams and capped.streams
pooled_codes(m, capped, chunk=4096)
mean_norm(acts)
print("ok", m.fit_metrics_["n_iter"], m2.fit_metrics_["n_iter"])
"""


def test_fits_over_more_data_than_the_memory_limit(tmp_path: Path) -> None:
    env = {**os.environ, "FEATBENCH_MEMORY_BUDGET": "64M", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_MEMORY), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
