"""Task files in lm-eval's field layouts, and quantized copies of a model directory."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elm_eval.tasks import TASKS

WORDS = ("the", "model", "reads", "a", "file", "and", "returns", "value", "list", "of", "names",
         "when", "python", "runs", "code", "with", "data", "from", "this", "module", "each", "call")


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def _task_rows(task: str, rng: random.Random, count: int) -> Iterator[dict[str, Any]]:
    """Rows in the HF datasets layout lm-eval reads, with the quirks its preprocessing handles."""
    for i in range(count):
        if task.startswith("arc"):
            labels = ["A", "B", "C", "D"] if i % 2 else ["1", "2", "3"]
            yield {"id": str(i), "question": _words(rng, 6) + "?", "answerKey": rng.choice(labels),
                   "choices": {"text": [_words(rng, rng.randint(1, 4)) for _ in labels],
                               "label": labels}}
        elif task == "hellaswag":
            yield {"ind": i, "activity_label": "Making tea", "ctx": "unused",
                   "ctx_a": _words(rng, 5) + " [header] step.", "ctx_b": _words(rng, 3),
                   "endings": [_words(rng, rng.randint(2, 6)) + " [title] done" for _ in range(4)],
                   "label": str(rng.randint(0, 3)), "split": "val", "split_type": "indomain",
                   "source_id": "s"}
        elif task == "piqa":
            yield {"goal": _words(rng, 5), "sol1": _words(rng, 4), "sol2": _words(rng, 7),
                   "label": rng.randint(0, 1)}
        elif task == "sciq":
            yield {"question": _words(rng, 5) + "?", "distractor1": _words(rng, 1),
                   "distractor2": _words(rng, 2), "distractor3": _words(rng, 1),
                   "correct_answer": _words(rng, 2),
                   "support": ("  " + _words(rng, 8)) if i % 2 else ""}
        elif task == "winogrande":
            yield {"sentence": _words(rng, 4) + " _ " + _words(rng, 4) + ".",
                   "option1": _words(rng, 1), "option2": _words(rng, 2),
                   "answer": rng.choice(["1", "2"])}
        elif task == "boolq":
            yield {"question": _words(rng, 5), "passage": _words(rng, 12), "idx": i,
                   "label": rng.randint(0, 1)}


def write_task_files(directory: Path, rows_per_task: int = 6) -> Path:
    """TASK.jsonl for every supported task, in lm-eval's field layouts."""
    directory.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        rows = _task_rows(task, random.Random(task), rows_per_task)
        (directory / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def write_quantized_dir(source: Path, destination: Path, bits: int = 4, group_size: int = 64) -> Path:
    """A quantized MLX model directory (mlx-lm's quantize_model and save_model)."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    from elm_mlx import load_model
    from elm_spec.modeldir import copy_tokenizer_files, read_config

    model = load_model(source)
    model, config = quantize_model(model, read_config(source), group_size, bits)
    destination.mkdir(parents=True)
    save_model(destination, model)
    save_config(config, destination / "config.json")
    copy_tokenizer_files(source, destination)
    return destination
