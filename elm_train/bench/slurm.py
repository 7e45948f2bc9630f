"""SLURM array mode: one sbatch array per node count, each task one cell (`srun torchrun`),
appending to the same DIR/results.jsonl; a last job writes the report once all have ended."""

from __future__ import annotations

import shlex
import sys
from collections import defaultdict
from pathlib import Path

from elm_spec import ElmError
from elm_train.bench.grid import Grid
from elm_train.bench.runner import GRID_FILE, atomic_write_text, source_root

SLURM_DIR = "slurm"
# Start-up and the report, on top of the cells' own timeouts.
MARGIN_S = 600


def hours_minutes_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def check_gpus_per_node(grid: Grid, gpus_per_node: int) -> None:
    for cell in grid.cells:
        if cell.gpus > gpus_per_node:
            raise ElmError(f"{grid.source}: cell '{cell.describe()}': gpus {cell.gpus} is more "
                           f"than the cluster's {gpus_per_node} per node (--gpus-per-node)")


def write_slurm(grid: Grid, out_dir: Path, gpus_per_node: int, run_options: list[str],
                sbatch_options: list[str]) -> list[Path]:
    """Write DIR/grid.yaml, DIR/slurm/bench-N-nodes.sbatch per node count, report.sbatch and
    submit.sh (which submits them all). Returns the written scripts."""
    check_gpus_per_node(grid, gpus_per_node)
    out_dir = out_dir.resolve()
    slurm_dir = out_dir / SLURM_DIR
    slurm_dir.mkdir(parents=True, exist_ok=True)
    grid_path = out_dir / GRID_FILE
    atomic_write_text(grid_path, grid.to_yaml())
    by_nodes: dict[int, list[int]] = defaultdict(list)
    for index, cell in enumerate(grid.cells):
        by_nodes[cell.nodes].append(index)
    python = shlex.quote(sys.executable)
    environment = f'export PYTHONPATH={shlex.quote(str(source_root()))}${{PYTHONPATH:+:$PYTHONPATH}}'
    extra = "".join(f"#SBATCH {option}\n" for option in sbatch_options)
    scripts = []
    for nodes, indices in sorted(by_nodes.items()):
        cells = [grid.cells[i] for i in indices]
        seconds = max(c.settings.timeout_s * (2 if c.settings.loss_budget_tokens else 1)
                      for c in cells) + MARGIN_S
        run = shlex.join(["-m", "apps", "bench", "run", "--grid", str(grid_path), "--out",
                          str(out_dir), "--launcher", "slurm", "--no-report", *run_options])
        script = slurm_dir / f"bench-{nodes}-nodes.sbatch"
        atomic_write_text(script, (
            "#!/bin/bash\n"
            f"#SBATCH --job-name=elm-bench-{nodes}n\n"
            f"#SBATCH --array={','.join(map(str, indices))}\n"
            f"#SBATCH --nodes={nodes}\n"
            "#SBATCH --ntasks-per-node=1\n"
            f"#SBATCH --gpus-per-node={max(c.gpus for c in cells)}\n"
            "#SBATCH --exclusive\n"
            f"#SBATCH --time={hours_minutes_seconds(seconds)}\n"
            f"#SBATCH --output={slurm_dir}/%x-%A_%a.out\n"
            f"{extra}"
            "set -euo pipefail\n"
            f"{environment}\n"
            f'exec {python} {run} --cell-index "$SLURM_ARRAY_TASK_ID"\n'))
        scripts.append(script)
    report = slurm_dir / "report.sbatch"
    atomic_write_text(report, (
        "#!/bin/bash\n"
        "#SBATCH --job-name=elm-bench-report\n"
        "#SBATCH --nodes=1\n"
        "#SBATCH --time=00:20:00\n"
        f"#SBATCH --output={slurm_dir}/%x-%j.out\n"
        f"{extra}"
        "set -euo pipefail\n"
        f"{environment}\n"
        f"exec {python} -m apps bench report {shlex.quote(str(out_dir))}\n"))
    submit = slurm_dir / "submit.sh"
    lines = ["#!/bin/bash", "# Submit every array, then the report once they have all ended.",
             "set -euo pipefail", 'cd "$(dirname "$0")"', "jobs="]
    lines += [f'jobs="$jobs:$(sbatch --parsable {s.name} | cut -d";" -f1)"' for s in scripts]
    lines += ["sbatch --dependency=afterany$jobs report.sbatch", ""]
    atomic_write_text(submit, "\n".join(lines))
    submit.chmod(0o755)
    return [*scripts, report, submit]
