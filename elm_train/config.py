"""Training configuration: YAML mapped onto validated dataclasses, dotted overrides, recipes.

Precedence, lowest first: dataclass defaults, the recipe named by `recipe:`, the YAML file,
`key=value` overrides from the command line. Unknown keys are rejected by their dotted name.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from elm_spec import ElmError
from elm_spec.names import (
    AC_MODES,
    ATTENTION_KINDS,
    DATA_LAYOUTS,
    FLOAT8_RECIPES,
    SHARDED_STRATEGIES,
    STRATEGIES,
    TRAIN_DTYPES,
)
from elm_spec.settings import (
    aliased,
    build_dataclass,
    deep_merge,
    parse_override,
    read_yaml_mapping,
    set_dotted,
)

TASKS = ("lm", "dpo", "catlip", "clip")
DEVICES = ("auto", "cpu", "cuda")
ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")


@dataclass
class ModelConfig:
    preset: str | None = None
    spec: str | None = None
    init_from: str | None = None
    attention: str = "sdpa"
    vocab_size: int | None = None
    # tokenizer.model (or a directory holding one) carried into checkpoints and exports;
    # by default the one in data.path or init_from.
    tokenizer: str | None = None
    # task: clip only: the text tower's shape (keys of elm_train.catlip.clip.TextSpec).
    text: dict[str, Any] | None = None
    # task: dpo only: the frozen reference model's directory (default: the initial weights).
    ref_model: str | None = None


@dataclass
class DataConfig:
    path: str | None = None
    synthetic: bool = False
    seed: int = 0
    # packed or corenet (elm_train/data/loader.py); default: the layout data.path was prepared with
    layout: str | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    warmup_init_lr: float = 1e-6
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    z_loss: float = 1e-4
    implementation: str = "auto"


@dataclass
class TrainSection:
    seq_len: int = 2048
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    # The global batch in tokens; > 0 derives grad_accum_steps from it (elm_train/batch_plan.py).
    global_batch_tokens: int = 0
    max_steps: int = 1000
    seed: int = 0
    dtype: str = "bfloat16"
    compile: bool = False
    # none | selective | full (docs/train.md); `true`/`false` of older configs read as full/none.
    activation_checkpointing: str = aliased("none", {True: "full", False: "none"})
    # none | tensorwise | rowwise: the blocks' matmuls in float8 (torchao; GPUs of SM 8.9+).
    float8: str = "none"
    device: str = "auto"
    # torch CPU threads per process; 0: OMP_NUM_THREADS if set, else (from `elm train`) the
    # cores the load average leaves idle.
    threads: int = 0
    eval_every: int = 0
    eval_batches: int = 20


@dataclass
class ParallelConfig:
    strategy: str = "none"
    # hsdp only: size of the replicate dimension (default: the number of nodes).
    replicate_degree: int | None = None
    # FSDP strategies: the dtype gradients are reduced in (parameters compute in train.dtype).
    reduce_dtype: str = "float32"
    # The model's floating-point buffers (the rotary tables); CoreNet's FSDP keeps them in bf16.
    buffer_dtype: str = "float32"


@dataclass
class CheckpointConfig:
    dir: str | None = None
    every: int = 0
    keep: int = 3
    resume: bool = True
    # Write checkpoints in the background while training goes on (committed when complete);
    # unset: on a GPU only (on a CPU the writer slows the step more than the save would).
    async_save: bool | None = None


@dataclass
class LogConfig:
    run_dir: str = "runs/elm"
    every: int = 1
    tensorboard: bool = False
    progress: bool = True
    # Peak FLOP/s per device for MFU; 0 means look up the GPU or measure the CPU GEMM peak.
    peak_flops: float = 0.0
    # On a GPU: record allocator history and dump it into run_dir on out-of-memory.
    oom_snapshot: bool = True


@dataclass
class Config:
    task: str = "lm"
    recipe: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Task-specific keys found under `data`, validated by the task's `data_config` dataclass.
    task_data: Any = None

    def to_dict(self) -> dict[str, Any]:
        result = dataclasses.asdict(self)
        task_data = result.pop("task_data")
        if task_data:
            result["data"].update(task_data)
        return result


CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS, "model.attention": ATTENTION_KINDS, "train.dtype": TRAIN_DTYPES, "train.device": DEVICES,
    "train.activation_checkpointing": AC_MODES, "train.float8": FLOAT8_RECIPES,
    "parallel.strategy": STRATEGIES, "optim.implementation": ADAMW_IMPLEMENTATIONS,
    "parallel.reduce_dtype": TRAIN_DTYPES, "parallel.buffer_dtype": TRAIN_DTYPES,
}
POSITIVE = ("train.seq_len", "train.micro_batch_size", "train.grad_accum_steps", "train.max_steps",
            "log.every", "checkpoint.keep", "train.eval_batches")
NON_NEGATIVE = ("optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.warmup_init_lr",
                "optim.weight_decay", "optim.eps", "optim.grad_clip", "optim.z_loss",
                "checkpoint.every", "train.eval_every", "train.threads", "log.peak_flops",
                "train.global_batch_tokens")


# ----- recipes (docs/reference.md section 3: CoreNet's OpenELM configs) --------------------------
# 16 sequences per GPU on 128 GPUs of 2048 tokens.
CORENET_GLOBAL_BATCH_TOKENS = 16 * 128 * 2048


def _openelm_recipe(preset: str, lr: float, checkpointing: str, strategy: str) -> dict[str, Any]:
    return {
        "model": {"preset": preset},
        "optim": {"lr": lr, "min_lr_ratio": 0.1, "warmup_steps": 5000, "warmup_init_lr": 1e-6,
                  "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0,
                  "z_loss": 1e-4},
        "train": {"seq_len": 2048, "micro_batch_size": 16,
                  "global_batch_tokens": CORENET_GLOBAL_BATCH_TOKENS, "max_steps": 350_000,
                  "dtype": "bfloat16", "activation_checkpointing": checkpointing},
        # CoreNet's FSDP (3B) also keeps the buffers in bf16; gradients reduce in fp32.
        "parallel": {"strategy": strategy,
                     **({"buffer_dtype": "bfloat16"} if strategy == "fsdp" else {})},
    }


RECIPES: dict[str, dict[str, Any]] = {
    "openelm-270m": _openelm_recipe("OpenELM-270M", 5.3e-3, "none", "ddp"),
    "openelm-450m": _openelm_recipe("OpenELM-450M", 3.9e-3, "full", "ddp"),
    "openelm-1.1b": _openelm_recipe("OpenELM-1_1B", 2.4e-3, "full", "ddp"),
    "openelm-3b": _openelm_recipe("OpenELM-3B", 1.2e-3, "full", "fsdp"),
}


# ----- loading --------------------------------------------------------------------------
def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> Config:
    """A validated Config from a YAML file and/or a dict, then `key=value` overrides."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        raw = read_yaml_mapping(Path(path), "sections (model, data, optim, train, ...)")
    if data:
        raw = deep_merge(raw, data)
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    recipe = raw.get("recipe")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ElmError(f"{source}: unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
        raw = deep_merge(RECIPES[recipe], raw)
    try:
        return build_config(raw)
    except ElmError as error:
        raise ElmError(f"{source}: {error}") from None


def build_config(raw: dict[str, Any]) -> Config:
    from elm_train.tasks import task_class

    raw = dict(raw)
    task_name = raw.get("task", "lm")
    if task_name not in TASKS:
        raise ElmError(f"task: {task_name!r} is not one of {', '.join(TASKS)}")
    data_section = raw.get("data") or {}
    if not isinstance(data_section, dict):
        raise ElmError("data: expected a mapping")
    engine_keys = {f.name for f in dataclasses.fields(DataConfig)}
    task_data_class = task_class(task_name).data_config
    task_keys = {k: v for k, v in data_section.items() if k not in engine_keys}
    if task_keys and task_data_class is None:
        raise ElmError(f"unknown key 'data.{next(iter(task_keys))}'")
    raw["data"] = {k: v for k, v in data_section.items() if k in engine_keys}
    config = build_dataclass(Config, {k: v for k, v in raw.items() if k != "task_data"}, "")
    if task_data_class is not None:
        config.task_data = build_dataclass(task_data_class, task_keys, "data")
    _check_values(config)
    return config


def _get(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check_values(config: Config) -> None:
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise ElmError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    for key in POSITIVE:
        if _get(config, key) <= 0:
            raise ElmError(f"{key}: must be positive, got {_get(config, key)}")
    for key in NON_NEGATIVE:
        if _get(config, key) < 0:
            raise ElmError(f"{key}: must not be negative, got {_get(config, key)}")
    if config.data.layout is not None and config.data.layout not in DATA_LAYOUTS:
        raise ElmError(f"data.layout: {config.data.layout!r} is not one of {', '.join(DATA_LAYOUTS)}")
    if config.train.global_batch_tokens and config.train.grad_accum_steps != 1:
        raise ElmError("train.grad_accum_steps: derived from train.global_batch_tokens "
                       f"({config.train.global_batch_tokens}); set one of them "
                       "(train.global_batch_tokens=0 to give the accumulation yourself)")
    betas = config.optim.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ElmError(f"optim.betas: expected two numbers in [0, 1), got {betas}")
    if config.optim.min_lr_ratio > 1:
        raise ElmError(f"optim.min_lr_ratio: must be at most 1, got {config.optim.min_lr_ratio}")
    replicate = config.parallel.replicate_degree
    if replicate is not None and replicate <= 0:
        raise ElmError(f"parallel.replicate_degree: must be positive, got {replicate}")
    if config.parallel.reduce_dtype != "float32" and config.parallel.strategy not in SHARDED_STRATEGIES:
        raise ElmError(f"parallel.reduce_dtype: {config.parallel.reduce_dtype!r} applies to "
                       f"{', '.join(SHARDED_STRATEGIES)}; {config.parallel.strategy} reduces the "
                       "float32 gradients as they are")
    if config.task in ("lm", "dpo"):
        sources = [k for k in ("preset", "spec", "init_from") if getattr(config.model, k)]
        if len(sources) != 1:
            raise ElmError("model: give exactly one of model.preset, model.spec or model.init_from"
                           + (f" (got {', '.join('model.' + s for s in sources)})" if sources else ""))
    if config.task == "lm" and (config.data.path is None) == (not config.data.synthetic):
        raise ElmError("data: give exactly one of data.path (prepared tokens) or data.synthetic: true")
    if config.task == "dpo" and (config.data.path is not None or config.data.synthetic):
        raise ElmError("data.path / data.synthetic: task dpo reads preference pairs from "
                       "data.train and data.valid (JSONL files)")
    if config.model.ref_model is not None and config.task != "dpo":
        raise ElmError(f"model.ref_model: only task dpo has a reference model, not {config.task}")


# Keys a resumed run must share with the checkpoint it continues: they shape the data order,
# the optimizer state or the learning-rate schedule (train.max_steps may grow: a longer run).
# Not the micro-batch or accumulation: a run may resume on another process count.
RESUME_KEYS = ("train.seq_len", "optim.lr", "optim.min_lr_ratio", "optim.warmup_steps",
               "optim.warmup_init_lr", "optim.weight_decay", "optim.betas", "optim.eps",
               "data.seed")


def check_resumable(saved_config: Path, config: Config) -> None:
    """Refuse to resume from a checkpoint written with other settings, naming the first key."""
    saved = load_config(saved_config)
    for key in RESUME_KEYS:
        before, now = _get(saved, key), _get(config, key)
        if before != now:
            raise ElmError(f"{key} is {now!r} but {saved_config.parent} was written with {before!r}; "
                           f"set it back, or start a new run (another checkpoint.dir, or "
                           f"checkpoint.resume=false)")


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
