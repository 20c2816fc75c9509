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
#   PART=edge    issue 16's edge check: `batch_size = "max"` under 8 GiB (.carry/max.toml:
#                Qwen2.5-1.5B nf4 bf16, checkpointing, paged_adamw8bit, seq 2048) through the
#                orchestrator, then the value found and +1 as direct runs of the point's 6 steps
#                under --vram-limit 8GiB, twice each; then the engine profile (scripts/gpu_profile.sh)
#                of the bf16 2 x 2048 and 1 x 512 points
#   PART=speed   the chunked attention on CUDA: selftest engine, the fixtures (default chunks and
#                chunks of 5), 30-step loss curves chunked / unchunked, the four 1.5B points with
#                LORASCOPE_ATTN_CHUNK=0 and 512 (scripts/gpu_bench.sh), then the edge check
#   PART=unsloth the fixtures with chunks of 5, Unsloth on the four 1.5B points
#                (../shared/bench/peers/run.sh), then lorascope on the same points with
#                LORASCOPE_ATTN_CHUNK in CHUNKS (default "0 512 1024")
#   PART=kernels selftest engine (the NF4 dequantise kernels against the host), the NF4
#                dequantise A/B (LORASCOPE_NF4_DEQUANT8=0 and the default, bf16 2 x 2048 and
#                1 x 512 direct runs), the kernel-time table of one step (scripts/gpu_kernels.sh,
#                ncu), then every model preset at 1 x 1024 (scripts/gpu_presets.sh, 6 steps)
#                until 540 s have passed
#   PART=vec8    the 8-wide elementwise kernels: selftest engine (its elementwise and NF4 lines),
#                the transformers fixtures on CUDA, LORASCOPE_VEC8=0 against the default at bf16
#                2 x 2048 (checkpointing) and 1 x 512 (loss curves and tokens/s), then Unsloth and
#                lorascope on the four 1.5B points as PART=unsloth (CHUNKS default "512 0")
#   PART=final   this round's kernels in one sitting: selftest engine, the fixtures (default and
#                chunks of 5), bf16 2 x 2048 and 1 x 512 direct runs with every new kernel off
#                (LORASCOPE_VEC8=0 LORASCOPE_ROW_COPY=0 LORASCOPE_NF4_DEQUANT8=0), the first two
#                alone off, and all on; the host's issue time (LORASCOPE_PROFILE=host); then Unsloth and lorascope on the four 1.5B points (CHUNKS "512 0")
#   PART=launches fewer launches per step: selftest engine and the fixtures, selftest optim (the
#                multi-tensor optimizer against the CPU), bf16 2 x 2048 (checkpointing) and 1 x 512
#                direct runs with LORASCOPE_MULTI_TENSOR=0 LORASCOPE_LAYER_CASTS=0, each alone off,
#                and all on (loss curves must be identical), then the host's issue time
#   PART=attn    the direct attention (ops/attention/direct.rs): selftest engine, the fixtures
#                (default chunks and chunks of 5), bf16 2 x 2048 (checkpointing) and 1 x 512 direct
#                runs with LORASCOPE_ATTN_DIRECT=0 and the default (loss curves), the host's issue
#                time
#   PART=sitting this round's speed sitting: 1 x 512 direct runs with LORASCOPE_ATTN_DIRECT=0 and
#                the default, alternating twice; start-up (process start to the first step record)
#                of Qwen2.5-1.5B and the Qwen2.5-7B shape; then Unsloth and lorascope on the four
#                1.5B points as PART=unsloth (CHUNKS "512")
#   PART=grid    1 x 512 with LORASCOPE_ATTN_DIRECT=0 and the default, alternating twice; NVML GPU
#                utilization over bf16 2 x 2048 and 1 x 512 runs; sweep efficiency: `lorascope run
#                profiles/h200-grid.toml` wall time against the sum of its points' timed windows;
#                then the model presets at 1 x 1024 (issue 16) until the deadline
#   PART=mem8b   where the 8B presets' memory goes: llama-3.1-8b and qwen3-8b at 1 x 1024 (the
#                presets' settings, 6 steps) with each of this round's switches off in turn
#                (LORASCOPE_ATTN_DIRECT, _LAYER_CASTS, _MULTI_TENSOR) and all on: NVML's process
#                peak against the pool's bytes in use and reservation
#   PART=inplace the MLP's smaller backward: selftest engine and the fixtures, bf16 2 x 2048
#                (checkpointing) with LORASCOPE_INPLACE_MLP=0 and the default, 1 x 512 with
#                LORASCOPE_GATED_DOWN=0 and the default, alternating twice (memdirect: NVML
#                polled every 20 ms, the pool's in-use and reserved peaks; loss curves), then
#                the model presets at 1 x 1024 until DEADLINE_S (540)
#   PART=quick   the fixtures, bf16 2 x 2048 with LORASCOPE_INPLACE_MLP=0 and the default, 1 x 512
#                (memdirect), for a short last call
#   PART=mma     the fused dropout + LoRA A kernel (lora_mma.cu): selftest engine (its lora A
#                lines) and the fixtures, then bf16 2 x 2048 ckpt and 1 x 512 with
#                LORASCOPE_FUSED_LORA_A=0 and 1, alternating twice; PART=mma2 the same with the
#                fixtures also under LORASCOPE_FUSED_LORA_A=1, then 2 x 2048 at dropout 0 (the
#                dropout's whole cost)
#   PART=rank20  the same kernel at LoRA rank 20 (a partial n8 tile): selftest engine's lora A
#                lines, then 12 steps of bf16 2 x 1024 ckpt with it off and on, curves compared
#   PART=final3  the edge check (PART=edge's first half) and the Qwen2.5-7B shape beside PEFT +
#                bitsandbytes at POINTS7 (scripts/gpu_bench.sh)
#   PART=mem3    the memory check (scripts/gpu_memory_check.sh), then PART=presets (every preset at
#                1 x 1024 and the diagnosis over both) until DEADLINE_S (520)
#   PART=round3  selftest engine (its synthetic-weights line), the 8B-class loads with candle's
#                f32 draws (LORASCOPE_SYNTH_KERNEL=0) and the synthetic kernel (PART=load8b, 20 ms
#                polling), then Unsloth and lorascope on the four 1.5B points (PART=unsloth, CHUNKS 512)
#   PART=load8b  when the 8B preset's NVML peak happens: llama-3.1-8b at the presets' settings three
#                times (or LOADS="model:ENV=value ..."), process memory polled every 20 ms with
#                timestamps against the run's phases;
#                then the presets named in PRESETS (scripts/gpu_presets.sh, 6 steps), if any
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
# Issue 16's edge check (see PART=edge).
edge() {
  mkdir -p "$OUT/edge"
  $L run .carry/max.toml --headless --db "$OUT/edge/max.db" > "$OUT/edge/max.log" 2>&1
  echo "max sweep exit $? ($((SECONDS - T0)) s)"
  $L report --db "$OUT/edge/max.db" --format json > "$OUT/edge/max.json" 2>&1
  found=$(python3 -c '
import json, re, sys
r = json.load(open(sys.argv[1]))["runs"][0]
print(r["status"], "|", r.get("note"), "|", r.get("cause"), file=sys.stderr)
m = re.search(r"batch_size = max: (\d+)", r.get("note") or "")
print(m.group(1) if m else 0)' "$OUT/edge/max.json" 2>> "$OUT/edge/found.txt")
  cat "$OUT/edge/found.txt"
  for b in $found $((found + 1)); do
    for rep in 1 2; do
      $L train --model qwen2.5-1.5b --data sample --device cuda:0 --quant nf4 --precision bf16 \
        --grad-checkpointing --optimizer paged_adamw8bit --batch-size "$b" --seq-len 2048 \
        --steps 6 --warmup-steps 1 --vram-limit 8GiB --json > "$OUT/edge/b$b-$rep.jsonl" 2> "$OUT/edge/b$b-$rep.err"
      echo "direct batch $b run $rep: exit $? $(grep -c '"type":"step"' "$OUT/edge/b$b-$rep.jsonl") steps $(grep -o '"oom_retries":[0-9]*' "$OUT/edge/b$b-$rep.jsonl") $(grep -o '"tokens_per_s":[0-9]*' "$OUT/edge/b$b-$rep.jsonl") $(tail -1 "$OUT/edge/b$b-$rep.err" | cut -c1-160)"
    done
  done
}
# The transformers fixtures on CUDA into $OUT/fixtures-cuda$1.txt with the environment
# assignments in $3 (e.g. LORASCOPE_ATTN_CHUNK=5), printed as "fixtures$2 exit ...: PASS, FAIL".
fixtures() {
  local f=$OUT/fixtures-cuda$1.txt
  env $3 timeout 100 $L selftest engine --device cuda:0 --fixtures tests/fixtures/hf > "$f" 2>&1
  echo "fixtures$2 exit $?: $(grep -c PASS "$f") PASS, $(grep -c FAIL "$f") FAIL ($((SECONDS - T0)) s)"
}
# selftest engine on CUDA, then the fixtures (unless FIXTURES=0; with CHUNK5=1 also in chunks of
# 5 positions).
selftests() {
  $L selftest engine --device cuda:0 > "$OUT/selftest-engine.txt" 2>&1
  echo "selftest engine exit $? ($((SECONDS - T0)) s)"
  [ "${FIXTURES:-1}" = 1 ] || return 0
  fixtures "" "" ""
  [ "${CHUNK5:-0}" = 1 ] || return 0
  fixtures -chunk5 ", chunks of 5," LORASCOPE_ATTN_CHUNK=5
}
# One 20-step direct run (5 warm-up) of Qwen2.5-1.5B nf4 bf16, dropout 0.05, at batch $2 x seq $3
# ($4: extra flags such as --grad-checkpointing) with the environment assignments in $5, into
# $OUT/$1-b$2-s$3.jsonl; prints its tokens/s and final loss.
direct() {
  local f=$OUT/$1-b$2-s$3
  env $5 $L train --model qwen2.5-1.5b --data sample --device cuda:0 --quant nf4 \
    --precision bf16 $4 --batch-size $2 --seq-len $3 --steps 20 --warmup-steps 5 \
    --lora-dropout 0.05 --json > "$f.jsonl" 2> "$f.err"
  echo "$1 bf16 $2 x $3: exit $? $(grep -o '"tokens_per_s":[0-9.]*' "$f.jsonl" | tail -1) $(grep -o '"final_loss":[0-9.]*' "$f.jsonl" | tail -1)"
}
# Start-up of one run ($2: model and shape flags): seconds from process start to its first step
# record on stdout (nf4, bf16, synthetic weights, 4 steps).
startup() {
  local f=$OUT/startup-$1.jsonl
  $L train $2 --data sample --device cuda:0 --quant nf4 --precision bf16 --steps 4 \
    --warmup-steps 1 --json 2> "${f%.jsonl}.err" | python3 -c '
import sys, time
t0 = float(sys.argv[1])
for line in sys.stdin:
    sys.stdout.write(f"{time.time() - t0:.3f}\t{line}")
' "$(date +%s.%N)" > "$f"
  echo "start-up $1: first step after $(grep -m1 '"type":"step"' "$f" | cut -f1) s"
}
# direct (same arguments) with the process's NVML memory polled every 20 ms: prints tokens/s,
# the final loss, NVML's peak and the pool's bytes in use and reservation peak (the summary's
# device_memory).
memdirect() {
  local f=$OUT/$1-b$2-s$3
  nvidia-smi --query-compute-apps=used_memory --format=csv,noheader,nounits -lms 20 > "$f.smi" 2>/dev/null &
  local poll=$!
  env $5 $L train --model qwen2.5-1.5b --data sample --device cuda:0 --quant nf4 \
    --precision bf16 $4 --batch-size $2 --seq-len $3 --steps 20 --warmup-steps 5 \
    --lora-dropout ${DROPOUT:-0.05} --json > "$f.jsonl" 2> "$f.err"
  local rc=$?
  sleep 0.2; kill $poll 2>/dev/null; wait $poll 2>/dev/null
  python3 - "$f.jsonl" "$f.smi" "$1 bf16 $2 x $3 (exit $rc)" <<'PY'
import json, sys
s = [json.loads(l) for l in open(sys.argv[1]) if '"type":"summary"' in l]
s = s[-1] if s else {}
m = s.get("device_memory") or {}
smi = [int(x) for x in open(sys.argv[2]).read().split() if x.isdigit()]
g = lambda k: (m.get(k) or 0) / 2**30
print(f"{sys.argv[3]}: {s.get('tokens_per_s', 0):.0f} tok/s, final loss {s.get('final_loss')}, NVML peak {max(smi, default=0) / 1024:.3f} GiB, pool in use {g('resident_bytes') + g('activations_peak_bytes'):.3f} GiB, reserved peak {g('pool_reserved_peak_bytes'):.3f} GiB")
PY
}
# The loss curves of two direct runs: steps, how many identical, largest relative difference.
curves() {
  python3 - "$1" "$2" <<'PY'
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(p) if '"type":"step"' in l] for p in sys.argv[1:3])
same = sum(x == y for x, y in zip(a, b))
d = max((abs(x - y) / abs(x) for x, y in zip(a, b)), default=float("nan"))
print(f"  loss curves: {len(a)} / {len(b)} steps, {same} identical, last {a[-1] if a else '-'} / {b[-1] if b else '-'}, max rel diff {d:.1e}")
PY
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
edge)
  edge
  OUT=$OUT/prof STEPS=12 PROFILE=1 POINTS="2,2048,bf16,nf4,1 1,512,bf16,nf4,0" \
    bash scripts/gpu_profile.sh > "$OUT/prof.log" 2>&1
  echo "profile exit $? ($((SECONDS - T0)) s)"
  for f in "$OUT"/prof/*profile-1.txt; do
    echo "== $f (section, calls, total s, ms/call, peak GiB)"
    awk 'NF == 5 && $2 ~ /^[0-9]+$/' "$f" | sort -k3 -rn | head -24
  done
  cat "$OUT/prof/table.txt"
  ;;
speed)
  # The chunked attention (src/engine/ops/attention/, LORASCOPE_ATTN_CHUNK=0: one chunk) on CUDA: the
  # fixtures with chunks of 5 positions, 30-step loss curves of both at bf16 2 x 2048, and the
  # four 1.5B points through the orchestrator with each; then the edge check again.
  CHUNK5=1 selftests
  for c in 0 512; do
    LORASCOPE_ATTN_CHUNK=$c $L train --model qwen2.5-1.5b --data .carry/alpaca_en_demo.json --device cuda:0 \
      --quant nf4 --precision bf16 --grad-checkpointing --batch-size 2 --seq-len 2048 --steps 30 \
      --warmup-steps 5 --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05 --json > "$OUT/curve-$c.jsonl" 2> "$OUT/curve-$c.err"
    echo "curve chunk $c exit $? ($((SECONDS - T0)) s)"
  done
  python3 - "$OUT/curve-0.jsonl" "$OUT/curve-512.jsonl" <<'PY'
import json, sys
def load(p):
    steps, summ = [], {}
    for l in open(p):
        e = json.loads(l)
        if e.get("type") == "step": steps.append(e["loss"])
        if e.get("type") == "summary": summ = e
    return steps, summ
(a, sa), (b, sb) = load(sys.argv[1]), load(sys.argv[2])
d = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if a and b else float("nan")
print(f"loss curves: {len(a)} / {len(b)} steps, first {a[0]:.4f} / {b[0]:.4f}, last {a[-1]:.4f} / {b[-1]:.4f}, max rel diff {d:.2e}")
for n, s in (("chunk 0", sa), ("chunk 512", sb)):
    m = s.get("device_memory") or {}
    print(f"{n}: {s.get('tokens_per_s', 0):.0f} tok/s, pool in-use peak {((m.get('resident_bytes') or 0) + (m.get('activations_peak_bytes') or 0)) / 2**30:.2f} GiB, reserved peak {(m.get('pool_reserved_peak_bytes') or 0) / 2**30:.2f} GiB")
PY
  for c in 0 512; do
    LORASCOPE_ATTN_CHUNK=$c POINTS=$P4 OUT=$OUT/ab$c SKIP_REF=1 WHL=.whl bash scripts/gpu_bench.sh > "$OUT/ab$c.log" 2>&1
    echo "four points, chunk $c ($((SECONDS - T0)) s)"
  done
  edge
  for c in 0 512; do echo "== chunk $c"; cat "$OUT/ab$c/lorascope.md"; done
  ;;
kernels)
  FIXTURES=0 selftests
  for pt in "2 2048 --grad-checkpointing" "1 512"; do
    set -- $pt
    for v in 0 1; do direct "dq$v" "$1" "$2" "${3:-}" "LORASCOPE_NF4_DEQUANT8=$v"; done
  done
  NCU_TIMEOUT=150 OUT=$OUT/kern bash scripts/gpu_kernels.sh > "$OUT/kern.log" 2>&1
  echo "kernel table exit $? ($((SECONDS - T0)) s)"
  export LORASCOPE_STATE_DIR=$OUT/state
  DEADLINE=$((540 - (SECONDS - T0))) STEPS=6 WARMUP=2 OUT=$OUT/presets bash scripts/gpu_presets.sh > "$OUT/presets.log" 2>&1
  echo "presets ($((SECONDS - T0)) s)"
  grep -E "nf4 (de)?quantize|FAIL" "$OUT/selftest-engine.txt"
  grep -E "^\|" "$OUT/presets.log"
  cat "$OUT/kern.log"
  ;;
final)
  CHUNK5=1 selftests
  for pt in "2 2048 --grad-checkpointing" "1 512"; do
    set -- $pt
    direct all-off "$1" "$2" "${3:-}" "LORASCOPE_VEC8=0 LORASCOPE_ROW_COPY=0 LORASCOPE_NF4_DEQUANT8=0"
    if [ "$2" != 512 ]; then
      direct vec8-off "$1" "$2" "${3:-}" LORASCOPE_VEC8=0
      direct rowcopy-off "$1" "$2" "${3:-}" LORASCOPE_ROW_COPY=0
    fi
    direct all-on "$1" "$2" "${3:-}" ""
    curves "$OUT/all-off-b$1-s$2.jsonl" "$OUT/all-on-b$1-s$2.jsonl"
  done
  # The host's issue time per section (no synchronisation): near the step's wall time = host-bound.
  LORASCOPE_PROFILE=host $L train --model qwen2.5-1.5b --data sample --device cuda:0 --quant nf4 \
    --precision bf16 --grad-checkpointing --batch-size 2 --seq-len 2048 --steps 12 --warmup-steps 4 \
    --lora-dropout 0.05 --json > "$OUT/host-profile.jsonl" 2> "$OUT/host-profile.err"
  echo "host profile exit $? $(grep -o '"tokens_per_s":[0-9.]*' "$OUT/host-profile.jsonl" | tail -1) ($((SECONDS - T0)) s)"
  CHUNKS=${CHUNKS:-"512 0"} BUDGET_S=${BUDGET_S:-230} PART=unsloth SKIP_FIXTURES=1 bash "$0"
  grep -E "row copy|swiglu|dropout|rms|rope|nf4 (de)?quantize|FAIL" "$OUT/selftest-engine.txt"
  tail -22 "$OUT/host-profile.err"
  ;;
sitting)
  for rep in 1 2; do
    for v in 0 1; do direct "a$v-r$rep" 1 512 "" "LORASCOPE_ATTN_DIRECT=$v"; done
  done
  startup 15b "--model qwen2.5-1.5b --batch-size 2 --seq-len 2048 --grad-checkpointing"
  startup 7b "--model qwen2.5-7b --batch-size 1 --seq-len 1024 --grad-checkpointing"
  CHUNKS=${CHUNKS:-512} BUDGET_S=${BUDGET_S:-270} PART=unsloth SKIP_FIXTURES=1 bash "$0"
  ;;
load8b)
  for rep in ${LOADS:-1 2 3}; do
    IFS=: read -r m env_v <<< "${rep}"
    case "$m" in [0-9]*) m=llama-3.1-8b; env_v="";; esac
    f=$OUT/load-${rep//[:=]/-}
    t0=$(date +%s.%N)
    nvidia-smi --query-compute-apps=used_memory --format=csv,noheader,nounits -lms 20 2>/dev/null | python3 -c '
import sys, time
t0 = float(sys.argv[1])
for line in sys.stdin:
    sys.stdout.write(f"{time.time() - t0:.3f} {line}"); sys.stdout.flush()
' "$t0" > "$f.smi" &
    poll=$!
    env $env_v $L train --model $m --data sample --device cuda:0 --quant nf4 --precision bf16 \
      --grad-checkpointing --optimizer paged_adamw8bit --batch-size 1 --seq-len 1024 --steps 6 \
      --warmup-steps 2 --lora-dropout 0.05 --json 2> "$f.err" | python3 -c '
import sys, time
t0 = float(sys.argv[1])
for line in sys.stdin:
    sys.stdout.write(f"{time.time() - t0:.3f}\t{line}")
' "$t0" > "$f.jsonl"
    sleep 0.3; kill $poll 2>/dev/null; pkill -f "nvidia-smi --query-compute-apps" 2>/dev/null; wait $poll 2>/dev/null
    python3 - "$f.jsonl" "$f.smi" "$rep" <<'PY'
import json, sys
ev = []
for l in open(sys.argv[1]):
    t, _, rec = l.partition("\t")
    e = json.loads(rec)
    if e.get("type") in ("phase", "header", "summary") or (e.get("type") == "step" and e.get("step") == 1):
        ev.append((float(t), e.get("type"), e.get("phase") or e.get("step")))
smi = []
for l in open(sys.argv[2]):
    p = l.split()
    if len(p) == 2 and p[1].isdigit():
        smi.append((float(p[0]), int(p[1])))
peak = max(smi, key=lambda x: x[1], default=(0, 0))
first_step = next((t for t, k, _ in ev if k == "step"), None)
before = max((m for t, m in smi if first_step is None or t < first_step), default=0)
after = max((m for t, m in smi if first_step is not None and t >= first_step), default=0)
print(f"run {sys.argv[3]}: NVML peak {peak[1]} MiB at {peak[0]:.2f} s; before the first step {before} MiB, from it on {after} MiB; events {[(round(t, 2), k, p) for t, k, p in ev]}")
PY
  done
  if [ -n "${PRESETS:-}" ]; then
    export LORASCOPE_STATE_DIR=$OUT/state
    STEPS=6 WARMUP=2 OUT=$OUT/presets bash scripts/gpu_presets.sh > "$OUT/presets.log" 2>&1
    grep -E "^\|" "$OUT/presets.log"
  fi
  ;;
mem8b)
  for m in llama-3.1-8b qwen3-8b; do
    for v in "" LORASCOPE_ATTN_DIRECT=0 LORASCOPE_LAYER_CASTS=0 LORASCOPE_MULTI_TENSOR=0; do
      f=$OUT/mem-$m-${v:-default}
      ( while sleep 0.1; do nvidia-smi --query-compute-apps=used_memory --format=csv,noheader,nounits; done ) > "$f.smi" 2>/dev/null &
      poll=$!
      env $v $L train --model $m --data sample --device cuda:0 --quant nf4 --precision bf16 \
        --grad-checkpointing --optimizer paged_adamw8bit --batch-size 1 --seq-len 1024 --steps 6 \
        --warmup-steps 2 --lora-dropout 0.05 --json > "$f.jsonl" 2> "$f.err"
      kill $poll 2>/dev/null; wait $poll 2>/dev/null
      python3 - "$f.jsonl" "$f.smi" "$m ${v:-all on}" <<'PY'
import json, sys
s = [json.loads(l) for l in open(sys.argv[1]) if '"type":"summary"' in l]
m = (s[-1].get("device_memory") or {}) if s else {}
smi = [int(x) for x in open(sys.argv[2]).read().split() if x.isdigit()]
g = lambda k: (m.get(k) or 0) / 2**30
print(f"{sys.argv[3]}: NVML peak {max(smi, default=0) / 1024:.2f} GiB, pool in use {g('resident_bytes') + g('activations_peak_bytes'):.2f} GiB (resident {g('resident_bytes'):.2f}), pool reserved peak {g('pool_reserved_peak_bytes'):.2f} GiB, {s[-1].get('tokens_per_s', 0) if s else 0:.0f} tok/s")
PY
    done
  done
  ;;
grid)
  for rep in 1 2; do
    for v in 0 1; do direct "a$v-r$rep" 1 512 "" "LORASCOPE_ATTN_DIRECT=$v"; done
  done
  # GPU busy time (NVML utilization: the share of each sample period with a kernel running,
  # polled every 100 ms) over 40-step direct runs: near 100% = the GPU bounds the step.
  for pt in "2 2048 --grad-checkpointing" "1 512"; do
    set -- $pt
    ( while sleep 0.1; do nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits; done ) > "$OUT/util-b$1-s$2.txt" 2>/dev/null &
    poll=$!
    $L train --model qwen2.5-1.5b --data sample --device cuda:0 --quant nf4 --precision bf16 ${3:-} \
      --batch-size $1 --seq-len $2 --steps 40 --warmup-steps 5 --lora-dropout 0.05 --json > "$OUT/util-b$1-s$2.jsonl" 2>/dev/null
    kill $poll 2>/dev/null; wait $poll 2>/dev/null
    python3 - "$OUT/util-b$1-s$2.txt" "$1 x $2" "$(grep -o '"tokens_per_s":[0-9.]*' "$OUT/util-b$1-s$2.jsonl" | tail -1)" <<'PY'
import sys
v = [int(x) for x in open(sys.argv[1]).read().split() if x.isdigit()]
# The middle half of the samples: past start-up and warm-up, before the end.
m = v[len(v) // 4: 3 * len(v) // 4] or v or [0]
print(f"GPU utilization {sys.argv[2]}: median {sorted(m)[len(m) // 2]}%, mean {sum(m) / len(m):.0f}% over {len(m)} samples; {sys.argv[3]}")
PY
  done
  mkdir -p "$OUT/grid"
  t=$SECONDS
  $L run profiles/h200-grid.toml --headless --db "$OUT/grid/grid.db" > "$OUT/grid/run.log" 2>&1
  echo "h200-grid exit $? wall $((SECONDS - t)) s"
  $L report --db "$OUT/grid/grid.db" --format json > "$OUT/grid/report.json" 2>&1
  python3 - "$OUT/grid/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
total = 0.0
for run in r["runs"]:
    b, s, tps = run.get("batch_size"), run.get("seq_len"), run.get("tokens_per_s")
    tps = tps.get("median") if isinstance(tps, dict) else tps
    if b and s and tps:
        w = 60 * b * s / tps
        total += w
        print(f"  {run.get('label')}: {tps:,.0f} tok/s, timed window {w:.1f} s, status {run.get('status')}")
print(f"sum of timed windows {total:.1f} s")
PY
  export LORASCOPE_STATE_DIR=$OUT/state
  DEADLINE=$((540 - (SECONDS - T0))) STEPS=6 WARMUP=2 OUT=$OUT/presets bash scripts/gpu_presets.sh > "$OUT/presets.log" 2>&1
  echo "presets ($((SECONDS - T0)) s)"
  grep -E "^\|" "$OUT/presets.log"
  ;;
attn)
  CHUNK5=1 selftests
  for pt in "2 2048 --grad-checkpointing" "1 512"; do
    set -- $pt
    direct attn-off "$1" "$2" "${3:-}" LORASCOPE_ATTN_DIRECT=0
    direct attn-on "$1" "$2" "${3:-}" ""
    curves "$OUT/attn-off-b$1-s$2.jsonl" "$OUT/attn-on-b$1-s$2.jsonl"
  done
  direct attn-on-again 2 2048 --grad-checkpointing ""
  LORASCOPE_PROFILE=host $L train --model qwen2.5-1.5b --data sample --device cuda:0 --quant nf4 \
    --precision bf16 --grad-checkpointing --batch-size 2 --seq-len 2048 --steps 12 --warmup-steps 4 \
    --lora-dropout 0.05 --json > "$OUT/host-profile.jsonl" 2> "$OUT/host-profile.err"
  echo "host profile exit $? $(grep -o '"tokens_per_s":[0-9.]*' "$OUT/host-profile.jsonl" | tail -1) ($((SECONDS - T0)) s)"
  echo "nsys: $(command -v nsys || echo none), ncu: $(command -v ncu || echo none)"
  grep -E "FAIL" "$OUT/selftest-engine.txt" "$OUT"/fixtures-cuda*.txt | head -8
  tail -22 "$OUT/host-profile.err"
  ;;
launches)
  selftests
  $L selftest optim --steps 20 > "$OUT/selftest-optim.txt" 2>&1
  echo "selftest optim exit $? ($((SECONDS - T0)) s)"
  for pt in "2 2048 --grad-checkpointing" "1 512"; do
    set -- $pt
    direct both-off "$1" "$2" "${3:-}" "LORASCOPE_MULTI_TENSOR=0 LORASCOPE_LAYER_CASTS=0"
    direct multi-off "$1" "$2" "${3:-}" LORASCOPE_MULTI_TENSOR=0
    direct casts-off "$1" "$2" "${3:-}" LORASCOPE_LAYER_CASTS=0
    direct all-on "$1" "$2" "${3:-}" ""
    curves "$OUT/both-off-b$1-s$2.jsonl" "$OUT/all-on-b$1-s$2.jsonl"
  done
  LORASCOPE_PROFILE=host $L train --model qwen2.5-1.5b --data sample --device cuda:0 --quant nf4 \
    --precision bf16 --grad-checkpointing --batch-size 2 --seq-len 2048 --steps 12 --warmup-steps 4 \
    --lora-dropout 0.05 --json > "$OUT/host-profile.jsonl" 2> "$OUT/host-profile.err"
  echo "host profile exit $? $(grep -o '"tokens_per_s":[0-9.]*' "$OUT/host-profile.jsonl" | tail -1) ($((SECONDS - T0)) s)"
  grep -E "FAIL" "$OUT/selftest-engine.txt" | head -5
  grep -vE '^ *$' "$OUT/selftest-optim.txt" | tail -16
  tail -22 "$OUT/host-profile.err"
  ;;
vec8)
  selftests
  for pt in "2 2048 --grad-checkpointing" "1 512"; do
    set -- $pt
    for v in 0 1; do direct "v$v" "$1" "$2" "${3:-}" "LORASCOPE_VEC8=$v"; done
    curves "$OUT/v0-b$1-s$2.jsonl" "$OUT/v1-b$1-s$2.jsonl"
  done
  CHUNKS=${CHUNKS:-"512 0"} PART=unsloth SKIP_FIXTURES=1 bash "$0"
  grep -E "elementwise|swiglu|dropout|nf4 (de)?quantize|FAIL" "$OUT/selftest-engine.txt"
  ;;
inplace)
  selftests
  for rep in 1 2; do
    for v in 0 1; do memdirect "ip$v-r$rep" 2 2048 --grad-checkpointing "LORASCOPE_INPLACE_MLP=$v"; done
  done
  curves "$OUT/ip0-r1-b2-s2048.jsonl" "$OUT/ip1-r1-b2-s2048.jsonl"
  for rep in 1 2; do
    for v in 0 1; do memdirect "gd$v-r$rep" 1 512 "" "LORASCOPE_GATED_DOWN=$v"; done
  done
  curves "$OUT/gd0-r1-b1-s512.jsonl" "$OUT/gd1-r1-b1-s512.jsonl"
  export LORASCOPE_STATE_DIR=$OUT/state
  DEADLINE=$((${DEADLINE_S:-540} - (SECONDS - T0))) STEPS=6 WARMUP=2 OUT=$OUT/presets bash scripts/gpu_presets.sh > "$OUT/presets.log" 2>&1
  echo "presets ($((SECONDS - T0)) s)"
  python3 scripts/gpu_memory_diag.py "$OUT/presets" > "$OUT/diag.txt" 2>&1
  tail -20 "$OUT/diag.txt"
  grep -E "in place|FAIL" "$OUT/selftest-engine.txt" | head -8
  grep -E "FAIL" "$OUT/fixtures-cuda.txt" | head -5
  grep -E "^\|" "$OUT/presets.log"
  ;;
quick)
  fixtures "" "" ""
  for v in 0 1; do memdirect "ip$v" 2 2048 --grad-checkpointing "LORASCOPE_INPLACE_MLP=$v"; done
  curves "$OUT/ip0-b2-s2048.jsonl" "$OUT/ip1-b2-s2048.jsonl"
  memdirect gd1 1 512 "" ""
  ;;
mma)
  selftests
  grep -E "lora A|FAIL" "$OUT/selftest-engine.txt"
  for i in 1 2; do
    for v in 0 1; do memdirect "fa$v-$i" 2 2048 --grad-checkpointing "LORASCOPE_FUSED_LORA_A=$v"; done
  done
  curves "$OUT/fa0-1-b2-s2048.jsonl" "$OUT/fa1-1-b2-s2048.jsonl"
  for i in 1 2; do
    for v in 0 1; do memdirect "fs$v-$i" 1 512 "" "LORASCOPE_FUSED_LORA_A=$v"; done
  done
  curves "$OUT/fs0-1-b1-s512.jsonl" "$OUT/fs1-1-b1-s512.jsonl"
  ;;
mma2)
  selftests
  grep -E "lora A|FAIL" "$OUT/selftest-engine.txt"
  fixtures -fa1 ", fused lora A," LORASCOPE_FUSED_LORA_A=1
  for i in 1 2; do
    for v in 0 1; do memdirect "fa$v-$i" 2 2048 --grad-checkpointing "LORASCOPE_FUSED_LORA_A=$v"; done
    DROPOUT=0 memdirect "nodrop-$i" 2 2048 --grad-checkpointing ""
  done
  curves "$OUT/fa0-1-b2-s2048.jsonl" "$OUT/fa1-1-b2-s2048.jsonl"
  ;;
rank20)
  # the fused LoRA A kernel at a rank that is not a multiple of 8: the selftest's rank-20 case,
  # then 12 training steps at rank 20 with the kernel off and on (the loss curves compared).
  FIXTURES=0 selftests
  grep -E "lora A|FAIL" "$OUT/selftest-engine.txt"
  for v in 0 1; do
    LORASCOPE_FUSED_LORA_A=$v $L train --model qwen2.5-1.5b --data sample --device cuda:0 \
      --quant nf4 --precision bf16 --grad-checkpointing --batch-size 2 --seq-len 1024 \
      --steps 12 --warmup-steps 2 --lora-rank 20 --lora-alpha 40 --lora-dropout 0.05 --json \
      > "$OUT/r20-$v.jsonl" 2> "$OUT/r20-$v.err"
    echo "rank 20, LORASCOPE_FUSED_LORA_A=$v: exit $?"
  done
  curves "$OUT/r20-0.jsonl" "$OUT/r20-1.jsonl"
  ;;
final3)
  edge
  POINTS7=${POINTS7:-"1,1024,bf16,nf4,1 2,2048,bf16,nf4,1"}
  POINTS=$POINTS7 MODEL=$PWD/.carry/qwen7b REFCFG=.carry/qwen7b OUT=$OUT/q7 WHL=.whl \
    bash scripts/gpu_bench.sh > "$OUT/q7.log" 2>&1
  echo "7B bench ($((SECONDS - T0)) s)"
  cat "$OUT/q7/lorascope.md"
  grep -hE '^\{' "$OUT"/q7/reference-ckpt*.jsonl | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print("PEFT + bnb", r.get("precision"), r.get("batch"), r.get("seq"), r.get("status"),
          round(r.get("tokens_per_s") or 0), "tok/s", r.get("peak_process_gib"), "GiB",
          r.get("j_per_token"), "J/tok")'
  ;;
mem3)
  OUT=$OUT/mem bash scripts/gpu_memory_check.sh > "$OUT/mem.log" 2>&1
  echo "memory check exit $? ($((SECONDS - T0)) s)"
  DEADLINE=$((${DEADLINE_S:-520} - (SECONDS - T0))) PART=presets bash "$0"
  grep -E "within|batch|largest" "$OUT/mem.log"
  ;;
round3)
  FIXTURES=0 selftests
  grep -E "synthetic|FAIL" "$OUT/selftest-engine.txt"
  LOADS="llama-3.1-8b:LORASCOPE_SYNTH_KERNEL=0 llama-3.1-8b: qwen2.5-7b:LORASCOPE_SYNTH_KERNEL=0 qwen2.5-7b:" \
    PART=load8b bash "$0"
  CHUNKS=512 BUDGET_S=${BUDGET_S:-270} PART=unsloth SKIP_FIXTURES=1 bash "$0"
  ;;
unsloth)
  [ -n "${SKIP_FIXTURES:-}" ] || fixtures -chunk5 ", chunks of 5," LORASCOPE_ATTN_CHUNK=5
  POINTS="fp16,1,512,0 bf16,1,512,0 fp16,2,2048,1 bf16,2,2048,1" STACKS=unsloth BUDGET_S=${BUDGET_S:-300} \
    OUT=$OUT/peers bash .carry/bench/peers/run.sh > "$OUT/peers.log" 2>&1
  echo "unsloth ($((SECONDS - T0)) s)"
  for c in ${CHUNKS:-0 512 1024}; do
    LORASCOPE_ATTN_CHUNK=$c POINTS=$P4 OUT=$OUT/again$c SKIP_REF=1 WHL=.whl bash scripts/gpu_bench.sh > "$OUT/again$c.log" 2>&1
    echo "lorascope, chunk $c ($((SECONDS - T0)) s)"
  done
  tail -8 "$OUT/peers.log"
  for c in ${CHUNKS:-0 512 1024}; do echo "== chunk $c"; grep -E "^\| [0-9]" "$OUT/again$c/lorascope.md"; done
  ;;
esac