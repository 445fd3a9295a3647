#!/usr/bin/env bash
# End-to-end decode benchmark on the GPU, one process per variant (a crash loses only that variant; it is
# retried once without Inductor's static CUDA launcher when RETRY=1). Writes parts under $OUT and merges them.
set -u
OUT=${OUT:-benchmarks/results}
PARTS=${PARTS:-/tmp/e2e_parts}
mkdir -p "$OUT" "$PARTS"
export PYTHONUNBUFFERED=1
VARIANTS=${VARIANTS:-"eager inductor transfigure transfigure+lut-4bit transfigure+sparsity-50 transfigure+lut-4bit+sparsity-50"}
# LOOP=step times transfigure.generate (compiled step, no per-token host sync) instead of generate()
LOOP=${LOOP:-generate}
# REPEATS=n runs the variant list n times, interleaved (A B A B ...); the report shows medians and ranges.
for rep in $(seq 1 ${REPEATS:-1}); do
for v in $VARIANTS; do
  extra=""; { [ "$v" = "transfigure" ] && [ "$rep" = 1 ]; } || extra="--no-warm"
  part="$PARTS/part_${v}_r$rep"; log="$PARTS/log_${v}_r$rep.txt"
  timeout ${PER_VARIANT_S:-150} python -X faulthandler -m transfigure bench --loop "$LOOP" --variants "$v" --new-tokens ${NEW_TOKENS:-256} --models ${MODELS:-llama-1b} --batch ${BATCH:-1} $extra --out "$part" > "$log" 2>&1 \
    || { [ -n "${RETRY:-}" ] && timeout ${PER_VARIANT_S:-150} python -X faulthandler -m transfigure bench --loop "$LOOP" --variants "$v" --new-tokens ${NEW_TOKENS:-256} --models ${MODELS:-llama-1b} --batch ${BATCH:-1} --no-warm --no-static-launcher --out "$part" >> "$log" 2>&1; } \
    || echo "variant $v (repeat $rep) failed" >> "$PARTS/failures.txt"
  tail -n 3 "$log"
done
done
cat "$PARTS"/log_*.txt > "$OUT/e2e_decode_log.txt" 2>/dev/null
cp "$PARTS/failures.txt" "$OUT/" 2>/dev/null
python - "$PARTS" "$OUT" <<'PY'
import sys, glob
from transfigure import bench
parts = sorted(glob.glob(f"{sys.argv[1]}/part_*/e2e_decode*.json"))
if parts:
    result = bench.merge(parts)
    bench.save(result, sys.argv[2], stem="e2e_decode" if result.get("loop", "generate") == "generate" else "e2e_decode_step_loop")
    print(bench.markdown(result))
PY
