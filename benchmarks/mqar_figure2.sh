#!/usr/bin/env bash
# The BASED paper's figure-2 MQAR sweep, cut to about 6 minutes of one GPU (issue 6): `based mqar --sweep
# figure2-short` (38 runs: figure 2's tasks and test sets, a quarter of its training examples for 6 epochs,
# its 2 middle learning rates, 19 of its models; docs/mqar.md) as JOBS processes on the GPU, then the plot.
#
#   BASED_GIT_REV=$(git rev-parse HEAD) bash benchmarks/mqar_figure2.sh OUT_DIR
#
# Run from the repository root; the package is used from there (PYTHONPATH), nothing is installed. Rows are
# appended to OUT_DIR/results.jsonl run by run. After TIME_LIMIT seconds no new run starts (runs under way
# finish); at HARD_LIMIT the sweep is killed, losing only the runs still under way. A rerun into the same
# OUT_DIR skips the finished runs and trains the rest. OUT_DIR/pareto.png is redrawn from every row at the
# end, OUT_DIR/meta.json records the machine, the time taken and how many runs finished.
#
# A CPU dry run of the script itself: DEVICE=cpu JOBS=2 SCALE=0.002 EPOCHS=1 bash benchmarks/mqar_figure2.sh /tmp/f2
set -uo pipefail

out=${1:?usage: bash benchmarks/mqar_figure2.sh OUT_DIR}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-8}
TIME_LIMIT=${TIME_LIMIT:-300}
HARD_LIMIT=${HARD_LIMIT:-400}
SCALE=${SCALE:-1}
EPOCHS=${EPOCHS:-6}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
rev=${BASED_GIT_REV:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
t_start=$(date +%s)

python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available()
else 'no GPU')"
# timeout signals the whole process group: the sweep and its worker processes.
timeout -k 15 "$HARD_LIMIT" python -m based mqar --sweep figure2-short --out "$out" --device "$DEVICE" \
    --jobs "$JOBS" --time-limit "$TIME_LIMIT" --scale "$SCALE" --epochs "$EPOCHS" 2>&1 | tee "$out/sweep.log"
rc=${PIPESTATUS[0]}
t_sweep=$(($(date +%s) - t_start))
echo "sweep exit $rc after $t_sweep s"
python -m based mqar --sweep figure2-short --plot-only --out "$out"

python - "$out" "$rev" "$rc" "$t_sweep" "$DEVICE" "$JOBS" "$TIME_LIMIT" "$HARD_LIMIT" "$SCALE" "$EPOCHS" <<'EOF'
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

from based.mqar import SWEEPS, read_results

out, rev, rc, seconds, device, jobs, time_limit, hard_limit, scale, epochs = sys.argv[1:]
runs = SWEEPS["figure2-short"](scale=float(scale), epochs=int(epochs))
ids = {r.run_id for r in runs}
rows = [r for r in read_results(Path(out) / "results.jsonl") if r["run_id"] in ids]
meta = {
    "date": datetime.date.today().isoformat(),
    "command": f"bash benchmarks/mqar_figure2.sh {out}  (DEVICE={device} JOBS={jobs} TIME_LIMIT={time_limit} "
               f"HARD_LIMIT={hard_limit} SCALE={scale} EPOCHS={epochs})",
    "sweep_exit_code": int(rc),
    "wall_seconds": int(seconds),
    "runs_finished": len(rows),
    "runs_in_sweep": len(runs),
    "missing": sorted(f"{r.model_name} lr={r.lr:.3g}" for r in runs if r.run_id not in {x["run_id"] for x in rows}),
    "machine": {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
    },
    "git_rev": rev,
}
text = json.dumps(meta, indent=1)
(Path(out) / "meta.json").write_text(text + "\n")
print(text)
EOF
echo "total $(($(date +%s) - t_start)) s"
