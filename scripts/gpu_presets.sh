#!/usr/bin/env bash
# Every model preset on the GPU at the profiling shape of issue 13: batch 1 x 1024, NF4,
# bf16, gradient checkpointing, paged_adamw8bit, LoRA r 16 / alpha 32 on all seven
# projections, synthetic weights, 20 steps (3 warm-up), one sweep per preset through the
# orchestrator (so J/token and peak process VRAM come from its NVML sampler). Writes
# $OUT/preset-<p>.{db,estimate.jsonl,json} (scripts/gpu_memory_diag.py reads them) and prints
# a table last: tokens/s, peak VRAM, J/token, predicted peak, first and final loss.
# Needs the CUDA binary at /tmp/lorascope and python3; run from the repository root.
set -uo pipefail
OUT=${OUT:-/tmp/out/presets}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
L=${LORASCOPE:-/tmp/lorascope}
PRESETS=${PRESETS:-"qwen2.5-0.5b qwen2.5-1.5b qwen2.5-3b qwen2.5-7b qwen3-0.6b qwen3-1.7b qwen3-4b qwen3-8b llama-3.2-1b llama-3.2-3b llama-3.1-8b mistral-7b-v0.3 gemma-2-2b gemma-3-1b phi-3-mini-4k phi-3.5-mini"}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
# DEADLINE (seconds of this script, default none): presets not started by then are skipped.
DONE=""
for p in $PRESETS; do
  if [ -n "${DEADLINE:-}" ] && [ "$SECONDS" -ge "$DEADLINE" ]; then echo "$p: skipped (deadline)"; continue; fi
  DONE="$DONE $p"
  f=$OUT/preset-$p.toml
  cat > "$f" <<TOML
name = "preset-$p"
[model]
preset = "$p"
[data]
path = "sample"
packing = true
[lora]
rank = 16
alpha = 32.0
dropout = 0.05
targets = ["q", "k", "v", "o", "gate", "up", "down"]
[run]
steps = $STEPS
warmup_steps = $WARMUP
devices = ["cuda:0"]
verify_oom = true
[grid]
batch_size = [1]
seq_len = [1024]
optimizer = ["paged_adamw8bit"]
precision = ["bf16"]
quant = ["nf4"]
grad_checkpointing = [true]
TOML
  t0=$SECONDS
  $L estimate "$f" --json > "$OUT/preset-$p.estimate.jsonl" 2>/dev/null
  $L run "$f" --headless --db "$OUT/preset-$p.db" > "$OUT/preset-$p.log" 2>&1
  $L report --db "$OUT/preset-$p.db" --format json > "$OUT/preset-$p.json" 2>/dev/null
  echo "$p: $((SECONDS - t0)) s"
done
python3 - "$OUT" $DONE <<'PY'
import json, sqlite3, sys
out, presets = sys.argv[1], sys.argv[2:]
print("| preset | status | tok/s | peak VRAM GiB | J/token | predicted GiB | loss first -> final |")
print("|---|---|---:|---:|---:|---:|---|")
for p in presets:
    try:
        con = sqlite3.connect(f"{out}/preset-{p}.db")
        r = con.execute("SELECT id, status, cause, tokens_per_s, peak_mem_bytes, j_per_token, final_loss FROM runs").fetchone()
        losses = [l for (l,) in con.execute("SELECT loss FROM steps WHERE run_id = ? ORDER BY step", (r[0],)) if l is not None]
        pred = None
        for line in open(f"{out}/preset-{p}.estimate.jsonl"):
            v = json.loads(line); pred = v.get("estimate", {}).get("peak")
        g = lambda b: f"{b / 2**30:.2f}" if b else "-"
        first = f"{losses[0]:.3f}" if losses else "-"
        print(f"| {p} | {r[1]}{' (' + r[2][:40] + ')' if r[2] else ''} | {r[3] or 0:,.0f} | {g(r[4])} | {r[5] or 0:.4f} | {g(pred)} | {first} -> {r[6] or 0:.3f} |")
    except Exception as e:
        print(f"| {p} | error: {e} |")
PY
