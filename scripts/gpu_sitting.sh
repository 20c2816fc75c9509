#!/usr/bin/env bash
# One sitting on the GPU machine for this round's BENCHMARKS tables, in parts that each fit a
# 10-minute device call (run them back to back so the host stays the same):
#   PART=checks  self-tests, the leak matrix (scripts/gpu_leak_check.sh), the memory model
#                (scripts/gpu_memory_check.sh), worker-side telemetry (scripts/gpu_telemetry_check.sh
#                when present)
#   PART=bench   lorascope and PEFT + bitsandbytes on the four 1.5B points and the 7B points
#                (scripts/gpu_bench.sh)
#   PART=peers   PEFT + Liger-Kernel and Unsloth on the four 1.5B points
#                (../shared/bench/peers/run.sh), then lorascope again on the same points
# Run from the repository root with carry [".carry", ".whl", ".whl-peers"]; `.carry/` holds
# lorascope.gz (bash ../shared/cuda/pack.sh target/release/lorascope), alpaca_en_demo.json,
# peft_qlora_baseline.py, qwen/config.json, qwen7b/config.json and bench/ + models/ (copies of
# ../shared/bench and ../shared/models). Results under $OUT; each part prints a table last.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
gunzip -c .carry/lorascope.gz > /tmp/lorascope && chmod +x /tmp/lorascope
L=/tmp/lorascope
P4="1,512,fp16,nf4,0 1,512,bf16,nf4,0 2,2048,fp16,nf4,1 2,2048,bf16,nf4,1"
T0=$SECONDS
case "${PART:-checks}" in
checks)
  $L selftest engine --device cuda:0 > "$OUT/selftest-engine.txt" 2>&1; e=$?
  $L selftest optim --steps 20 > "$OUT/selftest-optim.txt" 2>&1; o=$?
  echo "selftest engine exit $e, optim exit $o ($((SECONDS - T0)) s)"
  OUT=$OUT/leak JOBS=${JOBS:-6} bash scripts/gpu_leak_check.sh > "$OUT/leak.log" 2>&1
  echo "leak check exit $? ($((SECONDS - T0)) s)"
  OUT=$OUT/mem bash scripts/gpu_memory_check.sh > "$OUT/mem.log" 2>&1
  echo "memory check exit $? ($((SECONDS - T0)) s)"
  if [ -f scripts/gpu_telemetry_check.sh ]; then
    OUT=$OUT/tel bash scripts/gpu_telemetry_check.sh > "$OUT/tel.log" 2>&1
    echo "telemetry check exit $? ($((SECONDS - T0)) s)"
  fi
  grep -vE '^ *$' "$OUT/selftest-engine.txt" | tail -16
  tail -3 "$OUT/selftest-optim.txt"
  [ -f "$OUT/tel.log" ] && tail -8 "$OUT/tel.log"
  tail -14 "$OUT/leak.log"
  tail -16 "$OUT/mem.log"
  ;;
bench)
  POINTS=$P4 OUT=$OUT/q15 WHL=.whl bash scripts/gpu_bench.sh > "$OUT/q15.log" 2>&1
  echo "1.5B bench ($((SECONDS - T0)) s)"
  POINTS=${POINTS7:-"1,1024,bf16,nf4,1 2,2048,bf16,nf4,1"} MODEL=$PWD/.carry/qwen7b \
    REFCFG=.carry/qwen7b OUT=$OUT/q7 WHL=.whl bash scripts/gpu_bench.sh > "$OUT/q7.log" 2>&1
  echo "7B bench ($((SECONDS - T0)) s)"
  for f in q15 q7; do
    echo "== $f lorascope"; cat "$OUT/$f/lorascope.md"
    echo "== $f PEFT + bitsandbytes"; grep -hE '^\{' "$OUT"/$f/reference-ckpt*.jsonl | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print(r.get("precision"), r.get("batch"), r.get("seq"), r.get("status"),
          round(r.get("tokens_per_s") or 0), "tok/s", r.get("peak_process_gib"), "GiB",
          r.get("j_per_token"), "J/tok")'
  done
  ;;
peers)
  cp "$OUT"/q15/reference-ckpt1.jsonl "$OUT/peft.jsonl" 2>/dev/null
  POINTS="fp16,1,512,0 bf16,1,512,0 fp16,2,2048,1 bf16,2,2048,1" BUDGET_S=${BUDGET_S:-330} \
    REF=$OUT/peft.jsonl OUT=$OUT/peers bash .carry/bench/peers/run.sh > "$OUT/peers.log" 2>&1
  echo "peers ($((SECONDS - T0)) s)"
  POINTS=$P4 OUT=$OUT/again SKIP_REF=1 WHL=.whl bash scripts/gpu_bench.sh > "$OUT/again.log" 2>&1
  echo "lorascope again ($((SECONDS - T0)) s)"
  tail -8 "$OUT/peers.log"; cat "$OUT/again/lorascope.md"
  ;;
presets)
  # Every model preset at 1 x 1024 (scripts/gpu_presets.sh), then the memory model's error
  # split per point over these and the memory check's sweeps (scripts/gpu_memory_diag.py).
  export LORASCOPE_STATE_DIR=${LORASCOPE_STATE_DIR:-$OUT/mem/state}
  OUT=$OUT/presets bash scripts/gpu_presets.sh > "$OUT/presets.log" 2>&1
  echo "presets ($((SECONDS - T0)) s)"
  mkdir -p "$OUT/diag"
  for d in "$OUT"/mem "$OUT"/presets; do
    for f in "$d"/*.estimate.jsonl; do
      [ -f "$f" ] || continue
      n=$(basename "$f" .estimate.jsonl)
      [ -f "$d/$n.db" ] && cp "$f" "$d/$n.db" "$OUT/diag/"
    done
  done
  python3 scripts/gpu_memory_diag.py "$OUT/diag" > "$OUT/diag.txt" 2>&1
  cat "$OUT/diag.txt"
  grep -E "^\|" "$OUT/presets.log"
  ;;
esac
