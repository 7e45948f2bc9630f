"""Hub datasets as corpus sources: `hf://datasets/ORG/NAME[@REVISION][/GLOB][?split=S&column=C]`.

A source is resolved once to a commit, and its files are listed at that commit, so every task of
a distributed run reads the same files even if the dataset changes meanwhile. Files are read by
HTTP range requests through huggingface_hub's HfFileSystem (Parquet footers and row groups, byte
ranges of JSONL, gzip streams): nothing is copied to local disk.

Without a GLOB, `split` (default `train`) picks the files whose path names the split the way the
Hub names them (`data/train-00000-of-00004.parquet`, `train.jsonl`, `train/0000.parquet`), with
the Hub's aliases (`validation` also matches `valid`, `dev`, `val`); a repository where no file
names a split holds only `train`.

Offline (HF_HUB_OFFLINE=1) a dataset is read from its snapshot in the local Hub cache (`hf
download --repo-type dataset ORG/NAME`), the same files in the same order, so the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, unquote

from elm_spec import ElmError
from elm_spec.hub import hub_errors

PREFIX = "hf://datasets/"
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
QUERY_KEYS = ("split", "column")


def is_hub_source(text: str) -> bool:
    return text.startswith(PREFIX)


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None
    pattern: str | None  # a glob inside the repository, instead of a split
    split: str
    column: str | None
    query: str

    @property
    def name(self) -> str:
        return PREFIX + self.repo_id

    def at(self, revision: str) -> str:
        """This source pinned to REVISION, as a source string."""
        path = f"/{self.pattern}" if self.pattern else ""
        query = f"?{self.query}" if self.query else ""
        return f"{PREFIX}{self.repo_id}@{revision}{path}{query}"


def parse(text: str) -> HubSource:
    rest, _, query = text.removeprefix(PREFIX).partition("?")
    params = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - set(QUERY_KEYS))
    if unknown:
        raise ElmError(f"{text}: unknown option {unknown[0]!r} (expected split=NAME, column=NAME)")
    values = {key: params[key][-1] for key in params}
    parts = rest.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ElmError(f"{text}: expected hf://datasets/ORG/NAME[@REVISION][/PATH][?split=NAME"
                       "&column=NAME]")
    name, _, revision = parts[1].partition("@")
    pattern = parts[2].strip("/") if len(parts) > 2 else None
    if pattern and "split" in values:
        raise ElmError(f"{text}: give a path inside the dataset or split=, not both")
    if any(not values.get(key, "x") for key in QUERY_KEYS):
        raise ElmError(f"{text}: split= and column= need a value")
    return HubSource(f"{parts[0]}/{name}", unquote(revision) or None, pattern or None,
                     values.get("split", "train"), values.get("column"), query)


def pin(text: str) -> str:
    """TEXT with its revision replaced by the commit it resolves to now."""
    source = parse(text)
    return source.at(_commit(source))


def _commit(source: HubSource) -> str:
    from huggingface_hub import HfApi

    if _offline():
        return _snapshot(source).name  # the cache names each snapshot by its commit
    with hub_errors(source.name, source.revision):
        return HfApi().dataset_info(source.repo_id, revision=source.revision).sha


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def _snapshot(source: HubSource) -> Path:
    from huggingface_hub import snapshot_download

    with hub_errors(source.name, source.revision):
        return Path(snapshot_download(source.repo_id, repo_type="dataset",
                                      revision=source.revision, local_files_only=True))


def list_files(text: str, readable: Callable[[str], bool]) -> tuple[list[tuple[str, int]], str | None]:
    """The (path, size) of each file TEXT names, at one commit, sorted by path; and the column.
    Offline, the paths are those of the cached snapshot.

    READABLE(name) tells whether elm reads a file of that name.
    """
    from fsspec.utils import glob_translate
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    source = parse(text)
    if _offline():
        root = _snapshot(source)
        files = {p.relative_to(root).as_posix(): p.stat().st_size
                 for p in root.rglob("*") if p.is_file()}
        prefix = f"{root}/"
    else:
        commit = _commit(source)
        with hub_errors(source.name, source.revision):
            tree = HfApi().list_repo_tree(source.repo_id, repo_type="dataset", revision=commit,
                                          recursive=True)
            files = {entry.path: entry.size for entry in tree if isinstance(entry, RepoFile)}
        prefix = f"{PREFIX}{source.repo_id}@{commit}/"
    if source.pattern:
        wanted = re.compile(glob_translate(source.pattern))
        chosen = [path for path in files if wanted.match(path)]
        if not chosen:
            raise ElmError(f"{text}: no files match {source.pattern!r} in the dataset")
    else:
        readable_files = [path for path in files if readable(path)]
        if not readable_files:
            kinds = sorted({path.rpartition(".")[2] for path in files if "." in path})
            raise ElmError(f"{text}: no .parquet, .jsonl, .jsonl.gz or .txt files in the dataset "
                           f"(found: {', '.join(kinds) or 'nothing'})")
        by_split = {split: [path for path in readable_files if _names_split(path, split)]
                    for split in {*SPLIT_ALIASES, source.split}}
        found = sorted(split for split, paths in by_split.items() if paths)
        if not found:  # no file names a split: the Hub reads them all as train
            by_split["train"] = readable_files
            found = ["train"]
        chosen = by_split[source.split]
        if not chosen:
            raise ElmError(f"{text}: no split {source.split!r} in the dataset "
                           f"(splits: {', '.join(found)})")
    return [(prefix + path, files[path]) for path in sorted(chosen)], source.column


def _names_split(path: str, split: str) -> bool:
    names = "|".join(re.escape(name) for name in SPLIT_ALIASES.get(split, (split,)))
    return any(re.fullmatch(rf"(?:{names})(?:[-._ 0-9].*)?", part, re.IGNORECASE)
               for part in path.split("/"))


def open_file(path: str, size: int, block_size: int, cache_type: str) -> BinaryIO:
    """A seekable reader of a Hub file of SIZE bytes that fetches the ranges it is asked for
    (fsspec's CACHE_TYPE and BLOCK_SIZE: its default 5 MB would fetch a 1 MB chunk five times)."""
    from huggingface_hub import HfFileSystem

    source = parse(path)
    with hub_errors(source.name, source.revision):
        return HfFileSystem().open(path, "rb", size=size, block_size=block_size,
                                   cache_type=cache_type)
