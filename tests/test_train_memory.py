"""Memory and precision options of `elm train`: activation checkpointing modes, float8 wiring,
the OOM snapshot (in-process, fast)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from elm_spec import ElmError, ModelSpec
from elm_spec.names import AC_MODES
from elm_train import parallel
from elm_train.config import load_config
from elm_train.model import OpenELM


class LiveOutputs(TorchDispatchMode):
    """Every op output's storage, held weakly: after the forward, the bytes still alive (and not
    a parameter) are what the graph keeps for backward, whatever mechanism keeps them (autograd's
    saved tensors, the checkpoint's cache of saved outputs, the inputs a recompute needs)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self, exclude: set[int]) -> int:
        return sum(size for pointer, (ref, size) in self.storages.items()
                   if not ref.expired() and pointer not in exclude)


def tiny_model() -> OpenELM:
    spec = ModelSpec.from_preset("elm-tiny")
    torch.manual_seed(0)
    model = OpenELM(spec)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def forward_backward(model: OpenELM, ids: torch.Tensor) -> tuple[float, dict, int]:
    """(loss, gradients, bytes held between forward and backward)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = LiveOutputs()
    with tracker:
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    del logits
    held = tracker.live_bytes(parameters | {loss.untyped_storage().data_ptr()})
    loss.backward()
    # named as in the unwrapped model
    grads = {name.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
             for name, p in model.named_parameters()}
    return loss.item(), grads, held


def test_checkpointing_modes_agree_and_hold_less() -> None:
    reference = tiny_model()
    ids = torch.randint(0, reference.spec.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in AC_MODES:
        model = copy.deepcopy(reference)
        parallel.apply_activation_checkpointing(model, mode)
        results[mode] = forward_backward(model, ids)
    loss, grads, held = results["none"]
    for mode in ("selective", "full"):
        assert results[mode][0] == pytest.approx(loss, rel=1e-6), mode
        for name, grad in grads.items():
            torch.testing.assert_close(results[mode][1][name], grad, rtol=1e-5, atol=1e-6)
    # Full keeps each block's input only; selective also its matmul and attention outputs.
    assert results["full"][2] < results["selective"][2] < held, {m: r[2] for m, r in results.items()}


def test_selective_mode_wraps_every_block_and_keeps_matmuls() -> None:
    model = tiny_model()
    parallel.apply_activation_checkpointing(model, "selective")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    assert all(isinstance(block, CheckpointWrapper) for block in model.layers)
    assert torch.ops.aten.mm.default in parallel._selective_saved_ops()


@pytest.mark.parametrize(("value", "mode"), [(True, "full"), (False, "none"),
                                             ("selective", "selective"), ("full", "full")])
def test_activation_checkpointing_reads_old_booleans(value, mode) -> None:
    config = load_config(data={"model": {"preset": "elm-tiny"}, "data": {"synthetic": True},
                               "train": {"activation_checkpointing": value}})
    assert config.train.activation_checkpointing == mode
    overridden = load_config(data={"model": {"preset": "elm-tiny"}, "data": {"synthetic": True}},
                             overrides=[f"train.activation_checkpointing={str(value).lower()}"])
    assert overridden.train.activation_checkpointing == mode


def test_unknown_checkpointing_mode_is_named() -> None:
    with pytest.raises(ElmError, match=r"train.activation_checkpointing: 'some' is not one of "
                                       r"none, selective, full"):
        load_config(data={"model": {"preset": "elm-tiny"}, "data": {"synthetic": True}},
                    overrides=["train.activation_checkpointing=some"])


# ----- float8 ---------------------------------------------------------------------------------
def test_float8_on_the_cpu_is_refused_before_anything_is_built(tmp_path) -> None:
    from elm_train.trainer import train

    config = load_config(data={"model": {"preset": "elm-tiny"}, "data": {"synthetic": True},
                               "train": {"float8": "rowwise", "device": "cpu", "dtype": "float32"},
                               "log": {"run_dir": str(tmp_path / "run")}})
    with pytest.raises(ElmError) as raised:
        train(config)
    assert str(raised.value) == (
        "train.float8: 'rowwise' needs a CUDA GPU of compute capability 8.9 or newer (Ada, "
        "Hopper, Blackwell); this run is on the CPU; set train.float8=none")
    assert not (tmp_path / "run").exists()


def test_float8_on_an_older_gpu_or_without_torchao_is_refused(monkeypatch) -> None:
    import sys

    from elm_train.float8 import check_float8

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ElmError, match=r"^train.float8: NVIDIA A100-SXM4-80GB has compute "
                                       r"capability 8.0; float8 matmuls need 8.9 or newer"):
        check_float8("tensorwise", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ElmError, match=r"^train.float8: needs the torchao package"):
        check_float8("tensorwise", cuda)
    check_float8("none", torch.device("cpu"))  # off: nothing is checked


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_swaps_the_block_linears_and_keeps_the_weights(recipe: str) -> None:
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from elm_train.float8 import convert_to_float8

    reference = tiny_model()
    model = copy.deepcopy(reference)
    assert convert_to_float8(model, recipe) == 4 * len(model.layers)  # qkv, out, proj_1, proj_2
    for block in model.layers:
        assert {type(m) for m in block.modules() if isinstance(m, torch.nn.Linear)} == {Float8Linear}
    assert not isinstance(model.transformer.token_embeddings, Float8Linear)
    before, after = reference.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # torch runs float8 matmuls on this CPU too: each layer computes its Linear to float8
    # precision (e4m3 keeps 3 mantissa bits: a few percent per product).
    x = torch.randn(2, 8, model.spec.model_dim, generator=torch.Generator().manual_seed(2))
    for layer in (model.layers[0].attn.qkv_proj, model.layers[-1].ffn.proj_1):
        exact = F.linear(x, layer.weight)
        assert 0 < (layer(x) - exact).norm() / exact.norm() < 0.08
    ids = torch.randint(0, model.spec.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    model(ids).float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


# ----- memory snapshot on out-of-memory ------------------------------------------------------
@pytest.mark.parametrize(("device", "enabled", "dumped"), [
    ("cuda", True, True), ("cuda", False, False), ("cpu", True, False)])
def test_out_of_memory_dumps_the_allocator_history_on_a_gpu(monkeypatch, tmp_path, capsys,
                                                            device, enabled, dumped) -> None:
    """The allocator calls are stubbed (no GPU here); the path from the OOM to the file is real."""
    import inspect
    import json

    from elm_spec.names import OOM_EXIT_CODE
    from elm_train import trainer
    from elm_train.memory_snapshot import RECORD_OPTIONS

    # The stubs stand for these functions of torch: what is passed to them must fit them.
    inspect.signature(torch.cuda.memory._record_memory_history).bind(**RECORD_OPTIONS)
    inspect.signature(torch.cuda.memory._record_memory_history).bind(enabled=None)
    inspect.signature(torch.cuda.memory._dump_snapshot).bind("file.pickle")
    history: list = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **options: history.append(enabled))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot",
                        lambda filename: Path(filename).write_bytes(b"allocator history"))
    monkeypatch.setattr(parallel, "init_distributed", lambda preference: parallel.DistContext(
        0, 1, 0, 1, torch.device(device, 0) if device == "cuda" else torch.device(device)))

    def out_of_memory(config, ctx):
        assert history == (["all"] if dumped else [])  # recording from before the model exists
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer, "_train", out_of_memory)
    run_dir = tmp_path / "run"
    config = load_config(data={"model": {"preset": "elm-tiny"}, "data": {"synthetic": True},
                               "log": {"run_dir": str(run_dir), "oom_snapshot": enabled}})
    with pytest.raises(SystemExit) as exited:
        trainer.train(config)
    assert exited.value.code == OOM_EXIT_CODE
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1] == "error: out of memory: CUDA out of memory. Tried to allocate 20.00 GiB"
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "oom"
    snapshot = run_dir / "memory-snapshot-rank-00000.pickle"
    if dumped:
        assert snapshot.read_bytes() == b"allocator history"
        assert record["memory_snapshot"] == str(snapshot)
        assert stderr[-2] == f"memory snapshot: {snapshot} (open it in https://pytorch.org/memory_viz)"
        assert history == ["all", None]  # stopped after the dump
    else:
        assert "memory_snapshot" not in record and history == []
    assert sorted(p.name for p in run_dir.iterdir()) == (
        ["memory-snapshot-rank-00000.pickle", "metrics.jsonl"] if dumped else ["metrics.jsonl"])


# ----- FSDP mixed precision settings (the gloo test: test_train_precision.py) -----------------
def test_corenets_fsdp_recipe_keeps_buffers_in_bf16_and_reduces_in_fp32() -> None:
    config = load_config(data={"recipe": "openelm-3b", "data": {"synthetic": True}})
    assert (config.parallel.strategy, config.parallel.buffer_dtype,
            config.parallel.reduce_dtype) == ("fsdp", "bfloat16", "float32")
    small = load_config(data={"recipe": "openelm-270m", "data": {"synthetic": True}})
    assert (small.parallel.buffer_dtype, small.parallel.reduce_dtype) == ("float32", "float32")


def test_a_bf16_reduction_outside_fsdp_is_refused() -> None:
    with pytest.raises(ElmError, match=r"^config: parallel.reduce_dtype: .bfloat16. applies to fsdp, "
                                       r"fsdp-grad-op, hsdp; ddp reduces"):
        load_config(data={"model": {"preset": "elm-tiny"}, "data": {"synthetic": True},
                          "parallel": {"strategy": "ddp", "reduce_dtype": "bfloat16"}})


def test_cast_buffers_leaves_parameters_alone() -> None:
    model = tiny_model()
    parallel.cast_buffers(model, torch.bfloat16)
    assert model.transformer.rope.cos.dtype == model.transformer.rope.sin.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "transformer.rope.cos" not in model.state_dict()  # still not saved in checkpoints
