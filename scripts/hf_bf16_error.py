#!/usr/bin/env python3
"""transformers' own bf16 error on the fixtures: the yardstick for lorascope's bf16 rows.

Usage:
  python3 scripts/hf_bf16_error.py [FIXTURES_DIR] [DEVICE] [WRITE_DIR]
  (defaults: tests/fixtures/hf, cuda; with WRITE_DIR, also WRITE_DIR/<case>/bf16_error.json)

For every case of FIXTURES_DIR (``expected.json`` beside ``model.safetensors``) it runs the
fixture model in transformers in bfloat16 on DEVICE (eager attention, as the fixtures were made)
on the fixture's rows and labels, and measures what ``lorascope selftest engine --fixtures``
measures against the fp32 expectations, with the same metric (``max |got - want| / max |want|``
per logits row, the largest over rows; relative error of the losses; per gradient tensor, the
largest over tensors):

  logits  the base model's logits at ``logits_positions`` against ``expected.json``'s
  loss    the base loss and the adapted loss (PEFT's adapter of the fixture) against theirs
  grads   d(adapted loss)/d(lora_A, lora_B) against ``lora_grads.safetensors``

Prints one line per case (``case logits loss grads``). With WRITE_DIR it also writes (merging
with a file already there, one key per device kind ``cuda`` / ``cpu``)
``WRITE_DIR/<case>/bf16_error.json``: ``{"cuda": {"logits": .., "loss": .., "grads": ..},
"versions": {...}}``; copied into the fixture, ``selftest engine --fixtures`` allows a bf16 row
twice transformers' own error on that device kind. Needs torch,
transformers, peft, safetensors. PEFT keeps the adapter weights in fp32 (its default
``autocast_adapter_dtype``) while the base runs in bf16, as lorascope's master weights are.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def max_rel(a, b) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    if a.numel() != b.numel() or a.numel() == 0:
        return float("inf")
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / max(scale, 1e-30)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main(argv: list[str]) -> int:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from check_peft_load import plain_model_dir  # scripts/ is on sys.path when run as a script

    root = Path(argv[1]) if len(argv) > 1 else Path("tests/fixtures/hf")
    device = argv[2] if len(argv) > 2 else "cuda"
    write = Path(argv[3]) if len(argv) > 3 else None
    import peft
    import transformers
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__}
    print(f"{'case':<28}{'logits':>10}{'loss':>10}{'grads':>10}   (transformers bf16 on {device} against the fp32 fixture)")
    for case in sorted(p for p in root.iterdir() if (p / "expected.json").is_file()):
        if not (case / "model.safetensors").exists() or not (case / "adapter_model.safetensors").exists():
            continue
        ex = json.loads((case / "expected.json").read_text())
        plain = plain_model_dir(case)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                plain, dtype=torch.bfloat16, attn_implementation="eager").to(device)
        except Exception as e:  # a case transformers cannot load in bf16: say so, go on
            print(f"{case.name:<28}  not loaded: {str(e).splitlines()[0][:80]}")
            shutil.rmtree(plain, ignore_errors=True)
            continue
        model.eval()
        rows = torch.tensor(ex["rows"], device=device)
        labels = torch.tensor(ex["labels"], device=device)
        with torch.no_grad():
            out = model(input_ids=rows, labels=labels)
        logits = max(
            max_rel(out.logits[b, t].float().cpu(), torch.tensor(want))
            for (b, t), want in zip(ex["logits_positions"], ex["logits"]))
        loss = rel(float(out.loss), ex["loss"])
        pm = PeftModel.from_pretrained(model, case, is_trainable=True)
        pm.eval()
        pm.zero_grad(set_to_none=True)
        o = pm(input_ids=rows, labels=labels)
        o.loss.backward()
        loss = max(loss, rel(float(o.loss), ex["lora"]["loss"]))
        want = load_file(case / ex["lora"]["grads_file"])
        grads = 0.0
        for n, p in pm.named_parameters():
            if p.requires_grad and p.grad is not None:
                k = n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
                grads = max(grads, max_rel(p.grad.float().cpu(), want[k]) if k in want else float("inf"))
        print(f"{case.name:<28}{logits:>10.2e}{loss:>10.2e}{grads:>10.2e}")
        if write is not None:
            f = write / case.name / "bf16_error.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            doc = json.loads(f.read_text()) if f.is_file() else {}
            kind = "cuda" if str(device).startswith("cuda") else "cpu"
            doc[kind] = {"logits": logits, "loss": loss, "grads": grads}
            doc["versions"] = versions
            f.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(plain, ignore_errors=True)
        del pm, model
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
