"""Training tasks: what the engine trains, named in the config's `task:` key.

A task class implements (see elm_train.tasks.lm.LanguageModelTask for the reference):

- `__init__(self, config)`: the whole validated `elm_train.config.Config`. Task-specific keys
  under `data:` are validated by the dataclass the class names as `data_config` (a class
  attribute; None when the task has no keys of its own) and arrive as `config.task_data`.
- `build_model(self) -> torch.nn.Module`, initialised, on the CPU (the engine moves, casts and
  wraps it through elm_train.parallel). A model built on the meta device is materialised on
  the CPU by the engine, which then calls the task's `init_weights(model)`.
- `build_loader(self, split, rank, world_size)`: an iterator of batches (dicts of tensors) with
  `state_dict()` / `load_state_dict()`.
- `loss(self, model, batch) -> (loss tensor, {name: float tensor or float})`.
- `items_in(self, batch) -> int` and `flops_per_item(self) -> float` (for throughput and MFU).
- `export(self, model_state, destination)`: write the task's model directory (`dtype` and
  `force` keyword arguments are passed when the method accepts them).
- optional `write_checkpoint_files(self, directory)`: files that make a checkpoint
  self-describing (the lm task writes config.json and the tokenizer).
- optional classmethod `for_export(cls, config, checkpoint_dir)`: a task instance able to
  export from a checkpoint alone, when the training inputs may be gone.
- `item_name` (class attribute): "tokens" or e.g. "images"; non-token tasks also get
  `items_per_s` in the metrics.
"""

from __future__ import annotations

import importlib

from elm_spec import ElmError

TASKS: dict[str, str] = {
    "lm": "elm_train.tasks.lm:LanguageModelTask",
    "catlip": "elm_train.catlip.task:CatLIPTask",
    "clip": "elm_train.catlip.task:CLIPTask",
}


def task_class(name: str) -> type:
    if name not in TASKS:
        raise ElmError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    module_name, class_name = TASKS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ElmError(f"task {name!r} is not available ({error})") from None
    return getattr(module, class_name)
