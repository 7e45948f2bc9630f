"""`elm convert SRC DST`: open the source, plan every output tensor, then stream.

Each tensor is read, checked for NaN/inf, cast, quantized and written before the next is read,
into a temporary directory that replaces DST only when everything (and `--verify`) succeeded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert import corenet
from convert.quantize import (
    QuantSettings,
    check_settings,
    plan_quantization,
    quantization_config,
    quantize,
    quantized_shapes,
)
from convert.safetensors_io import PlannedTensor, ShardedWriter
from convert.sources import ShapeOptions, Source, cut_rows, open_model_dir, open_source
from convert.tensors import DTYPE_NAMES, Tensor, dtype_code, from_mlx, from_torch, to_mlx
from elm_spec import ElmError
from elm_spec.hf_config import reader_notes
from elm_spec.hub import LLAMA2_TOKENIZER_ADVICE
from elm_spec.modeldir import (
    CONFIG_FILE,
    MAX_SHARD_BYTES,
    atomic_output_dir,
    copy_tokenizer_files,
    expected_shapes,
    write_json,
)
from elm_spec.outputs import refuse_overlap
from elm_spec.progress import byte_progress
from elm_spec.tokenizer import (
    FAST_TOKENIZER_FILE,
    SENTENCEPIECE_FILE,
    Tokenizer,
    write_tokenizer_files,
)
from elm_spec.writes import write_failure

TARGETS = ("mlx", "torch", "corenet", "gguf")
LARGE_MODEL_PARAMETERS = 2_500_000_000  # "3B-class": CoreNet's notes say these need bf16


@dataclass
class ConvertOptions:
    source_kind: str | None = None
    target: str = "mlx"
    dtype: str | None = None
    quantize: bool = False
    q_bits: int = 4
    q_group_size: int = 64
    q_recipe: str | None = None
    shape: ShapeOptions = field(default_factory=ShapeOptions)
    verify: bool = False
    force: bool = False
    progress: bool = True
    max_shard_bytes: int = MAX_SHARD_BYTES
    outtype: str | None = None  # GGUF tensor type (--to gguf): f32, f16, bf16 or q8_0


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass
class ConvertReport:
    destination: Path
    lines: list[str] = field(default_factory=list)
    bits_per_weight: float | None = None
    verify: Any = None
    echo: Callable[[str], None] = _to_stderr

    def say(self, line: str) -> None:
        self.lines.append(line)
        self.echo(line)


def convert(src: str | Path, dst: str | Path, options: ConvertOptions,
            say: Callable[[str], None] = _to_stderr) -> ConvertReport:
    """Convert SRC to DST; SAY gets each line of the summary as it is made."""
    src, dst = Path(src), Path(dst)
    refuse_overlap(src, dst)
    catlip = _catlip_converter(src)
    if catlip is not None:
        report = ConvertReport(dst, echo=say)
        report.say(catlip(src, dst, options.force))
        return report
    if options.target not in TARGETS:
        raise ElmError(f"unknown --to {options.target!r}; choose from {', '.join(TARGETS)}")
    if options.q_recipe is not None:
        options = dataclasses.replace(options, quantize=True)
    if options.quantize:
        check_settings(options.q_bits, options.q_group_size, options.q_recipe)
        if options.target != "mlx":
            raise ElmError(f"--quantize writes MLX directories; --to {options.target} writes full precision")
    padded_rows, shape = None, options.shape
    if options.target == "corenet":  # --vocab-size pads the written embedding instead
        padded_rows, shape = shape.vocab_size, dataclasses.replace(shape, vocab_size=None)
    if options.outtype is not None and options.target != "gguf":
        raise ElmError("--outtype applies to --to gguf; use --dtype or --quantize for other targets")
    source = open_source(src, options.source_kind, shape)
    report = ConvertReport(dst, echo=say)
    report.say(source.describe())
    if options.target == "gguf":
        from convert.gguf_writer import write_gguf

        if options.dtype is not None or options.verify:
            raise ElmError("--to gguf takes --outtype (f32, f16, bf16, q8_0), not --dtype or --verify")
        for line in write_gguf(source, dst, options.outtype or "f16", options.force,
                               options.progress):
            report.say(line)
        return report
    code = _output_dtype(source, options.dtype, report)
    if options.target == "corenet":
        _write_corenet(source, dst, code, padded_rows, options, report)
    else:
        _write_model_dir(source, dst, code, options, report)
    return report


def _catlip_converter(src: Path) -> Callable[[Path, Path, bool], str] | None:
    """The CatLIP converter, when SRC is a CatLIP model directory."""
    from convert import catlip

    return catlip.convert_catlip if catlip.is_catlip_source(src) else None


def _output_dtype(source: Source, requested: str | None, report: ConvertReport) -> str:
    if requested is not None:
        return dtype_code(requested)
    if source.spec.num_parameters() >= LARGE_MODEL_PARAMETERS and source.dtype != "BF16":
        report.say(f"note: {source.spec.num_parameters() / 1e9:.1f}B parameters: writing bfloat16 "
                   "(float16 overflows on 3B-class OpenELM models); choose with --dtype")
        return "BF16"
    return source.dtype


def _require_tokenizer(source: Source) -> Path:
    if source.tokenizer is None:
        raise ElmError(f"{source.path}: no tokenizer (tokenizer.model missing); "
                       f"{LLAMA2_TOKENIZER_ADVICE}")
    pieces = Tokenizer(source.tokenizer).vocab_size
    if pieces > source.spec.vocab_size:
        raise ElmError(f"{source.tokenizer}: has {pieces} pieces, more than the model's "
                       f"vocab_size {source.spec.vocab_size}")
    return source.tokenizer


def _checked(source: Source, name: str, code: str) -> Tensor:
    """The tensor in the output dtype; NaN/inf, in the source or from overflow, named."""
    tensor = source.read(name)
    converted = tensor.cast(code)
    if converted.count_nonfinite():  # one pass over the output; the source only on failure
        bad = tensor.count_nonfinite()
        if bad:
            raise ElmError(f"{source.path}: tensor {name!r} has {bad} NaN/inf values")
        raise ElmError(f"{source.path}: tensor {name!r} overflows {DTYPE_NAMES[code]} "
                       f"(|value| up to {float(abs(tensor.float32()).max()):.4g}); use --dtype bfloat16")
    return converted


def _stream(source: Source, code: str, options: ConvertOptions, label: str
            ) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor in the output dtype) for every tensor, with a progress bar in source bytes."""
    total = sum(source.tensor_bytes.values())
    with byte_progress(label, enabled=options.progress) as progress:
        task = progress.add_task(label, total=total)
        for name in source.names:
            yield name, _checked(source, name, code)
            progress.advance(task, source.tensor_bytes[name])


