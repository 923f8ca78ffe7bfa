"""Steering speed: featbench's steered sampling loop against `generate`, and batched KL calibration against the
reference's per-feature bisection, on the same prompts, batch, directions and settings (issue #15).

Sampling: `--batch` rows of "I think that" (BOS included), each with its own steering vector at the site, decoded
for `--new-tokens` tokens with the paper's sampling (temperature 1, top-k 30, top-p 0.3 passed to `generate` as
the reference does; `--top-p` sets both) by Hugging Face `generate` (the steering hook around it) and by
`bench.steer.sample`; after one short warm-up call of each, the three variants run in turn for `--repeats`
rounds and tokens/s are each one's best. `generate` runs twice: on the model as transformers gives
it (the baseline of the summary line: what a user without featbench runs), and on the model with featbench's CPU
unembedding layout (`bench.fastlinear`, which `bench.models.load` applies and `sample` uses), so the gain of the
decode loop alone is printed too. On a GPU or with `FEATBENCH_FAST_LINEAR=0` the two are the same model.

Calibration: alpha of `--features` random unit directions x 7 KL targets x 2 signs. Batched: `bench.steer.calibrate`,
every row at once (20 batched forwards, each starting at the steered layer on the prompt's recorded prefix).
Per-feature: the reference's loop, `bisect_one` per (feature, sign, target), one full forward per step; it is
timed on `--per-feature-rows` rows and scaled linearly to all rows (each row costs the same 20 forwards), which
the output says.

Ends with `sampling: R x generate`, `sampling, same layout: R x generate` and `calibration: R x per-feature`;
`--json PATH` also writes the numbers.
Usage: bench perf steer_speed [--model gemma-3-270m-gguf] [--layer middle] [--batch 32] [--new-tokens 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bench.fastlinear import stock_layout
from bench.features import steering_target
from bench.hooks import steer
from bench.models import load
from bench.sites import Site, n_layers, resolve_layers, site_dim
from bench.steer import Bisection, KLProbe, Sampling, bisect_one, calibrate, left_pad, prompt_ids, sample

TARGETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5)


def _generate(model, tok, ids: list[list[int]], site: Site, vectors: torch.Tensor, args) -> int:  # noqa: ANN001
    """`generate` with the steering hook, left-padded rows; returns the number of new tokens."""
    x, mask = left_pad(ids, tok.pad_token_id or 0, args.device)
    with steer(model, site, vectors[:, None, :]), torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=mask, do_sample=True, top_k=args.top_k, top_p=args.top_p,
                             temperature=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             pad_token_id=tok.pad_token_id or 0)
    return int(out[:, x.shape[1]:].numel())


def _sync() -> None:
    """Wait for queued GPU work, so that a timing ends when the work does."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fn, repeats: int) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m-gguf")
    p.add_argument("--layer", default="middle")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--top-k", type=int, default=30)
    p.add_argument("--top-p", type=float, default=0.3)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--per-feature-rows", type=int, default=14, help="rows timed for the per-feature baseline")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the settings and timings as JSON")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model, tok, _ = load(args.model, args.device)
    layer = resolve_layers([args.layer], n_layers(model))[0]
    prompt = prompt_ids(tok, "I think that")
    d_mlp = site_dim(model, Site(layer, "mlp"))
    raw = torch.nn.functional.normalize(torch.randn(args.features, d_mlp), dim=-1)  # [f, d_mlp] mlp directions
    site, units = steering_target(model, Site(layer, "mlp"), raw)  # [f, d_target] unit, where they are added
    units = units.to(args.device)
    print(f"{args.model} layer {layer} ({site}), device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}")

    # sampling: one vector per row, alpha 50 (a mid-strength steer)
    vectors = (units[torch.arange(args.batch) % args.features] * 50.0).to(args.device)  # [batch, d]
    rows = [prompt] * args.batch
    sampling = Sampling(args.new_tokens, 1.0, args.top_k, args.top_p)
    pad = tok.pad_token_id or 0
    ours = lambda: sample(model, rows, sampling, site=site, vectors=vectors, seed=args.seed,  # noqa: E731
                          batch_size=args.batch, pad_id=pad, device=args.device)
    with stock_layout(model) as n_stock:
        pass  # how many modules the fast layout changed (0: the two generate rows run the same model)
    # One warm-up call of each variant (first-call costs land on none of them), then `--repeats` rounds that run
    # the three variants in turn, keeping each one's best time: the machine's drift hits every variant alike.
    warm = argparse.Namespace(**{**vars(args), "new_tokens": 2})
    with stock_layout(model):
        _generate(model, tok, rows, site, vectors, warm)
    _generate(model, tok, rows, site, vectors, warm)
    sample(model, rows, Sampling(2, 1.0, args.top_k, args.top_p), site=site, vectors=vectors, seed=args.seed,
           batch_size=args.batch, pad_id=pad, device=args.device)
    t_stock = t_gen = t_ours = float("inf")
    for _ in range(args.repeats):
        with stock_layout(model):
            t_stock = min(t_stock, _best(lambda: _generate(model, tok, rows, site, vectors, args), 1))
        t_gen = min(t_gen, _best(lambda: _generate(model, tok, rows, site, vectors, args), 1))
        t_ours = min(t_ours, _best(ours, 1))
    n_tok = args.batch * args.new_tokens
    print(f"\nsampling: batch {args.batch}, {args.new_tokens} new tokens, top-k {args.top_k}, top-p {args.top_p}, "
          f"temperature 1 (best of {args.repeats} alternating rounds, after a warm-up)")
    print(f"{'':<28}{'s':>8}{'tok/s':>9}")
    print(f"{'generate (baseline)':<28}{t_stock:>8.2f}{n_tok / t_stock:>9.1f}")
    print(f"{'generate, featbench layout':<28}{t_gen:>8.2f}{n_tok / t_gen:>9.1f}"
          + ("" if n_stock else "  (no module changed: the same model as the baseline)"))
    print(f"{'featbench sample()':<28}{t_ours:>8.2f}{n_tok / t_ours:>9.1f}")

    # calibration: every feature x sign x target
    signed = torch.cat([units, -units])  # [2f, d]
    n = args.features
    dir_index = torch.arange(2 * n).repeat_interleave(len(TARGETS))  # [2f * 7]
    targets = torch.tensor(TARGETS, dtype=torch.float64).repeat(2 * n)
    bis = Bisection()
    t0 = time.perf_counter()
    calibrate(model, site, [prompt], signed, dir_index, targets, bis, batch_size=256, pad_id=pad, device=args.device)
    t_batched = time.perf_counter() - t0
    probe = KLProbe(model, site, [prompt], signed, 1, pad, args.device, skip_prefix=False)  # the reference's forward
    m = min(args.per_feature_rows, len(targets))
    t0 = time.perf_counter()
    for j in range(m):
        bisect_one(lambda a, j=j: float(probe(dir_index[j : j + 1], torch.tensor([a], dtype=torch.float64))[0]),
                   float(targets[j]), bis)
    t_row = (time.perf_counter() - t0) / m
    t_per = t_row * len(targets)
    print(f"\ncalibration: {n} features x {len(TARGETS)} targets x 2 signs = {len(targets)} rows, "
          f"{bis.steps} steps each")
    print(f"{'per-feature (baseline)':<28}{t_per:>8.1f} s  (timed on {m} rows: {t_row:.3f} s/row, scaled "
          f"to {len(targets)})")
    print(f"{'featbench batched':<28}{t_batched:>8.1f} s")
    print(f"\nsampling: {t_stock / t_ours:.2f}x generate")
    print(f"sampling, same layout: {t_gen / t_ours:.2f}x generate")
    print(f"calibration: {t_per / t_batched:.1f}x per-feature")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "settings": {k: v for k, v in vars(args).items() if k != "json"}, "layer": layer, "site": str(site),
            "threads": torch.get_num_threads(), "generate_stock_s": t_stock, "generate_s": t_gen,
            "fast_layout_modules": n_stock, "sample_s": t_ours, "new_tokens_total": n_tok,
            "calibration_rows": len(targets), "per_feature_rows_timed": m, "per_feature_s_per_row": t_row,
            "per_feature_s": t_per, "batched_s": t_batched}, indent=1))


if __name__ == "__main__":
    main()
