"""`--verify`: run the PyTorch and MLX twins on a probe prompt and compare their logits.

Both twins compute in float32, so the difference measures the conversion (dtype rounding,
quantization), not the arithmetic precision of the machine; the reference is always the
source weights at full precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.tensors import Tensor, to_torch
from elm_spec import ElmError, ModelSpec

PROBE_TEXT = ("OpenELM uses a layer-wise scaling strategy to allocate parameters within each "
              "layer.\ndef main(argv):\n    return sum(int(x) for x in argv) % 7\n")
PROBE_TOKENS = 32
LOSSLESS_TOLERANCE = 1e-3  # max |logit difference|, absolute, for float32 and the way back
# RMS logit difference relative to the reference logits' standard deviation
DTYPE_TOLERANCES = {"F16": 0.02, "BF16": 0.1}
QUANT_TOLERANCES = {8: 0.1, 4: 0.6}  # by --q-bits, the fewest bits any weight gets
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class VerifyResult:
    reference: str
    candidate: str
    max_abs: float
    relative: float
    agreement: int
    positions: int
    tolerance: float
    lossless: bool

    @property
    def ok(self) -> bool:
        return (self.max_abs if self.lossless else self.relative) <= self.tolerance

    def figures(self) -> dict[str, str]:
        """The comparison as a model card states it."""
        return {"compared": f"{self.candidate} against {self.reference}",
                "max abs logit difference": f"{self.max_abs:.3g}",
                "relative difference": f"{self.relative:.3g}",
                "greedy next-token agreement": f"{self.agreement}/{self.positions}"}

    def lines(self) -> list[str]:
        measure = (f"max |logit difference| {self.max_abs:.3g}" if self.lossless else
                   f"max |logit difference| {self.max_abs:.3g}, RMS difference "
                   f"{self.relative:.3g} of the reference logits' std")
        verdict = "within" if self.ok else "EXCEEDS"
        kind = "absolute" if self.lossless else "relative"
        return [f"verify: {self.reference} vs {self.candidate} on {self.positions} probe tokens",
                f"verify: {measure}; greedy agreement {self.agreement}/{self.positions} "
                f"({100 * self.agreement / self.positions:.1f}%); {verdict} the {kind} tolerance "
                f"{self.tolerance:g}"]


def tolerance(dtype: str, quant_bits: int | None) -> tuple[float, bool]:
    """(tolerance, lossless) for an output in DTYPE, quantized with --q-bits QUANT_BITS if set."""
    if quant_bits is not None:
        return QUANT_TOLERANCES[quant_bits], False
    if dtype in DTYPE_TOLERANCES:
        return DTYPE_TOLERANCES[dtype], False
    return LOSSLESS_TOLERANCE, True


def probe_ids(spec: ModelSpec, tokenizer: Path | None) -> list[int]:
    if tokenizer is not None:
        from elm_spec.tokenizer import Tokenizer

        ids = Tokenizer(tokenizer).encode(PROBE_TEXT, bos=True)[:PROBE_TOKENS]
        if all(i < spec.vocab_size for i in ids):
            return ids
    rng = np.random.default_rng(0)
    return [1, *rng.integers(3, spec.vocab_size, PROBE_TOKENS - 1).tolist()]


def torch_model(tensors: Mapping[str, Tensor], spec: ModelSpec) -> Any:
    from elm_train.modeldir import model_from_state_dict

    state = {name: to_torch(t.cast("F32")) for name, t in tensors.items()}
    return model_from_state_dict(state, spec, dtype="float32")


def torch_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).float().numpy()[0]


def mlx_logits(directory: Path, ids: list[int]) -> np.ndarray:
    import mlx.core as mx

    from elm_mlx import load_model

    model = load_model(directory)
    model.set_dtype(mx.float32)
    logits = model(mx.array([ids])).astype(mx.float32)
    return np.array(logits)[0]


def compare(reference: np.ndarray, candidate: np.ndarray, reference_name: str, candidate_name: str,
            dtype: str, quant_bits: int | None) -> VerifyResult:
    if reference.shape != candidate.shape:
        raise ElmError(f"verify: logits shapes differ ({list(reference.shape)} vs {list(candidate.shape)})")
    difference = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    max_abs = float(difference.max())
    relative_rms = float(np.sqrt(np.mean(difference**2))) / (float(reference.std()) or 1.0)
    agreement = int((reference.argmax(-1) == candidate.argmax(-1)).sum())
    limit, lossless = tolerance(dtype, quant_bits)
    return VerifyResult(reference_name, candidate_name, max_abs, relative_rms, agreement,
                        reference.shape[0], limit, lossless)


def float16_activation_peak(model: Any, ids: list[int]) -> tuple[float, str]:
    """The largest |activation| any module of the PyTorch twin produces on the probe, and where."""
    import torch

    peak = [0.0, ""]

    def record(name: str):
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                value = float(output.detach().abs().max())
                if value > peak[0]:
                    peak[0], peak[1] = value, name
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        torch_logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return float(peak[0]), str(peak[1])