# ----- MLX and interchange model directories ----------------------------------------------
def _write_tokenizer(source: Source, staging: Path, report: ConvertReport) -> None:
    """The SentencePiece model with elm's configs; an mlx-lm directory that carries only
    tokenizer.json (what `mlx_lm.convert` writes) passes its tokenizer files on as they are."""
    fast_only = (source.tokenizer is None and source.is_model_dir
                 and (source.path / FAST_TOKENIZER_FILE).is_file())
    if fast_only:
        copy_tokenizer_files(source.path, staging)
        report.say(f"note: {source.path} has no {SENTENCEPIECE_FILE}; copied its tokenizer.json "
                   "(mlx-lm and transformers read it; elm's PyTorch tools need tokenizer.model)")
    else:
        write_tokenizer_files(_require_tokenizer(source), staging)


def _write_model_dir(source: Source, dst: Path, code: str, options: ConvertOptions,
                     report: ConvertReport) -> None:
    spec = source.spec
    shapes = expected_shapes(spec)
    quant: dict[str, QuantSettings] = {}
    if options.quantize:
        quant = plan_quantization(spec, shapes, options.q_bits, options.q_group_size, options.q_recipe)
    planned: list[PlannedTensor] = []
    for name, shape in shapes.items():
        module = name[: -len(".weight")]
        if module in quant:
            parts = quantized_shapes(shape, quant[module])
            planned.append(PlannedTensor(name, "U32", parts["weight"]))
            planned += [PlannedTensor(f"{module}.{part}", code, parts[part]) for part in ("scales", "biases")]
        else:
            planned.append(PlannedTensor(name, code, shape))
    if code == "F16":
        _warn_float16_range(source, report)
    config = spec.to_config(torch_dtype=DTYPE_NAMES[code])
    if options.target == "mlx":
        config.pop("auto_map")  # MLX output: no remote-code prompt (elm_spec.hf_config)
    if quant:
        config["quantization"] = quantization_config(quant, options.q_bits, options.q_group_size)
        config["quantization_config"] = config["quantization"]
    file_format = "mlx" if options.target == "mlx" else "pt"
    try:
        with atomic_output_dir(dst, force=options.force) as staging:
            with ShardedWriter(staging, planned, file_format, options.max_shard_bytes) as writer:
                for name, tensor in _stream(source, code, options, f"converting to {dst.name}"):
                    module = name[: -len(".weight")]
                    if module in quant:
                        for part, value in zip(("weight", "scales", "biases"),
                                               quantize(to_mlx(tensor), quant[module]), strict=True):
                            writer.write(f"{module}.{part}", from_mlx(value))
                    else:
                        writer.write(name, tensor)
                writer.finish()
            write_json(staging / CONFIG_FILE, config)
            _write_tokenizer(source, staging, report)
            total = sum(t.nbytes for t in planned)
            report.bits_per_weight = 8 * total / spec.num_parameters()
            kind = "MLX" if options.target == "mlx" else "model"
            precision = DTYPE_NAMES[code]
            if quant:
                recipe = f" {options.q_recipe}" if options.q_recipe else ""
                precision = (f"{options.q_bits}-bit{recipe} (group {options.q_group_size}), "
                             f"{report.bits_per_weight:.2f} bits per weight, scales and "
                             f"unquantized tensors in {precision}")
            report.say(f"{dst}: {kind} directory, {precision}, "
                       f"{total / 1e6:,.1f} MB in {len(writer.shards)} file(s)")
            for note in reader_notes(spec, dst):
                report.say(note)
            if options.verify:
                _verify_model_dir(source, staging, dst, code, options, report, quant)
    except OSError as error:
        raise _write_error(dst, error) from None


