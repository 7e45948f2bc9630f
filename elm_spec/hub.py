"""Hugging Face Hub repositories wherever a model or tokenizer is read, and publishing.

A value names a local path when that path exists; otherwise `org/name` (or `org/name@revision`)
is a Hub repository, fetched with huggingface_hub's `snapshot_download` into its standard
cache (`HF_HOME`, `HF_HUB_CACHE`), with `HF_TOKEN` or a stored login, honouring
`HF_HUB_OFFLINE=1`. The client shows a progress bar, resumes interrupted downloads and moves
a file into the cache only once it is complete, so nothing half-downloaded is ever read.
Failures become one line: 401 (missing, or private without a token), 403 (gated or no
permission), 404, an unknown revision, and a cache miss while offline are told apart.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from elm_spec.errors import ElmError, first_line

# What a model directory needs; mlx-lm's loader fetches the same kinds of files.
MODEL_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.jinja")
TOKENIZER_PATTERNS = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")

LLAMA2_TOKENIZER_ADVICE = (
    "pass --tokenizer with meta-llama/Llama-2-7b-hf (gated: accept its licence on the Hub and "
    "log in), a local tokenizer.model, or a non-gated Hub copy of the Llama-2 tokenizer")


def is_repo_id(value: str | os.PathLike[str]) -> bool:
    """True when VALUE is not an existing path and reads as `org/name[@revision]`."""
    text = os.fspath(value)
    return not Path(text).exists() and bool(_REPO_ID.match(text)) and ".." not in text


def split_revision(value: str, revision: str | None = None) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`); an explicit REVISION must agree with it."""
    repo_id, _, suffix = value.partition("@")
    if suffix and revision and suffix != revision:
        raise ElmError(f"{value}: revision {suffix!r} disagrees with --revision {revision!r}")
    return repo_id, suffix or revision


def resolve(value: str | os.PathLike[str], revision: str | None = None,
            patterns: Sequence[str] = MODEL_PATTERNS) -> Path:
    """A local directory for VALUE: the path itself, or the snapshot of a Hub repository."""
    if not is_repo_id(value):
        if revision is not None:
            raise ElmError(f"{value}: --revision applies to Hub repositories, and this is a path")
        return Path(value)
    repo_id, revision = split_revision(os.fspath(value), revision)
    return Path(download(repo_id, revision, patterns))


def resolve_source(value: str, revision: str | None = None, tokenizer_given: bool = False) -> Path:
    """`elm convert`'s SRC: a path, or a Hub repo, which must bring a tokenizer or be given one
    (Apple's OpenELM repositories ship none: Llama-2's is gated), checked before the weights
    are fetched."""
    if is_repo_id(value) and not tokenizer_given:
        small = resolve(value, revision, (*TOKENIZER_PATTERNS, "config.json"))
        if not any((small / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
            raise ElmError(f"{value}: the repository ships no tokenizer; {LLAMA2_TOKENIZER_ADVICE}")
    return resolve(value, revision)


def resolve_tokenizer(value: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local `tokenizer.model` (or a directory holding one) for VALUE, a path or a Hub repo."""
    path = resolve(value, revision, TOKENIZER_PATTERNS)
    if is_repo_id(value) and not (path / "tokenizer.model").is_file():
        raise ElmError(f"{value}: the Hub repository has no tokenizer.model (SentencePiece model)")
    return path


def download(repo_id: str, revision: str | None, patterns: Sequence[str]) -> str:
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision):
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns))


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turns huggingface_hub's failures into one ElmError line naming the repository."""
    try:
        yield
    except Exception as error:
        message = describe_hub_error(repo_id, revision, error)
        if message is None:
            raise
        raise ElmError(message) from None


def describe_hub_error(repo_id: str, revision: str | None, error: BaseException) -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, GatedRepoError):
        return (f"{where}: 403 gated repository; accept its terms on the Hub, then log in "
                "(`hf auth login`) or set HF_TOKEN")
    if isinstance(error, RepositoryNotFoundError):
        if status == 404:
            return f"{where}: 404 no such repository on the Hub"
        return (f"{where}: {status or 401} repository not found, or private and this request "
                "carried no token with access (log in with `hf auth login` or set HF_TOKEN)")
    if isinstance(error, RevisionNotFoundError):
        return f"{where}: 404 revision {revision!r} not found in the repository"
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return (f"{where}: not in the local Hub cache ({constants.HF_HUB_CACHE}) and the Hub "
                "cannot be reached (HF_HUB_OFFLINE=1 or no network); download it once online")
    if isinstance(error, HfHubHTTPError):
        if status == 403:
            return f"{where}: 403 forbidden; the token in use has no permission for this repository"
        if status == 401:
            from huggingface_hub import get_token

            if not get_token():
                return f"{where}: 401 not logged in; log in with `hf auth login` or set HF_TOKEN"
            return f"{where}: 401 the token in use was refused (log in again or fix HF_TOKEN)"
        return f"{where}: Hub request failed: {first_line(error)}"
    return None


# ----- publishing ----------------------------------------------------------------------------
def model_card(repo_id: str, base_model: str | None, kind: str,
               figures: Mapping[str, object] | None = None, license: str = "apache-2.0") -> str:
    """README.md for the Hub: YAML front matter (library_name, base_model, tags, license) and
    how the files were made (the command line), with --verify figures when there are any."""
    import yaml

    library = {"mlx": "mlx", "adapters": "mlx", "gguf": "gguf"}.get(kind, "transformers")
    tags = ["elm", "openelm", *([library] if library != "transformers" else [])]
    if kind == "adapters":
        tags.append("lora")
    meta: dict[str, object] = {"library_name": library, "license": license, "tags": tags}
    if base_model:
        meta["base_model"] = base_model
    command = shlex.join(["elm", *sys.argv[1:]])
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {repo_id}", "",
             f"Made with elm ({kind}):", "", "```",
             command, "```", ""]
    if figures:
        lines += ["Verification (`--verify`):", "", "| check | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in figures.items()] + [""]
    return "\n".join(lines)


def publish(output: str | os.PathLike[str], repo_id: str, card: str, private: bool = False) -> str:
    """Create REPO_ID on the Hub (if needed) and upload OUTPUT (a directory, or one file such as
    a GGUF) with CARD as its README.md, in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    output = Path(output)
    api = HfApi()
    with hub_errors(repo_id):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        message = f"Upload {output.name} with elm"
        if output.is_dir():
            (output / "README.md").write_text(card)
            info = api.upload_folder(folder_path=str(output), repo_id=repo_id, repo_type="model",
                                     commit_message=message)
        else:
            info = api.create_commit(repo_id, [
                CommitOperationAdd(path_in_repo=output.name, path_or_fileobj=str(output)),
                CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())],
                commit_message=message, repo_type="model")
    return str(getattr(info, "commit_url", None) or info)
