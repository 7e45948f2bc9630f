"""`elm plot RUN_DIR`: loss and throughput curves of a run's metrics.jsonl, as a PNG."""

from __future__ import annotations

import os
from pathlib import Path

from elm_spec import ElmError
from elm_train.metrics import read_metrics


def plot_run(run_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
             title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "event" not in r and "step" in r]
    if not records:
        raise ElmError(f"{Path(run_dir) / 'metrics.jsonl'}: no logged steps to plot")
    steps = [r["step"] for r in records]
    figure, (loss_axis, speed_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(steps, [r.get("loss") for r in records], label="train loss")
    valid = [(r["step"], r["valid_loss"]) for r in records if r.get("valid_loss") is not None]
    if valid:
        loss_axis.plot(*zip(*valid, strict=True), "o-", label="held-out loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss (nats/token)")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    speed_key = "tokens_per_s" if records[0].get("tokens_per_s") is not None else "items_per_s"
    speed_axis.plot(steps, [r.get(speed_key) for r in records], color="tab:green")
    speed_axis.set_xlabel("step")
    speed_axis.set_ylabel(speed_key.replace("_per_s", "/s") + " (all devices)")
    speed_axis.grid(alpha=0.3)
    figure.suptitle(title or str(run_dir))
    figure.tight_layout()
    target = Path(output) if output else Path(run_dir) / "curves.png"
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target
