"""SNMF fit speed and memory: featbench's `methods.snmf.SNMF` against the reference's cost structure.

Fits one activation matrix x [n, d] with
- `featbench`: methods/snmf.py (one pass over A per iteration, sparse Z^T A, trace-form loss);
- `fb-mkl`: the same with its dense product on torch's default float32 kernel (MKL) instead of oneDNN, so
  the ratio against `plain` is the algorithm's alone (all others use torch's default kernels);
- `plain`: the reference's per-iteration structure written out here: A Y^T, an inverse, Z^T A densely,
  and the loss from the rebuilt d x n reconstruction (no product reuse);
- `reference` (with --reference PATH): the paper's own factorization/seminmf.py, imported from PATH.
All start from the same Y0 (torch.rand(n, k) after torch.manual_seed(seed), the reference's random init),
keep the best iterate by the reference's absolute rule (featbench with tol_mode="absolute", tol=1e-4)
and run exactly --iters iterations; losses are ||A - ZY||_F^2 summed in float64 (featbench's own trace form,
checked equal by tests/test_snmf.py). Each implementation runs in its own subprocess, interleaved
--repeats times; the table shows the fastest run. Peak memory, from a first (cold) fit: on CPU the peak
resident set (VmHWM, reset via /proc/self/clear_refs) minus the resident set before the fit, i.e. all the
fit allocated and touched, torch included, and, in brackets, the peak of anonymous memory (RssAnon sampled
every 5 ms), which leaves out the file pages a streamed fit maps while reading (clean page cache); on CUDA
torch.cuda.max_memory_allocated() minus the allocation before. Seconds per iteration are marginal,
(fit(iters) - fit(1)) / (iters - 1) on warm fits, so one-time costs (featbench's transposed copy of A, the
init) are left out; `fit s` is the whole fit of --iters. `cpu s/iter` is the same from process CPU time:
with --threads 1 it does not depend on other processes' load, which on a shared 2-core machine swings the
wall times of multi-threaded runs by 5x.

    python benchmarks/snmf_speed.py --threads 1 --iters 20 --reference path/to/seminmf.py   # real activations
    python benchmarks/snmf_speed.py --synthetic --n-tokens 20000 --d 2048 --k 100 --iters 30 --device cpu
    python benchmarks/snmf_speed.py --acts acts.safetensors --reference path/to/seminmf.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SEED = 0
REF_TOL = 1e-4  # the reference's absolute tol: which iterate is kept as the best follows its rule everywhere


def synthetic(n: int, d: int, seed: int = SEED, k_true: int = 200) -> torch.Tensor:
    """Planted x [n, d]: sparse signed features times sparse non-negative codes, plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(d, k_true, generator=g) * (torch.rand(d, k_true, generator=g) < 0.05)
    y = torch.rand(k_true, n, generator=g).pow(3) * (torch.rand(k_true, n, generator=g) < 0.1)
    return (z @ y).T.contiguous() + 0.05 * torch.randn(n, d, generator=g)


def real(n_tokens: int, layer: str) -> torch.Tensor:
    """MLP activations of the embedded model over the shipped concept texts (via the activation cache):
    a seeded random subset of x [<=n_tokens, d_mlp]."""
    try:
        from bench.activations import ActivationCache
        from bench.data import ConceptData
        from bench.models import DEFAULT_MODEL, load
        from bench.sites import Site, n_layers, resolve_layers

        model, tok, prov = load(DEFAULT_MODEL)
        texts = ConceptData.load().texts
    except Exception as e:  # noqa: BLE001 - any missing piece means: no default data on this checkout
        msg = f"real activations unavailable ({type(e).__name__}: {e}); use --synthetic or --acts PATH"
        raise SystemExit(msg) from e
    site = Site(resolve_layers([layer], n_layers(model))[0], "mlp")
    acts = ActivationCache().get(model, tok, DEFAULT_MODEL, prov["revision"], texts, [site])[site]
    print(f"real activations: {DEFAULT_MODEL} {site}, {len(acts)} tokens of {len(texts)} texts")
    return acts.cap(n_tokens, SEED).x


