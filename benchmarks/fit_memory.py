"""Peak memory of fits that stream activations from the store, against the amount of data.

Writes one synthetic store (`bench.store.ShardWriter`: float32 shards of `--shard-tokens` tokens, texts of
`--per-text` tokens, 8 concept labels by text) of the largest size to a temp folder on disk; each smaller size is a
store of its first shards (hard links, no copy). Then every method fits every size in a fresh subprocess, through the
harness's own path (`bench.activations.load_store`, the method's public `fit`, default parameters but k and
iterations), and reports the child's peak resident set (VmHWM of /proc/self/status: anonymous and file pages; not
`ru_maxrss`, which on Linux starts from the parent's peak) and its growth from the smallest to the largest size.
Each child runs under an RLIMIT_DATA of `--limit-gb`, so a method that loads everything fails with MemoryError
instead of pushing a shared machine into swap. The baseline is the same child's resident set after its imports
(Python, torch, featbench), printed with each row.

Target (issue #17): peak RSS under 4 GiB at the largest size and growth under 25% from the smallest.

    bench perf fit_memory                                     # 0.5M, 1M, 2M tokens at d=2,048 (16 GB on disk)
    bench perf fit_memory --sizes 20000,40000 --d 256 --json /tmp/m.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("snmf", "dim")
N_CONCEPTS = 8
TARGET_PEAK_GIB, TARGET_GROWTH = 4.0, 0.25


def write_store(folder: Path, n: int, d: int, shard_tokens: int, per_text: int, seed: int = 0) -> None:
    """n tokens of synthetic non-negative activations [n, d], one shard-sized batch at a time."""
    from bench.store import ShardWriter

    writer = ShardWriter(folder.with_name(f".{folder.name}.partial"), {"synthetic": seed, "d": d}, shard_tokens)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, shard_tokens):
        b = min(shard_tokens, n - start)
        tok = torch.arange(start, start + b)
        x = torch.randn(b, d, generator=g).relu_()
        writer.add({"x": x, "prompt_idx": tok // per_text, "position": tok % per_text, "token_ids": tok % 1000},
                   -(-(start + b) // per_text))
    writer.finish(folder, torch.float32)


def prefix_store(big: Path, folder: Path, n: int) -> int:
    """A store of `big`'s first shards holding n tokens (hard links); its token count."""
    meta = json.loads((big / "meta.json").read_text())
    shards, total = [], 0
    for shard in meta["shards"]:
        if total >= n:
            break
        shards.append(shard)
        total += shard["n_tokens"]
    folder.mkdir()
    for shard in shards:
        os.link(big / shard["file"], folder / shard["file"])
    sub = {**meta, "shards": shards, "n_tokens": total, "bytes": sum(s["bytes"] for s in shards)}
    (folder / "meta.json").write_text(json.dumps(sub, indent=1))
    return total


def _status_mib(field: str) -> float:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) / 1024


