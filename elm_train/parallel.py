"""Process groups, devices and what is applied to a model from outside: activation
checkpointing, per-block torch.compile, and DDP / FSDP2 / HSDP wrapping.

The same code runs under `torchrun` on GPUs (NCCL) and on CPUs (gloo); on a CPU the device
mesh is built explicitly for "cpu", so a machine that also has GPUs still shards on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from elm_spec import ElmError
from elm_spec.names import SELECTIVE_AC_SAVED_OPS, SHARDED_STRATEGIES
from elm_spec.platform import idle_cores, load_summary


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    # Whether init_distributed created the process group (and so should destroy it).
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_max(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def mean_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return values
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.world_size


def resolve_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ElmError("train.device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def choose_cpu_threads(device_preference: str, configured: int = 0) -> str | None:
    """Set torch's CPU threads per process for a run on the CPU and say how they were chosen:
    CONFIGURED (train.threads) when set, else OMP_NUM_THREADS when set (torch reads it), else
    the cores the load average leaves idle, shared among this node's processes. None off the CPU.

    Commands call this; `train()` itself applies only train.threads, so a program that set
    torch's threads keeps them.
    """
    if resolve_device(device_preference, int(os.environ.get("LOCAL_RANK", "0"))).type != "cpu":
        return None
    if configured:
        torch.set_num_threads(configured)
        why = "train.threads"
    elif "OMP_NUM_THREADS" in os.environ:
        why = "OMP_NUM_THREADS"
    else:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(idle_cores(processes))
        why = f"the cores left idle: {load_summary()}; set train.threads to choose"
    return f"torch threads: {torch.get_num_threads()} per process ({why})"


def init_distributed(device_preference: str) -> DistContext:
    """Join the process group torchrun describes in the environment (or run as one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        owns_group = True
    return DistContext(rank, world_size, local_rank, local_world_size, device, owns_group)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks a model exposes as `layers`: a ModuleList (OpenELM, a ViT) or a list of
    blocks held elsewhere in the model (both towers of CLIP)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, (nn.ModuleList, list, tuple)) or not all(
            isinstance(block, nn.Module) for block in layers):
        raise ElmError(f"{type(model).__name__} exposes no `layers` list of blocks to wrap per block")
    return list(layers)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap each block where the model holds it, so `layers` then yields the wrapped blocks.

    MODE `full` recomputes the whole block in backward; `selective` keeps the outputs of the ops
    named in SELECTIVE_AC_SAVED_OPS (matmuls, attention) and recomputes the cheap rest (norms,
    activations, rotary), as torchtitan's per-op policy; `none` leaves the model as it is.
    """
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as wrap_matching,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    options = {"context_fn": selective_checkpoint_contexts} if mode == "selective" else {}
    blocks = {id(block) for block in transformer_blocks(model)}
    wrap_matching(model, checkpoint_wrapper_fn=lambda block: checkpoint_wrapper(
        block, preserve_rng_state=False, **options), check_fn=lambda module: id(module) in blocks)


def selective_checkpoint_contexts():
    """The forward and recompute contexts of selective checkpointing (one pair per block call)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _selective_saved_ops()

    # The same answer in forward and in recompute: a saved output is then taken from the cache.
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


@functools.cache
def _selective_saved_ops() -> frozenset:
    return frozenset(getattr(torch.ops.aten, name).default for name in SELECTIVE_AC_SAVED_OPS
                     if hasattr(torch.ops.aten, name))


# Graphs one block shape needs: training (grad on, train mode) and evaluation (no_grad, eval mode).
GRAPHS_PER_SHAPE = 2


def block_shape(block: nn.Module) -> tuple:
    """What dynamo specialises a block's graph on: its class and its parameters' shapes and
    dtypes (parameter shapes are static guards, so each distinct shape is its own graph)."""
    return (type(block).__name__, *((name, tuple(p.shape), p.dtype)
                                    for name, p in block.named_parameters()))


