"""`elm doctor` reports versions, the MLX GEMM rate and whether OpenBLAS is preloaded."""

from __future__ import annotations

import platform
import re

import mlx.core as mx
import pytest
from support.cli import run_elm

from elm_spec.platform import OPENBLAS_PRELOAD_ENV, openblas_preload_path

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers

GEMM_LINE = re.compile(r"^  MLX fp32 GEMM 1024\^3: (\d+\.\d) GFLOP/s$", re.MULTILINE)

linux_with_openblas = pytest.mark.skipif(
    platform.system() != "Linux" or openblas_preload_path() is None,
    reason="the BLAS report exists on Linux, and the preload needs Debian's libopenblas0-pthread")


def doctor(**env: str) -> str:
    result = run_elm("doctor", env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@linux_with_openblas
def test_doctor_reports_versions_and_the_automatic_openblas_preload() -> None:
    out = doctor(LD_PRELOAD="", **{OPENBLAS_PRELOAD_ENV: ""})
    assert f"mlx: {mx.__version__} (default device: Device(cpu, 0))" in out
    assert re.search(r"^python: 3\.\d+\.\d+", out, re.MULTILINE)
    assert re.search(r"^torch: \S+", out, re.MULTILINE) and "mlx-lm: " in out
    assert float(GEMM_LINE.search(out).group(1)) > 0
    assert f"  OpenBLAS preloaded: yes ({openblas_preload_path()})" in out
    assert "fix:" not in out
    assert out.startswith("python: ") and "WordNet (CatLIP): " in out
    # The CPU's quantized-speed warning states the ranges docs/generate.md measured.
    from support.cli import REPO

    claim = re.search(r"quantized models decode (\d+)-(\d+)x and read prompts (\d+)-(\d+)x slower",
                      out)
    assert claim, out
    decode_low, decode_high, prompt_low, prompt_high = map(int, claim.groups())
    measured = re.findall(r"^\| \d-bit \| .* \| ([\d.]+)x, ([\d.]+)x \|$",
                          (REPO / "docs" / "generate.md").read_text(), re.MULTILINE)
    assert len(measured) == 2
    for prompt, decode in measured:
        assert prompt_low <= float(prompt) <= prompt_high and decode_low <= float(decode) <= decode_high
    assert re.search(r"^lm-eval: \S+; run it with `elm eval harness --model elm ...`$", out,
                     re.MULTILINE)


@linux_with_openblas
def test_doctor_without_the_preload_names_the_fix() -> None:
    out = doctor(LD_PRELOAD="", **{OPENBLAS_PRELOAD_ENV: "0"})
    assert float(GEMM_LINE.search(out).group(1)) > 0
    assert "  OpenBLAS preloaded: no\n" in out
    assert f"fix: unset {OPENBLAS_PRELOAD_ENV}=0" in out


def test_version_is_the_projects() -> None:
    import tomllib
    from support.cli import REPO

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    result = run_elm("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"elm {declared}"
