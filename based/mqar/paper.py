"""The BASED paper's figure 2 as published, and a table of our sweep beside it.

Source. Figure 2 of "Simple linear attention language models balance the recall-throughput tradeoff"
(arXiv 2402.18668), right panel: the PNG `zoology/experiments/paper_configs/arxiv24_based_figure2/figure.png`
of HazyResearch/zoology at commit 4261f62eecc372d0af99e57890f922caf0d188c2 (first added as
`zoology/experiments/arxiv24_based_figure2/figure.png` in 0ebb79e, 2024-02-29), byte for byte the same file as
`assets/tradeoff.png` of HazyResearch/based at d21ccc554278c5fd42d9c4eda1dc02eae301606f, which that README
calls the paper's figure 2. No data file of it is public: Zoology's `plot.py` beside it reads the runs from
the authors' Weights & Biases project. So every number below was read off the plot: marker centres found
by colour in the 869 x 393 PNG, mapped through the grid lines (28.4 px per power of 2 on x, 312 px per unit
of accuracy on y). Accuracy: +-0.01 (+-0.02 for the two Based markers half hidden behind another).

What the figure is. One panel (no panel per sequence length). y: "Associative Recall Accuracy", Zoology's
`valid/accuracy` at the end of each run (its W&B summary), the mean over all test examples of the 7 test
sets (T 64 with 4, 8, 16 pairs; 128/32; 256/64; 512/128; 1024/256; 1000 examples each, so each set
weighs the same), best learning rate per model. x: "Recurrent state size (bytes)", log scale: Zoology's
`state_size` at sequence length 1024 (its largest test length) times 4 (fp32 bytes), summed over the
model's layers, except that the BaseConv layer of the hybrid models (Based, attention, sliding window) is
not counted (sliding window d 128, w 8 sits at exactly 2^13 = 4 x 2 w d).

Every marker's x matches, within 0.02 in log2, the state of one model of Zoology's sweep, so the points
below carry the exact byte counts of those models (named beside them); only Mamba's (16 d N bytes for two
layers) cannot be told apart (d x N is what the x gives). The figure's sweep is wider than the committed
configs (`arxiv24_based_figure2/configs.py`, our FIGURE2_MODELS): Based at d_model 32 (feature dim 8 only),
64, 128, 256, 512 (no 48); H3 and Hyena up to d_model 512; Mamba up to 2^19 bytes; attention at d_model 64
and 256 (a d_model 128 point, at 2^20 with accuracy 1.0, could be hidden behind the sliding window w 1024
there). Mamba-2, RWKV and Lightning are not in the figure.

Not used: Zoology's `assets/figure2.png` is the Zoology paper's figure 2 (accuracy against model width), and
`zoology/analysis/paper/based_paper/results.png` (4293e43, 2026) a later re-run with other families (GLA,
DeltaNet, RWKV-7, ...), not the BASED paper's figure.
"""
from __future__ import annotations

import math
from typing import Optional

# family (plot.family's names) -> ((state in bytes as the figure counts it, accuracy, d_model, the model's
# other settings as our FIGURE2_MODELS name them), ...); d_model and settings None where not identifiable.
Point = tuple[int, float, Optional[int], Optional[dict]]
FIGURE2: dict[str, tuple[Point, ...]] = {
    # Based: 4 (d + 1) E bytes, E = 1 + f + f (f + 1) / 2 (the compact Taylor map of feature dim f).
    "Based": (
        (5_940, 0.54, 32, {"feature_dim": 8}),
        (11_700, 0.71, 64, {"feature_dim": 8}),
        (23_220, 0.82, 128, {"feature_dim": 8}),
        (39_780, 0.89, 64, {"feature_dim": 16}),
        (46_260, 0.85, 256, {"feature_dim": 8}),
        (78_948, 0.97, 128, {"feature_dim": 16}),
        (84_500, 0.96, 64, {"feature_dim": 24}),
        (92_340, 0.87, 512, {"feature_dim": 8}),
        (157_284, 0.99, 256, {"feature_dim": 16}),
        (167_700, 0.99, 128, {"feature_dim": 24}),  # half hidden behind d 256, f 16
        (313_956, 0.99, 512, {"feature_dim": 16}),
        (334_100, 0.99, 256, {"feature_dim": 24}),  # half hidden behind d 512, f 16
        (666_900, 1.00, 512, {"feature_dim": 24}),
    ),
    # Mamba: two layers of 2 d N values, 16 d N bytes; which (d, N) gave a point is not readable.
    "Mamba": tuple((b, a, None, None) for b, a in (
        (8_192, 0.57), (16_384, 0.58), (16_384, 0.61), (24_576, 0.58), (32_768, 0.65), (32_768, 0.70),
        (32_768, 0.77), (49_152, 0.82), (65_536, 0.75), (65_536, 0.80), (98_304, 0.82), (131_072, 0.82),
        (131_072, 0.83), (131_072, 0.89), (196_608, 0.86), (262_144, 0.86), (262_144, 0.91), (393_216, 0.88),
        (524_288, 0.86),
    )),
    # H3: two layers of d N values, N = d / 4 (Zoology's count leaves the head_dim 2 out): 2 d^2 bytes.
    "H3": tuple((2 * d * d, a, d, {}) for d, a in ((64, 0.19), (128, 0.26), (256, 0.31), (512, 0.36))),
    # Hyena: two layers of d L values at L = 1024: 8192 d bytes.
    "Hyena": tuple((8192 * d, a, d, {}) for d, a in ((64, 0.20), (128, 0.34), (256, 0.45), (512, 0.51))),
    # Sliding window, d_model 128: 2 w d values (4 bytes each) for w = 8 ... 1024.
    "Sliding window": tuple((4 * 2 * w * 128, a, 128, {"window_size": w}) for w, a in (
        (8, 0.07), (16, 0.14), (32, 0.31), (64, 0.51), (128, 0.65), (256, 0.80), (512, 0.94), (1024, 1.00),
    )),
    # Attention: the KV cache at L = 1024, 2 d L values.
    "Attention": tuple((4 * 2 * d * 1024, 1.00, d, {}) for d in (64, 256)),
}

