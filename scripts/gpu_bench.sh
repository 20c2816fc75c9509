#!/usr/bin/env bash
# lorascope beside the PyTorch + PEFT reference on the GPU machine, same points, same sitting.
# Run from the repository root on the device machine, with `.carry/` holding:
#   lorascope.gz (bash ../shared/cuda/pack.sh target/release/lorascope), alpaca_en_demo.json,
#   peft_qlora_baseline.py and qwen/config.json (from ../shared), whl/bitsandbytes-*.whl.
# POINTS: space-separated "batch,seq,precision,quant,grad_ckpt" (grad_ckpt 0 or 1).
# MODEL: a preset (default qwen2.5-1.5b) or, with a leading `/`, a model directory (config.json,
# weights optional: synthetic); REFCFG: the reference's config directory (default .carry/qwen).
# WHL: the folder holding the bitsandbytes wheel (default .carry/whl).
# Writes results under $OUT (or /tmp/out).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
gunzip -c .carry/lorascope.gz > /tmp/lorascope && chmod +x /tmp/lorascope
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,power.limit --format=csv
DATA=$PWD/.carry/alpaca_en_demo.json
POINTS=${POINTS:-"1,512,bf16,none,0 2,2048,bf16,none,0 4,1024,bf16,none,0"}

# 1. lorascope: a sweep of the points (LoRA r=16 on all seven projections, dropout 0.05 as the
#    reference, AdamW, 30 timed steps after 5 warm-up steps), NVML telemetry on.
{
  M=${MODEL:-qwen2.5-1.5b}
  if [ "${M#/}" != "$M" ]; then printf 'name = "h200"\n[model]\npath = "%s"\n' "$M"
  else printf 'name = "h200"\n[model]\npreset = "%s"\n' "$M"; fi
  printf '[data]\npath = "%s"\n' "$DATA"
  printf '[lora]\nrank = 16\nalpha = 32.0\ndropout = 0.05\n'
  printf 'targets = ["q", "k", "v", "o", "gate", "up", "down"]\n'
  printf '[run]\nsteps = 35\nwarmup_steps = 5\nseed = 0\ndevices = ["cuda:0"]\n[grid]\n'
  first=${POINTS%% *}; IFS=, read -r b s p q c <<< "$first"
  printf 'batch_size = [%s]\nseq_len = [%s]\nprecision = ["%s"]\nquant = ["%s"]\n' "$b" "$s" "$p" "$q"
  printf 'grad_checkpointing = [%s]\n' "$([ "$c" = 1 ] && echo true || echo false)"
  for pt in $POINTS; do
    IFS=, read -r b s p q c <<< "$pt"
    printf '[[grid.include]]\nbatch_size = %s\nseq_len = %s\nprecision = "%s"\nquant = "%s"\n' "$b" "$s" "$p" "$q"
    printf 'grad_checkpointing = %s\n' "$([ "$c" = 1 ] && echo true || echo false)"
  done
} > /tmp/h200.toml
/tmp/lorascope run /tmp/h200.toml --headless --db "$OUT/lorascope.db" 2> "$OUT/lorascope.log"
/tmp/lorascope report --db "$OUT/lorascope.db" --format md | tee "$OUT/lorascope.md"
/tmp/lorascope report --db "$OUT/lorascope.db" --format json > "$OUT/lorascope.json"
grep -E "header|breakdown|error" "$OUT/lorascope.log" | head -20

# 2. The reference on the same points (AdamW), grouped by its global --grad-ckpt setting
#    (SKIP_REF=1: lorascope only).
[ "${SKIP_REF:-0}" = 1 ] && exit 0
[ -d /tmp/site/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ${WHL:-.carry/whl}/*.whl
export PYTHONPATH=/tmp/site
for ck in 0 1; do
  REF=""
  for pt in $POINTS; do
    IFS=, read -r b s p q c <<< "$pt"
    [ "$c" = "$ck" ] && REF="$REF;$q,adamw,$p,$b,$s"
  done
  [ -z "$REF" ] && continue
  python3 .carry/peft_qlora_baseline.py "${REFCFG:-.carry/qwen}" "$OUT/reference-ckpt$ck.jsonl" \
    --points "${REF#;}" --grad-ckpt "$ck" --steps 30 --warmup 5 2>&1 | tail -6
done
