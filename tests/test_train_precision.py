"""FSDP2 mixed precision (CoreNet's recipe): blocks compute with bf16 copies of the fp32
parameters and buffers, gradients are reduced in fp32 (or, when asked, bf16). Two gloo
processes; the gradients are checked against each rank's own bf16 gradients averaged in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.training import run_under_torchrun

pytestmark = pytest.mark.slow  # subprocesses

DRIVER = """
import json
import torch
import torch.distributed as dist
import torch.nn.functional as F
from elm_spec import ModelSpec
from elm_train import parallel
from elm_train.config import load_config
from elm_train.model import OpenELM
from elm_train.modeldir import torch_dtype

dist.init_process_group("gloo")
ctx = parallel.init_distributed("cpu")
rank = dist.get_rank()
spec = ModelSpec.from_preset("elm-tiny")

def build():
    model = OpenELM(spec)
    model.init_weights(torch.Generator().manual_seed(0))
    return model

ids = torch.randint(0, spec.vocab_size, (2, 17), generator=torch.Generator().manual_seed(10 + rank))

def backward(model):
    logits = model(ids[:, :-1]).float()
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()

plain = build().to(torch.bfloat16)
backward(plain)
expected = {}
for name, p in plain.named_parameters():
    mine = p.grad.float()
    both = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(both, mine)
    expected[name] = (both[0] + both[1]) / 2
report = {}
for reduce in ("float32", "bfloat16"):
    config = load_config(data={
        "model": {"preset": "elm-tiny"}, "data": {"synthetic": True}, "train": {"dtype": "bfloat16"},
        "parallel": {"strategy": "fsdp", "reduce_dtype": reduce, "buffer_dtype": "bfloat16"}})
    model = build()
    parallel.cast_buffers(model, torch_dtype(config.parallel.buffer_dtype))
    model = parallel.wrap_model(model, ctx, "fsdp", torch_dtype(config.train.dtype), None,
                                torch_dtype(config.parallel.reduce_dtype))
    seen = set()
    model.layers[0].attn.qkv_proj.register_forward_pre_hook(
        lambda m, args: seen.add((str(m.weight.dtype), str(args[0].dtype))))
    backward(model)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    report[reduce] = {
        "forward": sorted(seen), "rope": str(model.transformer.rope.cos.dtype),
        "params": sorted({str(p.dtype) for p in model.parameters()}),
        "grads": sorted({str(p.grad.dtype) for p in model.parameters()}),
        "equal": sorted(n for n in expected if torch.equal(grads[n], expected[n])) == sorted(expected),
        "max": max(float((grads[n] - expected[n]).abs().max()) for n in expected)}
if rank == 0:
    open(REPORT, "w").write(json.dumps(report))
dist.destroy_process_group()
"""


def test_fsdp_computes_in_bf16_and_reduces_in_the_configured_dtype(tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    result = run_under_torchrun(f"REPORT = {str(report_file)!r}\n" + DRIVER, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    for reduce in ("float32", "bfloat16"):
        observed = report[reduce]
        # the layer's weight and input in forward; the rotary tables; what the optimizer steps
        assert observed["forward"] == [["torch.bfloat16", "torch.bfloat16"]], reduce
        assert observed["rope"] == "torch.bfloat16", reduce
        assert observed["params"] == observed["grads"] == ["torch.float32"], reduce
    # fp32 reduction: exactly the fp32 mean of the ranks' bf16 gradients; bf16 rounds it.
    assert report["float32"]["equal"] and report["float32"]["max"] == 0.0
    assert not report["bfloat16"]["equal"] and 0 < report["bfloat16"]["max"] < 1e-2
