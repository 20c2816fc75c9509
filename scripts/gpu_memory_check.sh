#!/usr/bin/env bash
# The memory model against measurements on a GPU machine: every point of
# profiles/h200-grid.toml and profiles/rtx4060-case-study.toml (few steps each, verify_oom on so
# nothing is skipped) and the model presets at batch 1 x 1024, then the largest batch predicted
# to fit 8 GiB for Qwen2.5-1.5B nf4 seq 2048 with checkpointing, run with that batch and +1
# under --vram-limit 8GiB. Prints a table last: predicted, measured peak process VRAM, error,
# and whether it is within 5% or 150 MiB.
#
# Needs the CUDA binary at /tmp/lorascope (or .carry/lorascope.gz, unpacked there), python3;
# run from the repository root. Results under $OUT (default /tmp/out). About 3-4 minutes on an
# H200. STEPS (default 4) and PRESETS (default "tiny qwen2.5-1.5b") can be overridden.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
if [ ! -x /tmp/lorascope ] && [ -f .carry/lorascope.gz ]; then
  gunzip -c .carry/lorascope.gz > /tmp/lorascope && chmod +x /tmp/lorascope
fi
L=/tmp/lorascope
[ -x "$L" ] || { echo "no CUDA lorascope at /tmp/lorascope (or .carry/lorascope.gz)"; exit 1; }
STEPS=${STEPS:-4}
PRESETS=${PRESETS:-"tiny qwen2.5-1.5b"}
# A private state directory: the CUDA context is measured afresh by the first run and cached.
export LORASCOPE_STATE_DIR=$OUT/state; rm -rf "$LORASCOPE_STATE_DIR"; mkdir -p "$LORASCOPE_STATE_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

# A profile's copy with few steps and verify_oom = true (predicted-oom points run too).
short() {
  sed -e "s/^steps = .*/steps = $STEPS/" -e "s/^warmup_steps = .*/warmup_steps = 1/" \
      -e "s/^\[run\]/[run]\nverify_oom = true/" "$1" > "$2"
}
mkdir -p "$OUT/profiles"
short profiles/h200-grid.toml "$OUT/profiles/h200-grid.toml"
short profiles/rtx4060-case-study.toml "$OUT/profiles/rtx4060-case-study.toml"
for p in $PRESETS; do
  cat > "$OUT/profiles/preset-$p.toml" <<EOF
name = "preset-$p"
[model]
preset = "$p"
[data]
path = "sample"
packing = true
[lora]
rank = 16
alpha = 32.0
targets = ["q", "k", "v", "o", "gate", "up", "down"]
[run]
steps = $STEPS
warmup_steps = 1
devices = ["cuda:0"]
verify_oom = true
[grid]
batch_size = [1]
seq_len = [1024]
precision = ["bf16"]
quant = ["nf4", "none"]
grad_checkpointing = [true, false]
EOF
done
# The sample profiles use data.path = "sample": nothing to resolve relative to $OUT.

echo "== context: a short sweep measures the CUDA context (cached in $LORASCOPE_STATE_DIR)"
$L run "$OUT/profiles/preset-tiny.toml" --headless --db "$OUT/context.db" > /dev/null 2>&1 || true
cat "$LORASCOPE_STATE_DIR/cuda-context.json" 2>/dev/null || echo "(no context cached)"

DBS=""
for p in "$OUT"/profiles/*.toml; do
  n=$(basename "$p" .toml)
  echo "== $n"
  $L estimate "$p" > "$OUT/$n.estimate.txt" 2>&1
  $L estimate "$p" --json > "$OUT/$n.estimate.jsonl" 2>/dev/null
  $L run "$p" --headless --db "$OUT/$n.db" > "$OUT/$n.log" 2>&1
  $L report --db "$OUT/$n.db" --format json > "$OUT/$n.json"
  $L report --db "$OUT/$n.db" --format md > "$OUT/$n.md"
  DBS="$DBS $OUT/$n.json"
done

echo "== batch_size max under 8 GiB: Qwen2.5-1.5B nf4 bf16 seq 2048, checkpointing"
MAXP=$OUT/profiles/max.toml
cat > "$MAXP" <<EOF
name = "max"
[model]
preset = "qwen2.5-1.5b"
[data]
path = "sample"
[lora]
rank = 16
alpha = 32.0
dropout = 0.05
targets = ["q", "k", "v", "o", "gate", "up", "down"]
[run]
steps = 3
warmup_steps = 1
vram_limit = "8GiB"
devices = ["cuda:0"]
[grid]
batch_size = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32]
seq_len = [2048]
optimizer = ["paged_adamw8bit"]
precision = ["bf16"]
quant = ["nf4"]
grad_checkpointing = [true]
EOF
$L estimate "$MAXP" --json > "$OUT/max.estimate.jsonl" 2>&1
B=$(python3 - "$OUT/max.estimate.jsonl" <<'PY'
import json, re, sys
best = 0
for line in open(sys.argv[1]):
    v = json.loads(line)
    if v.get("verdict") == "fits":
        best = max(best, int(re.search(r"bs(\d+)", v["label"]).group(1)))
print(best)
PY
)
echo "largest batch predicted to fit: $B" | tee "$OUT/max.txt"
for b in "$B" $((B + 1)); do
  [ "$b" -ge 1 ] || continue
  $L train --model qwen2.5-1.5b --device cuda:0 --batch-size "$b" --seq-len 2048 --steps 3 \
    --warmup-steps 1 --quant nf4 --precision bf16 --optimizer paged_adamw8bit \
    --grad-checkpointing --lora-dropout 0.05 --vram-limit 8GiB --json \
    > "$OUT/max-b$b.jsonl" 2> "$OUT/max-b$b.err"
  rc=$?
  echo "batch $b under --vram-limit 8GiB: exit $rc ($( [ $rc -eq 0 ] && echo ok || ([ $rc -eq 3 ] && echo oom || echo failed)))" | tee -a "$OUT/max.txt"
  tail -1 "$OUT/max-b$b.err"
done

echo
echo "== predicted vs measured peak process VRAM (bar: |error| <= 5% or <= 150 MiB)"
python3 - $DBS <<'PY' | tee "$OUT/memory-check.txt"
import json, sys
rows, within, total = [], 0, 0
for path in sys.argv[1:]:
    name = path.rsplit("/", 1)[-1][:-5]
    doc = json.load(open(path))
    for r in (doc["runs"] if isinstance(doc, dict) else doc):
        p, m = r.get("predicted_peak_bytes"), r.get("peak_mem_bytes")
        gib = lambda b: f"{b / 2**30:.2f}" if b else "-"
        if p and m and r["status"] == "ok":
            err = m - p
            ok = abs(err) <= 0.05 * m or abs(err) <= 150 * 2**20
            total += 1; within += ok
            e = f"{100 * err / p:+.1f}%"
            mark = "yes" if ok else "NO"
        else:
            e, mark = "-", "-"
        rows.append((name, r["label"], r["status"], gib(p), gib(m), e, mark))
w = [max(len(str(x[i])) for x in rows + [("profile", "point", "status", "predicted", "measured", "error", "within")]) for i in range(7)]
hdr = ("profile", "point", "status", "predicted", "measured", "error", "within")
for row in [hdr] + rows:
    print("  ".join(str(c).ljust(w[i]) if i < 3 else str(c).rjust(w[i]) for i, c in enumerate(row)))
print(f"{within}/{total} ok points within 5% or 150 MiB (GiB columns; measured = NVML peak process VRAM less the --vram-limit reservation)")
PY
cat "$OUT/max.txt"
