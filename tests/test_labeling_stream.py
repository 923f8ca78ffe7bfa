"""The labeling task's token data streams: every context it writes equals the one computed from the dense
[n_tokens, n_features] activations, and gathering never holds them (chunked encodes, only the needed windows kept)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

import tasks.labeling
from bench.cli import main
from bench.results import read_jsonl
from tests.conftest import FIXTURE_CONCEPTS
from tests.test_labeling import fake_grader

OPTIONS = ("-M", "snmf.n_features=12", "-T", "labeling.max_features=3", "-T", "labeling.n_top=6",
           "-T", "labeling.n_label=3", "-T", "labeling.n_score=2", "-T", "labeling.window=4",
           "-T", "labeling.label_window=2")


def _run(out: Path, monkeypatch: pytest.MonkeyPatch, model: str, *extra: str) -> list[tuple[Any, Any]]:
    """Run labeling (dim, snmf) on a tiny model with the fake judge; returns the (method, ctx) of every unit."""
    seen: list[tuple[Any, Any]] = []
    run = tasks.labeling.Labeling.run

    def spy(self: tasks.labeling.Labeling, method: Any, ctx: Any) -> Iterator[Any]:
        seen.append((method, ctx))
        yield from run(self, method, ctx)

    monkeypatch.setattr(tasks.labeling.Labeling, "run", spy)
    monkeypatch.setattr("bench.judge.make_judge", lambda spec, **_: fake_grader())
    args = ["run", "--models", model, "--layers", "1", "--methods", "dim,snmf", "--tasks", "labeling",
            "--concepts", str(FIXTURE_CONCEPTS), "--judge", "fake", "--out", str(out), *OPTIONS, *extra]
    assert main(args) == 0
    return seen


def _dense(method: Any, ctx: Any, sources: tuple[str, ...]) -> dict[tuple[str, int], torch.Tensor]:
    """(split, row) -> the feature activations on the prompt's tokens in position order: [n_prompt_tokens, n_features],
    from the whole x of every split (the reference; fine at this size)."""
    out = {}
    for split in sources:
        acts = ctx.acts(split, method.site)
        z = method.encode(acts.x).float()  # [n_tokens, n_features]
        for p in range(acts.n_prompts):
            mine = (acts.prompt_idx == p).nonzero().flatten()
            out[(split, p)] = z[mine[torch.argsort(acts.position[mine])]]
    return out


def _check_snippet(s: dict[str, Any], z: torch.Tensor, width: int) -> None:
    """The snippet equals the window of `z` ([n_prompt_tokens] of one feature) around its first peak."""
    at = int(torch.argmax(z))  # first maximum
    assert bool((z[:at] < z[at]).all())
    lo, hi = max(0, at - width), min(len(z), at + width + 1)
    assert s["peak"] == at - lo
    assert s["acts"] == [float(f"{a:.4g}") for a in z[lo:hi].tolist()]
    assert len(s["tokens"]) == hi - lo


@pytest.mark.parametrize(("model", "sources"), [("tiny:llama", ("train", "test")),
                                                 ("tiny:gpt2", tasks.labeling.SOURCES)])
def test_contexts_equal_the_dense_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str,
                                            sources: tuple[str, ...]) -> None:
    extra = ("-T", f"labeling.sources={','.join(sources)}")
    seen = _run(tmp_path / "run", monkeypatch, model, *extra)
    rows = [r for r in read_jsonl(tmp_path / "run" / "samples.jsonl") if r.get("kind") == "labeling"]
    assert {r["method"] for r in rows} == {"dim", "snmf"} and len(seen) == 2
    for method, ctx in seen:
        dense = _dense(method, ctx, sources)
        mine = [r for r in rows if r["method"] == type(method).registry_name]
        assert mine
        for r in mine:
            f = r["feature"]
            peak = {key: float(z[:, f].max()) for key, z in dense.items() if len(z)}
            ranked = sorted(peak, key=lambda k: -peak[k])  # stable: ties keep the split, row order
            want_top = [k for k in ranked[:6] if peak[k] > 0]
            assert [(s["split"], s["row"]) for s in r["top"]] == want_top
            assert r["dead"] == (not want_top)
            for s in r["top"]:
                _check_snippet(s, dense[(s["split"], s["row"])][:, f], 4)
            if want_top:
                assert r["max_act"] == peak[want_top[0]]
            held = set(want_top[3:])  # ranks n_label.. of the top
            for s in r["scoring"]:
                key = (s["split"], s["row"])
                _check_snippet(s, dense[key][:, f], 4)
                assert (key in held) if s["truth"] else (key not in set(ranked[:6]) and len(dense[key]))
    second = tmp_path / "again"
    monkeypatch.setenv("FEATBENCH_MEMORY_BUDGET", "40K")  # smaller chunks: the same records and samples
    _run(second, monkeypatch, model, *extra)
    strip = ("run_id", "time", "seconds", "elapsed")

    def clean(path: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(path)
                if r.get("kind", "labeling") == "labeling" and r.get("task", "labeling") == "labeling"]

    assert clean(second / "records.jsonl") == clean(tmp_path / "run" / "records.jsonl")
    assert clean(second / "samples.jsonl") == clean(tmp_path / "run" / "samples.jsonl")



def test_gather_encodes_in_chunks_and_keeps_only_the_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peaks across chunk boundaries equal the dense ones; no [n_tokens, n_chosen] tensor is ever held."""
    seen = _run(tmp_path / "run", monkeypatch, "tiny:llama", "-T", "labeling.sources=train,test")
    method, ctx = next((m, c) for m, c in seen if type(m).registry_name == "snmf")
    features = [0, 3, 7, 11]
    sizes: list[int] = []
    encode = method.encode

    def counted(x: torch.Tensor) -> torch.Tensor:
        sizes.append(len(x))
        return encode(x)

    monkeypatch.setattr(method, "encode", counted)
    toks = tasks.labeling._Tokens.gather(method, ctx, features, ("train", "test"), chunk=5)
    n = len(toks.token_ids)
    assert sizes and max(sizes) <= 5 and sum(sizes) == n > 50
    dense = _dense(method, ctx, ("train", "test"))
    for p, key in enumerate(toks.where):
        z = dense[key][:, features]  # [n_prompt_tokens, 4]
        torch.testing.assert_close(toks.peak_val[p], z.max(0).values)
        assert torch.equal(toks.peak_at[p] - toks.starts[p], torch.argmax(z, 0))  # first maximum
    wanted = [(p, c) for p in range(0, len(toks.where), 3) for c in range(len(features))]
    sizes.clear()
    toks.keep(method, wanted, window=2)
    assert max(sizes) <= 5 and sum(sizes) < n, "only chunks holding a wanted window are encoded again"
    held = [t for t in vars(toks).values() if isinstance(t, torch.Tensor) and t.ndim == 2 and len(t) >= n]
    assert not held, "a [n_tokens, n_chosen] tensor is held"
    assert 0 < len(toks.kept_at) <= len(wanted) * 5
    for p, c in wanted:
        s = toks.snippet(p, c, 2, ctx.tokenizer)
        _check_snippet(asdict(s), dense[toks.where[p]][:, features[c]], 2)
    with pytest.raises(RuntimeError, match="was not kept"):
        toks.snippet(1, 0, 2, ctx.tokenizer)
