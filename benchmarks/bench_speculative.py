"""`elm generate --draft-model` vs `elm generate` on the same model: speculative decoding's
acceptance rate and decode speed ratio, with drafts that agree with the model more or less.

No trained OpenELM pair runs on this machine, so the pair is built to agree by construction:
a DRAFT of a few uniform OpenELM layers, and a TARGET made of the draft's layers followed by
more layers whose residual writers (`attn.out_proj`, `ffn.proj_2`) are scaled by S. At S = 0
the extra layers change nothing (the target computes the draft's tokens at the target's cost:
the best case); larger S makes the target disagree with its draft more often. Both command
lines run as a user runs them, alternately (plain, draft, plain, draft, ...), greedy, and
their statistics lines are parsed. `Draft: A of N tokens accepted` gives the share of the
generated tokens that came from the draft; as each round of K drafts ends with one token of the
target's own, N - A rounds proposed about K (N - A) tokens, of which A were accepted.

    python benchmarks/bench_speculative.py --workdir /tmp/bench-speculative --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_generate import make_prompt, publish, run  # noqa: E402
from elm_spec import ModelSpec  # noqa: E402

DRAFT = re.compile(r"^Draft: (\d+) of (\d+) tokens accepted", re.MULTILINE)
WRITERS = ("attn.out_proj.weight", "ffn.proj_2.weight")


def tokenizer_file(workdir: Path, vocab_size: int) -> Path:
    from elm_spec.tokenizer import SENTENCEPIECE_FILE, train_tokenizer

    path = workdir / "tokenizer" / SENTENCEPIECE_FILE
    if not path.is_file():
        sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
        texts = (f.read_text(encoding="utf-8", errors="replace") for f in sources)
        train_tokenizer(texts, vocab_size, path.parent)
    return path


def make_pair(workdir: Path, spec: ModelSpec, draft_layers: int, scales: list[float]
              ) -> tuple[Path, dict[float, Path]]:
    """The draft directory and one target directory per scale (see the module doc)."""
    import torch

    from elm_train.modeldir import init_model, save_model_dir

    tokenizer = tokenizer_file(workdir, spec.vocab_size)
    state = init_model(spec, seed=0).state_dict()
    draft = workdir / "draft"
    if not (draft / "config.json").is_file():
        kept = {name: value for name, value in state.items()
                if not name.startswith("transformer.layers.")
                or int(name.split(".")[2]) < draft_layers}
        save_model_dir(kept, spec.replace(num_transformer_layers=draft_layers), draft, tokenizer)
    targets = {}
    for scale in scales:
        target = targets[scale] = workdir / f"target-s{scale:g}"
        if (target / "config.json").is_file():
            continue
        scaled = dict(state)
        for name, value in state.items():
            if (name.startswith("transformer.layers.") and int(name.split(".")[2]) >= draft_layers
                    and name.endswith(WRITERS)):
                scaled[name] = value * torch.tensor(scale, dtype=value.dtype)
        save_model_dir(scaled, spec, target, tokenizer)
    return draft, targets


def forward_seconds(model_dir: Path, rows: list[int], repeats: int = 5) -> dict[int, float]:
    """Best seconds of one decoding forward pass of ROWS new tokens after a 64-token cache, as
    `elm generate` runs it (one row: elm's sgemv route; several: MLX's matrix products): what a
    plain step and a speculative verification step cost."""
    import time

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    from elm_mlx import load
    from elm_mlx.matvec import matvec_on_cpu

    model, _ = load(model_dir)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(3, 67))]), cache=cache))
    best = {count: float("inf") for count in rows}
    with matvec_on_cpu(model):
        for _ in range(repeats):
            for count in rows:  # alternated, so both see the same load
                start = time.perf_counter()
                mx.eval(model(mx.array([list(range(5, 5 + count))]), cache=cache))
                best[count] = min(best[count], time.perf_counter() - start)
                trim_prompt_cache(cache, count)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-speculative"))
    parser.add_argument("--model-dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16, help="Layers of the target.")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--scales", default="0,0.05", help="Comma-separated S values.")
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="Write the markdown report here too.")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec.from_preset("OpenELM-270M").replace(
        num_transformer_layers=args.layers, model_dim=args.model_dim, qkv_multipliers=1.0,
        ffn_multipliers=2.0)
    scales = [float(s) for s in args.scales.split(",")]
    draft, targets = make_pair(args.workdir, spec, args.draft_layers, scales)
    prompt = make_prompt(draft, args.prompt_tokens)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    rows, rounds_text = [], []
    for scale, target in targets.items():
        common = [sys.executable, "-m", "apps", "generate", "--model", str(target), "--prompt",
                  prompt, "--max-tokens", str(args.max_tokens), "--temp", "0"]
        commands = {"plain": common, "draft": [*common, "--draft-model", str(draft),
                                               "--num-draft-tokens", str(args.num_draft_tokens)]}
        results: dict[str, list[dict]] = {name: [] for name in commands}
        for round_index in range(args.rounds):
            for name, command in commands.items():
                result = run(command, env)
                if name == "draft":
                    accepted, total = map(int, DRAFT.search(result["stdout"]).groups())
                    # each round of drafting ends with one token of the target's own
                    proposed = args.num_draft_tokens * (total - accepted)
                    result["share"] = accepted / total
                    result["acceptance"] = min(1.0, accepted / proposed) if proposed else 1.0
                results[name].append(result)
                print(f"S={scale:g} round {round_index + 1} {name:5s} decode "
                      f"{result['generation_tps']:7.3f} tok/s", flush=True)
        best = {name: max(r["generation_tps"] for r in rs) for name, rs in results.items()}
        paired = float(np.median([d["generation_tps"] / p["generation_tps"]
                                  for p, d in zip(results["plain"], results["draft"], strict=True)]))
        same = len({r["text"] for rs in results.values() for r in rs}) == 1
        first = results["draft"][0]
        rows.append(f"| {scale:g} | {100 * first['acceptance']:.0f}% | {100 * first['share']:.0f}% | "
                    f"{best['plain']:.3f} | "
                    f"{best['draft']:.3f} | **{best['draft'] / best['plain']:.2f}** | {paired:.2f} | "
                    f"{'yes' if same else 'NO'} |")
        rounds_text.append(f"- S={scale:g}: " + "; ".join(
            f"{name} " + ", ".join(f"{r['generation_tps']:.3f}" for r in rs)
            for name, rs in results.items()))
    verify = args.num_draft_tokens + 1
    seconds = forward_seconds(next(iter(targets.values())), [1, verify])
    draft_seconds = forward_seconds(draft, [1])[1]
    lines = [
        f"Target: {args.layers} uniform OpenELM layers of width {args.model_dim} "
        f"({spec.num_parameters() / 1e6:.0f}M parameters, fp32, vocab {spec.vocab_size}); draft: "
        f"its first {args.draft_layers} layers "
        f"({spec.replace(num_transformer_layers=args.draft_layers).num_parameters() / 1e6:.0f}M); "
        f"--num-draft-tokens {args.num_draft_tokens}; prompt {args.prompt_tokens} tokens, "
        f"{args.max_tokens} generated, greedy; best of {args.rounds} alternating rounds; "
        f"{os.cpu_count()} CPU cores; load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| S | drafted tokens accepted | generated tokens from the draft "
        f"(at most {args.num_draft_tokens}/{args.num_draft_tokens + 1}) | plain decode tokens/s "
        "| with draft | ratio of the bests | median per-round ratio | same text |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"One forward pass of the target (best of 5, alternated): 1 new token "
        f"{1000 * seconds[1]:.1f} ms, {verify} new tokens (a verification) "
        f"{1000 * seconds[verify]:.1f} ms ({seconds[verify] / seconds[1]:.2f}x); the draft's "
        f"one-token step {1000 * draft_seconds:.1f} ms ({draft_seconds / seconds[1]:.2f}x the "
        f"target's). A round of {args.num_draft_tokens} drafts and one verification yields at most "
        f"{verify} tokens for {(args.num_draft_tokens * draft_seconds + seconds[verify]) / seconds[1]:.2f} "
        "plain steps' time.",
        "",
        "All rounds (decode tokens/s):",
        *rounds_text,
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
