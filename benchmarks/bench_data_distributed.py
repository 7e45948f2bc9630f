"""`elm data prepare --backend datatrove` with 1, 2 and 4 tasks against the process pool, same run.

Same corpus as bench_data.py (the standard library's text as JSONL, repeated to --megabytes)
and a --vocab-size tokenizer. Each round runs the process pool (2 workers) and the datatrove
backend at each task count (2 tasks at a time on 2 cores), alternating; the best of --repeats is
reported as documents/s and tokens/s. Overhead per task: (datatrove time - pool time) / tasks,
at the same two workers, which is what launching a task, re-planning its chunks and writing
and re-reading its parts cost. Every run's index.json must equal the pool's.

    python benchmarks/bench_data_distributed.py --megabytes 12 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.bench_data import stdlib_documents, write_corpus
from elm_spec.tokenizer import train_tokenizer
from elm_train.data.distributed import prepare_data_distributed
from elm_train.data.prepare import PrepareOptions, prepare_data

WORKERS = 2


def timed(label: str, corpus: Path, tokenizer: Path, scratch: Path, tasks: int | None) -> dict:
    out, work = scratch / f"data-{label}", scratch / f"work-{label}"
    options = PrepareOptions(workers=WORKERS)
    start = time.perf_counter()
    if tasks is None:
        stats = prepare_data([corpus], tokenizer, out, options, show_progress=False)
    else:
        stats = prepare_data_distributed([corpus], tokenizer, out, work, tasks, options,
                                         show_progress=False)
    seconds = time.perf_counter() - start
    index = (out / "index.json").read_bytes()
    shutil.rmtree(out)
    shutil.rmtree(work, ignore_errors=True)
    tokens = stats["tokens"]["train"] + stats["tokens"]["valid"]
    return {"seconds": seconds, "docs_per_s": stats["documents_read"] / seconds,
            "tokens_per_s": tokens / seconds, "index": index}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=12)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import logging

    from loguru import logger

    logger.remove()  # datatrove's per-task logs would swamp the table
    logging.disable(logging.INFO)
    scratch = Path(tempfile.mkdtemp(prefix="elm-bench-dt-"))
    try:
        documents = stdlib_documents()
        corpus = scratch / "corpus.jsonl"
        size = write_corpus(corpus, documents, args.megabytes)
        tokenizer = train_tokenizer(iter(documents[:3000]), args.vocab_size, scratch / "tok")
        print(f"corpus: {size / 1e6:.1f} MB of JSONL; tokenizer {args.vocab_size} pieces; "
              f"{WORKERS} workers everywhere")
        settings: dict[str, int | None] = {"pool": None, "datatrove-1": 1, "datatrove-2": 2,
                                           "datatrove-4": 4}
        runs: dict[str, list[dict]] = {label: [] for label in settings}
        for repeat in range(args.repeats):
            for label, tasks in settings.items():
                result = timed(label, corpus, tokenizer, scratch, tasks)
                runs[label].append(result)
                print(f"  repeat {repeat + 1} {label}: {result['seconds']:.2f} s, "
                      f"{result['docs_per_s']:,.0f} docs/s, {result['tokens_per_s']:,.0f} tokens/s",
                      flush=True)
        best = {label: min(r, key=lambda x: x["seconds"]) for label, r in runs.items()}
        assert len({b["index"] for r in runs.values() for b in r}) == 1, "index.json differs"
        pool = best["pool"]["seconds"]
        print("\n| backend | best time (s) | docs/s | tokens/s | vs pool | overhead per task (s) |")
        print("|---|---|---|---|---|---|")
        for label, result in best.items():
            tasks = settings[label]
            overhead = f"{(result['seconds'] - pool) / tasks:+.2f}" if tasks else "-"
            print(f"| {label} | {result['seconds']:.2f} | {result['docs_per_s']:,.0f} | "
                  f"{result['tokens_per_s']:,.0f} | {pool / result['seconds']:.2f}x | {overhead} |")
        print("\nevery run's index.json is byte-identical to the pool's")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
