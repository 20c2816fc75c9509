#!/usr/bin/env bash
# Several lorascope builds on the same points in one sitting on the GPU machine: `lorascope
# train` directly (no orchestrator), the builds in turn on each point, ROUNDS times. Prints tokens/s,
# time from process start to the first step record (start-up), peak process VRAM (nvidia-smi,
# 5 Hz) and the loss at the last step for each run, then a table of the medians.
# Run from the repository root on the device machine with `.carry/` holding <NAME>.gz for each
# NAME in BINS (default "A B"; bash ../shared/cuda/pack.sh BINARY, renamed) and
# alpaca_en_demo.json; results under $OUT.
# POINTS: "batch,seq,precision,quant,grad_ckpt[,optimizer[,model]]"; STEPS (35), WARMUP (5).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
BINS=${BINS:-"A B"}
for x in $BINS; do gunzip -c ".carry/$x.gz" > "/tmp/lorascope-$x" && chmod +x "/tmp/lorascope-$x"; done
DATA=$PWD/.carry/alpaca_en_demo.json
POINTS=${POINTS:-"1,512,fp16,nf4,0 2,2048,bf16,nf4,1"}
STEPS=${STEPS:-35}; WARMUP=${WARMUP:-5}; ROUNDS=${ROUNDS:-1}
: > "$OUT/ab.txt"
for r in $(seq "$ROUNDS"); do
for pt in $POINTS; do
  IFS=, read -r b s p q c o m <<< "$pt"
  o=${o:-adamw}; m=${m:-qwen2.5-1.5b}
  for which in $BINS; do
    tag="$which-$m-b${b}s${s}-${p}-${q}-ck${c}-${o}-r$r"
    args=(train --model "$m" --data "$DATA" --device cuda:0 --batch-size "$b" --seq-len "$s"
          --precision "$p" --quant "$q" --optimizer "$o" --steps "$STEPS" --warmup-steps "$WARMUP"
          --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05 --json ${EXTRA:-})
    [ "$c" = 1 ] && args+=(--grad-checkpointing)
    ( while sleep 0.2; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits; done ) > "$OUT/$tag.smi" 2>/dev/null &
    poll=$!
    # Each stdout line gets the seconds since the process started.
    /tmp/lorascope-$which "${args[@]}" 2> "$OUT/$tag.err" | python3 -c '
import sys, time
t0 = float(sys.argv[1])
for line in sys.stdin:
    sys.stdout.write(f"{time.time() - t0:.3f}\t{line}")
' "$(date +%s.%N)" > "$OUT/$tag.jsonl"
    kill $poll 2>/dev/null; wait $poll 2>/dev/null
    peak=$(awk -F', ' '{ if ($2 > m) m = $2 } END { print m + 0 }' "$OUT/$tag.smi")
    python3 - "$OUT/$tag.jsonl" "$which" "$m b${b}x${s} $p $q ck$c $o" "$peak" >> "$OUT/ab.txt" <<'PY'
import json, sys
path, which, point, peak = sys.argv[1:]
summ, first, last = None, None, None
for line in open(path):
    t, _, rec = line.partition("\t")
    try:
        e = json.loads(rec)
    except Exception:
        continue
    if e.get("type") == "step":
        first = first if first is not None else float(t)
        last = e
    elif e.get("type") == "summary":
        summ = e
if summ is None:
    print(f"{which}\t{point}\tnan\tnan\t{int(peak)/1024:.2f}\tnan\tno-summary")
else:
    print(f"{which}\t{point}\t{summ['tokens_per_s']:.0f}\t{first:.1f}\t{int(peak)/1024:.2f}\t{summ['final_loss']:.4f}\t{summ['status']}")
PY
    tail -1 "$OUT/ab.txt"
  done
done
done
python3 - "$OUT/ab.txt" $BINS <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
bins = sys.argv[2:]
points = []
for r in rows:
    if r[1] not in points:
        points.append(r[1])
def med(w, p, i):
    v = [float(r[i]) for r in rows if r[0] == w and r[1] == p]
    return statistics.median(v) if v else float("nan")
print("== medians per build: tok/s (x first build) | start-up s | peak VRAM GiB | final loss")
print("point | " + " | ".join(bins))
for p in points:
    base = med(bins[0], p, 2)
    cells = [f"{med(b, p, 2):.0f} ({med(b, p, 2) / base:.3f}x) {med(b, p, 3):.1f}s {med(b, p, 4):.2f}G {med(b, p, 5):.4f}" for b in bins]
    print(p + " | " + " | ".join(cells))
PY
