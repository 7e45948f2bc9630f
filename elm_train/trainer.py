"""The training loop: one process or many under torchrun, any task, exact resume.

Read top to bottom: set up processes and the task, build and wrap the model, build AdamW and
the cosine schedule, resume from the newest checkpoint, then step until max_steps, logging,
checkpointing and stopping cleanly on SIGTERM/SIGUSR1 (preemption).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elm_spec import ElmError
from elm_spec.errors import first_line
from elm_spec.names import OOM_EXIT_CODE
from elm_spec.writes import writing
from elm_train import float8, memory_snapshot, parallel
from elm_train.batch_plan import plan_batch
from elm_train.checkpoint import CONFIG_COPY, Checkpointer, checkpoint_lock
from elm_train.config import Config, OptimConfig, TrainSection, check_resumable, dump_config
from elm_train.metrics import MetricsLog, mfu, peak_flops, peak_memory_bytes
from elm_train.modeldir import torch_dtype
from elm_train.tasks import task_class
from elm_train.tasks.base import Task


@dataclass
class TrainResult:
    step: int
    loss: float | None
    valid_loss: float | None
    run_dir: Path
    checkpoint: Path | None
    stopped_by_signal: bool


def lr_multiplier(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warm-up from warmup_init_lr, then cosine down to min_lr_ratio * lr (CoreNet's schedule).

    STEP counts optimizer steps already taken; the lr of step k+1 is lr_multiplier(k) * lr.
    """
    if optim.lr == 0:
        return 0.0
    if step < optim.warmup_steps:
        start = optim.warmup_init_lr / optim.lr
        return start + (1.0 - start) * step / optim.warmup_steps
    decay_steps = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    floor = optim.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """CoreNet's rule (`no_decay_bn_filter_bias`): 1-D parameters (norm weights, biases) get no
    weight decay; matrices, the embedding included, do."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    implementation = optim.implementation
    if implementation == "auto":
        # One pass over parameter, gradient and both moments, on GPUs and CPUs alike (the CPU
        # profile of a 270M step spent 8% in foreach AdamW's separate elementwise passes).
        implementation = "fused"
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True},
             "for-loop": {"foreach": False}}[implementation]
    return torch.optim.AdamW(parameter_groups(model, optim.weight_decay), lr=optim.lr,
                             betas=tuple(optim.betas), eps=optim.eps, **flags)


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves, and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(config: Config) -> TrainResult:
    ctx = parallel.init_distributed(config.train.device)
    recording = config.log.oom_snapshot and memory_snapshot.start_recording(ctx.device)
    try:
        with checkpoint_lock(config.checkpoint.dir, ctx), parallel.compile_failures_named():
            return _train(config, ctx)
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        message = first_line(error, fallback="MemoryError")
        record = {"event": "oom", "message": message, "world_size": ctx.world_size}
        if recording:
            recording = False
            record["memory_snapshot"] = str(memory_snapshot.dump(config.log.run_dir, ctx.rank))
        oom_log = MetricsLog(config.log.run_dir, ctx.is_main)
        oom_log.write(record)
        oom_log.close()
        if "memory_snapshot" in record:
            print(f"memory snapshot: {record['memory_snapshot']} (open it in "
                  "https://pytorch.org/memory_viz)", file=sys.stderr, flush=True)
        print(f"error: out of memory: {message}", file=sys.stderr, flush=True)
        sys.exit(OOM_EXIT_CODE)
    finally:
        if recording:
            memory_snapshot.stop_recording()
        parallel.shutdown_distributed(ctx)


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (GPU), MemoryError, or the CPU allocator's failure."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def _train(config: Config, ctx: parallel.DistContext) -> TrainResult:
    tc = config.train
    float8.check_float8(tc.float8, ctx.device)
    if tc.threads and ctx.device.type == "cpu":
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    task = task_class(config.task)(config)
    tc = _apply_batch_plan(tc, task, ctx)
    dtype = torch_dtype(tc.dtype)
    strategy = config.parallel.strategy

    model = task.build_model()
    if tc.float8 != "none":
        float8.convert_to_float8(model, tc.float8)
    parallel.apply_activation_checkpointing(model, tc.activation_checkpointing)
    if tc.compile:
        shapes = parallel.apply_compile(model)
        if ctx.is_main:
            print(f"compile: {len(parallel.transformer_blocks(model))} blocks of {shapes} distinct "
                  f"shapes; the first step compiles {shapes} graphs", flush=True)
    parallel.cast_buffers(model, torch_dtype(config.parallel.buffer_dtype))
    model = parallel.wrap_model(model, ctx, strategy, dtype, config.parallel.replicate_degree,
                                torch_dtype(config.parallel.reduce_dtype))
    task.setup(lambda frozen: parallel.wrap_frozen(frozen, ctx, strategy, dtype,
                                                   config.parallel.replicate_degree))
    autocast = (torch.autocast(ctx.device.type, dtype=dtype)
                if dtype != torch.float32 and not parallel.uses_fsdp(strategy)
                else contextlib.nullcontext())

    optimizer = build_optimizer(model, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, config.optim, tc.max_steps))
    loader = task.build_loader("train", ctx.rank, ctx.world_size)

    run_dir = Path(config.log.run_dir)
    _require_directory(run_dir, "log.run_dir")
    checkpointer = None
    if config.checkpoint.dir:
        _require_directory(Path(config.checkpoint.dir), "checkpoint.dir")
        async_save = config.checkpoint.async_save
        checkpointer = Checkpointer(config.checkpoint.dir, ctx, config.checkpoint.keep,
                                    ctx.device.type == "cuda" if async_save is None else async_save)
    start_step = 0
    if checkpointer is not None and not config.checkpoint.resume:
        checkpointer.refuse_earlier_run()
    elif checkpointer is not None:
        newest = checkpointer.latest()
        if newest is not None and (newest / CONFIG_COPY).is_file():
            check_resumable(newest / CONFIG_COPY, config)
        resumed = checkpointer.resume(model, optimizer, scheduler, loader)
        if resumed is not None:
            start_step, latest = resumed
            if ctx.is_main:
                print(f"resumed from {latest} (step {start_step})", flush=True)

    config_text = dump_config(config)
    with writing(run_dir):
        log = MetricsLog(run_dir, ctx.is_main, config.log.tensorboard, resume_step=start_step)
        if ctx.is_main:
            (run_dir / "train_config.yaml").write_text(config_text)
    # float8 runs are measured against the GPU's float8 peak.
    peak = peak_flops(ctx.device, dtype, config.log.peak_flops,
                      precision="bf16" if tc.float8 == "none" else "fp8", warn=ctx.is_main)
    flops_per_item = task.flops_per_item()
    token_task = task.item_name == "tokens"

    step = start_step
    last_loss: float | None = None
    last_saved: Path | None = checkpointer.newest if checkpointer else None
    stopped = False
    progress = _Progress(ctx.is_main and config.log.progress, start_step, tc.max_steps)
    # Throughput is measured over the window since the last logged step: the host never waits
    # for the device in between, so only a synchronised window end gives a true time.
    window = _Window(step)
    model.train()
    try:
        with StopRequest() as stop, progress:
            while step < tc.max_steps:
                parts_sum: dict[str, torch.Tensor] = {}
                for micro in range(tc.grad_accum_steps):
                    batch = {k: _to_device(v, ctx.device) for k, v in next(loader).items()}
                    last_micro = micro == tc.grad_accum_steps - 1
                    with parallel.gradient_sync(model, last_micro), autocast:
                        loss, parts = task.loss(model, batch)
                    (loss / tc.grad_accum_steps).backward()
                    window.items += task.items_in(batch)
                    for name, value in parts.items():
                        value = torch.as_tensor(value, dtype=torch.float32, device=ctx.device)
                        parts_sum[name] = parts_sum.get(name, 0) + value.detach() / tc.grad_accum_steps
                max_norm = config.optim.grad_clip or math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                # Everything below that reads a device value or talks to other ranks runs on
                # log, save and eval steps only, so the host runs ahead of the device between.
                should_save = checkpointer is not None and (
                    (config.checkpoint.every and step % config.checkpoint.every == 0)
                    or step == tc.max_steps)
                should_log = step % config.log.every == 0 or should_save or step == tc.max_steps
                should_eval = bool(tc.eval_every) and step % tc.eval_every == 0
                if not (should_log or should_eval):
                    continue
                stop_now = ctx.all_reduce_max(float(stop.signal is not None)) > 0
                record: dict[str, Any] = {}
                if should_log or stop_now:
                    record = _step_record(step, parts_sum, grad_norm, lr, window.close(ctx), ctx,
                                          flops_per_item, peak, token_task)
                    last_loss = record.get("loss")
                    if checkpointer is not None:  # the asynchronous save, once written
                        with writing(checkpointer.root):
                            last_saved = checkpointer.poll()
                    if not all(math.isfinite(record[n]) for n in parts_sum):
                        if checkpointer is not None:
                            with writing(checkpointer.root):
                                last_saved = checkpointer.finish()
                        raise ElmError(
                            f"step {step}: loss is {last_loss} (not finite); stopped. Last checkpoint: "
                            f"{last_saved or 'none'}. Lower optim.lr or check the data")
                if should_eval:
                    window.pause(ctx)
                    valid = evaluate(task, model, ctx, tc.eval_batches, autocast)
                    if record:
                        record.update(valid)
                    else:
                        log.write({"event": "eval", "step": step, **valid})
                if record:
                    log.write(record)
                    progress.update(step, record)
                if should_save or (stop_now and checkpointer is not None):
                    with writing(checkpointer.root):
                        last_saved = checkpointer.save(step, model, optimizer, scheduler, loader,
                                                       config_text, task)
                        if stop_now or step == tc.max_steps:
                            last_saved = checkpointer.finish()
                if record:
                    window.restart(step)
                else:
                    window.resume()
                if stop_now:
                    stopped = True
                    if ctx.is_main:
                        print(f"stopped by signal at step {step}; checkpoint: {last_saved}",
                              flush=True)
                    break
    except BaseException:
        if checkpointer is not None:
            checkpointer.close(failed=True)
        raise
    finally:
        log.close()
    if checkpointer is not None:
        with writing(checkpointer.root):
            checkpointer.close()
    valid: dict[str, float | None] = {"valid_loss": None}
    if not stopped and tc.eval_batches and task.has_split("valid"):
        valid = evaluate(task, model, ctx, tc.eval_batches, autocast)
    valid_loss = valid["valid_loss"]
    log = MetricsLog(run_dir, ctx.is_main)
    log.write({"event": "end", "step": step, "loss": last_loss, **valid,
               "checkpoint": str(last_saved) if last_saved else None,
               "stopped_by_signal": stopped, "world_size": ctx.world_size,
               "peak_memory_bytes": peak_memory_bytes(ctx.device)})
    log.close()
    return TrainResult(step, last_loss, valid_loss, run_dir, last_saved, stopped)


def _apply_batch_plan(tc: TrainSection, task: Task, ctx: parallel.DistContext) -> TrainSection:
    """TC with the accumulation of the batch plan, which rank 0 prints (a missed target warns)."""
    if task.item_name != "tokens" or not task.full_rows:
        if tc.global_batch_tokens:
            counted = (f"counts {task.item_name}, not tokens" if task.item_name != "tokens" else
                       f"batches {tc.micro_batch_size} items that are not rows of seq_len tokens")
            raise ElmError(f"train.global_batch_tokens: task {task.config.task} {counted}; "
                           "give train.grad_accum_steps (train.global_batch_tokens=0)")
        return tc
    plan = plan_batch(ctx.world_size, tc.micro_batch_size, tc.seq_len, tc.grad_accum_steps,
                      tc.global_batch_tokens)
    if ctx.is_main:
        print(plan.line(), flush=True)
        if plan.warning():
            print(f"warning: {plan.warning()}", file=sys.stderr, flush=True)
    return dataclasses.replace(tc, grad_accum_steps=plan.accumulation)


def _require_directory(path: Path, key: str) -> None:
    if path.exists() and not path.is_dir():
        raise ElmError(f"{key}: {path} is a file, not a directory")


class _Window:
    """Items and wall time since the last logged step (evaluation and checkpoints excluded)."""

    def __init__(self, step: int) -> None:
        self.restart(step)

    def restart(self, step: int) -> None:
        self.first_step = step
        self.items = 0
        self.started = time.perf_counter()
        self.paused = self.started

    def close(self, ctx: parallel.DistContext) -> tuple[int, float, int]:
        """(items, seconds, first step) of the window, after waiting for the device to finish it."""
        _synchronize(ctx.device)
        return self.items, time.perf_counter() - self.started, self.first_step

    def pause(self, ctx: parallel.DistContext) -> None:
        """Stop the clock once the device has caught up (before an evaluation)."""
        _synchronize(ctx.device)
        self.paused = time.perf_counter()

    def resume(self) -> None:
        self.started += time.perf_counter() - self.paused


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # A copy from pinned memory is asynchronous; from pageable memory it blocks the host.
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _step_record(step: int, parts_sum: dict[str, torch.Tensor], grad_norm: torch.Tensor,
                 lr: float, window: tuple[int, float, int], ctx: parallel.DistContext,
                 flops_per_item: float, peak: float | None, token_task: bool) -> dict[str, Any]:
    """The metrics line of a logged step (the one place the loop reads device values)."""
    items, elapsed, first_step = window
    names = sorted(parts_sum)
    values = ctx.mean_across_ranks(torch.stack([parts_sum[n] for n in names]))
    reduced = dict(zip(names, values.tolist(), strict=True))
    items_per_s_device = items / elapsed
    record = {"step": step, **reduced, "grad_norm": _as_float(grad_norm), "lr": lr,
              "tokens_per_s": items_per_s_device * ctx.world_size if token_task else None,
              "tokens_per_s_per_device": items_per_s_device if token_task else None,
              "step_time_s": elapsed / (step - first_step),
              "steps_timed": step - first_step,
              "mfu": mfu(flops_per_item, items_per_s_device, peak),
              "peak_memory_bytes": peak_memory_bytes(ctx.device),
              "world_size": ctx.world_size}
    if not token_task:
        record["items_per_s"] = items_per_s_device * ctx.world_size
    return record


def _as_float(value: torch.Tensor) -> float:
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, ctx: parallel.DistContext, batches: int,
             autocast: Any) -> dict[str, float]:
    """{"valid_<name>": mean} of the task's valid_metrics over the first BATCHES batches of the
    held-out split (the same on every rank)."""
    loader = task.build_loader("valid", ctx.rank, ctx.world_size)
    limit = min(batches, loader.batches_per_epoch)
    model.eval()
    total = torch.zeros(len(task.valid_metrics), device=ctx.device)
    for _ in range(limit):
        batch = {k: v.to(ctx.device) for k, v in next(loader).items()}
        with autocast:
            _, parts = task.loss(model, batch)
        total += torch.stack([torch.as_tensor(parts[name], dtype=torch.float32, device=ctx.device)
                              for name in task.valid_metrics])
    model.train()
    means = ctx.mean_across_ranks(total / limit).tolist()
    return {f"valid_{name}": mean for name, mean in zip(task.valid_metrics, means, strict=True)}


class _Progress:
    """A rich progress bar with ETA on rank 0; plain lines with the ETA when output is not a
    terminal (a log, a pipe); a warning when throughput collapses."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.enabled = enabled
        self.total = total
        self.start = start
        self.started = time.perf_counter()
        self.watch = ThroughputWatch()
        self.bar = None
        if not enabled:
            return
        from elm_spec.progress import make_console

        console = make_console(stderr=True)
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            # The status goes last: on a narrow terminal rich cuts the rightmost column.
            self.bar = Progress(TextColumn("train"), BarColumn(bar_width=20), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                TextColumn("{task.fields[status]}"), console=console)
            self.task_id = self.bar.add_task("train", total=total, completed=start, status="")

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        status = f"loss {record.get('loss', math.nan):.4f} lr {record['lr']:.2e}"
        if record.get("tokens_per_s"):
            status += f" {record['tokens_per_s']:,.0f} tok/s"
        if record.get("mfu") is not None:
            status += f" mfu {100 * record['mfu']:.1f}%"
        warning = self.watch.check(record.get("tokens_per_s") or record.get("items_per_s"))
        if warning:
            print(f"warning: step {step}: {warning}", file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.update(self.task_id, completed=step, status=status)
        else:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / (step - self.start) * (self.total - step) if step > self.start else 0.0
            print(f"step {step}/{self.total} {status} elapsed {_clock(elapsed)} eta {_clock(eta)}",
                  flush=True)


def _clock(seconds: float) -> str:
    """H:MM:SS, as rich's time columns show it."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class ThroughputWatch:
    """Says when throughput falls below 1/COLLAPSE of the best window so far (once, until it
    recovers): on a CPU that other jobs share, torch's threads then wait on each other."""

    COLLAPSE = 3.0

    def __init__(self) -> None:
        self.best = 0.0
        self.collapsed = False

    def check(self, rate: float | None) -> str | None:
        if not rate:
            return None
        if rate > self.best:
            self.best = rate
        if rate * self.COLLAPSE >= self.best:
            self.collapsed = False
            return None
        if self.collapsed:
            return None
        self.collapsed = True
        from elm_spec.platform import load_summary

        busy = f" ({load_summary()})" if load_summary() else ""
        advice = (f"; fewer torch threads than {torch.get_num_threads()} help (train.threads=1, "
                  "elm demo --threads 1)" if torch.get_num_threads() > 1 else "")
        return (f"throughput fell to {rate:,.0f}/s from {self.best:,.0f}/s{busy}: other jobs "
                f"may be using the cores{advice}")
