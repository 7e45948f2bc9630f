"""Training tasks: what the engine trains, named in the config's `task:` key. Each is a
`elm_train.tasks.base.Task` (elm_train.tasks.lm.LanguageModelTask is the reference)."""

from __future__ import annotations

import importlib

from elm_spec import ElmError
from elm_train.tasks.base import Task

TASKS: dict[str, str] = {
    "lm": "elm_train.tasks.lm:LanguageModelTask",
    "dpo": "elm_train.tasks.dpo:PreferenceTask",
    "catlip": "elm_train.catlip.task:CatLIPTask",
    "clip": "elm_train.catlip.task:CLIPTask",
}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ElmError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    module_name, class_name = TASKS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ElmError(f"task {name!r} is not available ({error})") from None
    return getattr(module, class_name)