def _write_error(dst: Path, error: OSError) -> ElmError:
    return write_failure(dst, error) or ElmError(
        f"{dst}: write failed ({error.strerror or error}); nothing was changed there")


def _warn_float16_range(source: Source, report: ConvertReport) -> None:
    if importlib.util.find_spec("torch") is None:
        report.say("note: float16 range check skipped (needs torch); bfloat16 never overflows")
        return
    from convert.verify import float16_activation_peak, probe_ids, torch_model

    model = torch_model(_all_tensors(source), source.spec)
    peak, where = float16_activation_peak(model, probe_ids(source.spec, source.tokenizer))
    from convert.verify import FLOAT16_MAX

    if peak > FLOAT16_MAX:
        report.say(f"warning: float16 would overflow: activations reach {peak:.4g} in {where} on a "
                   f"probe prompt (float16 max {FLOAT16_MAX:g}); use --dtype bfloat16")


def _all_tensors(source: Source) -> dict[str, Tensor]:
    return {name: source.read(name) for name in source.names}


def _verify_model_dir(source: Source, staging: Path, dst: Path, code: str, options: ConvertOptions,
                      report: ConvertReport, quant: dict[str, QuantSettings]) -> None:
    from convert.verify import (
        compare,
        mlx_logits,
        probe_ids,
        quantization_effect,
        torch_logits,
        torch_model,
        weight_errors,
    )

    ids = probe_ids(source.spec, source.tokenizer)
    if options.target == "torch" and source.is_model_dir:
        reference = mlx_logits(source.path, ids)
        candidate = torch_logits(torch_model(_all_tensors(open_model_dir(staging, ShapeOptions())),
                                             source.spec), ids)
        names = (f"MLX twin on {source.path}", f"PyTorch twin on {dst}")
        result = compare(reference, candidate, *names, code)
    elif options.quantize:
        candidate = mlx_logits(staging, ids)
        effect = quantization_effect(
            torch_logits(torch_model(_all_tensors(source), source.spec), ids), candidate,
            f"source (PyTorch twin on {source.path}, float32)")
        output = open_model_dir(staging, ShapeOptions())
        written = torch_logits(torch_model(_all_tensors(output), source.spec), ids)
        result = dataclasses.replace(
            compare(written, candidate, f"PyTorch twin on {dst}'s dequantized weights",
                    f"MLX twin on {dst}", "F32", effect),
            weights=weight_errors(source, output, quant, code))
    else:
        reference = torch_logits(torch_model(_all_tensors(source), source.spec), ids)
        candidate = mlx_logits(staging, ids)
        names = (f"PyTorch twin on {source.path} (float32)", f"MLX twin on {dst}")
        result = compare(reference, candidate, *names, code)
    _finish_verify(result, report)


