"""Quantization quality of `elm convert`: held-out perplexity of a briefly trained small model.

Trains `elm-demo` (or --preset) for a few hundred PyTorch steps on Python standard-library
source with a tokenizer trained by elm_spec.tokenizer, writes it as a model directory, converts
it to MLX at each setting and measures held-out perplexity with the MLX twin (float32 compute,
so only the stored weights differ). Sizes are bits per weight as mlx-lm counts them (all stored
bytes over all parameters).

    python benchmarks/bench_convert.py --workdir /tmp/bench-quant
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from convert import ConvertOptions, convert  # noqa: E402
from elm_spec import ModelSpec  # noqa: E402
from elm_spec.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from tests.support.corpora import stdlib_texts  # noqa: E402

SETTINGS: dict[str, dict] = {
    "float32": {},
    "bfloat16": {"dtype": "bfloat16"},
    "8-bit, group 64": {"dtype": "bfloat16", "quantize": True, "q_bits": 8, "q_group_size": 64},
    "mixed_4_8, group 64": {"dtype": "bfloat16", "q_recipe": "mixed_4_8", "q_group_size": 64},
    "mixed_4_6, group 64": {"dtype": "bfloat16", "q_recipe": "mixed_4_6", "q_group_size": 64},
    "4-bit, group 64": {"dtype": "bfloat16", "quantize": True, "q_bits": 4, "q_group_size": 64},
    "4-bit, group 32": {"dtype": "bfloat16", "quantize": True, "q_bits": 4, "q_group_size": 32},
}


def token_stream(texts: list[str], tokenizer: Tokenizer) -> np.ndarray:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, bos=True, eos=True)
    return np.array(ids, dtype=np.int64)


def train(spec: ModelSpec, tokens: np.ndarray, steps: int, seq_len: int, batch: int, lr: float,
          seed: int = 0):
    import torch
    import torch.nn.functional as F

    from elm_train.modeldir import init_model

    torch.manual_seed(seed)
    model = init_model(spec, seed=seed).train()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95), eps=1e-8)
    data = torch.from_numpy(tokens)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else \
            0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()])
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f}", flush=True)
    return model.eval()


def perplexity(directory: Path, tokens: np.ndarray, seq_len: int) -> float:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model

    from elm_mlx import load_model

    # the stored (quantized) weights, dequantized once: the same numbers as quantized matmuls,
    # at float32 GEMM speed on the CPU
    model = dequantize_model(load_model(directory))
    model.set_dtype(mx.float32)
    windows = len(tokens) // (seq_len + 1)
    data = mx.array(tokens[: windows * (seq_len + 1)].reshape(windows, seq_len + 1))
    total, count = 0.0, 0
    for start in range(0, windows, 16):
        chunk = data[start: start + 16]
        losses = nn.losses.cross_entropy(model(chunk[:, :-1]), chunk[:, 1:], reduction="sum")
        total += float(losses)
        count += chunk[:, 1:].size
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--preset", default="elm-demo")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--held-out-files", type=int, default=40)
    parser.add_argument("--eval-tokens", type=int, default=200_000)
    parser.add_argument("--reuse", action="store_true", help="keep WORKDIR/trained from an earlier run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more than the free cores makes a shared machine crawl)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)

    texts = stdlib_texts(args.files)
    train_texts, held_out_texts = texts[: -args.held_out_files], texts[-args.held_out_files:]
    spec = ModelSpec.from_preset(args.preset)
    trained = workdir / "trained"
    if args.reuse and (trained / "config.json").is_file():
        tokenizer_file = trained / "tokenizer.model"
    else:
        tokenizer_file = train_tokenizer(iter(train_texts), spec.vocab_size, workdir / "tokenizer")
    tokenizer = Tokenizer(tokenizer_file)
    spec = spec.replace(vocab_size=tokenizer.vocab_size)
    train_tokens = token_stream(train_texts, tokenizer)
    held_out = token_stream(held_out_texts, tokenizer)[: args.eval_tokens]
    print(f"{spec.describe()}; {len(train_tokens):,} training tokens, {len(held_out):,} held out")

    from elm_train.modeldir import save_model_dir

    source = trained
    if not (args.reuse and (trained / "config.json").is_file()):
        start = time.perf_counter()
        model = train(spec, train_tokens, args.steps, args.seq_len, args.batch, args.lr)
        print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")
        save_model_dir(model.state_dict(), spec, trained, tokenizer_file, force=True)

    rows = []
    for label, flags in SETTINGS.items():
        report = convert(source, workdir / label.replace(" ", "").replace(",", "-"),
                         ConvertOptions(force=True, progress=False, **flags))
        rows.append((label, report.bits_per_weight, perplexity(report.destination, held_out, args.seq_len)))
        print(f"{label}: {rows[-1][1]:.2f} bits per weight, perplexity {rows[-1][2]:.4f}", flush=True)

    reference = rows[0][2]
    print(f"\n{args.preset}, {spec.num_parameters() / 1e6:.2f}M parameters, {args.steps} steps; "
          f"held-out perplexity over {len(held_out):,} tokens\n")
    print("| output | bits per weight | held-out perplexity | vs float32 |")
    print("|---|---|---|---|")
    for label, bits, value in rows:
        print(f"| {label} | {bits:.2f} | {value:.4f} | {100 * (value / reference - 1):+.2f}% |")


if __name__ == "__main__":
    main()
