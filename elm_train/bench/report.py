"""DIR/report.md: the best configuration per model size, the study's findings checked against
the measured rows (holds / does not hold / not measured, with the numbers), Loss/$ where a
token budget was trained, the figures, and the raw table."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elm_spec import ElmError
from elm_train.bench import cost
from elm_train.bench.plots import FIGURES, best_points, models_by_size, successful, write_figures
from elm_train.bench.runner import ResultsStore, atomic_write_text

Row = dict[str, Any]
REPORT_FILE = "report.md"
FSDP = ("fsdp", "fsdp-grad-op")
# A doubling of the batch that gains less than this much Token/$ counts as saturated.
SATURATION_GAIN = 0.10


@dataclass(frozen=True)
class Finding:
    claim: str
    verdict: str   # "holds" | "does not hold" | "inconclusive" | "not measured"
    evidence: str


@dataclass(frozen=True)
class Measure:
    """A cell's Token/$ (or a ratio of two), with the range its repeats span."""
    value: float
    low: float
    high: float

    def over(self, other: Measure) -> Measure:
        return Measure(self.value / other.value, self.low / other.high, self.high / other.low)

    def apart_from(self, other: Measure) -> bool:
        """The ranges do not overlap: the repeats' spread cannot account for the difference."""
        return self.low > other.high or other.low > self.high

    def excludes(self, threshold: float) -> bool:
        return not self.low <= threshold <= self.high

    def text(self, unit: str = "x") -> str:
        value = f"{self.value:.2f}{unit}" if unit else si(self.value)
        if self.high - self.low <= 1e-9 * abs(self.value):
            return value
        low, high = (f"{v:.2f}" if unit else si(v) for v in (self.low, self.high))
        return f"{value} ({low}-{high})"


def verdict(holds: bool, conclusive: bool) -> str:
    if not conclusive:
        return "inconclusive"
    return "holds" if holds else "does not hold"


def si(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024**3:.2f} GiB"


def ratio_text(ratios: dict[str, Measure]) -> str:
    return ", ".join(f"{name} {value.text()}" for name, value in ratios.items())


def measure(row: Row) -> Measure:
    """Token/$ of ROW, spanning its slowest to its fastest repeat."""
    repeats = row.get("tokens_per_s_repeats") or [row["tokens_per_s"]]
    per_token_per_s = row["tokens_per_dollar"] / row["tokens_per_s"]
    return Measure(row["tokens_per_dollar"], min(repeats) * per_token_per_s,
                   max(repeats) * per_token_per_s)


def spread(row: Row) -> str:
    """The range of a cell's repeats relative to their mean, as the raw table shows it."""
    repeats = row.get("tokens_per_s_repeats") or []
    if len(repeats) < 2:
        return "-"
    return f"{(max(repeats) - min(repeats)) / statistics.fmean(repeats):.0%}"


def best_value(rows: list[Row], **where: Any) -> Measure | None:
    matching = [r for r in rows
                if all(r.get(k) == v if not isinstance(v, tuple) else r.get(k) in v
                       for k, v in where.items())]
    return measure(max(matching, key=lambda r: r["tokens_per_dollar"])) if matching else None


# ----- the study's findings -------------------------------------------------------------------

def flash_finding(rows: list[Row]) -> Finding:
    claim = "FlashAttention matters more for small models than for large ones"
    fused = "flash" if any(r["attention"] == "flash" for r in rows) else "sdpa"
    speedups = {}
    for model in models_by_size(rows):
        eager, fast = best_value(rows, model=model, attention="eager"), best_value(
            rows, model=model, attention=fused)
        if eager and fast:
            speedups[model] = fast.over(eager)
    if len(speedups) < 2:
        return Finding(claim, "not measured", f"needs eager and {fused} attention for two or more "
                       f"model sizes; measured for {len(speedups)}")
    smallest, largest = speedups[next(iter(speedups))], speedups[list(speedups)[-1]]
    note = "" if fused == "flash" else " (flash was not measured; sdpa, the fused kernel, stands in)"
    return Finding(claim, verdict(smallest.value > largest.value, smallest.apart_from(largest)),
                   f"best Token/$ of {fused} over eager, smallest to largest model: "
                   f"{ratio_text(speedups)}{note}")