def apply_compile(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile each block as one graph; blocks of the same shape share it. Returns the
    number of distinct block shapes (the graphs a training step compiles). BACKEND: dynamo's
    backend (tests and benchmarks count graphs with "eager" or "aot_eager").

    Layer-wise scaling gives every OpenELM block its own shape (16 for 270M, 28 for 1.1B), past
    dynamo's default recompile limit of 8 graphs per code object, after which a block would run
    eagerly; the limit is raised to what the model needs, and a block dynamo still gives up on
    is an error (compile_failures_named), never a silent eager block.
    """
    import torch._dynamo

    blocks = transformer_blocks(model)
    shapes = len({block_shape(block) for block in blocks})
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, GRAPHS_PER_SHAPE * shapes)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit,
                                             GRAPHS_PER_SHAPE * shapes)
    dynamo.fail_on_recompile_limit_hit = True
    for block in blocks:
        block.compile(fullgraph=True, backend=backend)
    return shapes


@contextlib.contextmanager
def compile_failures_named() -> Iterator[None]:
    """Dynamo giving up on a compiled block (past the recompile limit, or a graph break) as one
    train.compile error line instead of a traceback or an eager fallback."""
    try:
        yield
    except Exception as error:
        if type(error).__module__ != "torch._dynamo.exc":
            raise
        from torch._dynamo.exc import FailOnRecompileLimitHit, Unsupported

        if isinstance(error, FailOnRecompileLimitHit):
            import torch._dynamo

            raise ElmError(
                "train.compile: a block needed more graphs than torch._dynamo.config."
                f"recompile_limit ({torch._dynamo.config.recompile_limit}) and would have run "
                "eagerly (TORCH_LOGS=recompiles names the guard); set train.compile=false to "
                "train without compiling") from None
        if isinstance(error, Unsupported):
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ElmError(f"train.compile: a block does not compile as one graph: {reason}; set "
                           "train.compile=false to train without compiling") from None
        raise


def build_mesh(ctx: DistContext, strategy: str, replicate_degree: int | None):
    from torch.distributed.device_mesh import init_device_mesh

    device_type = ctx.device.type
    if strategy != "hsdp":
        return init_device_mesh(device_type, (ctx.world_size,), mesh_dim_names=("shard",))
    replicate = replicate_degree or max(1, ctx.world_size // ctx.local_world_size)
    if ctx.world_size % replicate:
        raise ElmError(f"parallel.replicate_degree {replicate} does not divide the world size "
                       f"{ctx.world_size}")
    return init_device_mesh(device_type, (replicate, ctx.world_size // replicate),
                            mesh_dim_names=("replicate", "shard"))


def cast_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    """The model's floating-point buffers in DTYPE (parameters stay as they are)."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))


def wrap_model(model: nn.Module, ctx: DistContext, strategy: str, param_dtype: torch.dtype,
               replicate_degree: int | None = None,
               reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Move to the device and apply the data-parallel strategy; the model itself is unchanged.
    Under FSDP each block computes with PARAM_DTYPE copies of its float32 parameters and
    reduces gradients in REDUCE_DTYPE (FSDP2's MixedPrecisionPolicy)."""
    if strategy != "none" and ctx.world_size == 1 and not ctx.distributed:
        strategy = "none"
    if strategy == "none":
        if ctx.world_size > 1:
            raise ElmError(f"parallel.strategy is 'none' but {ctx.world_size} processes are running; "
                           "choose ddp, fsdp, fsdp-grad-op or hsdp")
        return model.to(ctx.device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(ctx.device)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = build_mesh(ctx, strategy, replicate_degree)
    mixed = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    reshard = strategy != "fsdp-grad-op"
    model = model.to(ctx.device)
    blocks = transformer_blocks(model)
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them.
        fully_shard(block, mesh=mesh, mp_policy=mixed,
                    reshard_after_forward=reshard and index < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mixed, reshard_after_forward=reshard)
    return model


def wrap_frozen(model: nn.Module, ctx: DistContext, strategy: str, param_dtype: torch.dtype,
                replicate_degree: int | None = None) -> nn.Module:
    """A model only run forward (a reference model): frozen, on the device; under FSDP sharded
    per block like the trained model (each block gathered for its forward and freed after, as
    no backward needs it again); under DDP a full replica, which has nothing to synchronise."""
    model.requires_grad_(False).eval()
    if not uses_fsdp(strategy) or (ctx.world_size == 1 and not ctx.distributed):
        return model.to(ctx.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = build_mesh(ctx, strategy, replicate_degree)
    mixed = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    model = model.to(ctx.device)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mixed, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mixed, reshard_after_forward=True)
    return model


def uses_fsdp(strategy: str) -> bool:
    return strategy in SHARDED_STRATEGIES


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield
