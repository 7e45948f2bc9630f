"""train.compile on a layer-wise model: every block compiled, one graph per distinct block shape,
the compiled loss equal to the eager one, and a block dynamo gives up on is one error line.

Dynamo's graphs are counted with its aot_eager backend (the same capture and autograd split as
inductor, without inductor's kernel compilation, minutes on a shared CPU);
benchmarks/bench_compile.py times inductor itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from elm_spec import ElmError, ModelSpec
from elm_train import parallel
from elm_train.model import OpenELM
from elm_train.tasks.lm import language_model_loss

# Ten layer-wise blocks with five distinct shapes (more blocks than dynamo's default limit of
# eight graphs per code object; repeated shapes must share a graph).
SPEC = ModelSpec.from_preset("elm-tiny", num_transformer_layers=10, ffn_dim_divisor=64)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A clean dynamo cache and counters; the config apply_compile raises is restored after."""
    import torch._dynamo

    config = torch._dynamo.config
    saved = {key: getattr(config, key) for key in
             ("recompile_limit", "accumulated_recompile_limit", "fail_on_recompile_limit_hit")}
    torch._dynamo.reset()
    counters.clear()
    with config.patch(saved):
        yield
    torch._dynamo.reset()


def distinct_shapes(spec: ModelSpec) -> int:
    return len({(spec.num_query_heads[i], spec.num_kv_heads[i], spec.ffn_dims[i])
                for i in range(spec.num_transformer_layers)})


def training_losses(model: OpenELM, batches: list[torch.Tensor]) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    result = []
    for tokens in batches:
        loss, _ = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:], 1e-4)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        result.append(loss.item())
    return result


@pytest.mark.slow
def test_every_block_compiles_once_per_distinct_shape_and_matches_eager() -> None:
    shapes = distinct_shapes(SPEC)
    assert 1 < shapes < SPEC.num_transformer_layers
    torch.manual_seed(0)
    eager = OpenELM(SPEC)
    compiled = copy.deepcopy(eager)
    assert parallel.apply_compile(compiled, backend="aot_eager") == shapes
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, SPEC.vocab_size, (2, 33), generator=generator) for _ in range(3)]

    with parallel.compile_failures_named():
        compiled_losses = training_losses(compiled, batches)
    assert counters["stats"]["unique_graphs"] == shapes
    assert not counters["unimplemented"]  # nothing dynamo gave up on
    # Each block ran its compiled graph: the eager model's graphs are none, and both give the
    # same losses (fp32) after optimizer steps.
    assert compiled_losses == pytest.approx(training_losses(eager, batches), rel=1e-5)

    # Evaluation (no_grad, eval mode) adds one graph per shape, within the raised limit.
    compiled.eval()
    with torch.no_grad(), parallel.compile_failures_named():
        compiled(batches[0][:, :-1])
    assert counters["stats"]["unique_graphs"] == 2 * shapes


def test_a_block_past_the_recompile_limit_is_one_error_line() -> None:
    import torch._dynamo

    torch.manual_seed(0)
    model = OpenELM(ModelSpec.from_preset("elm-tiny"))  # four shapes
    parallel.apply_compile(model, backend="eager")
    torch._dynamo.config.recompile_limit = 2  # as if elm had counted too few shapes
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ElmError) as caught, parallel.compile_failures_named():
        model(tokens)
    message = str(caught.value)
    assert message.startswith("train.compile:") and "recompile_limit (2)" in message
    assert "\n" not in message
