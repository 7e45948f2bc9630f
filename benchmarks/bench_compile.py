"""train.compile on layer-wise models: graphs per preset, and the CPU step with inductor vs eager.

Part 1 counts, for every preset, the distinct block shapes and the graphs dynamo captures for
one training forward and backward through `elm_train.parallel.apply_compile` (on the meta
device with dynamo's eager backend: capture only, no memory, no kernels), and whether any
block fell back to eager. Part 2 trains a small layer-wise preset with inductor and eagerly,
the two alternating step by step on the same batches in this process: compile time (first
compiled step minus an eager step), median step times, and the losses side by side.

    python benchmarks/bench_compile.py [--presets all] [--preset elm-tiny] [--steps 6] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch._dynamo.utils import counters

from elm_spec import ModelSpec
from elm_spec.presets import PRESETS
from elm_train import parallel
from elm_train.model import OpenELM
from elm_train.tasks.lm import language_model_loss


def distinct_shapes(spec: ModelSpec) -> int:
    return len({(spec.num_query_heads[i], spec.num_kv_heads[i], spec.ffn_dims[i])
                for i in range(spec.num_transformer_layers)})


def count_graphs(preset: str) -> dict:
    """Graphs captured for one forward + backward of PRESET, and what dynamo gave up on."""
    import torch._dynamo

    spec = ModelSpec.from_preset(preset)
    torch._dynamo.reset()
    counters.clear()
    with torch.device("meta"):
        model = OpenELM(spec)
    parallel.apply_compile(model, backend="eager")
    started = time.perf_counter()
    with parallel.compile_failures_named():
        model(torch.zeros(1, 16, dtype=torch.long, device="meta")).sum().backward()
    return {"preset": preset, "layers": spec.num_transformer_layers,
            "distinct_shapes": distinct_shapes(spec),
            "graphs": counters["stats"]["unique_graphs"],
            "gave_up": sum(counters["unimplemented"].values()),
            "recompile_limit": torch._dynamo.config.recompile_limit,
            "capture_s": time.perf_counter() - started}


def step(model: OpenELM, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> tuple[float, float]:
    started = time.perf_counter()
    loss, _ = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:], 1e-4)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, loss.item()


def compare_steps(preset: str, batch: int, seq_len: int, steps: int) -> dict:
    import torch._dynamo

    spec = ModelSpec.from_preset(preset)
    torch._dynamo.reset()
    counters.clear()
    eager = OpenELM(spec)
    eager.init_weights(torch.Generator().manual_seed(0))
    compiled = copy.deepcopy(eager)
    parallel.apply_compile(compiled)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3)
                  for name, m in (("eager", eager), ("compiled", compiled))}
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, spec.vocab_size, (batch, seq_len + 1), generator=generator)
               for _ in range(steps + 1)]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    first = {}
    with parallel.compile_failures_named():
        for index, tokens in enumerate(batches):
            for name, model in (("eager", eager), ("compiled", compiled)):
                seconds, loss = step(model, optimizers[name], tokens)
                losses[name].append(loss)
                if index == 0:
                    first[name] = seconds
                else:
                    times[name].append(seconds)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"preset": preset, "batch": batch, "seq_len": seq_len, "steps": steps,
            "distinct_shapes": distinct_shapes(spec),
            "graphs": counters["stats"]["unique_graphs"],
            "compile_s": first["compiled"] - eager_s,
            "eager_step_s": eager_s, "compiled_step_s": compiled_s,
            "speedup": eager_s / compiled_s,
            "max_loss_difference": max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"],
                                                                  strict=True)),
            "losses": losses, "times": times, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="all", help="Comma-separated presets to count, "
                                                         "'all', or 'none'.")
    parser.add_argument("--preset", default="elm-tiny", help="Preset timed with inductor.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="Timed steps after the first.")
    parser.add_argument("--json", help="Also write the figures to this file.")
    args = parser.parse_args()
    names = {"all": list(PRESETS), "none": []}.get(args.presets, args.presets.split(","))
    results: dict = {"graphs": []}
    for name in names:
        row = count_graphs(name)
        results["graphs"].append(row)
        print(json.dumps(row), flush=True)
    results["steps"] = compare_steps(args.preset, args.batch, args.seq_len, args.steps)
    summary = {k: v for k, v in results["steps"].items() if k not in ("losses", "times")}
    print(json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
