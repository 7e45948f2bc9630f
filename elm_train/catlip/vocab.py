"""The synset vocabulary of a caption corpus (`elm catlip vocab`), and its per-sample label cache.

A vocabulary directory holds:
- `vocab.json`: the top-k synsets with names and counts, and corpus statistics;
- `vocab.pkl`: CoreNet's format, a pickled {synset id: count} dict in descending count order
  (what `dataset.wordnet_tagged_classification.vocab_file` reads);
- `labels/*.json`: every sample's synset ids, one file per data file, so training reads labels
  instead of running WordNet again. A cache entry is used only while the data file's size
  and modification time match.

A synset is counted once per caption that names it (the number of samples carrying the
label), ties broken by id. Data files are processed in parallel worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elm_spec import ElmError
from elm_spec.modeldir import atomic_output_dir, read_json, write_json
from elm_spec.vit import VOCAB_JSON, VOCAB_PICKLE
from elm_train.catlip.sources import expand_sources, read_samples
from elm_train.catlip.synsets import shared_extractor, unique_in_order

VOCAB_FORMAT = "elm-catlip-vocab-v1"
LABELS_DIR = "labels"


@dataclass
class SourceLabels:
    """Synset ids of every sample of one data file, with the file's counts."""

    source: str
    size: int
    mtime_ns: int
    labels: dict[str, list[str]]
    names: dict[str, str] = field(default_factory=dict)
    empty_captions: int = 0
    without_synsets: int = 0


@dataclass(frozen=True)
class Vocabulary:
    ids: tuple[str, ...]
    names: tuple[str, ...]
    counts: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def top(self, k: int | None) -> Vocabulary:
        if k is None or k >= len(self):
            return self
        return Vocabulary(self.ids[:k], self.names[:k], self.counts[:k])


def label_source(path: str) -> SourceLabels:
    """Run the caption -> synsets procedure over one data file (in a worker process)."""
    extractor = shared_extractor()
    stat = os.stat(path)
    result = SourceLabels(path, stat.st_size, stat.st_mtime_ns, {})
    for sample in read_samples(Path(path)):
        if not sample.caption.strip():
            result.empty_captions += 1
            result.labels[sample.key] = []
            continue
        synsets = extractor(sample.caption)
        ids = unique_in_order(s.id for s in synsets)
        if not ids:
            result.without_synsets += 1
        for synset in synsets:
            result.names[synset.id] = synset.name
        result.labels[sample.key] = ids
    return result


def label_sources(paths: Sequence[Path], workers: int,
                  progress: Callable[[SourceLabels], None] | None = None) -> list[SourceLabels]:
    """label_source over many files; `workers` processes (1: in this process)."""
    names = [str(p) for p in paths]
    results: list[SourceLabels] = []
    if workers <= 1 or len(names) == 1:
        for name in names:
            results.append(label_source(name))
            if progress:
                progress(results[-1])
        return results
    import multiprocessing

    with multiprocessing.Pool(min(workers, len(names))) as pool:
        for result in pool.imap(label_source, names):
            results.append(result)
            if progress:
                progress(result)
    return results


def _cache_name(source: str) -> str:
    return hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:24] + ".json"


def build_vocab(paths: Sequence[str | Path], top_k: int, out: str | Path, workers: int = 1,
                force: bool = False,
                progress: Callable[[SourceLabels], None] | None = None) -> dict[str, Any]:
    """Count synsets over a caption corpus and write the vocabulary directory OUT."""
    if top_k <= 0:
        raise ElmError(f"--top-k must be positive, got {top_k}")
    files = expand_sources(paths)
    results = label_sources(files, workers, progress)
    counts: Counter[str] = Counter()
    names: dict[str, str] = {}
    for result in results:
        names.update(result.names)
        for ids in result.labels.values():
            counts.update(ids)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top_k]
    if not ranked:
        raise ElmError(f"no caption in {', '.join(str(f) for f in files)} names a WordNet noun "
                       "synset; nothing to build a vocabulary from")
    summary = {
        "format": VOCAB_FORMAT,
        "num_captions": sum(len(r.labels) for r in results),
        "empty_captions": sum(r.empty_captions for r in results),
        "captions_without_synsets": sum(r.without_synsets for r in results),
        "distinct_synsets": len(counts),
        "sources": [str(Path(f).resolve()) for f in files],
        "synsets": [{"id": i, "name": names[i], "count": c} for i, c in ranked],
    }
    with atomic_output_dir(out, force=force) as staging:
        write_json(staging / VOCAB_JSON, summary)
        with (staging / VOCAB_PICKLE).open("wb") as handle:
            pickle.dump(dict(ranked), handle)
        (staging / LABELS_DIR).mkdir()
        for result in results:
            source = str(Path(result.source).resolve())
            write_json(staging / LABELS_DIR / _cache_name(source),
                       {"source": source, "size": result.size, "mtime_ns": result.mtime_ns,
                        "labels": result.labels})
    return summary


def read_vocab(directory: str | Path) -> Vocabulary:
    """The vocabulary of a directory written by build_vocab (vocab.json)."""
    path = Path(directory) / VOCAB_JSON
    data = read_json(path)
    if data.get("format") != VOCAB_FORMAT:
        raise ElmError(f"{path}: not a CatLIP vocabulary (format {data.get('format')!r})")
    try:
        entries = data["synsets"]
        return Vocabulary(tuple(e["id"] for e in entries), tuple(e["name"] for e in entries),
                          tuple(int(e["count"]) for e in entries))
    except (KeyError, TypeError, ValueError) as error:
        raise ElmError(f"{path}: malformed synset list ({error!r})") from None


def cached_labels(directory: str | Path, source: str | Path) -> dict[str, list[str]] | None:
    """Per-sample synset ids of SOURCE from the vocabulary's cache, if still current."""
    resolved = str(Path(source).resolve())
    path = Path(directory) / LABELS_DIR / _cache_name(resolved)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    stat = os.stat(resolved)
    if data.get("size") != stat.st_size or data.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return data["labels"]