def _finish_verify(result: Any, report: ConvertReport) -> None:
    report.verify = result
    for line in result.lines():
        report.say(line)
    if not result.weights_ok:
        share, name = result.weights
        raise ElmError(f"verify failed: {name} differs from the source's by {share:.3g} times "
                       f"what rounding allows; {report.destination} was not written")
    if not result.ok:
        raise ElmError(f"verify failed: the converted model's logits differ by {result.max_abs:.3g}, "
                       f"beyond the tolerance; {report.destination} was not written")


# ----- CoreNet .pt ----------------------------------------------------------------------------
def _write_corenet(source: Source, dst: Path, code: str, padded_rows: int | None,
                   options: ConvertOptions, report: ConvertReport) -> None:
    import torch

    from convert.tensors import to_torch

    vocab = source.spec.vocab_size
    if padded_rows is not None and padded_rows < vocab:
        raise ElmError(f"--vocab-size {padded_rows} is smaller than the model's vocab_size {vocab}")
    tensors: dict[str, Any] = {}
    for name, tensor in _stream(source, code, options, f"converting to {dst.name}"):
        value = to_torch(tensor)
        if padded_rows and name in ("transformer.token_embeddings.weight", corenet.HF_HEAD):
            padding = torch.zeros(padded_rows - vocab, value.shape[1], dtype=value.dtype)
            value = torch.cat([value, padding])
        tensors[corenet.corenet_name(name)] = value
    try:
        with corenet.atomic_output_file(dst, options.force) as staging:
            torch.save(tensors, staging)
            report.say(f"{dst}: CoreNet checkpoint, {DTYPE_NAMES[code]}, {len(tensors)} tensors"
                       + (f", embedding padded to {padded_rows} rows" if padded_rows else ""))
            if options.verify:
                _verify_corenet(source, staging, code, report)
    except OSError as error:
        raise _write_error(dst, error) from None


def _verify_corenet(source: Source, written_file: Path, code: str, report: ConvertReport) -> None:
    from convert.verify import compare, mlx_logits, probe_ids, torch_logits, torch_model

    vocab = source.spec.vocab_size
    ids = probe_ids(source.spec, source.tokenizer)
    written = {corenet.hf_name(k): cut_rows(corenet.hf_name(k), from_torch(v), vocab)
               for k, v in corenet.load_state_dict(written_file).items()}
    candidate = torch_logits(torch_model(written, source.spec), ids)
    if source.is_model_dir:
        reference, name = mlx_logits(source.path, ids), f"MLX twin on {source.path}"
    else:
        reference = torch_logits(torch_model(_all_tensors(source), source.spec), ids)
        name = f"PyTorch twin on {source.path}"
    _finish_verify(compare(reference, candidate, name, f"PyTorch twin on {report.destination}",
                           code), report)
