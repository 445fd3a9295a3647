#!/usr/bin/env bash
# End-to-end decode benchmark on the GPU, one process per variant (a crash loses only that variant; it is
# retried once without Inductor's static CUDA launcher when RETRY=1). Writes parts under $OUT and merges them.
set -u
OUT=${OUT:-benchmarks/results}
PARTS=${PARTS:-/tmp/e2e_parts}
# parts of an earlier run would be merged into this run's table: start empty unless KEEP_PARTS=1
[ -n "${KEEP_PARTS:-}" ] || rm -rf "$PARTS"
mkdir -p "$OUT" "$PARTS"
export PYTHONUNBUFFERED=1
VARIANTS=${VARIANTS:-"eager inductor transfigure transfigure+lut-4bit transfigure+sparsity-50 transfigure+lut-4bit+sparsity-50"}
# LOOP=custom times generate(custom_generate=transfigure.decoding_loop(backend)), LOOP=step transfigure.generate
# (compiled step, no per-token host sync) instead of transformers' loop; a variant written name@loop overrides
# LOOP for itself, so one run can hold the generate() baseline and the other loops side by side.
LOOP=${LOOP:-generate}
# DECODING=sample|padded times sampling (top-k/top-p) or a left-padded batch (BATCH >= 2) instead of greedy.
# REPEATS=n runs the variant list n times, interleaved (A B A B ...); the report shows medians and ranges.
for rep in $(seq 1 ${REPEATS:-1}); do
for spec in $VARIANTS; do
  v=${spec%@*}; loop=$LOOP; [ "$spec" != "$v" ] && loop=${spec#*@}
  extra=""; { [ "$v" = "transfigure" ] && [ "$rep" = 1 ]; } || extra="--no-warm"
  part="$PARTS/part_${v}_${loop}_r$rep"; log="$PARTS/log_${v}_${loop}_r$rep.txt"
  timeout ${PER_VARIANT_S:-150} python -X faulthandler -m transfigure bench --loop "$loop" --variants "$v" --new-tokens ${NEW_TOKENS:-256} --models ${MODELS:-llama-1b} --batch ${BATCH:-1} --decoding ${DECODING:-greedy} $extra --out "$part" > "$log" 2>&1 \
    || { [ -n "${RETRY:-}" ] && timeout ${PER_VARIANT_S:-150} python -X faulthandler -m transfigure bench --loop "$loop" --variants "$v" --new-tokens ${NEW_TOKENS:-256} --models ${MODELS:-llama-1b} --batch ${BATCH:-1} --decoding ${DECODING:-greedy} --no-warm --no-static-launcher --out "$part" >> "$log" 2>&1; } \
    || echo "variant $v (repeat $rep) failed" >> "$PARTS/failures.txt"
  tail -n 3 "$log"
done
done
cat "$PARTS"/log_*.txt > "$OUT/e2e_decode_log.txt" 2>/dev/null
cp "$PARTS/failures.txt" "$OUT/" 2>/dev/null
python - "$PARTS" "$OUT" <<'PY'
import sys, glob, os
from transfigure import bench
parts = sorted(glob.glob(f"{sys.argv[1]}/part_*/e2e_decode*.json"))
if parts:
    result = bench.merge(parts)
    stem = os.environ.get("STEM") or bench.stem_for([r["loop"] for r in result["rows"] if r["variant"] != "eager"])
    bench.save(result, sys.argv[2], stem=stem)
    print(bench.markdown(result))
PY
