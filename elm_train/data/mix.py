"""Data mixes: named groups of sources, each with a weight, for `elm data prepare --mix FILE`.

What a weight means: with weights w_i (normalised to shares p_i = w_i / sum(w)), source i
supplies p_i of the output's tokens (both splits, EOS included). T_i is the number of tokens of
source i's documents that pass the filters; the output holds N = min_i T_i / p_i tokens (at most
the mix's `tokens`), the largest size at which no document is repeated: the scarcest source
relative to its weight is used whole, the others are subsampled.

Which documents a subsampled source keeps is decided by a seeded hash of each document's
identity (source file, position in it), cut into BUCKETS buckets: the source keeps the documents
of its lowest buckets, the fewest buckets whose tokens reach p_i * N. So the realised count is
at least p_i * N and exceeds it by less than one bucket's tokens (T_i / BUCKETS on average), and
it depends only on the documents, never on how the corpus was cut into chunks or tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from elm_spec import ElmError
from elm_spec.settings import build_dataclass, read_yaml_mapping
from elm_train.data import hub

BUCKET_BITS = 16
BUCKETS = 1 << BUCKET_BITS


@dataclass(frozen=True)
class MixSource:
    name: str
    paths: tuple[str, ...]
    weight: float | None = None  # None: every document (sources given without a mix)
    text_key: str | None = None  # overrides --text-key for these paths

    def __post_init__(self) -> None:
        if self.weight is not None and not (self.weight > 0 and math.isfinite(self.weight)):
            raise ElmError(f"mix source {self.name!r}: weight must be a positive number, "
                           f"got {self.weight}")
        if not self.paths:
            raise ElmError(f"mix source {self.name!r}: no paths")


@dataclass(frozen=True)
class Mix:
    sources: tuple[MixSource, ...]
    tokens: int | None = None  # an upper bound on the output's tokens

    def __post_init__(self) -> None:
        if not self.sources:
            raise ElmError("no sources given")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise ElmError(f"mix source {duplicate!r} is named twice")
        if self.tokens is not None and self.tokens < 1:
            raise ElmError(f"mix tokens must be positive, got {self.tokens}")

    @property
    def weighted(self) -> bool:
        return self.sources[0].weight is not None

    def flat(self) -> tuple[list[str], list[int], list[str | None]]:
        """Every path, the source each belongs to, and its text key."""
        paths, owners, keys = [], [], []
        for number, source in enumerate(self.sources):
            for path in source.paths:
                paths.append(path)
                owners.append(number)
                keys.append(source.text_key)
        return paths, owners, keys

    def pinned(self) -> Mix:
        """This mix with each Hub dataset pinned to the commit it resolves to now: every task
        lists the same files, and the index records which."""
        return replace(self, sources=tuple(
            replace(source, paths=tuple(hub.pin(p) if hub.is_hub_source(p) else p
                                        for p in source.paths))
            for source in self.sources))

    def describe(self) -> dict:
        return {"tokens": self.tokens,
                "sources": [{"name": s.name, "paths": list(s.paths), "weight": s.weight,
                             "text_key": s.text_key} for s in self.sources]}


def as_mix(sources) -> Mix:
    """SOURCES as a mix: a Mix as it is; paths (the command line's) each their own unweighted
    source."""
    if isinstance(sources, Mix):
        return sources
    return Mix(tuple(MixSource(str(p), (str(p),)) for p in dict.fromkeys(map(str, sources))))


@dataclass
class _Entry:
    name: str = ""
    paths: list[str] = field(default_factory=list)
    weight: float = 0.0
    text_key: str | None = None


@dataclass
class _File:
    sources: list[Any] = field(default_factory=list)
    tokens: int | None = None


def read_mix(path: Path) -> Mix:
    """A mix file: `sources:` a list of {name, paths, weight, text_key}, and optional `tokens:`.

    Relative local paths are read from the mix file's directory.
    """
    data = read_yaml_mapping(path, "mix settings")
    try:
        top = build_dataclass(_File, data)
        entries = []
        for number, raw in enumerate(top.sources):
            if isinstance(raw, dict) and isinstance(raw.get("paths"), str):
                raw = {**raw, "paths": [raw["paths"]]}
            entry = build_dataclass(_Entry, raw, f"sources[{number}]")
            missing = [key for key in ("name", "paths", "weight") if key not in raw]
            if missing:
                raise ElmError(f"sources[{number}]: {missing[0]} is required")
            entries.append(MixSource(entry.name, tuple(_relative_to(path.parent, p)
                                                       for p in entry.paths),
                                     entry.weight, entry.text_key))
        return Mix(tuple(entries), top.tokens)
    except ElmError as error:
        raise ElmError(f"{path}: {error}") from None


def _relative_to(directory: Path, path: str) -> str:
    if hub.is_hub_source(path) or Path(path).is_absolute():
        return path
    return str(directory / path)


def thresholds(histogram: np.ndarray, mix: Mix) -> tuple[np.ndarray, list[int]]:
    """Per source, the number of key buckets it keeps; and the tokens each has before the mix.

    HISTOGRAM[i, b] holds the tokens of source i's documents in key bucket b.
    """
    available = [int(t) for t in histogram.sum(axis=1)]
    if not mix.weighted:
        return np.full(len(mix.sources), BUCKETS, dtype=np.int64), available
    for source, tokens in zip(mix.sources, available, strict=True):
        if tokens == 0:
            raise ElmError(f"mix source {source.name!r}: no documents kept")
    weights = [Fraction(s.weight) for s in mix.sources]
    total_weight = sum(weights)
    size = min(Fraction(t) * total_weight / w for t, w in zip(available, weights, strict=True))
    if mix.tokens is not None:
        size = min(size, Fraction(mix.tokens))
    keep = np.empty(len(mix.sources), dtype=np.int64)
    for number, weight in enumerate(weights):
        target = math.ceil(weight * size / total_weight)
        cumulative = np.cumsum(histogram[number])
        keep[number] = min(int(np.searchsorted(cumulative, target, side="left")) + 1, BUCKETS)
    return keep, available
