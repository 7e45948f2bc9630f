"""`elm serve` vs `mlx_lm.server`: generated tokens/s over all clients at 1, 4 and 8 clients.

Both servers run as real processes on a loopback port, on the same OpenELM-270M-shape model
directory (the one benchmarks/bench_generate.py writes), one at a time: for each concurrency
level and round, elm then mlx-lm (A, B, A, B, ...), each started, waited for (/health), warmed
with one request, measured, and stopped. The clients are threads of the official `openai`
client, each sending its own completions requests one after the other; every server sees the
same prompts, the same max_tokens, greedy decoding. Throughput is the completion tokens the
servers report (`usage`) summed over all clients, over the wall time from the first request
to the last answer. With one client, each server then also streams a few requests
(`stream: true`) to time, as its client sees them, the first token and the gaps between tokens.

    python benchmarks/bench_serve.py --workdir /tmp/bench-generate --rounds 3 --requests-per-client 3
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_generate import make_model, publish  # noqa: E402
from elm_spec.platform import openblas_preload_path  # noqa: E402
from elm_spec.tokenizer import Tokenizer  # noqa: E402

SERVERS = ("elm", "mlx-lm")
MODEL_NAME = {"elm": "default", "mlx-lm": "default_model"}  # each server's name for --model


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process PID so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(name: str, model: Path, port: int) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    common = ["--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    if name == "elm":  # elm preloads OpenBLAS itself (it restarts once)
        return [sys.executable, "-m", "apps", "serve", *common, "--max-batch", "8"], env
    openblas = openblas_preload_path()
    return ([sys.executable, "-m", "mlx_lm", "server", *common, "--log-level", "WARNING"],
            {**env, **({"LD_PRELOAD": openblas} if openblas else {})})


@contextmanager
def running(name: str, model: Path, log: Path, timeout: float = 300):
    """Server NAME on a free loopback port until /health answers; yields its URL and pid."""
    port = free_port()
    command, env = server_command(name, model, port)
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{name} server exited:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} server did not answer /health in {timeout} s") from None
                time.sleep(0.25)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def make_prompts(model: Path, count: int, tokens: int) -> list[str]:
    """COUNT different standard-library passages of about TOKENS tokens each."""
    tokenizer = Tokenizer(model)
    ids = tokenizer.encode((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
    step = max(1, (len(ids) - tokens) // count)
    return [tokenizer.decode(ids[i * step: i * step + tokens - 1]) for i in range(count)]


@dataclass
class Level:
    clients: int
    seconds: float
    cpu_seconds: float  # the server process's, while measured
    tokens: int
    texts: list[str]

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


def openai_client(url: str):
    """The official client for the server at URL (no retries: a failure shows)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)


def drive(url: str, pid: int, name: str, prompts: list[str], clients: int, requests_per_client: int,
          max_tokens: int) -> Level:
    """CLIENTS threads, each sending REQUESTS_PER_CLIENT completions one after the other."""
    client = openai_client(url)

    def one(prompt: str) -> tuple[str, int]:
        answer = client.completions.create(model=MODEL_NAME[name], prompt=prompt,
                                           max_tokens=max_tokens, temperature=0.0)
        return answer.choices[0].text, answer.usage.completion_tokens

    def session(index: int) -> list[tuple[str, int]]:
        return [one(prompts[(index * requests_per_client + k) % len(prompts)])
                for k in range(requests_per_client)]

    one(prompts[-1])  # warm-up: first-call costs (graph setup, allocations) stay out
    start, cpu = time.perf_counter(), cpu_seconds(pid)
    with ThreadPoolExecutor(clients) as pool:
        answers = [a for chunk in pool.map(session, range(clients)) for a in chunk]
    seconds, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    return Level(clients, seconds, cpu, sum(n for _, n in answers), [text for text, _ in answers])