def gpu_type_finding(rows: list[Row]) -> Finding:
    claim = "H100 and A100-80GB are not cost-effective for small models"
    gpu_rows = [r for r in rows if r["gpu_type"] != cost.CPU]
    models = models_by_size(gpu_rows)
    if not models:
        return Finding(claim, "not measured", "no GPU rows")
    smallest = models[0]
    prices = {r["gpu_type"]: r["price_per_gpu_hour"] for r in gpu_rows if r["model"] == smallest}
    if len(prices) < 2:
        return Finding(claim, "not measured", f"{smallest} was measured on {len(prices)} GPU type(s); "
                       "the claim needs two or more")
    best = {gpu: best_value(gpu_rows, model=smallest, gpu_type=gpu) for gpu in prices}
    cheapest = min(prices, key=prices.get)
    beaten_by = [gpu for gpu in prices if best[gpu].value > best[cheapest].value]
    conclusive = all(best[gpu].apart_from(best[cheapest]) for gpu in prices if gpu != cheapest)
    evidence = (f"{smallest}: best Token/$ " + ", ".join(
        f"{gpu} {best[gpu].text('')} (price {prices[gpu]:g}/h)"
        for gpu in sorted(prices, key=prices.get)))
    return Finding(claim, verdict(not beaten_by, conclusive), evidence)


def ddp_small_finding(rows: list[Row]) -> Finding:
    claim = "DDP is the most cost-effective strategy for small models"
    multi = [r for r in rows if r["world_size"] > 1]
    for model in models_by_size(multi):
        ddp = best_value(multi, model=model, strategy="ddp")
        sharded = {s: best_value(multi, model=model, strategy=s) for s in FSDP}
        sharded = {s: v for s, v in sharded.items() if v}
        if ddp and sharded:
            holds = all(ddp.value >= v.value for v in sharded.values())
            conclusive = all(ddp.apart_from(v) for v in sharded.values())
            return Finding(claim, verdict(holds, conclusive),
                           f"{model} on 2+ devices, best Token/$: ddp {ddp.text('')}, " + ", ".join(
                               f"{s} {v.text('')}" for s, v in sharded.items()))
    return Finding(claim, "not measured", "needs ddp and fsdp cells on two or more devices")


def fsdp_large_finding(rows: list[Row], all_rows: list[Row]) -> Finding:
    claim = "FSDP wins for the largest model at large batches (it fits bigger batches)"
    multi = [r for r in rows if r["world_size"] > 1]
    for model in reversed(models_by_size(multi)):
        model_rows = [r for r in multi if r["model"] == model]
        ddp_batches = {r["batch_size"] for r in model_rows if r["strategy"] == "ddp"}
        fsdp_batches = {r["batch_size"] for r in model_rows if r["strategy"] in FSDP}
        if not ddp_batches or not fsdp_batches:
            continue
        ddp_oom = sorted({r["batch_size"] for r in all_rows if r["model"] == model
                          and r["status"] == "oom" and r["strategy"] == "ddp"
                          and r["world_size"] > 1} & fsdp_batches)
        large = [b for b in fsdp_batches | ddp_batches
                 if b >= statistics.median(sorted(fsdp_batches | ddp_batches))]
        ddp = best_value(model_rows, strategy="ddp", batch_size=tuple(large))
        fsdp = best_value(model_rows, strategy=FSDP, batch_size=tuple(large))
        evidence = (f"{model} at batch >= {min(large)} on 2+ devices, best Token/$: fsdp family "
                    f"{fsdp.text('') if fsdp else '-'}, ddp {ddp.text('') if ddp else '-'}")
        if ddp_oom:
            evidence += f"; ddp ran out of memory at batch {ddp_oom} where fsdp ran"
            return Finding(claim, "holds", evidence)
        if not (ddp and fsdp):
            return Finding(claim, "does not hold" if ddp else "holds", evidence)
        return Finding(claim, verdict(fsdp.value > ddp.value, fsdp.apart_from(ddp)), evidence)
    return Finding(claim, "not measured", "needs ddp and fsdp cells of one model on two or more devices")


def grad_op_finding(rows: list[Row]) -> Finding:
    claim = "Sharding gradients and optimizer state (fsdp-grad-op) beats full sharding (fsdp)"
    def setting(r: Row) -> tuple:
        return (r["model"], r["batch_size"], r["attention"], r["world_size"], r["nodes"],
                r["seq_len"], r["dtype"], r["gpu_type"])
    full = {setting(r): measure(r) for r in rows if r["strategy"] == "fsdp"}
    ratios = [measure(r).over(full[setting(r)]) for r in rows
              if r["strategy"] == "fsdp-grad-op" and setting(r) in full]
    if not ratios:
        return Finding(claim, "not measured", "needs fsdp and fsdp-grad-op cells with the same "
                       "other settings")
    decided = [ratio for ratio in ratios if ratio.excludes(1.0)]
    wins = sum(ratio.value > 1 for ratio in decided)
    return Finding(claim, verdict(wins > len(decided) / 2, bool(decided)),
                   f"fsdp-grad-op has the higher Token/$ in {wins} of {len(decided)} matched cells "
                   f"whose repeats do not overlap ({len(ratios)} matched; median ratio "
                   f"{statistics.median(r.value for r in ratios):.2f}x)")


