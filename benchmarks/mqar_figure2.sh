#!/usr/bin/env bash
# The BASED paper's figure-2 MQAR sweep on one GPU, resumable in sittings: `based mqar --sweep SWEEP` then
# the plot and meta.json. SWEEP=figure2 (default; 220 runs, each model's 4 learning rates trained as one
# stacked model, its step a CUDA graph: docs/mqar.md) or figure2-short (38 runs, issue 6; JOBS=8, EPOCHS=6).
#
#   BASED_GIT_REV=$(git rev-parse HEAD) bash benchmarks/mqar_figure2.sh OUT_DIR
#   BASED_GIT_REV=... TIME_LIMIT=480 HARD_LIMIT=570 bash benchmarks/mqar_figure2.sh OUT_DIR   # one sitting of <10 min
#   BASED_GIT_REV=... TIME_LIMIT=480 HARD_LIMIT=570 FIT=1 bash benchmarks/mqar_figure2.sh OUT_DIR  # fresh machines
#
# Run from the repository root; the package is used from there (PYTHONPATH), nothing is installed. Rows are
# appended to OUT_DIR/results.jsonl run by run. After TIME_LIMIT seconds no new run starts and a stacked
# model still training saves its state (OUT_DIR/partial/) and stops; at HARD_LIMIT the sweep is killed,
# losing only what is under way since. A rerun into the same OUT_DIR skips the finished runs, resumes the
# paused ones and trains the rest. FIT=1 passes --fit: no model starts that would not finish (an H100's
# estimate) before TIME_LIMIT, for machines that lose OUT_DIR/partial/ between sittings (on a slower GPU give
# a smaller TIME_LIMIT). OUT_DIR/pareto.png is redrawn from every row at the
# end, OUT_DIR/meta.json records the machine, the time taken and how many runs finished.
#
# A CPU dry run of the script itself: DEVICE=cpu SCALE=0.0005 EPOCHS=1 bash benchmarks/mqar_figure2.sh /tmp/f2
set -uo pipefail

out=${1:?usage: bash benchmarks/mqar_figure2.sh OUT_DIR}
SWEEP=${SWEEP:-figure2}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-1}
TIME_LIMIT=${TIME_LIMIT:-3300}
HARD_LIMIT=${HARD_LIMIT:-3500}
SCALE=${SCALE:-1}
EPOCHS=${EPOCHS:-}  # empty: the sweep's own (figure2 32, figure2-short 6)
FIT=${FIT:-0}
STREAMS=${STREAMS:-1}  # models trained at once on the GPU, a CUDA stream each (based mqar --streams)
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
rev=${BASED_GIT_REV:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
t_start=$(date +%s)

python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available()
else 'no GPU')"
# timeout signals the whole process group: the sweep and its worker processes.
timeout -k 15 "$HARD_LIMIT" python -m based mqar --sweep "$SWEEP" --out "$out" --device "$DEVICE" \
    --jobs "$JOBS" --streams "$STREAMS" --time-limit "$TIME_LIMIT" --scale "$SCALE" ${EPOCHS:+--epochs "$EPOCHS"} \
    $([ "$FIT" = 1 ] && echo --fit) 2>&1 \
    | tee -a "$out/sweep.log"
rc=${PIPESTATUS[0]}
t_sweep=$(($(date +%s) - t_start))
echo "sweep exit $rc after $t_sweep s"
python -m based mqar --sweep "$SWEEP" --plot-only --out "$out"

python - "$out" "$rev" "$rc" "$t_sweep" "$DEVICE" "$JOBS" "$TIME_LIMIT" "$HARD_LIMIT" "$SCALE" "$EPOCHS" "$SWEEP" \
    "$FIT" "$STREAMS" <<'EOF'
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

from based.mqar import SWEEPS, read_results

out, rev, rc, seconds, device, jobs, time_limit, hard_limit, scale, epochs, sweep, fit, streams = sys.argv[1:]
runs = SWEEPS[sweep](scale=float(scale), **({"epochs": int(epochs)} if epochs else {}))
ids = {r.run_id for r in runs}
rows = [r for r in read_results(Path(out) / "results.jsonl") if r["run_id"] in ids]
meta_path = Path(out) / "meta.json"
earlier = json.loads(meta_path.read_text()) if meta_path.exists() else {}
sittings = [*earlier.get("sittings", []), {"date": datetime.date.today().isoformat(), "wall_seconds": int(seconds),
                                           "sweep_exit_code": int(rc), "git_rev": rev, "streams": int(streams)}]
meta = {
    "date": datetime.date.today().isoformat(),
    "sweep": sweep,
    "command": f"bash benchmarks/mqar_figure2.sh {out}  (SWEEP={sweep} DEVICE={device} JOBS={jobs} "
               f"TIME_LIMIT={time_limit} HARD_LIMIT={hard_limit} SCALE={scale} EPOCHS={epochs or 'default'} FIT={fit} "
               f"STREAMS={streams})",
    "sweep_exit_code": int(rc),
    "wall_seconds": int(seconds),
    # Every sitting of a resumed sweep; GPU-seconds = their sum (stacked runs share their group's seconds).
    "sittings": sittings,
    "gpu_seconds_total": sum(s["wall_seconds"] for s in sittings),
    "summed_train_steps_done": sum(r["train_steps"] for r in rows),
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
