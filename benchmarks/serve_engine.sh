#!/usr/bin/env bash
# Where the serving loop's time goes (issue 21): `based bench serve --engine-only` (the saturation workload
# through the engine alone, no HTTP) once per variant, each in a fresh process, each with a cProfile of the
# engine thread (BASED_ENGINE_PROFILE), and the top of each profile printed. Variants:
#   base                  the defaults (--prefill-wait-ms 20)
#   wait100, wait200      --prefill-wait-ms 100 / 200: fewer, larger prefills (a small 1.3b prefill costs its
#                         ~1000 launches of host time whatever its size)
#   blocking              BASED_BLOCKING_COPIES=1: the loop's host-to-device copies as before 15921bc
#   nocompact             BASED_SLOT_COMPACTION=0: no slot compaction (sequences stay in their slots as a batch
#                         drains, so steps keep the rows up to the highest one in use)
#   long                  --saturation-factor 6: 4x the requests, the drain at the end a smaller share
#
#   BASED_GIT_REV=$(git rev-parse HEAD) bash benchmarks/serve_engine.sh OUT_DIR [VARIANT ...]
#
# Run from the repository root; nothing is installed. Writes OUT_DIR/serve-engine-VARIANT-GPU-DATE.json and
# .prof. PRESET (1.3b), SLOTS (2048) and CHUNK (16384) set the run.
# A CPU dry run of the script itself: DEVICE=cpu PRESET=debug SLOTS=16 CHUNK=256 bash benchmarks/serve_engine.sh /tmp/se
set -uo pipefail

out=${1:?usage: bash benchmarks/serve_engine.sh OUT_DIR [VARIANT ...]}
shift
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(base wait100 wait200)
for v in "${variants[@]}"; do  # all checked before the first run, not when its turn comes
    case $v in base|wait100|wait200|blocking|nocompact|long) ;; *) echo "unknown variant $v (base, wait100, wait200, blocking, nocompact, long)" >&2; exit 2 ;; esac
done
PRESET=${PRESET:-1.3b}
SLOTS=${SLOTS:-2048}
CHUNK=${CHUNK:-16384}
DEVICE=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
rev=${BASED_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else 'cpu')")
day=$(date +%F)
rc=0
for v in "${variants[@]}"; do
    case $v in
        base) env=(); flags=() ;;
        wait100) env=(); flags=(--prefill-wait-ms 100) ;;
        wait200) env=(); flags=(--prefill-wait-ms 200) ;;
        blocking) env=(BASED_BLOCKING_COPIES=1); flags=() ;;
        nocompact) env=(BASED_SLOT_COMPACTION=0); flags=() ;;
        long) env=(); flags=(--saturation-factor 6) ;;
    esac
    name=$out/serve-engine-$v-$gpu-$day
    env "${env[@]}" BASED_ENGINE_PROFILE=$name.prof python -m based bench serve --device "$DEVICE" \
        --presets "$PRESET" --engine-only --max-slots "$SLOTS" --prefill-chunk "$CHUNK" --api-workers 4 \
        --git-rev "$rev" --out "$name.json" "${flags[@]}" || rc=1
    python - "$name.prof" <<'EOF'
import pstats
import sys

stats = pstats.Stats(sys.argv[1])
stats.sort_stats("tottime").print_stats(15)
EOF
done
exit $rc
