"""OUT/metrics.jsonl (one JSON object per line) and the loss-curve PNG drawn from it.

Training rows: {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "time"}; validation
rows: {"step", "val_loss", "val_ppl"}. A resumed run first drops the rows past its checkpoint, so the file
reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """Every complete row (a line cut short by a kill is skipped)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        rows = [r for r in read_metrics(path) if resume_step is not None and r.get("step", 0) <= resume_step]
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
        self._f = open(path, "a", buffering=1)  # line-buffered: a row is on disk when written

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._f.close()


def plot_losses(metrics: Path, png: Path) -> None:
    """Training loss per step (and a moving average) and validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, lw=0.6, alpha=0.4, color="C0", label="train")
        k = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, color="C0", label=f"train (mean of {k})")
    if val:
        ax.plot(*zip(*val), "o-", color="C1", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
