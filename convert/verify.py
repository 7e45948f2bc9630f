"""`--verify`: run the PyTorch and MLX twins on a probe prompt and compare their logits.

Both twins compute in float32, so the difference measures the conversion (dtype rounding,
quantization), not the arithmetic precision of the machine. For a dtype change the reference
is the source weights at full precision. A quantized output is checked against the PyTorch twin
on its own dequantized weights, which it must match as closely as a lossless conversion does;
how far quantization moved the logits from the source is reported beside it, not judged: that
distance is the model's sensitivity to rounding (a random-init model, whose logits carry no
structure, moves by ~0.6 of their spread at 4 bits where a trained one moves by ~0.03), and at
4 bits it is ~17x the 8-bit distance on both, the ratio of the step sizes, (2^8-1)/(2^4-1).
What the logits of the output's own weights cannot show, whether those weights are the source's,
is checked weight by weight: each quantized matrix within its rounding bound, every other tensor
equal to the source's in the output dtype.
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
# max |logit difference|, absolute, for float32, the way back, and a quantized output against
# its own dequantized weights
LOSSLESS_TOLERANCE = 1e-3
# RMS logit difference relative to the reference logits' standard deviation
DTYPE_TOLERANCES = {"F16": 0.02, "BF16": 0.1}
FLOAT16_MAX = 65504.0
# Machine epsilon of the dtype quantization scales and biases are stored in.
SCALE_EPSILON = {"F32": 2.0**-23, "BF16": 2.0**-7, "F16": 2.0**-10}


@dataclass(frozen=True)
class QuantEffect:
    """How far quantization moved the logits from the full-precision source (reported only)."""
    source: str
    max_abs: float
    relative: float
    agreement: int
    positions: int

    @property
    def agrees_mostly(self) -> bool:
        return 2 * self.agreement >= self.positions

    def lines(self) -> list[str]:
        lines = [f"verify: quantization moved the logits from the {self.source} by "
                 f"{self.relative:.3g} of their std (max {self.max_abs:.3g}); greedy agreement "
                 f"{self.agreement}/{self.positions} ({100 * self.agreement / self.positions:.1f}%)"]
        if not self.agrees_mostly:
            lines.append("warning: the quantized model picks another next token than the source "
                         f"at {self.positions - self.agreement} of {self.positions} probe positions; "
                         "usual for a random-init model (its logits carry no structure), a loss of "
                         "quality for a trained one: try --q-recipe mixed_4_6 or --q-bits 8. "
                         "The output was written")
        return lines


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
    effect: QuantEffect | None = None
    # The worst written weight's error against the source's, as a share of what rounding allows
    # it (quantized outputs only), and its name.
    weights: tuple[float, str] | None = None

    @property
    def logits_ok(self) -> bool:
        return (self.max_abs if self.lossless else self.relative) <= self.tolerance

    @property
    def weights_ok(self) -> bool:
        return self.weights is None or self.weights[0] <= 1.0

    @property
    def ok(self) -> bool:
        return self.logits_ok and self.weights_ok

    def figures(self) -> dict[str, str]:
        """The comparison as a model card states it."""
        figures = {"compared": f"{self.candidate} against {self.reference}",
                   "max abs logit difference": f"{self.max_abs:.3g}",
                   "relative difference": f"{self.relative:.3g}",
                   "greedy next-token agreement": f"{self.agreement}/{self.positions}"}
        if self.effect is not None:
            figures.update({
                "quantization: relative difference from the source": f"{self.effect.relative:.3g}",
                "quantization: greedy agreement with the source":
                    f"{self.effect.agreement}/{self.effect.positions}"})
        return figures

    def lines(self) -> list[str]:
        measure = (f"max |logit difference| {self.max_abs:.3g}" if self.lossless else
                   f"max |logit difference| {self.max_abs:.3g}, RMS difference "
                   f"{self.relative:.3g} of the reference logits' std")
        verdict = "within" if self.logits_ok else "EXCEEDS"
        kind = "absolute" if self.lossless else "relative"
        lines = [f"verify: {self.reference} vs {self.candidate} on {self.positions} probe tokens",
                 f"verify: {measure}; greedy agreement {self.agreement}/{self.positions} "
                 f"({100 * self.agreement / self.positions:.1f}%); {verdict} the {kind} tolerance "
                 f"{self.tolerance:g}"]
        if self.weights is not None:
            share, name = self.weights
            lines.append(f"verify: weights against the source: the worst, {name}, uses "
                         f"{share:.2f} of its rounding allowance"
                         + ("" if self.weights_ok else " (EXCEEDS it)"))
        return lines + (self.effect.lines() if self.effect else [])


def tolerance(dtype: str) -> tuple[float, bool]:
    """(tolerance, lossless) for an output whose weights are in DTYPE (F32 for the check of a
    quantized output against its own dequantized weights)."""
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


def _differences(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, int]:
    """(max |difference|, RMS difference / reference std, greedy agreement)."""
    if reference.shape != candidate.shape:
        raise ElmError(f"verify: logits shapes differ ({list(reference.shape)} vs {list(candidate.shape)})")
    difference = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    relative_rms = float(np.sqrt(np.mean(difference**2))) / (float(reference.std()) or 1.0)
    agreement = int((reference.argmax(-1) == candidate.argmax(-1)).sum())
    return float(difference.max()), relative_rms, agreement


def compare(reference: np.ndarray, candidate: np.ndarray, reference_name: str, candidate_name: str,
            dtype: str, effect: QuantEffect | None = None) -> VerifyResult:
    max_abs, relative_rms, agreement = _differences(reference, candidate)
    limit, lossless = tolerance(dtype)
    return VerifyResult(reference_name, candidate_name, max_abs, relative_rms, agreement,
                        reference.shape[0], limit, lossless, effect)


def rounding_allowance(bits: int, code: str) -> float:
    """The most, in steps of its group ((max - min) / (2^bits - 1)), that affine quantization
    moves a weight: MLX widens the step so that the group's larger end is exact (measured: up
    to 1.0 step), and scales and biases stored in CODE add up to (2^bits - 1) roundings of the
    scale (8 bits in bfloat16: 1.49 steps measured)."""
    return 1.25 + (2**bits - 1) * SCALE_EPSILON[code]


def weight_errors(source: Any, written: Any, plan: Mapping[str, Any], code: str
                  ) -> tuple[float, str]:
    """The largest error of a written tensor against the source's in CODE, as a share of its
    allowance, and its name: a quantized matrix's (PLAN: module -> settings) within
    `rounding_allowance` steps of each group, any other tensor exactly the source's."""
    worst, where = 0.0, ""
    for name in source.names:
        expected = source.read(name).cast(code).float32()
        restored = written.read(name).float32()
        settings = plan.get(name[: -len(".weight")])
        if settings is None:
            share = 0.0 if np.array_equal(expected, restored) else np.inf
        else:
            groups = expected.reshape(-1, settings.group_size).astype(np.float64)
            error = np.abs(restored.reshape(groups.shape) - groups).max(axis=1)
            step = (groups.max(axis=1) - groups.min(axis=1)) / (2**settings.bits - 1)
            floor = np.finfo(np.float32).eps * np.abs(groups).max(axis=1) + np.finfo(np.float32).tiny
            share = float((error / (rounding_allowance(settings.bits, code)
                                    * np.maximum(step, floor))).max())
        if share > worst or not where:
            worst, where = share, name
    return worst, where


def quantization_effect(source: np.ndarray, candidate: np.ndarray, source_name: str) -> QuantEffect:
    max_abs, relative_rms, agreement = _differences(source, candidate)
    return QuantEffect(source_name, max_abs, relative_rms, agreement, source.shape[0])


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
