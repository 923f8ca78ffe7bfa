"""The CPU layout of the unembedding: torch's `F.linear` (x @ W^T, the baseline) against featbench's blocked
(W_c @ x^T)^T (`bench.fastlinear`), on the default model's unembedding (gemma-3-270m: [262144, 640]) at the rows
of a label or decoding step (16, 32, 64, 128), of a calibration batch (256), of a scoring batch (480 = 16 texts
x 30 tokens) and at `MAX_ROWS` (512, above which torch's layout stays), and for reference on two of the blocks'
projections (which keep torch's layout in models); each time is the best over `--rounds` rounds, each round
timing every shape in both layouts (mean per call over at least `--seconds`).
Then the block size: the 32- and 480-row unembedding at each of `--chunks` rows of W per product (featbench
uses `CHUNK`), the sizes alternating for `--rounds` rounds, best call of each. Then the whole model, stock
against fast: one 32-row decoding forward (last position's logits) and one 16 x 30-token scoring forward
(every position's logits), alternating stock and fast for `--rounds` rounds, best time of each.

Each line of the first table gives milliseconds of both, their ratio and the largest absolute difference of the
outputs (0 means bit-identical). Ends with `unembedding layout: R x F.linear` (the geometric mean over the
unembedding shapes) and `model forward: R x stock` (the two forwards summed); `--json PATH` also writes the
numbers.
Usage: bench perf linear_layout [--model gemma-3-270m-gguf] [--seconds 0.5] [--chunks 256,512,1024,2048,4096]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import bench.fastlinear
from bench.fastlinear import CHUNK, MIN_OUT, fast_linear_forward, use_fast_linears
from bench.models import load

SHAPES = [(32, 640, 2048), (32, 2048, 640), (16, 640, 262144), (32, 640, 262144), (64, 640, 262144),
          (128, 640, 262144), (256, 640, 262144), (480, 640, 262144), (512, 640, 262144)]  # (rows, d_in, d_out)
CHUNK_ROWS = (32, 480)  # the unembedding rows the block sizes are timed at


def _time(fn, seconds: float) -> float:  # noqa: ANN001
    """Mean seconds per call over at least `seconds` (after one warm-up call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m-gguf")
    p.add_argument("--seconds", type=float, default=0.5, help="minimum timing per measurement")
    p.add_argument("--rounds", type=int, default=5,
                   help="alternating rounds of the block sizes and of the stock/fast model forwards")
    p.add_argument("--chunks", default="256,512,1024,2048,4096",
                   help=f"comma-separated rows of W per product to time (featbench uses {CHUNK})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
        if not chunks or min(chunks) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--chunks {args.chunks!r}: expected comma-separated positive integers, e.g. 512,1024,2048")
    if args.rounds < 1 or args.seconds <= 0:
        p.error(f"--rounds {args.rounds} --seconds {args.seconds}: expected rounds >= 1 and seconds > 0")
    torch.manual_seed(args.seed)
    rows, ratios = [], []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    linears = {(k, n): torch.nn.Linear(k, n, bias=False) for _, k, n in SHAPES}  # one unembedding for all its rows
    inputs = {(m, k): torch.randn(m, k) for m, k, _ in SHAPES}
    best = {(m, k, n, side): math.inf for m, k, n in SHAPES for side in ("linear", "fast")}
    with torch.inference_mode():
        for _ in range(args.rounds):  # every shape, F.linear then featbench's, in each round: best of the rounds
            for m, k, n in SHAPES:
                lin, x = linears[k, n], inputs[m, k]
                best[m, k, n, "linear"] = min(best[m, k, n, "linear"],
                                              _time(lambda: torch.nn.functional.linear(x, lin.weight), args.seconds))  # noqa: B023
                best[m, k, n, "fast"] = min(best[m, k, n, "fast"],
                                            _time(lambda: fast_linear_forward(lin, x), args.seconds))  # noqa: B023
    print(f"{'rows x d_in -> d_out':<26}{'F.linear ms':>12}{'fast ms':>10}{'ratio':>8}{'max |diff|':>12}")
    for m, k, n in SHAPES:
        lin, x = linears[k, n], inputs[m, k]
        base, fast = best[m, k, n, "linear"], best[m, k, n, "fast"]
        with torch.inference_mode():
            diff = float((torch.nn.functional.linear(x, lin.weight) - fast_linear_forward(lin, x)).abs().max())
        if n >= MIN_OUT:
            ratios.append(base / fast)
        rows.append({"rows": m, "d_in": k, "d_out": n, "linear_s": base, "fast_s": fast, "max_abs_diff": diff})
        print(f"{f'{m} x {k} -> {n}':<26}{base * 1e3:>12.2f}{fast * 1e3:>10.2f}{base / fast:>8.2f}{diff:>12.3g}")
    del linears, inputs

    # the block size: rows of W per product, at a decoding step's and a scoring batch's rows
    unembed = torch.nn.Linear(640, 262144, bias=False)
    xs = {m: torch.randn(m, 640) for m in CHUNK_ROWS}
    # every block size in turn for `--rounds` rounds, best single call of each: drift hits all sizes alike
    best_ms = {(c, m): math.inf for c in chunks for m in CHUNK_ROWS}
    try:
        with torch.inference_mode():
            for c in chunks:  # warm-up
                bench.fastlinear.CHUNK = c
                fast_linear_forward(unembed, xs[CHUNK_ROWS[0]])
            for _ in range(args.rounds):
                for c in chunks:
                    bench.fastlinear.CHUNK = c
                    for m, x in xs.items():
                        t0 = time.perf_counter()
                        fast_linear_forward(unembed, x)
                        best_ms[c, m] = min(best_ms[c, m], (time.perf_counter() - t0) * 1e3)
    finally:
        bench.fastlinear.CHUNK = CHUNK
    blocks = [{"chunk": c, **{f"rows_{m}_s": best_ms[c, m] / 1e3 for m in CHUNK_ROWS}} for c in chunks]
    print(f"\nrows of W per product (featbench: {CHUNK}), unembedding 640 -> 262,144, best of {args.rounds} "
          "alternating rounds, ms")
    print(f"{'rows of W':<12}" + "".join(f"{f'{m} rows':>12}" for m in CHUNK_ROWS))
    for c in chunks:
        print(f"{c:<12}" + "".join(f"{best_ms[c, m]:>12.1f}" for m in CHUNK_ROWS))

    model, tok, _ = load(args.model, "cpu")  # load() already switched the layout on: undo it for the baseline
    linears = [mod for mod in model.modules() if type(mod) is torch.nn.Linear]
    ids = torch.randint(10, 1000, (32, 6))
    score_ids = torch.randint(10, 1000, (16, 30))

    def forwards() -> tuple[float, float, torch.Tensor]:
        with torch.inference_mode():
            step = _time(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), args.seconds)
            score = _time(lambda: model(input_ids=score_ids, use_cache=False), args.seconds)
            return step, score, model(input_ids=score_ids, use_cache=False).logits

    def stock() -> None:
        for mod in linears:
            mod.__dict__.pop("forward", None)

    # stock and fast alternate, best of `--rounds` each: the machine's drift hits both alike
    best: dict[str, list[float]] = {"stock": [math.inf, math.inf], "fast": [math.inf, math.inf]}
    logits: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name in ("stock", "fast"):
            stock()
            if name == "fast":
                use_fast_linears(model)
            step, score, logits[name] = forwards()
            best[name] = [min(best[name][0], step), min(best[name][1], score)]
    (step0, score0), (step1, score1) = best["stock"], best["fast"]
    logits0, logits1 = logits["stock"], logits["fast"]
    diff = float((logits0 - logits1).abs().max())
    print(f"\n{args.model}: {len(linears)} linear modules")
    print(f"{'':<34}{'stock s':>9}{'fast s':>9}{'ratio':>8}")
    print(f"{'32 rows x 6 tokens, last logits':<34}{step0:>9.3f}{step1:>9.3f}{step0 / step1:>8.2f}")
    print(f"{'16 rows x 30 tokens, all logits':<34}{score0:>9.3f}{score1:>9.3f}{score0 / score1:>8.2f}")
    print(f"largest |logit difference|: {diff:.3g}")
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"\nunembedding layout: {geo:.2f}x F.linear")
    print(f"model forward: {(step0 + score0) / (step1 + score1):.2f}x stock")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "settings": {k: v for k, v in vars(args).items() if k != "json"}, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "chunk": CHUNK, "shapes": rows, "chunks": blocks,
            "model_step_s": [step0, step1], "model_score_s": [score0, score1], "logit_max_abs_diff": diff}, indent=1))


if __name__ == "__main__":
    main()
