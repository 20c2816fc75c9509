#!/usr/bin/env bash
# Memory diagnosis on the GPU machine: pool bytes in use per layer (LORASCOPE_MEM_TRACE) and
# the activation peak under variations. Run from the repository root with `.carry/` as for
# gpu_bench.sh.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
[ -x /tmp/lorascope ] || { gunzip -c .carry/lorascope.gz > /tmp/lorascope && chmod +x /tmp/lorascope; }
DATA=$PWD/.carry/alpaca_en_demo.json
base=(train --model qwen2.5-1.5b --data "$DATA" --device cuda:0 --quant nf4 --precision fp16
      --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05 --warmup-steps 1)
act() { grep -o "activations peak [0-9.]* GiB" | head -1; }
echo "== trace: bs2 s2048 ckpt, 2 steps"
LORASCOPE_MEM_TRACE=1 /tmp/lorascope "${base[@]}" --batch-size 2 --seq-len 2048 --grad-checkpointing --steps 2 2>&1 \
  | grep -E "mem-trace|activations" | awk 'NR<=4 || NR%7==0 || /after (forward|backward)/ || /activations/' | head -40
echo "== bs1 s512 variations (4 steps)"
for v in "plain" "blocking" "nodrop"; do
  case $v in
    plain) r=$(/tmp/lorascope "${base[@]}" --batch-size 1 --seq-len 512 --steps 4 2>&1 | act);;
    blocking) r=$(CUDA_LAUNCH_BLOCKING=1 /tmp/lorascope "${base[@]}" --batch-size 1 --seq-len 512 --steps 4 2>&1 | act);;
    nodrop) r=$(/tmp/lorascope "${base[@]}" --batch-size 1 --seq-len 512 --steps 4 --lora-dropout 0 2>&1 | act);;
  esac
  echo "$v: $r"
done
echo "== selftest optim"; /tmp/lorascope selftest optim --steps 20 2>&1 | tail -12