def saturation_finding(rows: list[Row]) -> Finding:
    claim = "Cost-efficiency saturates before device memory is full"
    gains, notes = {}, []
    for model in models_by_size(rows):
        best = best_points([r for r in rows if r["model"] == model], lambda r: r["batch_size"])
        batches = sorted(best)
        if len(batches) < 3:
            continue
        last, before = best[batches[-1]], best[batches[-2]]
        gains[model] = measure(last).over(measure(before))
        if last.get("peak_memory_bytes") and last.get("device_memory_bytes"):
            notes.append(f"{model} at batch {batches[-1]} uses "
                         f"{last['peak_memory_bytes'] / last['device_memory_bytes']:.0%} of memory")
    if not gains:
        return Finding(claim, "not measured", "needs three or more batch sizes of one model")
    threshold = 1 + SATURATION_GAIN
    holds = all(gain.value < threshold for gain in gains.values())
    conclusive = all(gain.excludes(threshold) for gain in gains.values())
    evidence = ("Token/$ gained by the last batch doubling (the study: little gain while memory "
                f"is left; threshold {SATURATION_GAIN:.0%}): "
                + ", ".join(f"{m} {gain_text(g)}" for m, g in gains.items()))
    if notes:
        evidence += "; " + "; ".join(notes)
    return Finding(claim, verdict(holds, conclusive), evidence)


def gain_text(ratio: Measure) -> str:
    text = f"{ratio.value - 1:+.1%}"
    if ratio.high - ratio.low > 1e-9:
        text += f" ({ratio.low - 1:+.0%} to {ratio.high - 1:+.0%})"
    return text


def findings(rows: list[Row]) -> list[Finding]:
    measured = successful(rows)
    return [flash_finding(measured), gpu_type_finding(measured), ddp_small_finding(measured),
            fsdp_large_finding(measured, rows), grad_op_finding(measured),
            saturation_finding(measured)]


# ----- loss per dollar ------------------------------------------------------------------------

def tokens_to_reach(curve: list[list[float]], target: float) -> float | None:
    for tokens, loss in curve:
        if loss <= target:
            return tokens
    return None


def loss_section(rows: list[Row], target_loss: float | None, currency: str) -> list[str]:
    trained = [r for r in successful(rows) if r.get("loss_reached") is not None]
    if not trained:
        return []
    lines = ["## Loss per dollar (measured)", "",
             "Each cell trained on real data for its token budget; Loss/Token is the loss the "
             "budget removed divided by the tokens, Loss/$ = Loss/Token x tokens/s x 3600 / "
             f"price per hour, cost = budget tokens at the measured tokens/s ({currency}).", "",
             "| model | batch | attention | strategy | devices | tokens | loss start | loss reached "
             f"| cost ({currency}) | Loss/$ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(trained, key=lambda r: r["loss_cost"]):
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['attention']} | {r['strategy']} | "
                     f"{r['world_size']} | {si(r['loss_tokens'])} | {r['loss_initial']:.3f} | "
                     f"{r['loss_reached']:.3f} | {r['loss_cost']:.3g} | {r['loss_per_dollar']:.3g} |")
    target = target_loss if target_loss is not None else max(r["loss_reached"] for r in trained)
    costs = []
    for r in trained:
        tokens = tokens_to_reach(r["loss_curve"], target)
        if tokens is not None:
            costs.append((cost.cost_of_tokens(tokens, r["tokens_per_s"], r["price_per_hour"]),
                          tokens, r))
    origin = "given" if target_loss is not None else "the highest loss any cell reached"
    lines += ["", f"Cheapest configuration to reach loss {target:.3f} ({origin}):"]
    if not costs:
        lines.append("no measured cell reached it.")
    else:
        spent, tokens, r = min(costs, key=lambda c: c[0])
        lines.append(f"{r['model']} batch {r['batch_size']} {r['attention']} {r['strategy']} on "
                     f"{r['world_size']} x {r['gpu_type']}: {si(tokens)} tokens, "
                     f"{spent:.3g} {currency} ({len(costs)} of {len(trained)} cells reached it).")
    return [*lines, ""]


