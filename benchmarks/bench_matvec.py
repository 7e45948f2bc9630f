"""Where the CPU sgemv route (elm_mlx.matvec) pays: decode tokens/s with MLX's own one-row sgemm
against the sgemv route, in one process on one model, for a short and a long prompt.

Rounds interleave the four cases (short/long prompt x sgemm/sgemv) so that each sees the same
machine load; the report gives each case's median and the median of the per-round sgemv/sgemm
ratios. A second part times one one-row product alone (an OpenELM-270M FFN weight) through MLX
and through NumPy, idle and right after a prompt-sized (many-row) product, which is what decoding
after a long prompt does.

    python benchmarks/bench_matvec.py --workdir /tmp/bench-generate --rounds 5
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from bench_generate import make_model, make_prompt  # noqa: E402

import elm_mlx  # noqa: E402
from elm_mlx.generate import stream_generate  # noqa: E402
from elm_spec.tokenizer import Tokenizer  # noqa: E402


def decode_rate(model, tokenizer, ids: list[int], max_tokens: int, sgemv: bool) -> float:
    (last,) = collections.deque(stream_generate(model, tokenizer, ids, max_tokens=max_tokens,
                                                matvec=sgemv), maxlen=1)
    return last.generation_tps


def one_row_product_ms(rows_before: int, repeats: int = 30) -> dict[str, float]:
    """Median ms of x[1, 1280] @ W[1280, 5120].T through MLX (sgemm) and NumPy (sgemv), each
    right after a (ROWS_BEFORE x 1280) product through MLX (0: none)."""
    weight = mx.random.normal((5120, 1280)).astype(mx.float32)
    mx.eval(weight)
    host = np.asarray(memoryview(weight))
    row = mx.random.normal((1, 1280))
    batch = mx.random.normal((max(rows_before, 1), 1280))
    mx.eval(row, batch)
    times: dict[str, list[float]] = {"mlx sgemm": [], "numpy sgemv": []}
    for _ in range(repeats):
        for name in times:
            if rows_before:
                mx.eval(batch @ weight.T)
            start = time.perf_counter()
            if name == "mlx sgemm":
                mx.eval(row @ weight.T)
            else:
                host @ np.asarray(row).reshape(-1)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-generate"))
    parser.add_argument("--preset", default="OpenELM-270M")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[3, 320])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(args.workdir, args.preset)
    model, tokenizer = elm_mlx.load(model_dir)
    ids = Tokenizer(model_dir).encode(make_prompt(model_dir, max(args.prompt_tokens)))
    prompts = {f"{n}-token prompt": ids[:n] for n in args.prompt_tokens}
    rates: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds):
        for prompt_name, prompt in prompts.items():
            for route in ("sgemm", "sgemv"):
                rate = decode_rate(model, tokenizer, prompt, args.max_tokens, route == "sgemv")
                rates.setdefault((prompt_name, route), []).append(rate)
                print(f"round {round_index + 1} {prompt_name:16s} {route}: {rate:7.3f} tok/s",
                      flush=True)
    lines = [f"Model: {args.preset} shape, fp32; {args.max_tokens} greedy tokens; {args.rounds} "
             f"interleaved rounds; {os.cpu_count()} CPU cores; load average at the end "
             f"{os.getloadavg()[0]:.1f}.", "",
             "| prompt | sgemm decode tok/s (median) | sgemv decode tok/s (median) | "
             "median per-round sgemv/sgemm |", "|---|---:|---:|---:|"]
    for prompt_name in prompts:
        sgemm, sgemv = rates[(prompt_name, "sgemm")], rates[(prompt_name, "sgemv")]
        ratio = statistics.median(b / a for a, b in zip(sgemm, sgemv, strict=True))
        lines.append(f"| {prompt_name} | {statistics.median(sgemm):.3f} | "
                     f"{statistics.median(sgemv):.3f} | {ratio:.2f} |")
    lines += ["", "One one-row product, 1280 -> 5120 fp32 (median ms):", "",
              "| before it | MLX sgemm | NumPy sgemv |", "|---|---:|---:|"]
    for rows in (0, max(args.prompt_tokens)):
        product = one_row_product_ms(rows)
        label = "nothing" if rows == 0 else f"a {rows}-row MLX product"
        lines.append(f"| {label} | {product['mlx sgemm']:.3f} | {product['numpy sgemv']:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
