"""curves.jsonl -> curves.png: test accuracy (top) and train loss (bottom) against steps, one column per
(mixer, d_model), one colour per learning rate, solid = "paper" layout, dashed = "conv_hybrid"; dotted (paper) and
dash-dot (conv_hybrid) for a max_seq_len longer than T (Hyena's l_max as in figure 2).

    python benchmarks/results/mqar-baselines-cpu-2026-12-06/plot.py IN.jsonl OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
panels = sorted({(r["mixer"], r["d_model"], r["vocab"]) for r in rows})
lrs = sorted({r["lr"] for r in rows})
colours = dict(zip(lrs, plt.cm.viridis([i / max(len(lrs) - 1, 1) for i in range(len(lrs))])))
fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 6), squeeze=False, sharex=False)
for col, (mixer, d, vocab) in enumerate(panels):
    acc_ax, loss_ax = axes[0, col], axes[1, col]
    for r in rows:
        if (r["mixer"], r["d_model"], r["vocab"]) != (mixer, d, vocab):
            continue
        steps = [c["step"] for c in r["curve"]]
        long_filter = r.get("max_seq_len", r["seq_len"]) != r["seq_len"]
        style = {(True, False): "-", (False, False): "--", (True, True): ":", (False, True): "-."}[
            (r["layout"] == "paper", long_filter)]
        label = f"lr {r['lr']:g}, {r['layout']}" + (f", l_max {r['max_seq_len']}" if long_filter else "")
        acc_ax.plot(steps, [c["acc"] for c in r["curve"]], style, color=colours[r["lr"]], label=label)
        loss_ax.plot(steps[1:], [c["loss"] for c in r["curve"][1:]], style, color=colours[r["lr"]])
    acc_ax.set_title(f"{mixer}, d_model {d}, vocab {vocab}", fontsize=9)
    acc_ax.set_ylim(-0.02, 1.02)
    loss_ax.axhline(__import__("math").log(vocab // 2), color="grey", lw=0.5)
    loss_ax.set_xlabel("step (batch 32)")
    if col == 0:
        acc_ax.set_ylabel("test accuracy (T 64, 4 pairs)")
        loss_ax.set_ylabel("train loss (nats; grey: ln(V/2))")
    acc_ax.legend(fontsize=6)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
