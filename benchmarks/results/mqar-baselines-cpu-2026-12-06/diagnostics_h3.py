"""What slows figure 2's H3: curves.py's task and recipe at d_model 64, lr 3e-3, 500 steps, paper layout,
with one thing changed at a time (heads of 1, N = 64, torch's default init instead of N(0, 0.02)).

    OMP_NUM_THREADS=1 python benchmarks/results/mqar-baselines-cpu-2026-12-06/diagnostics_h3.py OUT.jsonl \
        h3_hd1_N16 h3_hd2_N16_torchinit h3_hd2_N64

The unchanged model's curve at 500 steps is curves.jsonl's (h3, paper, 64, 3e-3) row.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import curves  # noqa: E402

from based.mqar import model as M  # noqa: E402

VARIANTS = {
    "h3_hd1_N16": ({"h3": {"h3_head_dim": 1, "h3_state_size": 16}}, None),
    "h3_hd2_N16_torchinit": ({}, "torch"),
    "h3_hd2_N64": ({"h3": {"h3_state_size": 64}}, None),
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    paper_init = M.MQARModel._init_weights
    for name in sys.argv[2:]:
        features, init = VARIANTS[name]
        curves.FEATURES.update(features)
        if init == "torch":  # the embeddings as before, every mixer at torch's default init
            M.MQARModel._init_weights = lambda self: torch.nn.init.normal_(self.embeddings.weight, std=0.02)
        row = curves.run("h3", "paper", 64, 3e-3, 500, 32, 256, 64, 4, 100)
        M.MQARModel._init_weights = paper_init
        for key in features:
            curves.FEATURES.pop(key, None)
        row["variant"] = name
        with open(sys.argv[1], "a") as f:
            f.write(json.dumps(row) + "\n")
        print(name, [(c["step"], c["loss"], round(c["acc"], 3)) for c in row["curve"]], row["seconds"], flush=True)
