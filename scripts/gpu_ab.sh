#!/usr/bin/env bash
# Two lorascope builds on the same points in one sitting on the GPU machine: `lorascope train`
# directly (no orchestrator), alternating A and B per point, ROUNDS times. Prints tokens/s,
# time from process start to the first step record (start-up), peak process VRAM (nvidia-smi,
# 5 Hz) and the loss at the last step for each run, then a table of the medians.
# Run from the repository root on the device machine with `.carry/` holding A.gz and B.gz
# (bash ../shared/cuda/pack.sh BINARY; renamed), alpaca_en_demo.json; results under $OUT.
# POINTS: "batch,seq,precision,quant,grad_ckpt[,optimizer[,model]]"; STEPS (35), WARMUP (5).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
A=${A:-.carry/A.gz}; B=${B:-.carry/B.gz}
gunzip -c "$A" > /tmp/lorascope-A && chmod +x /tmp/lorascope-A
gunzip -c "$B" > /tmp/lorascope-B && chmod +x /tmp/lorascope-B
DATA=$PWD/.carry/alpaca_en_demo.json
POINTS=${POINTS:-"1,512,fp16,nf4,0 2,2048,bf16,nf4,1"}
STEPS=${STEPS:-35}; WARMUP=${WARMUP:-5}; ROUNDS=${ROUNDS:-1}
: > "$OUT/ab.txt"
for r in $(seq "$ROUNDS"); do
for pt in $POINTS; do
  IFS=, read -r b s p q c o m <<< "$pt"
  o=${o:-adamw}; m=${m:-qwen2.5-1.5b}
  for which in A B; do
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
python3 - "$OUT/ab.txt" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
points = []
for r in rows:
    if r[1] not in points:
        points.append(r[1])
print("== A/B medians: point | A tok/s | B tok/s | B/A | A start s | B start s | A VRAM GiB | B VRAM GiB | A loss | B loss")
for p in points:
    def med(w, i):
        v = [float(r[i]) for r in rows if r[0] == w and r[1] == p]
        return statistics.median(v) if v else float("nan")
    a, b = med("A", 2), med("B", 2)
    print(f"{p} | {a:.0f} | {b:.0f} | {b / a if a == a and a else float('nan'):.3f} | {med('A', 3):.1f} | {med('B', 3):.1f} | {med('A', 4):.2f} | {med('B', 4):.2f} | {med('A', 5):.4f} | {med('B', 5):.4f}")
PY
