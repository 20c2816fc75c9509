#!/usr/bin/env bash
# Engine profile on the GPU machine: `lorascope train` directly (no orchestrator), each point
# once with LORASCOPE_PROFILE=1 (device-synchronised section times and pool peaks on stderr)
# and once plain (tokens/s), with nvidia-smi's process memory polled beside it.
# Run from the repository root on the device machine with `.carry/` as for gpu_bench.sh.
# POINTS: "batch,seq,precision,quant,grad_ckpt[,optimizer]"; STEPS (default 12), WARMUP (3).
# PROFILE: space-separated LORASCOPE_PROFILE modes to run first ("1" synchronised, "host"
# issue time), or 0 for none.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
[ -x /tmp/lorascope ] || { gunzip -c .carry/lorascope.gz > /tmp/lorascope && chmod +x /tmp/lorascope; }
DATA=$PWD/.carry/alpaca_en_demo.json
POINTS=${POINTS:-"1,512,fp16,nf4,0 2,2048,fp16,nf4,1"}
STEPS=${STEPS:-12}; WARMUP=${WARMUP:-3}; PROFILE=${PROFILE:-1}
for pt in $POINTS; do
  IFS=, read -r b s p q c o <<< "$pt"
  o=${o:-adamw}
  tag="b${b}s${s}-${p}-${q}-ck${c}-${o}"
  args=(train --model qwen2.5-1.5b --data "$DATA" --device cuda:0 --batch-size "$b" --seq-len "$s"
        --precision "$p" --quant "$q" --optimizer "$o"
        --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05 ${EXTRA:-})
  [ "$c" = 1 ] && args+=(--grad-checkpointing)
  for mode in $PROFILE; do
    [ "$mode" = 0 ] && continue
    LORASCOPE_PROFILE=$mode /tmp/lorascope "${args[@]}" --steps 6 --warmup-steps 2 > /dev/null 2> "$OUT/$tag.profile-$mode.txt"
    echo "== $tag profile $mode"; grep -vE "^step" "$OUT/$tag.profile-$mode.txt" | tail -40
  done
  ( while sleep 0.2; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits; done ) > "$OUT/$tag.smi" 2>/dev/null &
  poll=$!
  /tmp/lorascope "${args[@]}" --steps "$STEPS" --warmup-steps "$WARMUP" --json > "$OUT/$tag.jsonl" 2> "$OUT/$tag.err"
  rc=$?
  kill $poll 2>/dev/null; wait $poll 2>/dev/null
  peak=$(awk -F', ' '{ if ($2 > m) m = $2 } END { print m + 0 }' "$OUT/$tag.smi")
  python3 - "$OUT/$tag.jsonl" "$tag" "$rc" "$peak" >> "$OUT/table.txt" <<'PY'
import json, sys
path, tag, rc, peak = sys.argv[1:]
summ = None
steps = []
for line in open(path):
    try:
        e = json.loads(line)
    except Exception:
        continue
    if e.get("type") == "summary":
        summ = e
    elif e.get("type") == "step":
        steps.append(e)
if summ is None:
    print(f"{tag:<34} rc={rc} no summary")
else:
    m = summ.get("device_memory") or {}
    g = lambda k: (m.get(k) or 0) / 2**30
    print(f"{tag:<34} {summ['tokens_per_s']:>9.0f} tok/s  smi {int(peak)/1024:6.2f} GiB  "
          f"w {g('weights_bytes'):.2f} act {g('activations_peak_bytes'):.2f} pool {g('pool_reserved_peak_bytes'):.2f}  "
          f"loss {summ['first_loss']:.3f}->{summ['final_loss']:.3f} skipped {summ['skipped_steps']}")
PY
  tail -2 "$OUT/$tag.err"
done
echo "== table"; cat "$OUT/table.txt"
