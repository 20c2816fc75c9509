#!/usr/bin/env bash
# The worker's own telemetry (`lorascope train --json --telemetry`, what a Slurm task runs)
# against the orchestrator's (a local sweep) for the same point on one GPU: energy, peak
# VRAM and J/token should agree within 2%. Needs a CUDA build and an NVIDIA GPU (no Slurm).
#   cargo build --release --features cuda && scripts/gpu_telemetry_check.sh [target/release/lorascope]
# Prints a table last; exits 1 when a figure differs by more than 2%.
set -euo pipefail
BIN=${1:-/tmp/lorascope}; [ -x "$BIN" ] || BIN=target/release/lorascope
GPU=${GPU:-0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/p.toml" <<TOML
name = "telemetry-check"
[model]
preset = "qwen2.5-0.5b"
[data]
path = "sample"
[lora]
rank = 16
[run]
steps = 120
warmup_steps = 5
devices = ["cuda:$GPU"]
[grid]
batch_size = [4]
seq_len = [512]
precision = ["bf16"]
TOML
"$BIN" profile check "$work/p.toml" >/dev/null
# 1. Local: the orchestrator samples its child.
"$BIN" run "$work/p.toml" --headless --db "$work/local.db" >/dev/null
# 2. The same point's worker argv, sampled by the worker itself.
argv=$("$BIN" profile check "$work/p.toml" --argv | grep -m1 -o 'train .*--json')
CUDA_VISIBLE_DEVICES=$GPU CUDA_DEVICE_ORDER=PCI_BUS_ID "$BIN" $argv --telemetry >"$work/worker.jsonl"
python3 - "$work/local.db" "$work/worker.jsonl" <<'PY'
import json, sqlite3, sys
# The local run's summary as lorascope computed and stored it.
row = json.loads(sqlite3.connect(sys.argv[1]).execute(
    "SELECT summary_json FROM runs WHERE status = 'ok' ORDER BY id LIMIT 1").fetchone()[0])
lines = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
steps = [l for l in lines if l.get("type") == "step"]
tel = [l for l in lines if l.get("type") == "telemetry"]
summ = [l for l in lines if l.get("type") == "summary"][0]
warm = 5
timed = steps[warm:]
t0 = timed[0]["t"] - timed[0]["step_seconds"]
t1 = timed[-1]["t"]
# The energy counter interpolated at the window's edges, as src/summary/samples.rs does
# (taking the first and last sample inside the window instead drops up to two sampling
# intervals: ~9% of a 2 s window at the 100 ms period).
cnt = [(s["t"], s["energy_mj"]) for s in tel if s.get("energy_mj") is not None]
def interp(t):
    if t <= cnt[0][0]: return cnt[0][1]
    if t >= cnt[-1][0]: return cnt[-1][1]
    for (ta, ea), (tb, eb) in zip(cnt, cnt[1:]):
        if ta <= t <= tb:
            return ea if tb <= ta else ea + (eb - ea) * (t - ta) / (tb - ta)
energy_j = (interp(t1) - interp(t0)) / 1000.0 if len(cnt) > 1 else float("nan")
tokens = sum(s["tokens"] for s in timed)
peak = max((s.get("proc_mem_bytes") or 0) for s in tel)
loc = {"energy_j": row.get("energy_j"), "peak_vram_bytes": row.get("peak_vram_process_bytes"),
       "j_per_token": row.get("j_per_token")}
wrk = {"energy_j": energy_j, "peak_vram_bytes": peak, "j_per_token": energy_j / tokens if tokens else float("nan")}
bad = False
print(f"{'figure':<18}{'local sweep':>16}{'worker --telemetry':>20}{'diff %':>9}")
for k in ("energy_j", "peak_vram_bytes", "j_per_token"):
    a, b = loc[k], wrk[k]
    d = abs(a - b) / abs(a) * 100 if a else float("nan")
    bad |= not (d <= 2.0)
    print(f"{k:<18}{a:>16.6g}{b:>20.6g}{d:>9.2f}")
sys.exit(1 if bad else 0)
PY
