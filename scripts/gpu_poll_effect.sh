#!/usr/bin/env bash
# Does polling the driver from another process (nvidia-smi at 5 Hz, as gpu_profile.sh does)
# change a run's tokens/s? `lorascope train` at POINTS ("batch,seq,precision,grad_ckpt"), each
# once without and once with the poll loop beside it. Run from the repository root on the
# device machine with `.carry/` as for gpu_bench.sh.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
[ -x /tmp/lorascope ] || { gunzip -c .carry/lorascope.gz > /tmp/lorascope && chmod +x /tmp/lorascope; }
DATA=$PWD/.carry/alpaca_en_demo.json
POINTS=${POINTS:-"1,512,fp16,0 2,2048,bf16,1"}
STEPS=${STEPS:-15}; WARMUP=${WARMUP:-5}
for pt in $POINTS; do
  IFS=, read -r b s p c <<< "$pt"
  args=(train --model qwen2.5-1.5b --data "$DATA" --device cuda:0 --batch-size "$b" --seq-len "$s"
        --precision "$p" --quant nf4 --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05
        --steps "$STEPS" --warmup-steps "$WARMUP")
  [ "$c" = 1 ] && args+=(--grad-checkpointing)
  for poll in 0 1 0 1; do
    pid=""
    if [ "$poll" = 1 ]; then
      ( while sleep 0.2; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits; done ) > /dev/null 2>&1 &
      pid=$!
    fi
    r=$(/tmp/lorascope "${args[@]}" 2>&1 | grep -o "[0-9.]* tokens/s after warm-up")
    [ -n "$pid" ] && { kill "$pid"; wait "$pid" 2>/dev/null; }
    echo "bs$b seq$s $p ckpt$c nvidia-smi-poll=$poll: $r"
  done
done
