"""`elm inspect DIR`: what a model directory holds, read from config.json and safetensors headers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        model: Path = typer.Argument(..., help="Model directory (PyTorch or MLX)."),
        layers: bool = typer.Option(True, "--layers/--no-layers", help="Show the per-layer table."),
    ) -> None:
        """Show a model directory's spec, per-layer shapes, parameters, dtypes and sizes."""
        from rich.table import Table

        from elm_spec.hub import resolve
        from elm_spec.modeldir import check_tensors, read_config, read_spec
        from elm_spec.progress import make_console
        from elm_spec.tokenizer import SENTENCEPIECE_FILE, Tokenizer

        model = resolve(model)
        spec = read_spec(model)
        config = read_config(model)
        quantization = config.get("quantization")
        tensors = check_tensors(model, spec, quantization)
        console = make_console()
        console.print(f"[bold]{model}[/bold]: {spec.describe()}")
        dtypes = Counter()
        for info in tensors.values():
            dtypes[info.dtype] += info.nbytes
        weight_bytes = sum(dtypes.values())
        dtype_text = ", ".join(f"{dtype} {size / 2**20:,.1f} MiB" for dtype, size in dtypes.most_common())
        console.print(f"parameters: {spec.num_parameters():,}   weights: {weight_bytes / 2**20:,.1f} MiB "
                      f"({dtype_text}), {weight_bytes * 8 / spec.num_parameters():.2f} bits per parameter")
        if quantization:
            console.print(f"quantization: {quantization.get('bits')} bits, group size "
                          f"{quantization.get('group_size')}")
        console.print(f"context {spec.max_context_length}, RoPE base {spec.rope_freq_constant}, "
                      f"qk-norm {'on' if spec.normalize_qk_projections else 'off'}, embeddings "
                      f"{'tied' if spec.share_input_output_layers else 'untied'}, FFN "
                      f"{'gated (SwiGLU)' if spec.ffn_with_glu else 'plain SiLU'}")
        tokenizer_file = model / SENTENCEPIECE_FILE
        if tokenizer_file.is_file():
            console.print(f"tokenizer: {Tokenizer(tokenizer_file).vocab_size} pieces")
        else:
            console.print("tokenizer: [red]missing[/red] (generation and fine-tuning need one)")
        console.print(f"training FLOPs per token at context {spec.max_context_length}: "
                      f"{spec.flops_per_token(spec.max_context_length):,}")
        if not layers:
            return
        table = Table("layer", "qkv mult", "query heads", "kv heads", "ffn mult", "ffn dim", "parameters")
        for i in range(spec.num_transformer_layers):
            table.add_row(str(i), f"{spec.layer_qkv_multipliers[i]:.2f}", str(spec.num_query_heads[i]),
                          str(spec.num_kv_heads[i]), f"{spec.layer_ffn_multipliers[i]:.2f}",
                          str(spec.ffn_dims[i]),
                          f"{spec.layer_matmul_parameters(i) + spec.layer_norm_parameters():,}")
        console.print(table)
