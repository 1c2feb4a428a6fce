"""The recall vs state-size picture (BASED paper, figure 2): MQAR accuracy against the recurrent state of
the mixer under test, one panel per test length, the best learning rate of each model, frontier drawn."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

# One colour per mixer family; Based gets the paper's red.
FAMILIES = {
    "Attention": "tab:blue",
    "Sliding window": "tab:orange",
    "Based": "tab:red",
    "Mamba": "tab:green",
    "H3": "tab:purple",
    "Hyena": "tab:brown",
    "BaseConv": "tab:gray",
    "Lightning": "darkgoldenrod",
    "Mamba-2": "lime",
    "RWKV": "teal",
}
_ABLATION_COLORS = ("tab:pink", "tab:olive", "tab:cyan", "gold", "navy")
_NAMES = {"attention": "Attention", "sliding_window": "Sliding window", "mamba": "Mamba", "h3": "H3",
          "hyena": "Hyena", "base_conv": "BaseConv",
          "lightning": "Lightning", "mamba2": "Mamba-2", "rwkv": "RWKV"}
# The hyperparameter that moves each family along the x-axis, shown next to its points.
_DIAL = {"feature_dim": "d", "window_size": "w", "ssm_state_size": "N", "h3_state_size": "N",
         "lightning_num_heads": "H"}
# Points closer than this in accuracy at one state size overlap: they are spread sideways (log x) by
# _SPREAD per point, labels stacked _LABEL_STEP points apart.
_OVERLAP, _SPREAD, _LABEL_STEP = 0.04, 0.12, 8


def family(row: dict) -> str:
    """Display name of a result row's mixer: Taylor linear attention is "Based", other feature maps are
    named by their map."""
    if row["mixer"] == "linear_attn":
        fm = row["hparams"].get("feature_map", "compact")
        return "Based" if fm in ("compact", "full", "taylor") else f"Linear attn ({fm})"
    return _NAMES.get(row["mixer"], row["mixer"])


def mean_accuracy(row: dict, seq_len: int | None = None) -> float:
    """Mean accuracy over the row's test tasks (of one length if given)."""
    accs = [row["accuracy"][f"T{t['seq_len']}_kv{t['num_kv_pairs']}"] for t in row["run"]["test"]
            if seq_len is None or t["seq_len"] == seq_len]
    return sum(accs) / len(accs)


def best_per_model(rows: list[dict]) -> list[dict]:
    """For each model (mixer and hyperparameters), the run of the learning rate with the best mean
    accuracy: the paper reports the best of its lr sweep."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["model"] not in best or mean_accuracy(row) > mean_accuracy(best[row["model"]]):
            best[row["model"]] = row
    return sorted(best.values(), key=lambda r: (family(r), r["d_model"], sorted(r["hparams"].items())))


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto frontier: the points no other point beats with less or equal state, by increasing state."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out


def overlapping(panel: list[tuple]) -> list[list[tuple]]:
    """(x, y, ...) points in clusters that would hide each other: one x, accuracies within _OVERLAP of the
    next; each cluster by descending y, so stacked labels read in the points' order."""
    clusters: list[list[tuple]] = []
    for point in sorted(panel, key=lambda p: (p[0], -p[1])):
        last = clusters[-1][-1] if clusters else None
        if last is not None and last[0] == point[0] and last[1] - point[1] < _OVERLAP:
            clusters[-1].append(point)
        else:
            clusters.append([point])
    return clusters


def decade_limits(xs: list[float], margin: float = 1.5) -> tuple[float, float]:
    """x limits of a log panel: the powers of ten around the states (with room for the sideways spread of
    overlapping points, `margin` each way), at least one decade apart."""
    lo = 10 ** math.floor(math.log10(min(xs) / margin))
    hi = 10 ** math.ceil(math.log10(max(xs) * margin))
    return lo, max(hi, lo * 10)


def plot_pareto(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Write the figure to `path` (PNG); rows are results.jsonl rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = best_per_model(rows)
    by_len: dict[int, set[int]] = defaultdict(set)
    for row in rows:
        for t in row["run"]["test"]:
            by_len[t["seq_len"]].add(t["num_kv_pairs"])
    colors = dict(FAMILIES)
    for name in sorted({family(r) for r in rows} - set(colors)):
        colors[name] = _ABLATION_COLORS[len(colors) % len(_ABLATION_COLORS)]

    lengths = sorted(by_len)
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 4.2), sharey=True, squeeze=False)
    for ax, L in zip(axes[0], lengths):
        panel = [(row["state_size"][str(L)], mean_accuracy(row, L), row) for row in rows if str(L) in row["state_size"]]
        points = [(x, y) for x, y, _ in panel]
        for cluster in overlapping(panel):
            m = len(cluster)
            for j, (x, y, row) in enumerate(cluster):
                # Spread in log x around the true state size; the frontier uses the true one.
                xj = x * math.exp(_SPREAD * (j - (m - 1) / 2))
                ax.scatter(xj, y, s=18 + row["d_model"] / 4, color=colors[family(row)], edgecolor="black",
                           linewidth=0.4, zorder=3, label=family(row))
                dial = [f"{_DIAL[k]}={v}" for k, v in row["hparams"].items() if k in _DIAL]
                text = dial[0] if dial else f"d={row['d_model']}"
                if m > 1:  # labels stacked beside the cluster, one line each, in the points' order
                    right = x * math.exp(_SPREAD * (m - 1) / 2)
                    mid = sum(c[1] for c in cluster) / m
                    ax.annotate(text, (right, mid), textcoords="offset points", fontsize=6, va="center",
                                xytext=(7, _LABEL_STEP * ((m - 1) / 2 - j)), color=colors[family(row)])
                elif dial:
                    ax.annotate(text, (xj, y), textcoords="offset points", xytext=(5, -9), fontsize=6, color="dimgray")
        ax.set_xscale("log")
        if points:
            ax.set_xlim(*decade_limits([x for x, _ in points]))
        # Whole decades give every panel at least two labelled major ticks; minor ticks stay unlabelled (within one
        # decade matplotlib labels them, and their labels run into each other).
        ax.xaxis.set_minor_formatter(NullFormatter())
        edge = frontier(points)
        if edge:
            xs, ys = zip(*edge)
            ax.step([*xs, ax.get_xlim()[1]], [*ys, ys[-1]], where="post", color="black", linestyle="--",
                    linewidth=0.9, zorder=2, label="Pareto frontier")
        kvs = ", ".join(str(k) for k in sorted(by_len[L]))
        ax.set_title(f"test length {L}, {kvs} kv pairs", fontsize=10)
        ax.set_xlabel("recurrent state size (values per sequence)")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel("MQAR accuracy\n(mean over the panel's test tasks, best lr)")
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    order = [n for n in [*colors, "Pareto frontier"] if n in handles]
    fig.legend([handles[n] for n in order], order, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=9,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    # Written aside and moved in place: shards of one sweep may redraw the same plot at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=150, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)
    return path
