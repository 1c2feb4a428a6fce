#!/usr/bin/env bash
# Training throughput with and without torch.compile on one GPU (issue 5), in under 5 minutes:
#   1. based bench train --compile   360m BASED and transformer-360m, T=2048, batch 8, bf16
#   2. based bench train             the same, eager
#   3. based train --compile         the 360m preset for 30 steps on the built-in corpus (the real loop)
# then one JSON summary (printed, and written to OUT_DIR/train-compile-DATE.json with each stage's output).
#
#   BASED_GIT_REV=$(git rev-parse HEAD) bash benchmarks/train_compile.sh [OUT_DIR]
#
# Run from the repository root; the package is used from there (PYTHONPATH), nothing is installed.
# OUT_DIR defaults to $OUT (the device tool's output folder), else benchmarks/results. Each stage has a
# time limit (seconds, below) so that a slow compile cuts that stage short rather than the whole run:
# the benchmark writes its JSON after each model, so a stage cut short still reports what it finished.
set -uo pipefail

COMPILED_S=${COMPILED_S:-170}
EAGER_S=${EAGER_S:-50}
TRAIN_S=${TRAIN_S:-75}
TRAIN_STEPS=${TRAIN_STEPS:-30}
# A CPU dry run of the script itself: SIZE=debug SEQ_LEN=64 BATCH=2 BASED_COMPILE_BACKEND=aot_eager
SIZE=${SIZE:-360m}
SEQ_LEN=${SEQ_LEN:-2048}
BATCH=${BATCH:-8}

out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
day=$(date +%F)
rev=${BASED_GIT_REV:-unknown}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export BASED_CACHE=${BASED_CACHE:-${TMPDIR:-/tmp}/based-cache}
run_dir=${TMPDIR:-/tmp}/based-train-compile-$$
t_start=$(date +%s)

python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

bench() {  # bench NAME SECONDS [flags]
    local name=$1 limit=$2
    shift 2
    echo "== based bench train $* (limit ${limit} s)"
    timeout "$limit" python -m based bench train --size "$SIZE" --seq-len "$SEQ_LEN" --batch-size "$BATCH" \
        --steps 10 --warmup 3 --git-rev "$rev" --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
    echo "   exit ${PIPESTATUS[0]} after $(($(date +%s) - t_start)) s"
}

# Compiled first: it matters most, and it leaves Inductor's cache warm for the trainer below.
bench train-compile-bench-compiled "$COMPILED_S" --compile
bench train-compile-bench-eager "$EAGER_S"

echo "== based train --preset $SIZE --compile, $TRAIN_STEPS steps (limit ${TRAIN_S} s)"
# --stop-at: no validation or final export, which would compile inference graphs for a minute more.
timeout "$TRAIN_S" python -m based train --preset "$SIZE" --out "$run_dir" --seq-len "$SEQ_LEN" \
    --batch-size "$BATCH" --max-steps 1000 --stop-at "$TRAIN_STEPS" --warmup 10 --compile --no-progress \
    > "$out/train-compile-trainer.log" 2>&1
echo "   exit $? after $(($(date +%s) - t_start)) s"
tail -n 5 "$out/train-compile-trainer.log"
cp "$run_dir/metrics.jsonl" "$out/train-compile-trainer-metrics.jsonl" 2>/dev/null

python - "$out" "$day" "$rev" "$TRAIN_STEPS" "$SIZE" "$SEQ_LEN" "$BATCH" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

out, day, rev, steps, size, seq_len, batch = Path(sys.argv[1]), *sys.argv[2:4], int(sys.argv[4]), *sys.argv[5:8]
summary = {"benchmark": "train-compile", "date": day, "git_rev": rev, "device": None, "torch": None,
           "setup": f"{size} presets, T={seq_len}, batch {batch}, bf16 autocast on GPU, 10 timed steps after 3 "
                    f"warm-up", "results": []}
keys = ("preset", "compile", "tokens_per_s", "mfu", "step_ms", "tflops", "peak_memory_gib", "warmup_s", "graphs",
        "graph_breaks", "graph_break_reasons", "final_loss")
for name in ("train-compile-bench-eager", "train-compile-bench-compiled"):
    path = out / f"{name}.json"
    if not path.exists():
        summary["results"].append({"stage": name, "error": "no result (see its .log)"})
        continue
    bench = json.loads(path.read_text())
    summary["device"], summary["torch"] = bench["device"], bench["torch"]
    rows = {r["preset"]: r for r in bench["results"]}
    summary["results"] += [{k: r[k] for k in keys if k in r} for r in rows.values()]
    if {size, f"transformer-{size}"} <= set(rows):
        mode = "compiled" if name.endswith("compiled") else "eager"
        summary[f"based_over_transformer_{mode}"] = round(
            rows[size]["tokens_per_s"] / rows[f"transformer-{size}"]["tokens_per_s"], 3)
metrics = out / "train-compile-trainer-metrics.jsonl"
rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
rows = [r for r in rows if "loss" in r]
if rows:
    timed = rows[len(rows) // 3:]  # the first steps compile
    summary["trainer"] = {
        "command": f"based train --preset {size} --seq-len {seq_len} --batch-size {batch} --max-steps 1000 "
                   f"--stop-at {steps} --warmup 10 --compile",
        "steps_logged": len(rows), "first_step_s": rows[0]["time"], "loss_first": round(rows[0]["loss"], 4),
        "loss_last": round(rows[-1]["loss"], 4),
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "median_mfu": statistics.median(r["mfu"] for r in timed) if timed[0]["mfu"] is not None else None,
        "steps_in_median": f"{timed[0]['step']}..{timed[-1]['step']}",
    }
else:
    summary["trainer"] = {"error": "no metrics (see train-compile-trainer.log)"}
text = json.dumps(summary, indent=1)
(out / f"train-compile-{day}.json").write_text(text + "\n")
print(text)
EOF
rm -rf "$run_dir"
echo "total $(($(date +%s) - t_start)) s"
