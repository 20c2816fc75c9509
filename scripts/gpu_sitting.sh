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
#   PART=round   the transformers fixtures on CUDA (selftest engine --fixtures), adapters
#                trained on CUDA per family loaded by PEFT (scripts/check_peft_load.py), the
#                worker-side telemetry check, the memory check with the pool's release threshold
#                at 0 (LORASCOPE_POOL_KEEP_BYTES=0), and the dashboard of a real sweep captured
#                in a pseudo-terminal (scripts/gpu_screens.py; .carry/pylib holds pyte + wcwidth)
#   PART=round2  transformers' own bf16 error on the fixtures (scripts/hf_bf16_error.py, CUDA and
#                CPU; bf16_error.json per case under $OUT/bf16), the fixtures and PEFT loads again,
#                the memory check with the pool's default release threshold and with 0 back to back
#                (memory and tokens/s of the same points in one sitting), and the screens again
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
# Adapters trained on CUDA per family, each loaded by PEFT (scripts/check_peft_load.py).
peft_loads() {
  mkdir -p "$OUT/adapters"
  for fam in qwen2 qwen3 llama3 mistral gemma2 gemma3-text phi3; do
    $L train --model "tests/fixtures/hf/$fam" --device cuda:0 --quant nf4 --precision bf16 \
      --steps 4 --warmup-steps 0 --seq-len 32 --batch-size 2 --lr 1e-2 --lora-rank 4 \
      --lora-targets all-linear --save-adapter "$OUT/adapters/$fam" --json \
      > "$OUT/adapters/$fam.jsonl" 2> "$OUT/adapters/$fam.err"; t=$?
    python3 scripts/check_peft_load.py "$OUT/adapters/$fam" "tests/fixtures/hf/$fam" \
      > "$OUT/adapters/$fam.check" 2>&1; c=$?
    echo "peft load $fam: train exit $t, check exit $c ($(grep -c '^ok' "$OUT/adapters/$fam.check") ok, $(grep -c '^FAIL' "$OUT/adapters/$fam.check") FAIL)"
  done
}
# The dashboard of profiles/rtx4060-three.toml captured in a pseudo-terminal.
screens() {
  mkdir -p "$OUT/screens"
  PYTHONPATH=.carry/pylib timeout 300 python3 scripts/gpu_screens.py $L profiles/rtx4060-three.toml \
    "$OUT/screens/screens.db" "$OUT/screens" 120x36 > "$OUT/screens.log" 2>&1
  echo "screens exit $? ($((SECONDS - T0)) s)"
}
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
round)
  $L selftest engine --device cuda:0 --fixtures tests/fixtures/hf > "$OUT/fixtures-cuda.txt" 2>&1
  echo "selftest engine --fixtures exit $? ($((SECONDS - T0)) s)"
  peft_loads
  OUT=$OUT/tel bash scripts/gpu_telemetry_check.sh > "$OUT/tel.log" 2>&1
  echo "telemetry check exit $? ($((SECONDS - T0)) s)"
  screens
  if [ "${MEM0:-1}" = 1 ]; then
    LORASCOPE_POOL_KEEP_BYTES=0 OUT=$OUT/mem0 bash scripts/gpu_memory_check.sh > "$OUT/mem0.log" 2>&1
    echo "memory check, release threshold 0, exit $? ($((SECONDS - T0)) s)"
  fi
  grep -E "PASS|FAIL|ok|error" "$OUT/fixtures-cuda.txt" | awk '{print $NF}' | sort | uniq -c
  grep -E "FAIL|error" "$OUT/fixtures-cuda.txt" | head -8
  tail -5 "$OUT/tel.log"; tail -3 "$OUT/screens.log"
  [ -f "$OUT/mem0.log" ] && tail -3 "$OUT/mem0.log"
  ;;
round2)
  # Written into the fixtures too, so the selftest below applies them (and to $OUT/bf16 to keep).
  python3 scripts/hf_bf16_error.py tests/fixtures/hf cuda tests/fixtures/hf > "$OUT/hf-bf16-cuda.txt" 2>&1
  python3 scripts/hf_bf16_error.py tests/fixtures/hf cpu tests/fixtures/hf > "$OUT/hf-bf16-cpu.txt" 2>&1
  mkdir -p "$OUT/bf16"; (cd tests/fixtures/hf && for f in */bf16_error.json; do mkdir -p "$OUT/bf16/${f%/*}"; cp "$f" "$OUT/bf16/$f"; done)
  echo "transformers bf16 error ($((SECONDS - T0)) s)"
  $L selftest engine --device cuda:0 --fixtures tests/fixtures/hf > "$OUT/fixtures-cuda.txt" 2>&1
  echo "selftest engine --fixtures exit $? ($((SECONDS - T0)) s)"
  peft_loads
  OUT=$OUT/memdef bash scripts/gpu_memory_check.sh > "$OUT/memdef.log" 2>&1
  echo "memory check, default release threshold, exit $? ($((SECONDS - T0)) s)"
  LORASCOPE_POOL_KEEP_BYTES=0 OUT=$OUT/mem0 bash scripts/gpu_memory_check.sh > "$OUT/mem0.log" 2>&1
  echo "memory check, release threshold 0, exit $? ($((SECONDS - T0)) s)"
  screens
  paste <(cut -c1-58 "$OUT/hf-bf16-cuda.txt") <(awk '{print $2, $3, $4}' "$OUT/hf-bf16-cpu.txt") | head -30
  grep -c PASS "$OUT/fixtures-cuda.txt"; grep -c FAIL "$OUT/fixtures-cuda.txt"
  tail -1 "$OUT/memdef.log"; tail -1 "$OUT/mem0.log"
  ;;
esac
