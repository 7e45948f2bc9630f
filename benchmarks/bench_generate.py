"""`elm generate` vs `mlx_lm generate` on the same OpenELM-270M-shape model directory (fp32, CPU).

Both command lines run as a user runs them, alternately (elm, mlx-lm, elm, mlx-lm, ...), on the
same prompt with greedy decoding; each prints mlx-lm's statistics lines, which are parsed here.
The best round of each is compared. Also measured: the memory bandwidth this machine gives one
process, and so the decode ceiling (weight bytes read per token / bandwidth).

    python benchmarks/bench_generate.py --workdir /tmp/bench-generate
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from elm_spec import ModelSpec  # noqa: E402
from elm_spec.modeldir import read_spec  # noqa: E402
from elm_spec.platform import openblas_preload_path  # noqa: E402

STATS = re.compile(r"^(Prompt|Generation): (\d+) tokens, ([\d.]+) tokens-per-sec$", re.MULTILINE)


def make_model(workdir: Path, preset: str) -> Path:
    model = workdir / preset
    if (model / "config.json").is_file():
        return model
    from elm_spec.tokenizer import SENTENCEPIECE_FILE, train_tokenizer

    # Every id the model can emit must decode to text, so the tokenizer has the full vocabulary:
    # trained here on the Python standard library's sources.
    tokenizer = workdir / "tokenizer" / SENTENCEPIECE_FILE
    if not tokenizer.is_file():
        sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
        texts = (f.read_text(encoding="utf-8", errors="replace") for f in sources)
        train_tokenizer(texts, ModelSpec.from_preset(preset).vocab_size, tokenizer.parent)
    subprocess.run([sys.executable, "-m", "apps", "init", str(model), "--preset", preset,
                    "--tokenizer", str(tokenizer)], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return model


def make_prompt(model: Path, tokens: int) -> str:
    """Standard-library source text cut to about TOKENS tokens of this model's tokenizer."""
    from elm_spec.tokenizer import Tokenizer

    tokenizer = Tokenizer(model)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = tokenizer.encode(text)[: tokens - 1]  # the BOS makes up the rest
    return tokenizer.decode(ids)


def run(command: list[str], env: dict[str, str]) -> dict[str, float | str]:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{result.stderr[-2000:]}")
    stats = {f"{kind.lower()}_{key}": float(value) for kind, count, rate in STATS.findall(result.stdout)
             for key, value in (("tokens", count), ("tps", rate))}
    if len(stats) != 4:
        raise SystemExit(f"{' '.join(command[:4])} printed no statistics:\n{result.stdout[-2000:]}")
    text = result.stdout.split("=" * 10 + "\n", 1)[1].rsplit("\n" + "=" * 10, 1)[0]
    return {**stats, "text": text, "stdout": result.stdout}


def paired_ratio(results: dict[str, list[dict]], key: str) -> float:
    """Median over rounds of elm / mlx-lm for runs back to back, which see the same machine load."""
    return float(np.median([ours[key] / theirs[key]
                            for ours, theirs in zip(results["elm"], results["mlx-lm"], strict=True)]))


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """GB/s one process reads: the best of a matrix-vector product (NumPy's BLAS) over a buffer
    larger than any cache, the operation that decoding repeats on every weight."""
    rows = int(gigabytes * 1e9 / 4 / 4096)
    matrix = np.ones((rows, 4096), np.float32)
    vector = np.ones(4096, np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matrix @ vector
        best = min(best, time.perf_counter() - start)
    return matrix.nbytes / best / 1e9


def publish(lines: list[str], out: Path | None) -> None:
    """Print the report, and write it to OUT (--out) when given."""
    report = "\n".join(lines)
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-generate"))
    parser.add_argument("--preset", default="OpenELM-270M")
    parser.add_argument("--prompt-tokens", type=int, default=320)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="Write the markdown table here too.")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = make_model(args.workdir, args.preset)
    prompt = make_prompt(model, args.prompt_tokens)
    common = ["--model", str(model), "--prompt", prompt, "--max-tokens", str(args.max_tokens),
              "--temp", "0"]
    openblas = openblas_preload_path()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    peer_env = {**env, **({"LD_PRELOAD": openblas} if openblas else {})}
    commands = {
        "elm": ([sys.executable, "-m", "apps", "generate", *common], env),
        "mlx-lm": ([sys.executable, "-m", "mlx_lm", "generate", *common], peer_env),
    }
    results: dict[str, list[dict]] = {name: [] for name in commands}
    for round_index in range(args.rounds):
        for name, (command, command_env) in commands.items():
            results[name].append(run(command, command_env))
            last = results[name][-1]
            print(f"round {round_index + 1} {name:7s} prompt {last['prompt_tps']:8.2f} tok/s   "
                  f"decode {last['generation_tps']:7.3f} tok/s", flush=True)
    same_text = len({r["text"] for rs in results.values() for r in rs}) == 1

    best = {name: {key: max(r[key] for r in rs) for key in ("prompt_tps", "generation_tps")}
            for name, rs in results.items()}
    spec = read_spec(model)
    bytes_per_token = spec.num_matmul_parameters() * 4
    bandwidth = read_bandwidth()
    ceiling = bandwidth * 1e9 / bytes_per_token
    prompt_tokens = int(results["elm"][0]["prompt_tokens"])
    lines = [
        f"Model: {args.preset} shape, fp32, vocab {spec.vocab_size}, "
        f"{spec.num_parameters() / 1e6:.1f}M parameters; prompt {prompt_tokens} tokens, "
        f"{args.max_tokens} generated, greedy; best of {args.rounds} interleaved rounds; "
        f"MLX {'with OpenBLAS preloaded' if openblas else 'on its bundled BLAS'}; "
        f"{os.cpu_count()} CPU cores; load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| | prompt tokens/s | decode tokens/s |",
        "|---|---:|---:|",
        *(f"| {name} | {b['prompt_tps']:.2f} | {b['generation_tps']:.3f} |" for name, b in best.items()),
        f"| ratio of the bests, elm / mlx-lm | "
        f"{best['elm']['prompt_tps'] / best['mlx-lm']['prompt_tps']:.2f} | "
        f"{best['elm']['generation_tps'] / best['mlx-lm']['generation_tps']:.2f} |",
        f"| median of the per-round ratios (each elm run / the mlx-lm run right after it) | "
        f"{paired_ratio(results, 'prompt_tps'):.2f} | {paired_ratio(results, 'generation_tps'):.2f} |",
        "",
        f"Identical generated text in every run: {'yes' if same_text else 'NO'}.",
        "",
        f"Decode ceiling: {bytes_per_token / 1e9:.3f} GB of weights read per token; measured read "
        f"bandwidth {bandwidth:.1f} GB/s (NumPy sgemv over 1 GB) gives at most {ceiling:.1f} tokens/s; "
        f"elm reaches {100 * best['elm']['generation_tps'] / ceiling:.0f}% of it, mlx-lm "
        f"{100 * best['mlx-lm']['generation_tps'] / ceiling:.0f}%.",
        "",
        "All rounds (prompt tok/s, decode tok/s):",
        *(f"- {name}: " + ", ".join(f"({r['prompt_tps']:.2f}, {r['generation_tps']:.3f})" for r in rs)
          for name, rs in results.items()),
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