# ----- the report -----------------------------------------------------------------------------

def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(r) + " |" for r in rows)]


def best_per_model(rows: list[Row]) -> list[str]:
    measured = successful(rows)
    best = best_points(measured, lambda r: r["model"])
    table = [[m, si(best[m]["params"]), si(best[m]["tokens_per_dollar"]),
              si(best[m]["tokens_per_s"]), si(best[m]["tokens_per_s_per_device"]),
              str(best[m]["batch_size"]), best[m]["attention"], best[m]["strategy"],
              f"{best[m]['world_size']} x {best[m]['gpu_type']}", gib(best[m]["peak_memory_bytes"]),
              "-" if best[m]["mfu"] is None else f"{best[m]['mfu']:.1%}"]
             for m in models_by_size(measured)]
    return markdown_table(["model", "params", "Token/$", "tokens/s", "per device", "batch",
                           "attention", "strategy", "devices", "peak memory", "MFU"], table)


def raw_table(rows: list[Row]) -> list[str]:
    def cells(r: Row) -> list[str]:
        error = (r.get("error") or "").replace("|", "/")
        return [r["model"], str(r["batch_size"]), r["attention"], r["strategy"],
                f"{r['nodes']}x{r['gpus']}", str(r["seq_len"]), r["dtype"], r["status"],
                si(r.get("tokens_per_s")), spread(r), si(r.get("tokens_per_s_per_device")),
                "-" if r.get("step_time_s") is None else f"{r['step_time_s']:.4g}",
                gib(r.get("peak_memory_bytes")),
                "-" if r.get("mfu") is None else f"{r['mfu']:.1%}", r["gpu_type"],
                si(r.get("tokens_per_dollar")),
                "-" if r.get("loss_reached") is None else f"{r['loss_reached']:.3f}",
                error[:80]]
    return markdown_table(["model", "batch", "attention", "strategy", "nodes x gpus", "seq",
                           "dtype", "status", "tokens/s", "spread", "per device", "step s", "peak memory",
                           "MFU", "device", "Token/$", "loss", "error"],
                          [cells(r) for r in rows])


def render(rows: list[Row], figures: dict[str, str | None], target_loss: float | None) -> str:
    statuses = {s: sum(r["status"] == s for r in rows) for s in ("ok", "oom", "failed")}
    currency = cost.currency({r["price_unit"] for r in rows})
    devices = sorted({f"{r['gpu_type']} ({r['device_name']})" for r in rows})
    lines = ["# elm bench report", "",
             f"{len(rows)} cells: {statuses['ok']} measured, {statuses['oom']} out of memory, "
             f"{statuses['failed']} failed. Devices: {', '.join(devices)}. Token/$ is tokens per "
             f"{currency} (tokens/s x 3600 / price per hour of all devices in the cell); each "
             "cell's tokens/s is the mean of its repeats after the warm-up steps, and its spread "
             "the range of the repeats relative to that mean. A finding is inconclusive where "
             "the repeats' ranges overlap enough to account for the difference it rests on.", "",
             "## Best configuration per model size", "", *best_per_model(rows), "",
             "## The study's findings, checked", ""]
    for number, finding in enumerate(findings(rows), start=1):
        evidence = finding.evidence[:1].upper() + finding.evidence[1:]
        lines.append(f"{number}. **{finding.claim}**: {finding.verdict}. {evidence}.")
    lines += ["", *loss_section(rows, target_loss, currency), "## Figures", ""]
    for figure in FIGURES:
        reason = figures.get(figure.file)
        lines.append(f"![{figure.title}]({figure.file})" if reason is None
                     else f"- {figure.title}: {reason}.")
        lines.append("")
    lines += ["## All cells", "", *raw_table(rows), ""]
    return "\n".join(lines)


def write_report(directory: Path, target_loss: float | None = None,
                 echo: Callable[[str], None] | None = None) -> Path:
    """Write DIR/report.md and DIR/fig*.png from DIR/results.jsonl."""
    rows = ResultsStore(directory).rows()
    if not rows:
        raise ElmError(f"{directory}: no results.jsonl rows to report")
    currency = cost.currency({r["price_unit"] for r in rows})
    figures = write_figures(rows, directory, currency)
    path = directory / REPORT_FILE
    atomic_write_text(path, render(rows, figures, target_loss))
    if echo:
        echo(f"wrote {path} and {sum(r is None for r in figures.values())} figure(s)")
    return path
