#!/usr/bin/env bash
# Issue 7's two-GPU check: profiles/two-gpu.toml queued on the daemon of a machine with two
# GPUs. Passes when the four points ran two at a time, one per GPU, every run ok, with NVML
# telemetry (power) from both GPUs, as seen both in the results database and in the daemon's
# `status --json` while it ran. Writes what BENCHMARKS.md records under $OUT.
#
#   cargo build --release --features cuda
#   OUT=/tmp/out LORASCOPE=target/release/lorascope bash scripts/two_gpu_daemon.sh
#
# On the device machine without a toolchain, put lorascope.gz in .carry/ (as for
# scripts/gpu_bench.sh) and leave LORASCOPE unset.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -z "${LORASCOPE:-}" ] && [ -f .carry/lorascope.gz ]; then
  export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
  gunzip -c .carry/lorascope.gz > /tmp/lorascope && chmod +x /tmp/lorascope
  LORASCOPE=/tmp/lorascope
fi
L=${LORASCOPE:-target/release/lorascope}
# A private daemon for this check: its own socket and state.
LORASCOPE_RUNTIME_DIR=$(mktemp -d); export LORASCOPE_RUNTIME_DIR
export LORASCOPE_STATE_DIR=$OUT/state
nvidia-smi --query-gpu=index,name,driver_version,memory.total,power.limit --format=csv | tee "$OUT/gpus.csv"
DB=$OUT/two-gpu.db; rm -f "$DB" "$DB-wal" "$DB-shm"
t0=$(date +%s.%N)
"$L" run profiles/two-gpu.toml --detach --db "$DB" || exit 1
# The daemon's view twice a second while the sweep runs (what `lorascope attach` shows).
( while "$L" status --json > "$OUT/status.tmp" 2>/dev/null; do
    tr -d '\n' < "$OUT/status.tmp"; echo; sleep 0.5
  done ) > "$OUT/status.jsonl" &
sampler=$!
timeout 1800 "$L" wait 1; rc=$?
t1=$(date +%s.%N)
"$L" status | tee "$OUT/status-final.txt"
"$L" daemon stop
wait "$sampler"
"$L" report --db "$DB" --format md | tee "$OUT/two-gpu.md"
python3 - "$DB" "$OUT/status.jsonl" "$t0" "$t1" "$rc" <<'PY' | tee "$OUT/two-gpu-check.txt"
import json, sqlite3, sys
db, status_path, t0, t1, rc = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
c = sqlite3.connect(db)
runs = c.execute("SELECT id, label, device, status, started_at, finished_at FROM runs ORDER BY id").fetchall()
edges = sorted([(r[4], 1) for r in runs] + [(r[5] or r[4], -1) for r in runs], key=lambda e: (e[0], e[1]))
cur = most = 0
for _, d in edges:
    cur += d
    most = max(most, cur)
print(f"wall {t1 - t0:.1f} s for {len(runs)} runs; `lorascope wait` exit {rc}")
for r in runs:
    print(f"  run {r[0]} {r[1]:<32} {r[2]:<7} {r[3]:<8} {r[4] - t0:7.1f} .. {(r[5] or r[4]) - t0:7.1f} s")
print(f"most runs in flight at once (database): {most}")
tel = {}
for gpu, n, w, mem in c.execute(
        "SELECT gpu, count(*), avg(power_w), max(proc_mem_bytes) FROM telemetry GROUP BY gpu"):
    tel[gpu] = (n, w, mem)
    print(f"  telemetry gpu {gpu}: {n} samples, mean {w if w is None else round(w, 1)} W, "
          f"peak process memory {mem if mem is None else round(mem / 2**30, 1)} GiB")
both = 0
for line in open(status_path):
    try:
        s = json.loads(line)
    except ValueError:
        continue
    running = (s.get("current") or {}).get("running") or []
    devs = {r["device"] for r in running if (r.get("telemetry") or {}).get("power_w") is not None}
    if devs == {"cuda:0", "cuda:1"}:
        both += 1
print(f"status samples with both GPUs running and reporting power: {both}")
ok = (rc == 0 and len(runs) == 4 and all(r[3] == "ok" for r in runs)
      and {r[2] for r in runs} == {"cuda:0", "cuda:1"} and most == 2
      and all(g in tel and tel[g][1] is not None for g in (0, 1)) and both > 0)
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
