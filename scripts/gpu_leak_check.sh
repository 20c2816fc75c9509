#!/usr/bin/env bash
# Peak memory must not grow with the step count, on the GPU: every optimizer x precision x
# gradient checkpointing x quantisation combination runs N and 4N steps on cuda:0, and the
# table at the end compares, per combination,
#   pool:  the CUDA pool's in-use peak (the worker summary's device_memory: resident +
#          activations peak; the optimizer state is outside the pool, see NVML),
#   nvml:  the process's device memory from NVML (nvidia-smi polled every 50 ms; context,
#          cuBLAS workspace and the optimizer state included),
#   grew:  the worker's per-step mem_bytes (pool bytes in use at the end of each step) of the
#          4N run, last step minus step 2.
# A combination passes when pool(4N) - pool(N) <= POOL_BOUND_MIB and nvml(4N) - nvml(N) <=
# NVML_BOUND_MIB (NVML counts whole pool chunks: 2 MiB granules and cuBLAS's lazily created
# workspaces move it a little between two processes).
#
# Self-contained: needs only bash, grep, sed, awk, nvidia-smi and the CUDA build of lorascope
# at /tmp/lorascope (or $LORASCOPE). Settings by environment: MODEL (tiny), SEQ (512),
# BATCH (1), N (3), JOBS (4 runs at a time; each is its own process, so NVML and the pool are
# per run), COMBOS (space-separated "optimizer,precision,ckpt,quant" to run a subset).
# Logs go to $OUT (or /tmp/leak_check); the last thing printed is the table.
set -uo pipefail
BIN=${LORASCOPE:-/tmp/lorascope}
OUT=${OUT:-/tmp/leak_check}
MODEL=${MODEL:-tiny}
SEQ=${SEQ:-512}
BATCH=${BATCH:-1}
N=${N:-3}
JOBS=${JOBS:-4}
POOL_BOUND_MIB=${POOL_BOUND_MIB:-2}
NVML_BOUND_MIB=${NVML_BOUND_MIB:-64}
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
[ -x "$BIN" ] || { echo "no lorascope at $BIN: build with --features cuda and copy it there (or set LORASCOPE)" >&2; exit 2; }
command -v nvidia-smi > /dev/null || { echo "nvidia-smi not found: run this on the GPU machine" >&2; exit 2; }
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [ -z "${COMBOS:-}" ]; then
  COMBOS=""
  for o in adamw adamw8bit paged_adamw paged_adamw8bit; do
    for p in fp32 fp16 bf16; do
      for c in 0 1; do
        for q in none nf4; do COMBOS="$COMBOS $o,$p,$c,$q"; done
      done
    done
  done
fi

# The value of a JSON number field in a line ("key":123), or empty.
num() { grep -o "\"$1\":[0-9.]*" | head -1 | cut -d: -f2; }

# One run: combination $1, $2 steps. Writes $OUT/<name>.steps<k>.{jsonl,err,nvml} and prints
# "pool_peak_bytes nvml_peak_mib first_mem last_mem status".
one() {
  local combo=$1 steps=$2 o p c q
  IFS=, read -r o p c q <<< "$combo"
  local name="${o}_${p}_ckpt${c}_${q}.steps${steps}"
  local args=(train --json --model "$MODEL" --device "${DEVICE:-cuda:0}" --batch-size "$BATCH" --seq-len "$SEQ"
              --steps "$steps" --warmup-steps 0 --seed 3 --optimizer "$o" --precision "$p" --quant "$q")
  [ "$c" = 1 ] && args+=(--grad-checkpointing)
  "$BIN" "${args[@]}" > "$OUT/$name.jsonl" 2> "$OUT/$name.err" &
  local pid=$!
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 50 \
    > "$OUT/$name.nvml" 2> /dev/null &
  local smi=$!
  wait "$pid"; local rc=$?
  kill "$smi" 2> /dev/null; wait "$smi" 2> /dev/null
  local nvml
  nvml=$(awk -F', *' -v p="$pid" '$1 == p && $2 + 0 > m { m = $2 + 0 } END { print m + 0 }' "$OUT/$name.nvml")
  local summary resident act first last
  summary=$(grep '"type":"summary"' "$OUT/$name.jsonl")
  resident=$(num resident_bytes <<< "$summary")
  act=$(num activations_peak_bytes <<< "$summary")
  first=$(grep '"type":"step"' "$OUT/$name.jsonl" | sed -n 2p | num mem_bytes)
  last=$(grep '"type":"step"' "$OUT/$name.jsonl" | tail -1 | num mem_bytes)
  local status=ok
  [ "$rc" = 0 ] && [ -n "$summary" ] || status="exit$rc"
  echo "${resident:-0} ${act:-0} $nvml ${first:-0} ${last:-0} $status"
}

# Both runs of a combination; prints one result line.
pair() {
  local combo=$1 a b
  a=$(one "$combo" "$N")
  b=$(one "$combo" $((4 * N)))
  echo "$combo $a $b"
}
export -f one pair num
export BIN OUT MODEL SEQ BATCH N LD_LIBRARY_PATH DEVICE=${DEVICE:-cuda:0}

echo "running $(wc -w <<< "$COMBOS") combinations x {$N, $((4 * N))} steps, $JOBS at a time ($MODEL, batch $BATCH, seq $SEQ)" >&2
# shellcheck disable=SC2086
printf '%s\n' $COMBOS | xargs -P "$JOBS" -I{} bash -c 'pair "$1"' _ {} > "$OUT/results.txt"

fails=0
{
  printf '%-32s %10s %10s %7s %9s %9s %7s %9s %s\n' combination "pool N" "pool 4N" "d MiB" "nvml N" "nvml 4N" "d MiB" "grew MiB" verdict
  sort "$OUT/results.txt" | while read -r combo r1 a1 n1 _f1 _l1 s1 r2 a2 n2 f2 l2 s2; do
    awk -v c="$combo" -v r1="$r1" -v a1="$a1" -v n1="$n1" -v r2="$r2" -v a2="$a2" -v n2="$n2" \
        -v f2="$f2" -v l2="$l2" -v s1="$s1" -v s2="$s2" -v pb="$POOL_BOUND_MIB" -v nb="$NVML_BOUND_MIB" 'BEGIN {
      M = 1048576; p1 = (r1 + a1) / M; p2 = (r2 + a2) / M; dp = p2 - p1; dn = n2 - n1
      v = (s1 != "ok" || s2 != "ok") ? "FAILED(" s1 "/" s2 ")" : (dp > pb || dn > nb) ? "GROWS" : "flat"
      printf "%-32s %10.1f %10.1f %+7.1f %9d %9d %+7d %+9.1f %s\n", c, p1, p2, dp, n1, n2, dn, (l2 - f2) / M, v
    }'
  done
} > "$OUT/table.txt"
fails=$(grep -c -E 'GROWS|FAILED' "$OUT/table.txt")
echo "pool = CUDA pool in-use peak (MiB); nvml = process device memory (MiB); grew = 4N run's step-end pool bytes, last step - step 2"
echo "bounds: pool +${POOL_BOUND_MIB} MiB, nvml +${NVML_BOUND_MIB} MiB from $N to $((4 * N)) steps; logs in $OUT"
cat "$OUT/table.txt"
echo "$fails of $(wc -w <<< "$COMBOS") combinations grow or failed"
[ "$fails" = 0 ]
