"""The token losses of fine-tuning, shared by SFT (elm_mlx.lora.train) and preference tuning
(elm_mlx.lora.preference), and MLX's buffer-cache release between steps."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# fp32 logits projected at a time when computing the loss: 256 positions of a 2k vocabulary,
# and never fewer than 32 (a 32k vocabulary: half the MLX peak of whole logits for a few
# percent of step time; 16 rows save 50 MB more for 10-15%). benchmarks/bench_loss_chunks.py
LOSS_CHUNK_BYTES = 2**21
MIN_LOSS_CHUNK_ROWS = 32


def loss_chunk_rows(vocab_size: int) -> int:
    return max(MIN_LOSS_CHUNK_ROWS, LOSS_CHUNK_BYTES // (4 * vocab_size))


def output_head(model: nn.Module) -> nn.Module:
    """The module holding the vocabulary projection (the tied embedding or `lm_head`)."""
    return model.transformer.token_embeddings if model.spec.share_input_output_layers else model.lm_head


def token_losses(model: nn.Module, hidden: mx.array, targets: mx.array) -> mx.array:
    """Cross-entropy (logits in fp32) at every position of HIDDEN [B, T, D] against TARGETS.

    Projects `loss_chunk_rows(vocab)` positions at a time under a checkpoint, so the
    [tokens, vocab] logits, their softmax and their gradient never exist whole: that saves
    memory in proportion to the vocabulary (about 1.5 GB at batch 4 x 1024 tokens on a 32k
    vocabulary) for one more head projection per chunk in the backward pass.
    """
    def chunk_losses(rows: mx.array, chunk_targets: mx.array) -> mx.array:
        logits = model.project(rows).astype(mx.float32)
        picked = mx.take_along_axis(logits, mx.stop_gradient(chunk_targets)[:, None], axis=-1)
        return mx.logsumexp(logits, axis=-1) - picked[:, 0]

    checkpointed = nn.utils.checkpoint(output_head(model), chunk_losses)
    rows, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    size = loss_chunk_rows(model.spec.vocab_size)
    chunks = [checkpointed(rows[i: i + size], flat_targets[i: i + size])
              for i in range(0, flat_targets.size, size)]
    return mx.concatenate(chunks).reshape(targets.shape)


def clear_cache(threshold: int) -> None:
    """Return MLX's buffer cache to the system once it exceeds THRESHOLD bytes (mlx-lm's
    `--clear-cache-threshold`; 0, its default and ours, clears it after every step)."""
    if mx.get_cache_memory() > threshold:
        mx.clear_cache()