# Families whose figure-2 models put a BaseConv (kernel 3) before the mixer: our count includes its 3 d.
_HYBRID = ("Based", "Attention", "Sliding window")


def paper_state(family: str, state_bytes: int, d_model: int | None) -> float:
    """A figure-2 point's x in our count (docs/mqar.md: values per sequence, every layer): bytes / 4 (fp32);
    H3 x 2 (we count d P N per layer with head_dim P = 2, Zoology d N); the hybrids' BaseConv 3 d added."""
    values = state_bytes / 4
    if family == "H3":
        values *= 2
    if family in _HYBRID:
        values += 3 * d_model
    return values


def bucket(state: float) -> int:
    """State-size bucket k: [10^(k/2), 10^((k+1)/2)), half decades (1k-3.2k, 3.2k-10k, ...)."""
    return math.floor(2 * math.log10(state) + 1e-9)


def bucket_label(k: int) -> str:
    def short(x: float) -> str:
        for unit, scale in (("M", 1e6), ("k", 1e3), ("", 1)):
            if x >= scale:
                v = x / scale
                return f"{v:.2g}{unit}" if v < 10 else f"{v:.0f}{unit}"
        return f"{x:.2g}"

    return f"{short(10 ** (k / 2))}-{short(10 ** ((k + 1) / 2))}"


def comparison_table(rows: list[dict]) -> str:
    """Markdown: one row per mixer family, one column per half-decade of state (our count, at the longest
    test length, as the figure takes 1024), each cell "ours / paper": the best accuracy in that bucket, ours
    being each model at its best lr (plot.best_per_model) and accuracy averaged over all its test tasks, as
    the figure's y; '-' for a side with no model there. `rows`: results.jsonl rows."""
    from .plot import FAMILIES, best_per_model, family, mean_accuracy

    ours: dict[str, dict[int, float]] = {}
    for row in best_per_model(rows):
        longest = max(row["state_size"], key=int)
        k = bucket(row["state_size"][longest])
        cells = ours.setdefault(family(row), {})
        cells[k] = max(cells.get(k, 0.0), mean_accuracy(row))
    paper: dict[str, dict[int, float]] = {}
    for name, points in FIGURE2.items():
        cells = paper.setdefault(name, {})
        for state_bytes, acc, d_model, _ in points:
            k = bucket(paper_state(name, state_bytes, d_model))
            cells[k] = max(cells.get(k, 0.0), acc)
    names = [n for n in FAMILIES if n in ours or n in paper] + sorted(set(ours) - set(FAMILIES))
    ks = sorted({k for cells in (*ours.values(), *paper.values()) for k in cells})
    ks = list(range(ks[0], ks[-1] + 1))

    def cell(name: str, k: int) -> str:
        a, b = ours.get(name, {}).get(k), paper.get(name, {}).get(k)
        if a is None and b is None:
            return "-"
        return " / ".join("-" if v is None else f"{v:.2f}" for v in (a, b))

    lines = [
        "Best MQAR accuracy per state-size bucket, ours / paper's figure 2 (accuracy: mean over the test tasks, "
        "each model at its best lr; state: values per sequence at the longest test length, as docs/mqar.md "
        "counts it, half-decade buckets; the paper's points converted to that count)",
        "",
        "| family | " + " | ".join(bucket_label(k) for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    lines += [f"| {name} | " + " | ".join(cell(name, k) for k in ks) + " |" for name in names]
    absent = [n for n in names if n not in FIGURE2]
    if absent:
        lines += ["", f"Not in the paper's figure 2: {', '.join(absent)}."]
    return "\n".join(lines)
