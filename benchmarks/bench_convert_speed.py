"""`elm convert` vs `mlx_lm.convert`: fp32 model directory -> bfloat16 MLX directory.

Both run as subprocesses on the same input, interleaved (elm, mlx-lm, elm, mlx-lm, ...), so
machine load hits both alike; peak resident memory comes from wait4's rusage of each process.
Run it under flock so heavy jobs do not overlap:

    python benchmarks/bench_convert_speed.py --workdir /tmp/bench-convert
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from elm_spec.modeldir import read_tensor_index  # noqa: E402
from elm_spec.platform import openblas_preload_path  # noqa: E402


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ELM_OPENBLAS": "0"}
    library = openblas_preload_path()
    if library:
        env["LD_PRELOAD"] = library
    return env


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident GiB) of one subprocess."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return elapsed, usage.ru_maxrss / 1024**2


def make_source(workdir: Path, preset: str) -> Path:
    source = workdir / f"{preset}-fp32"
    if (source / "config.json").is_file():
        return source
    from elm_spec.tokenizer import train_tokenizer
    from tests.support.corpora import stdlib_texts

    tokenizer = workdir / "tokenizer"
    train_tokenizer(iter(stdlib_texts()), 512, tokenizer)
    subprocess.run([sys.executable, "-m", "apps", "init", "--preset", preset, "--vocab-size", "32000",
                    "--tokenizer", str(tokenizer / "tokenizer.model"), str(source)],
                   env=environment(), check=True)
    return source


def same_tensors(ours: Path, theirs: Path) -> bool:
    """Byte-for-byte equal tensors (both round float32 to bfloat16 to nearest even)."""
    a, b = read_tensor_index(ours), read_tensor_index(theirs)
    if a.keys() != b.keys():
        return False
    for name, info in a.items():
        other = b[name]
        with info.file.open("rb") as x, other.file.open("rb") as y:
            x.seek(info.offset)
            y.seek(other.offset)
            if info.dtype != other.dtype or x.read(info.nbytes) != y.read(other.nbytes):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--preset", default="OpenELM-1_1B")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = make_source(args.workdir, args.preset)
    for file in source.glob("*.safetensors"):  # both runs then read from the page cache
        with file.open("rb") as handle:
            while handle.read(1 << 26):
                pass
    ours_out, theirs_out = args.workdir / "elm-bf16", args.workdir / "mlx-lm-bf16"
    commands = {
        "elm convert": [sys.executable, "-m", "apps", "convert", str(source), str(ours_out),
                        "--dtype", "bfloat16"],
        "mlx_lm.convert": [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source),
                           "--mlx-path", str(theirs_out), "--dtype", "bfloat16"],
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for round_number in range(args.rounds):
        for name, command in commands.items():
            shutil.rmtree(ours_out, ignore_errors=True)
            shutil.rmtree(theirs_out, ignore_errors=True)
            results[name].append(measure(command))
            print(f"round {round_number + 1} {name}: {results[name][-1][0]:.1f} s, "
                  f"{results[name][-1][1]:.2f} GiB peak", flush=True)
            if round_number == 0 and name == "mlx_lm.convert":
                subprocess.run(commands["elm convert"], env=environment(), check=True,
                               stderr=subprocess.DEVNULL)
                print(f"outputs identical: {same_tensors(ours_out, theirs_out)}", flush=True)
    shutil.rmtree(ours_out, ignore_errors=True)
    shutil.rmtree(theirs_out, ignore_errors=True)
    size = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 1e9
    print(f"\n{args.preset} fp32 ({size:.2f} GB) -> bfloat16, {args.rounds} interleaved rounds\n")
    print("| converter | best wall time (s) | median wall time (s) | peak RSS (GiB, max) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        times = sorted(t for t, _ in runs)
        print(f"| {name} | {times[0]:.1f} | {times[len(times) // 2]:.1f} | {max(m for _, m in runs):.2f} |")
    ours, theirs = results["elm convert"], results["mlx_lm.convert"]
    print(f"\ntime ratio elm/mlx-lm (best): {min(t for t, _ in ours) / min(t for t, _ in theirs):.2f}")
    print(f"memory ratio elm/mlx-lm (max peak): {max(m for _, m in ours) / max(m for _, m in theirs):.2f}")


if __name__ == "__main__":
    main()
