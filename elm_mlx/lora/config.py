"""The settings of a fine-tuning run: defaults, a YAML file that mirrors the flags, validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elm_spec import ElmError
from elm_spec.settings import build_dataclass, read_yaml_mapping

FINE_TUNE_TYPES = ("lora", "dora", "full")
LR_SCHEDULES = ("cosine", "constant")
# Every linear layer of an OpenELM block, by the module path mlx-lm's `keys` use.
LAYER_KEYS = {"qkv_proj": "attn.qkv_proj", "out_proj": "attn.out_proj",
              "proj_1": "ffn.proj_1", "proj_2": "ffn.proj_2"}


@dataclass
class FinetuneConfig:
    model: str | None = None
    data: str | None = None
    adapter_path: str = "adapters"
    fine_tune_type: str = "lora"
    rank: int = 8
    alpha: float | None = None  # scale = alpha / rank; mlx-lm's `scale` is accepted instead
    scale: float = 20.0
    dropout: float = 0.0
    keys: list[str] = field(default_factory=lambda: list(LAYER_KEYS.values()))
    num_layers: int = -1  # -1 or more than the model has: every block
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    lr_schedule: str = "cosine"
    warmup: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    val_batches: int = 25
    test: bool = False
    test_batches: int = 500
    max_seq_length: int | None = None  # None: the model's context (max_context_length)
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    clear_cache_threshold: int = 0  # bytes of MLX buffer cache kept between steps
    seed: int = 0
    mask_prompt: bool = True
    pack: bool | None = None  # None: on for text data, off for completions and chat
    chat_template: str | None = None
    resume: bool = False
    # Preference tuning (elm_mlx.lora.preference): the data are prompt/chosen/rejected pairs.
    dpo: bool = False
    orpo: bool = False
    beta: float = 0.1
    label_smoothing: float = 0.0
    ipo: bool = False
    ref_model: str | None = None  # None: the base model itself, with the adapters disabled
    cache_ref_logps: bool = False

    @property
    def objective(self) -> str:
        """sft, dpo, ipo or orpo."""
        if self.orpo:
            return "orpo"
        if self.dpo:
            return "ipo" if self.ipo else "dpo"
        return "sft"

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else self.scale

    def lora_parameters(self) -> dict[str, Any]:
        return {"rank": self.rank, "scale": self.lora_scale, "dropout": self.dropout,
                "keys": list(self.keys)}

    def validate(self) -> FinetuneConfig:
        if not self.model:
            raise ElmError("--model is required")
        if not self.data:
            raise ElmError("--data is required")
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ElmError(f"--fine-tune-type {self.fine_tune_type!r}: choose from "
                           f"{', '.join(FINE_TUNE_TYPES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ElmError(f"--lr-schedule {self.lr_schedule!r}: choose from {', '.join(LR_SCHEDULES)}")
        for name in ("rank", "iters", "batch_size", "steps_per_report", "steps_per_eval",
                     "save_every", "max_seq_length", "grad_accumulation_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ElmError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("learning_rate", "weight_decay", "dropout", "scale", "alpha"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ElmError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        for name in ("learning_rate", "weight_decay", "warmup", "clear_cache_threshold"):
            if getattr(self, name) < 0:
                raise ElmError(f"--{name.replace('_', '-')} must not be negative, "
                               f"got {getattr(self, name)}")
        for name in ("num_layers", "val_batches", "test_batches"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise ElmError(f"--{name.replace('_', '-')} must be -1 (all) or at least 1, "
                               f"got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ElmError("--dropout must be in [0, 1)")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise ElmError("--max-seq-length must be at least 2")
        if self.save_every % self.grad_accumulation_steps:
            raise ElmError("--save-every must be a multiple of --grad-accumulation-steps "
                           "(checkpoints are taken between optimizer updates)")
        self.keys = [normalize_key(key) for key in self.keys]
        self._validate_preference()
        return self

    def _validate_preference(self) -> None:
        if self.dpo and self.orpo:
            raise ElmError("--dpo and --orpo exclude each other: choose one objective")
        if not self.dpo:
            for name in ("ipo", "cache_ref_logps", "ref_model"):
                if getattr(self, name):
                    what = "--orpo uses no reference model" if self.orpo else "it needs --dpo"
                    raise ElmError(f"--{name.replace('_', '-')}: {what}")
            if self.label_smoothing:
                raise ElmError("--label-smoothing needs --dpo")
        if not (self.dpo or self.orpo):
            return
        if not math.isfinite(self.beta) or self.beta <= 0:
            raise ElmError(f"--beta must be a positive number, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ElmError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.ipo and self.label_smoothing:
            raise ElmError("--label-smoothing applies to the sigmoid loss, not to --ipo")
        if self.pack:
            raise ElmError("--pack does not apply to preference pairs (each answer is one row)")
        if not self.mask_prompt:
            raise ElmError("--no-mask-prompt does not apply to --dpo or --orpo: only the "
                           "answers are scored")


def normalize_key(key: str) -> str:
    """`qkv_proj` or `attn.qkv_proj` -> `attn.qkv_proj`."""
    if key in LAYER_KEYS:
        return LAYER_KEYS[key]
    if key in LAYER_KEYS.values():
        return key
    raise ElmError(f"--keys: unknown layer {key!r}; choose from {', '.join(LAYER_KEYS)}")


FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)}


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a YAML file whose keys mirror the flags (dashes or underscores); mlx-lm's
    `lora_parameters: {rank, scale, dropout, keys}` block is accepted too. Values are coerced
    to each setting's type here, so that a bad one is named with its file."""
    settings: dict[str, Any] = {}
    for raw_key, value in read_yaml_mapping(path).items():
        key = str(raw_key).replace("-", "_")
        if key == "lora_parameters" and isinstance(value, dict):
            for inner_key, inner_value in value.items():
                if inner_key not in ("rank", "scale", "alpha", "dropout", "keys"):
                    raise ElmError(f"{path}: unknown key lora_parameters.{inner_key}")
                settings[inner_key] = inner_value
            continue
        if key not in FIELDS:
            raise ElmError(f"{path}: unknown key {raw_key!r}")
        settings[key] = value
    try:
        checked = build_dataclass(FinetuneConfig, _split_keys(settings))
    except ElmError as error:
        raise ElmError(f"{path}: {error}") from None
    return {key: getattr(checked, key) for key in settings}


def _split_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """`keys: "qkv_proj, out_proj"` (as a flag gives it) -> a list."""
    if isinstance(settings.get("keys"), str):
        settings["keys"] = [k.strip() for k in settings["keys"].split(",") if k.strip()]
    return settings


def build_config(config_file: Path | None, flags: dict[str, Any]) -> FinetuneConfig:
    """Defaults, then the config file, then the flags given on the command line (not None)."""
    settings = read_config_file(config_file) if config_file is not None else {}
    given = _split_keys({key: value for key, value in flags.items() if value is not None})
    # Flags arrive typed (typer); validate() names them as flags.
    return dataclasses.replace(build_dataclass(FinetuneConfig, settings), **given).validate()
