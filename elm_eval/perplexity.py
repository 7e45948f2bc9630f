"""Token perplexity and bits per byte of documents, with lm-eval's definitions.

Every token of a document is scored, the first conditioned on the BOS token (lm-eval's
`loglikelihood_rolling`). perplexity = exp(NLL / tokens); bits_per_byte = NLL / (bytes * ln 2)
with NLL in nats and bytes the UTF-8 length of the documents; byte_perplexity = exp(NLL / bytes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from elm_eval.model import EvalModel, window_count
from elm_spec import ElmError
from elm_spec.jsonl import read_jsonl_objects


def read_documents(paths: Sequence[Path], text_key: str = "text") -> list[str]:
    """Documents from .txt files (each file is one document) and .jsonl files (one per line)."""
    documents: list[str] = []
    for path in paths:
        if path.suffix == ".jsonl":
            for number, row in read_jsonl_objects(path):
                if text_key not in row:
                    raise ElmError(f"{path} line {number}: missing field {text_key!r} (--text-key)")
                if not isinstance(row[text_key], str):
                    raise ElmError(f"{path} line {number}: field {text_key!r} is not a string")
                documents.append(row[text_key])
        elif path.suffix == ".txt":
            if not path.is_file():
                raise ElmError(f"{path}: not found")
            try:
                documents.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as error:
                raise ElmError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} "
                               f"at offset {error.start})") from None
        else:
            raise ElmError(f"{path}: expected a .txt or .jsonl file")
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ElmError(f"{', '.join(map(str, paths))}: no text to evaluate (empty data)")
    return documents


def evaluate_perplexity(model: EvalModel, documents: Sequence[str], stride: int | None = None,
                        progress: Callable[[int], Callable[[int], None]] | None = None
                        ) -> dict[str, Any]:
    """Perplexity figures over DOCUMENTS. PROGRESS(total windows) returns a callback."""
    texts = [model.tokenizer.encode(document) for document in documents]
    stride = stride or model.max_length
    windows = sum(window_count(len(t), model.max_length, stride) for t in texts)
    advance = progress(windows) if progress else None
    started = time.perf_counter()
    scores = model.loglikelihood_rolling(texts, model.tokenizer.bos_id, stride, advance)
    seconds = time.perf_counter() - started
    nll = -sum(score.logprob for score in scores)
    tokens = sum(score.tokens for score in scores)
    num_bytes = sum(len(document.encode("utf-8")) for document in documents)
    return {
        "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / (num_bytes * math.log(2)),
        "byte_perplexity": math.exp(nll / num_bytes),
        "nll": nll,
        "tokens": tokens,
        "bytes": num_bytes,
        "documents": len(documents),
        "context_length": model.max_length,
        "stride": stride,
        "backend": model.backend,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else math.inf,
    }
