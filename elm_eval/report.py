"""Results as JSON (written atomically) and as a markdown table like lm-eval's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def tasks_markdown(results: Mapping[str, Mapping[str, float | None]]) -> str:
    """| Task | Metric | Value | Stderr | n | rows, one per metric, then the average of acc."""
    lines = ["| Task | Metric | Value | ± Stderr | n |", "|---|---|---:|---:|---:|"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or metric == "samples":
                continue
            lines.append(f"| {task} | {metric} | {_number(value)} | "
                         f"{_number(metrics.get(f'{metric}_stderr'))} | "
                         f"{int(metrics['samples'])} |")
    if len(results) > 1:
        average = sum(m["acc"] for m in results.values()) / len(results)
        lines.append(f"| average | acc | {_number(average)} | | |")
    return "\n".join(lines)


def perplexity_markdown(result: Mapping[str, Any]) -> str:
    rows = [("perplexity", f"{result['perplexity']:.4f}"),
            ("bits per byte", f"{result['bits_per_byte']:.4f}"),
            ("byte perplexity", f"{result['byte_perplexity']:.4f}"),
            ("tokens", f"{result['tokens']:,}"), ("bytes", f"{result['bytes']:,}"),
            ("documents", f"{result['documents']:,}"),
            ("context / stride", f"{result['context_length']} / {result['stride']}"),
            ("backend", result["backend"]),
            ("tokens/s", f"{result['tokens_per_second']:,.0f}")]
    return "\n".join(["| Metric | Value |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)])
