"""`elm bench`: measure training throughput and cost over a grid of configurations.

    elm bench --grid grid.yaml --out DIR     (the same as `elm bench run ...`)
    elm bench report DIR
    elm bench slurm --grid grid.yaml --out DIR
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from elm_spec import ElmError

GRID = typer.Option(None, "--grid", help="Grid YAML file (models, batch sizes, attention, ...).")
PRESET = typer.Option(None, "--preset", help="A built-in grid instead: paper or cpu-tiny.")
OUT = typer.Option(None, "--out", help="Sweep directory (results.jsonl, results.csv, report.md).")
PRICES = typer.Option(None, "--prices", help="Price table YAML (default: the bundled prices.yaml).")
GPU_TYPE = typer.Option(None, "--gpu-type", help="Price-table entry to use instead of detecting.")
MAX_CPU = typer.Option(None, "--max-cpu-processes",
                       help="Most processes per cell on a CPU-only machine (default: cores).")


def run_sweep(grid_file: Path | None, preset: str | None, out: Path | None, prices: Path | None,
              gpu_type: str | None, max_cpu_processes: int | None, launcher: str = "local",
              cell_index: int | None = None, report: bool = True) -> None:
    from elm_train.bench import cost
    from elm_train.bench.grid import Grid, check_devices, load_grid
    from elm_train.bench.report import write_report
    from elm_train.bench.runner import Context, run_sweep

    if out is None:
        raise ElmError("give --out DIR, the sweep directory")
    if launcher not in ("local", "slurm"):
        raise ElmError(f"--launcher {launcher!r}: choose local or slurm")
    grid = load_grid(grid_file, preset)
    selected = grid
    if cell_index is not None:
        if not 0 <= cell_index < len(grid.cells):
            raise ElmError(f"--cell-index {cell_index}: {grid.source} has {len(grid.cells)} cells")
        selected = Grid(grid.source, (grid.cells[cell_index],))
    table = cost.load_prices(prices)
    from elm_train.model import flash_attention_available  # torch: only once the grid is valid

    device = cost.detect_device()
    per_node = device.count if device.kind == "cuda" else (max_cpu_processes or os.cpu_count() or 1)
    check_devices(selected, per_node, device.kind, flash_attention_available(),
                  multi_node=launcher == "slurm")
    device_type = cost.device_type_for(device, table, gpu_type)
    context = Context(table, device_type, device.name, launcher, device.memory_bytes)
    typer.echo(f"{len(selected.cells)} cell(s) on {device_type} ({device.name}); results in {out}")
    run_sweep(grid, out, context, None if cell_index is None else [cell_index], echo=typer.echo)
    if report:
        write_report(out, grid.cells[0].settings.target_loss, echo=typer.echo)


def register(app: typer.Typer) -> None:
    bench = typer.Typer(help="Measure training throughput and Token/$ over a grid of configurations.",
                        add_completion=False)

    @bench.callback(invoke_without_command=True)
    def default(ctx: typer.Context, grid: Path = GRID, preset: str = PRESET, out: Path = OUT,
                prices: Path = PRICES, gpu_type: str = GPU_TYPE,
                max_cpu_processes: int = MAX_CPU) -> None:
        """Measure training throughput and Token/$ over a grid of configurations.

        `elm bench --grid FILE --out DIR` is `elm bench run --grid FILE --out DIR`."""
        given = (grid, preset, out, prices, gpu_type, max_cpu_processes)
        if ctx.invoked_subcommand is not None:
            if any(v is not None for v in given):
                raise ElmError(f"put the options after `elm bench {ctx.invoked_subcommand}`")
            return
        if grid is None and preset is None:
            typer.echo(ctx.get_help())
            raise typer.Exit(0)
        run_sweep(grid, preset, out, prices, gpu_type, max_cpu_processes)

    @bench.command("run")
    def run(grid: Path = GRID, preset: str = PRESET, out: Path = OUT, prices: Path = PRICES,
            gpu_type: str = GPU_TYPE, max_cpu_processes: int = MAX_CPU,
            launcher: str = typer.Option("local", "--launcher",
                                         help="local (torchrun --standalone) or slurm (srun "
                                              "torchrun, inside an allocation)."),
            cell_index: int = typer.Option(None, "--cell-index",
                                           help="Run only this cell of the grid (SLURM arrays)."),
            report: bool = typer.Option(True, "--report/--no-report",
                                        help="Write report.md and the figures at the end.")) -> None:
        """Run every cell not yet finished in --out through `elm train` and record it."""
        run_sweep(grid, preset, out, prices, gpu_type, max_cpu_processes, launcher, cell_index,
                  report)

    @bench.command("report")
    def report(directory: Path = typer.Argument(..., help="A sweep directory."),
               target_loss: float = typer.Option(None, "--target-loss",
                                                 help="Loss for 'cheapest configuration to "
                                                      "reach loss L' (default: the highest loss "
                                                      "any cell reached).")) -> None:
        """Write DIR/report.md and the figures from DIR/results.jsonl."""
        from elm_train.bench.report import write_report

        write_report(directory, target_loss, echo=typer.echo)

    @bench.command("slurm")
    def slurm(grid: Path = GRID, preset: str = PRESET, out: Path = OUT, prices: Path = PRICES,
              gpu_type: str = GPU_TYPE,
              gpus_per_node: int = typer.Option(8, "--gpus-per-node",
                                                help="GPUs on each cluster node."),
              sbatch_option: list[str] = typer.Option([], "--sbatch-option",
                                                      help="Extra #SBATCH line, e.g. "
                                                           "--partition=gpu (repeatable).")) -> None:
        """Write SLURM array scripts that run each cell with `srun torchrun` (submit.sh submits)."""
        from elm_train.bench import cost
        from elm_train.bench.grid import load_grid
        from elm_train.bench.slurm import write_slurm

        if out is None:
            raise ElmError("give --out DIR, the sweep directory (on a shared file system)")
        table = cost.load_prices(prices)
        if gpu_type is not None:
            table.price_per_hour(gpu_type)
        run_options = []
        if prices is not None:
            run_options += ["--prices", str(prices.resolve())]
        if gpu_type is not None:
            run_options += ["--gpu-type", gpu_type]
        scripts = write_slurm(load_grid(grid, preset), out, gpus_per_node, run_options,
                              sbatch_option)
        typer.echo(f"wrote {len(scripts)} scripts; submit with: bash {scripts[-1]}")

    app.add_typer(bench, name="bench")
