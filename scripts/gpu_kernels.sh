#!/usr/bin/env bash
# Where a training step's GPU time goes, kernel by kernel: Nsight Compute (ncu, clocks left
# alone) times every kernel of one `lorascope train` step at each point of POINTS
# ("batch,seq,precision,quant,ckpt", default bf16 2 x 2048 nf4 checkpointed and bf16 1 x 512), and
# a table per point sums the kernel durations by kernel family (cuBLAS GEMMs, NF4 dequantise,
# attention, ...) against the step's wall time without ncu (the same point, 12 steps, 4 warm-up).
# The gap between the kernels' sum and the step's wall time is time the GPU waits on the host.
# Needs ncu on PATH (the Firecracker machines; gVisor cannot read the counters), the CUDA binary
# at /tmp/lorascope, python3. Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out/kernels}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
L=${LORASCOPE:-/tmp/lorascope}
POINTS=${POINTS:-"2,2048,bf16,nf4,1 1,512,bf16,nf4,0"}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
for pt in $POINTS; do
  IFS=, read -r b s p q c <<< "$pt"
  ck=$([ "$c" = 1 ] && echo --grad-checkpointing)
  args="--model qwen2.5-1.5b --data sample --device cuda:0 --batch-size $b --seq-len $s --precision $p --quant $q $ck --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05 --optimizer adamw"
  tag=b$b-s$s-$p-$q-c$c
  $L train $args --steps 12 --warmup-steps 4 --json > "$OUT/$tag-plain.jsonl" 2> "$OUT/$tag-plain.err"
  # One step under ncu, with the set-up's kernels (quantisation: their own family).
  timeout ${NCU_TIMEOUT:-240} "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
    --log-file "$OUT/$tag.csv" $L train $args --steps 1 --warmup-steps 0 --json > "$OUT/$tag-ncu.jsonl" 2> "$OUT/$tag-ncu.err"
  echo "$tag: ncu exit $?"
done
python3 - "$OUT" $POINTS <<'PY'
import csv, json, re, sys, collections
out, points = sys.argv[1], sys.argv[2:]
def family(n):
    n0 = n.lower()
    for key, fam in [("nf4_absmax", "set-up (quantise)"), ("nf4_codes", "set-up (quantise)"),
                     ("dequant", "nf4 dequantise"),
                     ("gemm", "GEMM (cuBLAS)"), ("sm90", "GEMM (cuBLAS)"), ("cutlass", "GEMM (cuBLAS)"),
                     ("splitk", "GEMM (cuBLAS)"), ("reduce_", "reductions"),
                     ("attn", "attention"), ("softmax", "attention"), ("mask", "attention"),
                     ("rope", "rope"), ("rms", "rms norm"), ("swiglu", "swiglu"), ("silu", "swiglu"),
                     ("ce_rows", "cross-entropy rows"), ("dropout", "lora dropout"), ("lora", "lora casts/adds"),
                     ("adamw", "optimizer"), ("optim", "optimizer"), ("copy", "copies/casts"), ("cast", "copies/casts"),
                     ("affine", "elementwise"), ("bmul", "elementwise"), ("badd", "elementwise"), ("bsub", "elementwise"),
                     ("bdiv", "elementwise"), ("unary", "elementwise"), ("fill", "elementwise")]:
        if key in n0: return fam
    return "other"
for pt in points:
    b, s, p, q, c = pt.split(",")
    tag = f"b{b}-s{s}-{p}-{q}-c{c}"
    rows = []
    try:
        text = open(f"{out}/{tag}.csv").read()
        start = text.find('"ID"')
        for r in csv.DictReader(text[start:].splitlines()):
            v = r.get("gpu__time_duration.sum", "")
            try: rows.append((r["Kernel Name"], float(v.replace(",", ""))))
            except ValueError: pass  # the units row
    except FileNotFoundError:
        print(f"{tag}: no ncu output"); continue
    # ncu reports ns (or us: the units row says); take the units from the file.
    units = next(csv.DictReader(text[start:].splitlines()), {}).get("gpu__time_duration.sum", "ns")
    units = units.strip().lower()
    unit = next((u for p, u in (("n", "ns"), ("u", "us"), ("\u00b5", "us"), ("m", "ms"), ("s", "s")) if units.startswith(p)), "ns")
    steps = [json.loads(l) for l in open(f"{out}/{tag}-ncu.jsonl") if '"type":"step"' in l]
    plain = [json.loads(l) for l in open(f"{out}/{tag}-plain.jsonl") if '"type":"summary"' in l]
    tps = plain[0].get("tokens_per_s") if plain else None
    step_ms = (int(b) * int(s) / tps * 1e3) if tps else float("nan")
    fams, names = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(lambda: [0.0, 0])
    for n, t in rows:
        f = fams[family(n)]; f[0] += t; f[1] += 1
        k = names[n[:90]]; k[0] += t; k[1] += 1
    total = sum(t for _, t in rows)
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    print(f"== {tag}: {len(rows)} kernels in one step (+ set-up), kernel time {total*scale:.1f} ms; "
          f"plain run {tps or 0:,.0f} tok/s = {step_ms:.1f} ms per step")
    print(f"{'family':<22}{'ms':>14}{'launches':>10}{'share':>8}")
    for f, (t, n) in sorted(fams.items(), key=lambda x: -x[1][0]):
        print(f"{f:<22}{t*scale:>14.2f}{n:>10}{100*t/total:>7.1f}%")
    print("top kernels:")
    for n, (t, k) in sorted(names.items(), key=lambda x: -x[1][0])[:18]:
        print(f"  {t*scale:9.2f} ms {k:6d}x  {n}")
PY
