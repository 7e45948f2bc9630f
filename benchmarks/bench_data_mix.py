"""What a weighted mix costs: `elm data prepare --mix` (two passes) against the same two sources
without weights (one pass), same run, same corpus.

The corpus is bench_data.py's (the standard library's text as JSONL) cut into two source files
of about --megabytes together. A weighted mix tokenizes everything once, saves each chunk's
tokens in the staging directory, then selects and writes; without weights the chunks are written
as they come. The two settings alternate; the best of --repeats is reported as source MB/s, and
the ratio is the mix's cost on top of tokenizing (documents read per second, since the mix writes
fewer of them). Weights 3:1 subsample the larger source.

    python benchmarks/bench_data_mix.py --megabytes 12 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.bench_data import stdlib_documents, write_corpus
from elm_spec.tokenizer import train_tokenizer
from elm_train.data.mix import Mix, MixSource
from elm_train.data.prepare import PrepareOptions, prepare_data

WORKERS = 2


def timed(mix: Mix, tokenizer: Path, out: Path) -> dict:
    start = time.perf_counter()
    stats = prepare_data(mix, tokenizer, out, PrepareOptions(workers=WORKERS), force=True,
                         show_progress=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {"seconds": seconds, "mb_per_s": stats["source_bytes"] / 1e6 / seconds,
            "read_per_s": stats["documents_read"] / seconds, "stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=12)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="elm-bench-mix-"))
    try:
        documents = stdlib_documents()
        half = len(documents) // 2
        sizes = [write_corpus(scratch / f"{name}.jsonl", docs, args.megabytes * share)
                 for name, docs, share in [("a", documents[:half], 0.6),
                                           ("b", documents[half:], 0.4)]]
        tokenizer = train_tokenizer(iter(documents[:3000]), args.vocab_size, scratch / "tok")
        paths = [str(scratch / "a.jsonl"), str(scratch / "b.jsonl")]
        settings = {
            "two sources, no weights": Mix((MixSource("a", (paths[0],)),
                                            MixSource("b", (paths[1],)))),
            "mix, weights 3:1": Mix((MixSource("a", (paths[0],), 3.0),
                                     MixSource("b", (paths[1],), 1.0))),
        }
        print(f"corpus: {sum(sizes) / 1e6:.1f} MB of JSONL in two files; tokenizer "
              f"{args.vocab_size} pieces; {WORKERS} workers")
        runs: dict[str, list[dict]] = {label: [] for label in settings}
        for repeat in range(args.repeats):
            for label, mix in settings.items():
                result = timed(mix, tokenizer, scratch / "out")
                runs[label].append(result)
                print(f"  repeat {repeat + 1} {label}: {result['seconds']:.2f} s, "
                      f"{result['mb_per_s']:.2f} MB/s", flush=True)
        best = {label: min(r, key=lambda x: x["seconds"]) for label, r in runs.items()}
        plain = best["two sources, no weights"]
        print("\n| run | best time (s) | source MB/s | documents read/s | vs no weights |")
        print("|---|---|---|---|---|")
        for label, result in best.items():
            print(f"| {label} | {result['seconds']:.2f} | {result['mb_per_s']:.2f} | "
                  f"{result['read_per_s']:,.0f} | {plain['seconds'] / result['seconds']:.2f}x |")
        mixed = best["mix, weights 3:1"]["stats"]
        total = mixed["tokens"]["train"] + mixed["tokens"]["valid"]
        shares = ", ".join(f"{s['name']} {100 * sum(s['tokens'].values()) / total:.2f}%"
                           for s in mixed["sources"])
        print(f"\nmix output: {total:,} tokens ({shares}; asked 75% / 25%), "
              f"{mixed['dropped_mix']} documents left out")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
