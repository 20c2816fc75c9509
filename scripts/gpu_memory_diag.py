#!/usr/bin/env python3
"""Where the memory model's error comes from, per point: the prediction's terms beside the
worker's pool figures and NVML's process peak.

    python3 scripts/gpu_memory_diag.py OUT_DIR

reads OUT_DIR/<name>.estimate.jsonl (`lorascope estimate P --json`) and OUT_DIR/<name>.db (the
sweep's results) for every name that has both, joins them by the run's spec id, and prints one
line per ok run (MiB):

  pred      predicted peak process VRAM
  p_pool    predicted pool bytes in use at the peak (peak - overhead - optimizer state)
  m_pool    measured pool bytes in use at the peak (resident + activations peak)
  m_resv    measured pool reservation peak (what NVML sees of the pool)
  opt       optimizer state outside the pool (device + managed)
  ctx       NVML peak - reservation peak - opt (context, cuBLAS workspace, modules)
  nvml      measured peak process VRAM
Also writes OUT_DIR/memory-diag.json with every figure.
"""
import json, sqlite3, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for est in sorted(out.glob("*.estimate.jsonl")):
    name = est.name[: -len(".estimate.jsonl")]
    db = out / f"{name}.db"
    if not db.exists():
        continue
    preds = {}
    for line in est.read_text().splitlines():
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if "estimate" in v:
            preds[v["id"]] = v["estimate"]
    con = sqlite3.connect(db)
    for spec_id, label, status, peak, ws in con.execute(
        "SELECT spec_id, label, status, peak_mem_bytes, worker_summary_json FROM runs"
    ):
        e = preds.get(spec_id)
        if e is None or status != "ok" or not ws:
            continue
        ws = json.loads(ws)
        dm = ws.get("device_memory") or {}
        opt = (ws.get("optimizer_state_device_bytes") or 0) + (
            ws.get("optimizer_state_managed_bytes") or 0
        )
        r = {
            "profile": name,
            "label": label,
            "pred": e["peak"],
            "p_pool": e["peak"] - e["overhead"] - e["optimizer_state"],
            "p_act": e["activations"],
            "p_trans": e["transient"],
            "p_phase": e["peak_phase"],
            "m_res": dm.get("resident_bytes"),
            "m_act": dm.get("activations_peak_bytes"),
            "m_pool": (dm.get("resident_bytes") or 0) + (dm.get("activations_peak_bytes") or 0),
            "m_resv": dm.get("pool_reserved_peak_bytes"),
            "opt": opt,
            "nvml": peak,
        }
        r["ctx"] = (peak or 0) - (r["m_resv"] or 0) - opt
        rows.append(r)
(out / "memory-diag.json").write_text(json.dumps(rows, indent=1))
M = lambda b: f"{(b or 0) / 2**20:.0f}"
hdr = ["point", "phase", "pred", "p_pool", "m_pool", "m_resv", "p_act", "p_trans", "m_act", "opt", "ctx", "nvml", "err%"]
print(" ".join(hdr))
for r in rows:
    err = 100 * ((r["nvml"] or 0) - r["pred"]) / r["pred"]
    print(
        f"{r['profile'][:10]}:{r['label'][:34]} {r['p_phase'].split()[0]} {M(r['pred'])} {M(r['p_pool'])} "
        f"{M(r['m_pool'])} {M(r['m_resv'])} {M(r['p_act'])} {M(r['p_trans'])} {M(r['m_act'])} "
        f"{M(r['opt'])} {M(r['ctx'])} {M(r['nvml'])} {err:+.1f}"
    )
