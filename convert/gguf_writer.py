"""`elm convert SRC out.gguf --to gguf`: a GGUF file in llama.cpp's own `openelm` architecture,
with the SentencePiece tokenizer embedded, written with the `gguf` package.

llama.cpp's OpenELM keeps the per-layer query heads, kv heads and FFN widths as arrays, the
fused `qkv_proj` as `attn_qkv`, and the gated `proj_1` split into `ffn_gate` (first half) and
`ffn_up`; its output projection is always the embedding, so untied heads, ungated FFNs and
models without q/k norms cannot be expressed and are refused. Norms stay float32 as llama.cpp
expects; `--outtype` sets every matrix: f32, f16, bf16 or q8_0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from convert.sources import Source
from elm_spec import ElmError, ModelSpec
from elm_spec.progress import byte_progress
from elm_spec.tokenizer import BOS_ID, EOS_ID, TOKENIZER_CONFIG_FILE, UNK_ID

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURE = "openelm"


def unsupported(spec: ModelSpec) -> str | None:
    """Why llama.cpp's openelm architecture cannot hold SPEC, or None."""
    if not spec.share_input_output_layers:
        return "an untied lm_head (llama.cpp's openelm always reuses the embedding)"
    if not spec.ffn_with_glu:
        return "an ungated FFN (llama.cpp's openelm always splits proj_1 into gate and up)"
    if not spec.normalize_qk_projections:
        return "no q/k norms (llama.cpp's openelm always applies them)"
    return None


def write_gguf(source: Source, destination: Path, outtype: str, force: bool = False,
               progress: bool = True) -> list[str]:
    """Write DESTINATION (through a temporary file renamed into place); returns report lines."""
    import gguf

    if outtype not in OUTTYPES:
        raise ElmError(f"--outtype {outtype!r}: choose from {', '.join(OUTTYPES)}")
    spec = source.spec
    reason = unsupported(spec)
    if reason is not None:
        raise ElmError(f"{source.path}: GGUF (llama.cpp openelm) cannot express {reason}")
    if source.tokenizer is None:
        raise ElmError(f"{source.path}: no tokenizer.model to embed in the GGUF file; pass --tokenizer")
    if destination.exists() and not force:
        raise ElmError(f"{destination}: already exists (use --force to replace it)")
    if destination.exists() and destination.is_dir():
        raise ElmError(f"{destination}: is a directory")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(staging, ARCHITECTURE)
    try:
        notes = _add_metadata(writer, spec, source, outtype)
        total = sum(source.tensor_bytes.values())
        with byte_progress(f"converting to {destination.name}", enabled=progress) as bar:
            task = bar.add_task(destination.name, total=total)
            for name in source.names:
                for gguf_name, array in _gguf_tensors(name, source.read(name).float32(), spec):
                    _add_tensor(writer, gguf_name, array, outtype)
                bar.advance(task, source.tensor_bytes[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, destination)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    size = destination.stat().st_size
    return [*notes, f"{destination}: GGUF ({ARCHITECTURE}), {outtype}, {size / 1e6:,.1f} MB"]


def _add_metadata(writer: Any, spec: ModelSpec, source: Source, outtype: str) -> list[str]:
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(source.path.name)
    writer.add_block_count(spec.num_transformer_layers)
    writer.add_context_length(spec.max_context_length)
    writer.add_embedding_length(spec.model_dim)
    writer.add_feed_forward_length(spec.ffn_dims)
    writer.add_head_count(spec.num_query_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_freq_base(float(spec.rope_freq_constant))
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_file_type(file_types[outtype])
    return _add_tokenizer(writer, source.tokenizer, spec.vocab_size)


def _add_tokenizer(writer: Any, model_file: Path, vocab_size: int) -> list[str]:
    """The SentencePiece pieces, scores and types as llama.cpp's `llama` (SPM) tokenizer."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    from elm_spec.modeldir import read_json

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    tokens = [piece.piece.encode("utf-8") for piece in proto.pieces]
    scores = [piece.score for piece in proto.pieces]
    types = [int(piece.type) for piece in proto.pieces]  # SentencePiece's enum is GGUF's
    for index in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    config_file = Path(model_file).parent / TOKENIZER_CONFIG_FILE
    if config_file.is_file() and read_json(config_file).get("chat_template"):
        writer.add_chat_template(read_json(config_file)["chat_template"])
    normalizer = proto.normalizer_spec
    if normalizer.name != "identity" or normalizer.remove_extra_whitespaces:
        return [f"note: llama.cpp does not apply this tokenizer's {normalizer.name} normalization "
                "or whitespace removal; its ids can differ from SentencePiece's"]
    return []


def _gguf_tensors(name: str, array: np.ndarray, spec: ModelSpec) -> list[tuple[str, np.ndarray]]:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.OPENELM, spec.num_transformer_layers)
    module = name.removesuffix(".weight")
    if module.endswith(".ffn.proj_1"):
        layer = int(module.split(".")[2])
        ffn = spec.ffn_dims[layer]
        return [(f"blk.{layer}.ffn_gate.weight", array[:ffn]), (f"blk.{layer}.ffn_up.weight", array[ffn:])]
    mapped = names.get_name(module)
    if mapped is None:
        raise ElmError(f"tensor {name!r} has no place in llama.cpp's openelm architecture")
    return [(f"{mapped}.weight", array)]


def _add_tensor(writer: Any, name: str, array: np.ndarray, outtype: str) -> None:
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim <= 1 or outtype == "f32":
        writer.add_tensor(name, array)
    elif outtype == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