def child(args: argparse.Namespace) -> None:
    """Fit one method on one store under the memory limit; print one JSON line."""
    from bench.activations import load_store
    from bench.sites import Site
    from methods.dim import DiffInMeans
    from methods.snmf import SNMF

    base = _status_mib("VmRSS")
    limit = int(args.limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    meta = json.loads((Path(args.store) / "meta.json").read_text())
    n_texts = meta["shards"][-1]["texts"][1]
    acts = load_store(Path(args.store), Site(0, "mlp"), "synthetic", [""] * n_texts, key=f"bench-{meta['n_tokens']}")
    labels = torch.zeros(n_texts, N_CONCEPTS, dtype=torch.bool)
    labels[torch.arange(n_texts), torch.arange(n_texts) % N_CONCEPTS] = True
    acts = acts.with_labels(labels, [f"c{i}" for i in range(N_CONCEPTS)])
    t0 = time.perf_counter()
    error = None
    try:
        if args.child == "snmf":
            SNMF(site=acts.site, n_features=args.k, max_iter=args.iters, patience=args.iters + 1, device="cpu"
                 ).fit(acts)
        else:
            DiffInMeans(site=acts.site).fit(acts)
    except (MemoryError, RuntimeError) as e:  # torch reports a refused allocation as RuntimeError
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    peak = _status_mib("VmHWM")  # not ru_maxrss: Linux carries the parent's peak into a child's ru_maxrss
    print(json.dumps({"method": args.child, "n_tokens": len(acts), "d": acts.d, "gib_x": acts.nbytes / 2**30,
                      "peak_rss_mib": peak, "base_rss_mib": base, "seconds": time.perf_counter() - t0,
                      "streamed": acts.streams, "error": error}))


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per method: peak RSS at the smallest and largest size, growth between them (None when a fit failed) and
    whether the target is met."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["n_tokens"])
        lo, hi = mine[0], mine[-1]
        failed = ", ".join(f"{r['n_tokens']} tokens ({r['error'].split(':')[0]})" for r in mine if r["error"])
        growth = None if failed else hi["peak_rss_mib"] / lo["peak_rss_mib"] - 1
        ok = growth is not None and hi["peak_rss_mib"] < TARGET_PEAK_GIB * 1024 and growth < TARGET_GROWTH
        out[method] = {"growth": growth, "peak_smallest_mib": lo["peak_rss_mib"],
                       "peak_largest_mib": hi["peak_rss_mib"], "meets_target": ok, "failed": failed or None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500000,1000000,2000000", help="token counts, comma-separated")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32, help="SNMF features")
    ap.add_argument("--iters", type=int, default=2, help="SNMF iterations (memory does not change with them)")
    ap.add_argument("--shard-tokens", type=int, default=31_250)
    ap.add_argument("--per-text", type=int, default=125, help="tokens per synthetic text")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--limit-gb", type=float, default=6.0, help="RLIMIT_DATA of each fit (protects the machine)")
    ap.add_argument("--dir", default=None, help="where to write the temp store (default: the system temp dir)")
    ap.add_argument("--json", metavar="PATH", help="also write the settings and every row as JSON (README table)")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    methods = [m.strip() for m in args.methods.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="fit_memory-") as tmp:
        big = Path(tmp) / f"n{sizes[-1]}"
        t0 = time.perf_counter()
        write_store(big, sizes[-1], args.d, args.shard_tokens, args.per_text)
        print(f"wrote {sizes[-1]} tokens x {args.d} ({sizes[-1] * args.d * 4 / 2**30:.1f} GiB float32) in "
              f"{time.perf_counter() - t0:.0f} s to {tmp}", flush=True)
        stores = {sizes[-1]: big}
        for n in sizes[:-1]:
            stores[n] = Path(tmp) / f"n{n}"
            prefix_store(big, stores[n], n)
        for method in methods:
            for n in sizes:
                cmd = [sys.executable, __file__, "--child", method, "--store", str(stores[n]), "--k", str(args.k),
                       "--iters", str(args.iters), "--limit-gb", str(args.limit_gb)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    raise SystemExit(f"{method} at {n} tokens failed:\n{res.stderr[-3000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{method:<5} {row['n_tokens']:>9} tokens  x {row['gib_x']:6.2f} GiB  peak RSS "
                      f"{row['peak_rss_mib']:8.0f} MiB (after imports {row['base_rss_mib']:.0f})  "
                      f"{row['seconds']:7.1f} s  {row['error'] or ''}", flush=True)
    summary = summarize(rows)
    print(f"\n{'method':<6} {'peak RSS at ' + str(sizes[0]):>22} {'at ' + str(sizes[-1]):>14} {'growth':>8}  target")
    for method, v in summary.items():
        growth = "-" if v["growth"] is None else f"{v['growth']:+.1%}"
        print(f"{method:<6} {v['peak_smallest_mib']:>18.0f} MiB {v['peak_largest_mib']:>10.0f} MiB {growth:>8}  "
              f"{'met' if v['meets_target'] else 'MISSED'} (< {TARGET_PEAK_GIB:g} GiB, < {TARGET_GROWTH:.0%})"
              f"{'; failed: ' + v['failed'] if v['failed'] else ''}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("child", "store", "json", "dir")}
        settings |= {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                     "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
