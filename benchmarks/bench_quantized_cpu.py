"""What quantization costs on a CPU: prompt and decode tokens/s of one model in fp32, 8-bit and
4-bit MLX (elm convert -q), in one process, the three interleaved in every round.

On Apple silicon quantized weights decode faster (less memory to read); MLX's CPU build has no
fast quantized kernels, so on a Linux CPU they are slower. This measures by how much.

    python benchmarks/bench_quantized_cpu.py --workdir /tmp/bench-generate --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_generate import make_model, make_prompt  # noqa: E402

import elm_mlx  # noqa: E402
from convert import ConvertOptions, convert  # noqa: E402
from elm_mlx.generate import stream_generate  # noqa: E402
from elm_spec.tokenizer import Tokenizer  # noqa: E402


def quantized(model_dir: Path, bits: int) -> Path:
    destination = model_dir.parent / f"{model_dir.name}-{bits}bit"
    if not (destination / "config.json").is_file():
        convert(model_dir, destination, ConvertOptions(quantize=True, q_bits=bits, progress=False))
    return destination


def rates(model, tokenizer, ids: list[int], max_tokens: int) -> tuple[float, float]:
    (last,) = collections.deque(stream_generate(model, tokenizer, ids, max_tokens=max_tokens),
                                maxlen=1)
    return last.prompt_tps, last.generation_tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-generate"))
    parser.add_argument("--preset", default="OpenELM-270M")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    fp32 = make_model(args.workdir, args.preset)
    directories = {"fp32": fp32, "8-bit": quantized(fp32, 8), "4-bit": quantized(fp32, 4)}
    models = {name: elm_mlx.load(directory) for name, directory in directories.items()}
    ids = Tokenizer(fp32).encode(make_prompt(fp32, args.prompt_tokens))
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for round_index in range(args.rounds):
        for name, (model, tokenizer) in models.items():
            prompt_tps, decode_tps = rates(model, tokenizer, ids, args.max_tokens)
            measured[name].append((prompt_tps, decode_tps))
            print(f"round {round_index + 1} {name:6s} prompt {prompt_tps:8.2f} tok/s   "
                  f"decode {decode_tps:7.3f} tok/s", flush=True)

    def per_round_ratio(name: str, index: int) -> float:
        return statistics.median(fp[index] / q[index]
                                 for fp, q in zip(measured["fp32"], measured[name], strict=True))

    lines = [f"Model: {args.preset} shape; prompt {len(ids)} tokens, {args.max_tokens} greedy "
             f"tokens; {args.rounds} interleaved rounds; MLX CPU; {os.cpu_count()} CPU cores; "
             f"load average at the end {os.getloadavg()[0]:.1f}.", "",
             "| weights | prompt tok/s (median) | decode tok/s (median) | fp32 / this, prompt | "
             "fp32 / this, decode |", "|---|---:|---:|---:|---:|"]
    for name, values in measured.items():
        lines.append(f"| {name} | {statistics.median(v[0] for v in values):.2f} | "
                     f"{statistics.median(v[1] for v in values):.3f} | "
                     f"{per_round_ratio(name, 0):.2f} | {per_round_ratio(name, 1):.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
