"""Zero-shot multiple-choice tasks read from local JSONL in lm-eval's (HF datasets') layouts.

Each reader reproduces the task's lm-eval 0.4 YAML: `doc_to_text`, `doc_to_choice`,
`doc_to_target`, the " " target delimiter, HellaSwag's `process_docs` and WinoGrande's
partial evaluation (one context per option, the common sentence ending scored). Scoring follows
lm-eval's `process_results`: acc = argmax of summed log-likelihoods; acc_norm = argmax of
log-likelihood divided by the character length of each choice; stderr = sample standard
deviation / sqrt(n).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elm_eval.model import EvalModel
from elm_spec import ElmError
from elm_spec.jsonl import read_jsonl_objects
from elm_spec.tokenizer import Tokenizer

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Question:
    """One document as lm-eval builds its requests: (context, continuation) per choice."""

    requests: list[tuple[str, str]]
    choices: list[str]  # lm-eval's doc_to_choice, whose lengths normalise acc_norm
    gold: int


class RowError(ValueError):
    """A row lacks a field or holds a value the task cannot use."""


def _field(row: Mapping[str, Any], name: str, kind: type | tuple[type, ...] = str) -> Any:
    if name not in row:
        raise RowError(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RowError(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _choice_requests(context: str, choices: list[str], gold: int) -> Question:
    if not 0 <= gold < len(choices):
        raise RowError(f"label {gold} is not the index of one of the {len(choices)} choices")
    return Question([(context, TARGET_DELIMITER + c) for c in choices], choices, gold)


def _int_label(row: Mapping[str, Any], name: str) -> int:
    value = _field(row, name, (int, str))
    try:
        return int(value)
    except ValueError:
        raise RowError(f"field {name!r} is not an integer label ({value!r})") from None


def arc(row: Mapping[str, Any]) -> Question:
    question = _field(row, "question")
    choices = _field(row, "choices", dict)
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list):
        raise RowError("field 'choices' needs lists 'text' and 'label'")
    answer = _field(row, "answerKey")
    if answer not in labels:
        raise RowError(f"answerKey {answer!r} is not one of the choice labels {labels}")
    return _choice_requests(f"Question: {question}\nAnswer:", texts, labels.index(answer))


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag (lm-eval's utils.preprocess).
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: Mapping[str, Any]) -> Question:
    context = _field(row, "ctx_a") + " " + _field(row, "ctx_b").capitalize()
    query = _hellaswag_preprocess(_field(row, "activity_label") + ": " + context)
    endings = [_hellaswag_preprocess(e) for e in _field(row, "endings", list)]
    return _choice_requests(query, endings, _int_label(row, "label"))


def piqa(row: Mapping[str, Any]) -> Question:
    solutions = [_field(row, "sol1"), _field(row, "sol2")]
    return _choice_requests(f"Question: {_field(row, 'goal')}\nAnswer:", solutions,
                            _int_label(row, "label"))


def sciq(row: Mapping[str, Any]) -> Question:
    context = f"{_field(row, 'support').lstrip()}\nQuestion: {_field(row, 'question')}\nAnswer:"
    choices = [_field(row, "distractor1"), _field(row, "distractor2"),
               _field(row, "distractor3"), _field(row, "correct_answer")]
    return _choice_requests(context, choices, 3)


def winogrande(row: Mapping[str, Any]) -> Question:
    sentence = _field(row, "sentence")
    if "_" not in sentence:
        raise RowError("field 'sentence' has no '_' blank")
    blank = sentence.index("_")
    contexts = [sentence[:blank] + _field(row, "option1"), sentence[:blank] + _field(row, "option2")]
    answer = _field(row, "answer")
    if answer not in ("1", "2"):
        raise RowError(f"field 'answer' must be '1' or '2', got {answer!r}")
    ending = TARGET_DELIMITER + sentence[blank + 1:].strip()
    return Question([(context, ending) for context in contexts], contexts, int(answer) - 1)


def boolq(row: Mapping[str, Any]) -> Question:
    context = f"{_field(row, 'passage')}\nQuestion: {_field(row, 'question')}?\nAnswer:"
    return _choice_requests(context, ["no", "yes"], _int_label(row, "label"))


@dataclass(frozen=True)
class TaskFormat:
    reader: Callable[[Mapping[str, Any]], Question]
    metrics: tuple[str, ...]  # what lm-eval's YAML lists


TASKS: dict[str, TaskFormat] = {
    "arc_easy": TaskFormat(arc, ("acc", "acc_norm")),
    "arc_challenge": TaskFormat(arc, ("acc", "acc_norm")),
    "hellaswag": TaskFormat(hellaswag, ("acc", "acc_norm")),
    "piqa": TaskFormat(piqa, ("acc", "acc_norm")),
    "sciq": TaskFormat(sciq, ("acc", "acc_norm")),
    "winogrande": TaskFormat(winogrande, ("acc",)),
    "boolq": TaskFormat(boolq, ("acc",)),
}


def parse_task_names(names: str) -> list[str]:
    tasks = [name.strip() for name in names.split(",") if name.strip()]
    if not tasks:
        raise ElmError("--tasks is empty; choose from " + ", ".join(TASKS))
    for name in tasks:
        if name not in TASKS:
            raise ElmError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def task_file(data_dir: Path, task: str) -> Path:
    path = data_dir / f"{task}.jsonl"
    if not path.is_file():
        raise ElmError(f"{path}: not found (task {task} reads {task}.jsonl from --data-dir)")
    return path


def read_task(path: Path, task: str, limit: int | None = None) -> list[Question]:
    reader = TASKS[task].reader
    questions = []
    for number, row in read_jsonl_objects(path, limit):
        try:
            questions.append(reader(row))
        except RowError as error:
            raise ElmError(f"{path} line {number}: {error} (task {task})") from None
    return questions


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's stderr of a mean: sample standard deviation over sqrt(n) (None for n < 2)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def argmax(values: Sequence[float]) -> int:
    """First index of the largest value (numpy's tie rule, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_questions(questions: Sequence[Question], loglikelihoods: Sequence[float],
                    metrics: Sequence[str]) -> dict[str, float | None]:
    """Per-task metrics (and their stderr) from the log-likelihood of every request, in order."""
    per_metric: dict[str, list[float]] = {metric: [] for metric in metrics}
    offset = 0
    for question in questions:
        lls = list(loglikelihoods[offset: offset + len(question.requests)])
        offset += len(question.requests)
        if "acc" in per_metric:
            per_metric["acc"].append(float(argmax(lls) == question.gold))
        if "acc_norm" in per_metric:
            normed = [ll / len(choice) if choice else -math.inf
                      for ll, choice in zip(lls, question.choices, strict=True)]
            per_metric["acc_norm"].append(float(argmax(normed) == question.gold))
    if offset != len(loglikelihoods):
        raise ValueError("one log-likelihood per request expected")
    result: dict[str, float | None] = {}
    for metric, values in per_metric.items():
        result[metric] = sum(values) / len(values)
        result[f"{metric}_stderr"] = mean_stderr(values)
    result["samples"] = len(questions)
    return result


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, add_bos: bool
                ) -> tuple[list[int], list[int]]:
    """lm-eval's causal `_encode_pair`: trailing spaces of the context move to the
    continuation; the joined text is encoded and split after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, bos=add_bos)
    context_ids = tokenizer.encode(context, bos=add_bos)
    return context_ids, whole[len(context_ids):]


def load_tasks(tasks: Sequence[str], data_dir: Path, limit: int | None = None
               ) -> dict[str, list[Question]]:
    """Every task's questions, read and checked before any model is loaded."""
    return {task: read_task(task_file(data_dir, task), task, limit) for task in tasks}


def task_loglikelihoods(model: EvalModel, questions: Sequence[Question], add_bos: bool = True,
                        progress: Callable[[int], None] | None = None) -> list[float]:
    """log P(continuation | context) of every request of every question, in order."""
    requests = [encode_pair(model.tokenizer, context, continuation, add_bos)
                for question in questions for context, continuation in question.requests]
    return [ll for ll, _ in model.loglikelihood(requests, progress)]


def evaluate_tasks(model: EvalModel, loaded: Mapping[str, Sequence[Question]],
                   add_bos: bool = True,
                   progress: Callable[[str, int], Callable[[int], None]] | None = None
                   ) -> dict[str, dict[str, float | None]]:
    """Metrics per task. PROGRESS(task, total requests) returns a callback fed request counts."""
    results: dict[str, dict[str, float | None]] = {}
    for task, questions in loaded.items():
        total = sum(len(question.requests) for question in questions)
        advance = progress(task, total) if progress else None
        lls = task_loglikelihoods(model, questions, add_bos, advance)
        results[task] = score_questions(questions, lls, TASKS[task].metrics)
    return results