def plain_fit(
    a: torch.Tensor, y0: torch.Tensor, sparsity: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's cost structure on A [d, n] from Y0 [n, k]: the best (Z [d, k], Y^T [n, k])."""
    d, k = a.shape[0], y0.shape[1]
    s, y, best, out = max(1, math.ceil(sparsity * d)), y0.clone(), math.inf, (y0, y0)
    for _ in range(iters):
        z = a @ y @ torch.linalg.inv(y.T @ y + 1e-6 * torch.eye(k, device=a.device))  # [d, k]
        thresh = z.abs().topk(s, dim=0).values[-1]
        z = z * (z.abs() >= thresh)
        norms = y.norm(dim=0).clamp_min(1e-8)
        y, z = y / norms, z * norms
        p, q = a.T @ z, z.T @ z  # [n, k], [k, k]
        num = p.clamp_min(0) + y @ (-q).clamp_min(0)
        den = (-p).clamp_min(0) + y @ q.clamp_min(0)
        y = y * torch.sqrt(num / (den + 1e-6))
        loss = float(torch.norm(a - z @ y.T, p="fro") ** 2)  # the rebuilt d x n reconstruction
        if loss < best - REF_TOL:
            best, out = loss, (z.clone(), y.clone())
    return out


def exact_loss(a: torch.Tensor, z: torch.Tensor, yt: torch.Tensor) -> float:
    """||A - Z Y||_F^2 summed in float64, a block of rows at a time (outside the timed region)."""
    return sum(float((a[i : i + 256].double() - z[i : i + 256].double() @ yt.double().T).square().sum())
               for i in range(0, a.shape[0], 256))


def reference_fit(
    path: str, a: torch.Tensor, k: int, sparsity: float, iters: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's NMFSemiNMF from `path` (it appends to ./training_summary.log, so it runs in a temp dir)."""
    spec = importlib.util.spec_from_file_location("seminmf_reference", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}; pass the reference's factorization/seminmf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(SEED)
    model = mod.NMFSemiNMF(rank=k, fitting_device=device, sparsity=sparsity)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                model.fit(a, max_iter=iters, tol=REF_TOL, patience=iters + 1, verbose=False, init="random")
        finally:
            os.chdir(cwd)
    return model.F_.data, model.G_.data


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def child(args: argparse.Namespace) -> None:
    """Fit one implementation and print one JSON line: seconds per iteration, loss, peak memory."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    import methods.snmf
    from bench import Activations, Site  # imported before the memory baseline
    from methods.snmf import SNMF

    methods.snmf.USE_ONEDNN = args.child != "fb-mkl"

    streaming = args.stream and args.child in ("featbench", "fb-mkl")
    if streaming:  # x stays in the file: featbench streams it chunk by chunk (acts.source)
        with safe_open(args.acts, framework="pt") as f:
            n, d = f.get_slice("x").get_shape()
        x = torch.zeros(0, d)
    else:
        x = load_file(args.acts)["x"].float().clone()  # resident before the baseline (not file-backed pages)
        n, d = x.shape
    zeros = torch.zeros(n, dtype=torch.long)
    acts = Activations(x=x, site=Site(0, "mlp"), model_id="bench", prompt_idx=zeros, position=torch.arange(n),
                       token_ids=zeros, texts=[""], source=Path(args.acts) if streaming else None)

    def run(iters: int) -> tuple[float, float, float]:
        """(wall seconds, process CPU seconds, loss) of one fit of `iters` iterations."""
        sync = torch.cuda.synchronize if device == "cuda" else lambda: None
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        if args.child in ("featbench", "fb-mkl"):
            m = SNMF(n_features=args.k, sparsity=args.sparsity, max_iter=iters, patience=iters + 1, seed=SEED,
                     device=device, chunk_tokens=args.chunk_tokens, tol=REF_TOL, tol_mode="absolute")
            loss = m.fit(acts).fit_metrics_["loss"]  # the float64-summed trace form
        elif args.child == "plain":
            a = x.to(device).T  # [d, n], a view as in the reference's train.py
            y0 = torch.rand(n, args.k, generator=torch.Generator().manual_seed(SEED)).clamp_min(1e-6)
            factors = plain_fit(a, y0.to(device), args.sparsity, iters)
        else:
            factors = reference_fit(args.reference, x.to(device).T, args.k, args.sparsity, iters, device)
        sync()
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        if args.child not in ("featbench", "fb-mkl"):  # outside the timed region
            loss = exact_loss(x.to(device).T, *factors)
        return sec, cpu, loss

    anon = 0
    if device == "cuda":  # memory: a cold fit, before any warm-up could leave allocator caches behind
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
        run(args.iters)
        peak = torch.cuda.max_memory_allocated() - mem0
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        mem0, anon0, anon_max, done = _rss_kb("VmRSS"), _rss_kb("RssAnon"), [0], threading.Event()

        def sample() -> None:  # RssAnon has no high-water mark: sample it
            while not done.wait(0.005):
                anon_max[0] = max(anon_max[0], _rss_kb("RssAnon"))

        sampler = threading.Thread(target=sample)
        sampler.start()
        run(args.iters)
        done.set()
        sampler.join()
        peak, anon = (_rss_kb("VmHWM") - mem0) * 1024, max(0, anon_max[0] - anon0) * 1024
    one, one_cpu, _ = run(1)  # time: warm fits; the one-time costs (copies, init) cancel in the difference
    total, total_cpu, loss = run(args.iters)
    sec = (total - one) / (args.iters - 1)
    out = {"impl": args.child, "device": device, "s_per_iter": sec, "fit_s": total, "loss": loss, "peak_bytes": peak,
           "anon_bytes": anon, "cpu_s_per_iter": (total_cpu - one_cpu) / (args.iters - 1)}
    if device == "cuda":  # achieved fraction of this GPU's fp32 matmul peak, from the op count per iteration
        big = torch.randn(8192, 8192, device=device)
        big @ big
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(5):
            big @ big
        torch.cuda.synchronize()
        peak_flops = 5 * 2 * 8192**3 / (time.perf_counter() - t1)
        dense = {"featbench": 2, "fb-mkl": 2, "plain": 3, "reference": 3}[args.child]  # d*n*k products per iteration
        flops = dense * 2 * d * n * args.k + 6 * args.k**2 * n
        out |= {"peak_tflops": peak_flops / 1e12, "matmul_peak_fraction": flops / sec / peak_flops}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--acts", help="safetensors file with tensor x [n, d]")
    src.add_argument("--synthetic", action="store_true", help="planted data instead of real activations")
    ap.add_argument("--n-tokens", type=int, default=20000)
    ap.add_argument("--d", type=int, default=2048, help="width of the synthetic data")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sparsity", type=float, default=0.01)
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--chunk-tokens", type=int, default=None, help="featbench's chunk_tokens")
    ap.add_argument("--stream", action="store_true", help="featbench streams x from the file (needs --chunk-tokens)")
    ap.add_argument("--layer", default="middle", help="layer of the embedded model (real data)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each fit (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; the best is reported")
    ap.add_argument("--reference", help="path to the paper's factorization/seminmf.py, to time it too")
    ap.add_argument("--json", metavar="PATH", help="also write the settings and every run as JSON (README tables)")
    ap.add_argument("--child", choices=("featbench", "fb-mkl", "plain", "reference"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stream and not args.chunk_tokens:
        ap.error("--stream needs --chunk-tokens")
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.acts:
            x = load_file(args.acts)["x"][: args.n_tokens]
        else:
            x = synthetic(args.n_tokens, args.d) if args.synthetic else real(args.n_tokens, args.layer)
        path = Path(tmp) / "x.safetensors"
        save_file({"x": x.float().contiguous()}, str(path))
        n, d = x.shape
        print(f"x: n={n} d={d} k={args.k} sparsity={args.sparsity} iters={args.iters} device={args.device} "
              f"threads={args.threads or torch.get_num_threads()}")
        impls = ["featbench"] + (["fb-mkl"] if args.device != "cuda" else []) + ["plain"]
        impls += ["reference"] if args.reference else []
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
            for impl in impls:
                cmd = [sys.executable, __file__, "--child", impl, "--acts", str(path), "--k", str(args.k),
                       "--iters", str(args.iters), "--sparsity", str(args.sparsity), "--device", args.device]
                cmd += ["--chunk-tokens", str(args.chunk_tokens)] if args.chunk_tokens else []
                cmd += ["--threads", str(args.threads)] if args.threads else []
                cmd += ["--stream"] if args.stream else []
                cmd += ["--reference", args.reference] if args.reference else []
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    raise SystemExit(f"{impl} failed:\n{res.stderr[-3000:]}")
                runs[impl].append(json.loads(res.stdout.strip().splitlines()[-1]))
    rows = {impl: min(rs, key=lambda r: r["s_per_iter"]) for impl, rs in runs.items()}  # best of repeats
    base = rows["featbench"]
    mem = "peak GPU alloc" if base["device"] == "cuda" else "peak RSS delta (anon)"
    cpu = {impl: min(x["cpu_s_per_iter"] for x in rs) for impl, rs in runs.items()}
    print(f"best of {args.repeats} by wall time (every run's wall s/iter in brackets); cpu s/iter: process CPU "
          "time, best of the runs (robust to other load only with --threads 1)")
    head = f"{'impl':<10} {'s/iter':>9} {'fit s':>8} {'loss':>14} {mem + ' MiB':>27} {'speedup':>8}"
    print(f"{head} {'loss vs ours':>12} {'cpu s/iter':>10} {'speedup':>8}")
    for impl, r in rows.items():
        ratio, dloss = r["s_per_iter"] / base["s_per_iter"], (r["loss"] / base["loss"] - 1) * 100
        every = ", ".join(f"{x['s_per_iter']:.3f}" for x in runs[impl])
        print(f"{impl:<10} {r['s_per_iter']:>9.4f} {r['fit_s']:>8.2f} {r['loss']:>14.6g} "
              f"{r['peak_bytes'] / 2**20:>18.1f} ({r['anon_bytes'] / 2**20:>6.1f}) {ratio:>7.2f}x {dloss:>+11.3f}% "
              f"{cpu[impl]:>10.4f} "
              f"{cpu[impl] / cpu['featbench']:>7.2f}x  [{every}]")
        if "matmul_peak_fraction" in r:
            frac = r["matmul_peak_fraction"]
            print(f"{'':<10} fp32 matmul peak {r['peak_tflops']:.1f} TFLOP/s; this fit reached {frac:.1%}")
    print(f"A itself: {n * d * 4 / 2**20:.1f} MiB (float32)")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("child", "json")}
        settings["reference"] = bool(args.reference)  # a local path says nothing to a reader
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": settings, "n": n, "d": d, "best": rows, "runs": runs,
                                               "cpu_s_per_iter": cpu}, indent=1))


if __name__ == "__main__":
    main()
