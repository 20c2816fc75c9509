#!/usr/bin/env bash
# One sitting on the GPU machine for the BENCHMARKS tables: engine and optimizer self-tests,
# the four QLoRA points beside the PyTorch reference (scripts/gpu_bench.sh), the case study's
# three configurations under --vram-limit 8GiB plus a point that must end `oom`
# (profiles/rtx4060-three.toml), and profiles/h200-grid.toml end to end.
# Run from the repository root with `.carry/` as for scripts/gpu_bench.sh; results under $OUT.
# PART=1: self-tests and the QLoRA points; PART=2: the 8 GiB case study and h200-grid; default both.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
gunzip -c .carry/lorascope.gz > /tmp/lorascope && chmod +x /tmp/lorascope
L=/tmp/lorascope
if [ "${PART:-all}" != 2 ]; then
echo "== selftest engine (GPU vs CPU, tiny preset)"
$L selftest engine --device cuda:0 > "$OUT/selftest-engine.txt" 2>&1; fused=$?
LORASCOPE_FUSED=0 $L selftest engine --device cuda:0 > "$OUT/selftest-engine-unfused.txt" 2>&1; unfused=$?
echo "-- fused kernels (exit $fused)"; cat "$OUT/selftest-engine.txt"
echo "-- LORASCOPE_FUSED=0 (exit $unfused)"; cat "$OUT/selftest-engine-unfused.txt"
if [ $fused -ne 0 ] && [ $unfused -eq 0 ]; then
  echo "fused kernels disagree with the CPU path: benchmarks below run with LORASCOPE_FUSED=0"
  export LORASCOPE_FUSED=0
fi
echo "== selftest optim"; $L selftest optim --steps 20 2>&1 | tail -2 | tee "$OUT/selftest-optim.txt"
fi
# Per-run device-memory breakdown and status from a results database.
breakdown() {
  python3 - "$1" <<'PY'
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
for label, st, ws in con.execute("select label, status, worker_summary_json from runs order by rowid"):
    m = (json.loads(ws) if ws else {}).get("device_memory") or {}
    g = lambda k: (m.get(k) or 0) / 2**30
    print(f"{label:<44} {st:<7} weights {g('weights_bytes'):.2f} GiB  adapters+opt {g('adapters_optimizer_bytes'):.3f} GiB  activations peak {g('activations_peak_bytes'):.2f} GiB  pool peak {g('pool_reserved_peak_bytes'):.2f} GiB")
PY
}
PART=${PART:-all}
if [ "$PART" = all ] || [ "$PART" = 1 ]; then
echo "== issue 3: four QLoRA points, lorascope and the reference"
POINTS="1,512,fp16,nf4,0 1,512,bf16,nf4,0 2,2048,fp16,nf4,1 2,2048,bf16,nf4,1" OUT=$OUT/qlora bash scripts/gpu_bench.sh > "$OUT/qlora.log" 2>&1
breakdown "$OUT/qlora/lorascope.db" 2>&1 | tee "$OUT/qlora-breakdown.txt"
cat "$OUT/qlora/lorascope.md"; tail -8 "$OUT/qlora.log"
fi
if [ "$PART" = all ] || [ "$PART" = 2 ]; then
echo "== issue 4: case study under 8 GiB"
$L run profiles/rtx4060-three.toml --headless --db "$OUT/three.db" > "$OUT/three.log" 2>&1
$L report --db "$OUT/three.db" --format md > "$OUT/three.md"
breakdown "$OUT/three.db" | tee "$OUT/three-breakdown.txt"
grep -iE "oom|out of memory" "$OUT/three.log" | head -3
echo "== issue 5: h200-grid end to end"
$L run profiles/h200-grid.toml --headless --db "$OUT/h200.db" > "$OUT/h200.log" 2>&1
$L report --db "$OUT/h200.db" --format md > "$OUT/h200.md"
$L report --db "$OUT/h200.db" --format json > "$OUT/h200.json"
cat "$OUT/three.md"; cat "$OUT/h200.md"
fi
