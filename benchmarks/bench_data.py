"""Data preparation throughput: `elm data prepare` with 1 and 2 worker processes, same run.

The corpus is real text every machine has: the Python standard library's sources and text
files, as JSONL (one file per document), repeated until it reaches --megabytes. A tokenizer
of --vocab-size pieces is trained on a sample of it first. The two settings alternate
(1, 2, 1, 2, ...) so that load from other processes hits both alike; the best run of each is
reported, with MB/s of source bytes, tokens/s, and the CPU seconds used by the writing
(parent) process and by the workers: equal worker CPU for 1 and 2 workers means the parallel
path adds no work, so any shortfall from 2x is cores taken by other processes.

    python benchmarks/bench_data.py --megabytes 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from elm_spec.tokenizer import train_tokenizer
from elm_train.data.format import read_index
from elm_train.data.prepare import PrepareOptions, prepare_data

TEXT_SUFFIXES = (".py", ".txt", ".rst", ".md")


def stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()
                   and "site-packages" not in p.parts)
    return [text for p in files if (text := p.read_text(encoding="utf-8", errors="replace"))]


def write_corpus(path: Path, documents: list[str], megabytes: float) -> int:
    """JSONL of DOCUMENTS repeated until the file holds MEGABYTES; returns its size in bytes."""
    lines = [json.dumps({"text": text}) + "\n" for text in documents]
    target, written = megabytes * 1e6, 0
    with path.open("w") as handle:
        while written < target:
            for line in lines:
                handle.write(line)
                written += len(line)
                if written >= target:
                    break
    return path.stat().st_size


def timed_prepare(corpus: Path, tokenizer: Path, workers: int, scratch: Path) -> dict[str, float]:
    out = scratch / f"data-{workers}"
    before = _cpu_seconds()
    start = time.perf_counter()
    prepare_data([corpus], tokenizer, out, PrepareOptions(workers=workers), force=True,
                 show_progress=False)
    seconds = time.perf_counter() - start
    after = _cpu_seconds()
    stats = read_index(out).stats
    shutil.rmtree(out)
    tokens = stats["tokens"]["train"] + stats["tokens"]["valid"]
    return {"seconds": seconds, "mb_per_s": stats["source_bytes"] / 1e6 / seconds,
            "tokens_per_s": tokens / seconds, "tokens": tokens,
            "writer_cpu_s": after[0] - before[0], "worker_cpu_s": after[1] - before[1]}


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process and by its finished children (the workers)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=60)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs=2, default=[1, 2], metavar=("A", "B"))
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="elm-bench-data-"))
    try:
        documents = stdlib_documents()
        corpus = scratch / "corpus.jsonl"
        size = write_corpus(corpus, documents, args.megabytes)
        start = time.perf_counter()
        tokenizer = train_tokenizer(iter(documents[:3000]), args.vocab_size, scratch / "tokenizer")
        print(f"corpus: {len(documents)} stdlib documents repeated to {size / 1e6:.1f} MB of JSONL; "
              f"tokenizer: {args.vocab_size} pieces, trained in {time.perf_counter() - start:.0f} s")
        runs: dict[int, list[dict[str, float]]] = {w: [] for w in args.workers}
        for repeat in range(args.repeats):
            for workers in args.workers:
                result = timed_prepare(corpus, tokenizer, workers, scratch)
                runs[workers].append(result)
                print(f"  repeat {repeat + 1}, {workers} worker(s): {result['seconds']:.1f} s, "
                      f"{result['mb_per_s']:.2f} MB/s, {result['tokens_per_s']:,.0f} tokens/s, "
                      f"writer CPU {result['writer_cpu_s']:.1f} s, workers CPU {result['worker_cpu_s']:.1f} s",
                      flush=True)
        best = {w: min(r, key=lambda x: x["seconds"]) for w, r in runs.items()}
        assert len({b["tokens"] for b in best.values()}) == 1, "runs disagree on the token count"
        a, b = args.workers
        print("\n| workers | best time (s) | MB/s | tokens/s | writer CPU (s) | workers CPU (s) |")
        print("|---|---|---|---|---|---|")
        for workers, result in best.items():
            print(f"| {workers} | {result['seconds']:.1f} | {result['mb_per_s']:.2f} | "
                  f"{result['tokens_per_s']:,.0f} | {result['writer_cpu_s']:.1f} | "
                  f"{result['worker_cpu_s']:.1f} |")
        print(f"\nspeed-up {b} vs {a} workers: {best[a]['seconds'] / best[b]['seconds']:.2f}x "
              f"(best of {args.repeats}; median "
              f"{_median(runs[a]) / _median(runs[b]):.2f}x)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _median(results: list[dict[str, float]]) -> float:
    times = sorted(r["seconds"] for r in results)
    return times[len(times) // 2]


if __name__ == "__main__":
    main()