def streamed_latency(url: str, name: str, prompts: list[str], max_tokens: int
                     ) -> tuple[list[float], list[float]]:
    """Per streamed request of PROMPTS, one after the other: ms to the first text, and the median
    ms between texts."""
    client = openai_client(url)
    first, gaps = [], []
    for prompt in prompts:
        start, stamps = time.perf_counter(), []
        for chunk in client.completions.create(model=MODEL_NAME[name], prompt=prompt,
                                               max_tokens=max_tokens, temperature=0.0,
                                               stream=True):
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
        first.append(1e3 * (stamps[0] - start))
        gaps.append(1e3 * statistics.median(b - a for a, b in itertools.pairwise(stamps)))
    return first, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-generate"))
    parser.add_argument("--preset", default="OpenELM-270M")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streamed", type=int, default=4,
                        help="Streamed requests per server and round, timed (0: none).")
    parser.add_argument("--out", type=Path, default=None, help="Write the markdown report here too.")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = make_model(args.workdir, args.preset)
    prompts = make_prompts(model, max(args.clients) * args.requests_per_client + 1,
                           args.prompt_tokens)
    results: dict[tuple[str, int], list[Level]] = {}
    latency: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in SERVERS}
    loads = []
    started = time.perf_counter()
    for round_index in range(args.rounds):
        for clients in args.clients:
            for name in SERVERS:
                with running(name, model, args.workdir / f"{name}-server.log") as (url, pid):
                    level = drive(url, pid, name, prompts, clients, args.requests_per_client,
                                  args.max_tokens)
                    if clients == 1:
                        for kept, new in zip(latency[name], streamed_latency(
                                url, name, prompts[:args.streamed], args.max_tokens), strict=True):
                            kept.extend(new)
                results.setdefault((name, clients), []).append(level)
                loads.append(os.getloadavg()[0])
                print(f"round {round_index + 1} {clients} clients {name:7s} {level.tokens} tokens "
                      f"in {level.seconds:6.2f} s: {level.tps:6.2f} tokens/s, server CPU "
                      f"{level.cpu_seconds:6.2f} s  (load {loads[-1]:.1f})",
                      flush=True)

    same = all(len({tuple(level.texts) for name in SERVERS for level in results[(name, c)]}) == 1
               for c in args.clients)
    lines = [
        f"Model: {args.preset} shape, fp32, greedy; {args.prompt_tokens}-token prompts "
        f"(different per request), {args.max_tokens} tokens each, {args.requests_per_client} "
        f"requests per client one after the other; {args.rounds} rounds, elm and mlx-lm "
        f"alternating per level; {os.cpu_count()} CPU cores; load average (1 min) after each "
        f"measurement {min(loads):.1f}-{max(loads):.1f}; {time.perf_counter() - started:.0f} s in all.",
        "",
        "| clients | elm tokens/s (best) | mlx-lm tokens/s (best) | ratio of the bests | "
        "median of per-round ratios | server CPU ms per token, elm / mlx-lm (medians) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in args.clients:
        ours, theirs = results[("elm", clients)], results[("mlx-lm", clients)]
        best_ours, best_theirs = max(x.tps for x in ours), max(x.tps for x in theirs)
        paired = np.median([a.tps / b.tps for a, b in zip(ours, theirs, strict=True)])
        cpu = [1e3 * np.median([x.cpu_seconds / x.tokens for x in xs]) for xs in (ours, theirs)]
        lines.append(f"| {clients} | {best_ours:.2f} | {best_theirs:.2f} | "
                     f"**{best_ours / best_theirs:.2f}** | {paired:.2f} | {cpu[0]:.0f} / {cpu[1]:.0f} |")
    lines += [
        "",
        f"Same completions from both servers at every level: {'yes' if same else 'NO'}.",
        "",
        "All rounds (tokens/s and the server's CPU seconds, in run order):",
        *(f"- {name}, {clients} clients: " + ", ".join(
            f"{x.tps:.2f} ({x.cpu_seconds:.1f} CPU s)" for x in results[(name, clients)])
          for clients in args.clients for name in SERVERS),
        f"- load average after each measurement: {', '.join(f'{x:.1f}' for x in loads)}",
    ]
    if all(first for first, _ in latency.values()):
        lines += ["", f"One client streaming ({len(latency['elm'][0])} requests per server over "
                  "the rounds, medians; ms as the client sees them):", "",
                  "| server | time to first token | gap between tokens |", "|---|---:|---:|",
                  *(f"| {name} | {statistics.median(first):.0f} | {statistics.median(gaps):.1f} |"
                    for name, (first, gaps) in latency.items())]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
