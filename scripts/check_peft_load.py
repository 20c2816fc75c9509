#!/usr/bin/env python3
"""Check that an adapter lorascope saved (``lorascope train --save-adapter DIR``) loads in PEFT.

Usage:
  python scripts/check_peft_load.py ADAPTER_DIR MODEL_DIR

ADAPTER_DIR holds lorascope's ``adapter_config.json`` and ``adapter_model.safetensors``;
MODEL_DIR is the transformers model it was trained on (``config.json`` + ``model.safetensors``,
e.g. a fixture such as ``tests/fixtures/hf/phi3``). Checks, each printed as one ``ok`` / ``FAIL``
line; exit status 1 on any FAIL:

  1. adapter_config.json: ``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``r`` and ``lora_alpha``
     numbers, ``target_modules`` a list of module names that exist in MODEL_DIR's model (PEFT's
     names: ``q_proj``, Phi-3's ``qkv_proj`` / ``gate_up_proj``), ``base_model_name_or_path``
     printed (a Hub id for a preset, the directory as given otherwise);
  2. every tensor key is ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` for a
     ``torch.nn.Linear`` ``<module>`` of the model, with shapes (r, in) and (out, r);
  3. ``PeftModel.from_pretrained(model, ADAPTER_DIR)`` loads it with no missing or unexpected
     adapter keys, and every LoRA weight PEFT holds equals the saved tensor exactly;
  4. the adapter is applied: with any lora_B nonzero, PEFT's logits differ from the base model's
     on a fixed row, and disabling the adapter gives the base logits back (1e-6).

lorascope's own logits against PEFT's for the same adapter are checked by the fixture tests
(``cargo test --test it hf_fixtures`` and ``lorascope selftest engine --fixtures``), so equal
weights here mean equal functions.

Needs torch, transformers, peft, safetensors (CPU is enough).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

FAILED = []


def plain_model_dir(model_dir: Path) -> Path:
    """A temporary directory of symlinks to ``model_dir``'s files except ``adapter_*``:
    transformers loads an adapter it finds beside the weights (a fixture directory holds PEFT's
    own ``adapter_config.json``), so the base model must come from a directory without one.
    The caller removes it (``shutil.rmtree``)."""
    import tempfile
    plain = Path(tempfile.mkdtemp(prefix="base-model-"))
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.startswith("adapter_"):
            (plain / f.name).symlink_to(f.resolve())
    return plain


def report(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'}  {what}")
    if not ok:
        FAILED.append(what)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: check_peft_load.py ADAPTER_DIR MODEL_DIR", file=sys.stderr)
        return 2
    adapter_dir, model_dir = Path(argv[1]), Path(argv[2])
    for f in (adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors",
              model_dir / "config.json"):
        if not f.is_file():
            print(f"error: {f} not found", file=sys.stderr)
            return 2

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    report(cfg.get("peft_type") == "LORA", f"peft_type {cfg.get('peft_type')!r} is LORA")
    report(cfg.get("task_type") == "CAUSAL_LM", f"task_type {cfg.get('task_type')!r} is CAUSAL_LM")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    report(isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)),
           f"r {r!r} and lora_alpha {alpha!r}")
    print(f"      base_model_name_or_path: {cfg.get('base_model_name_or_path')!r}")

    torch.manual_seed(0)
    import shutil
    plain = plain_model_dir(model_dir)
    base = AutoModelForCausalLM.from_pretrained(
        plain, dtype=torch.float32, attn_implementation="eager")
    shutil.rmtree(plain, ignore_errors=True)
    base.eval()
    linears = {name: m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    suffixes = {name.rsplit(".", 1)[-1] for name in linears}
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    report(isinstance(targets, list) and all(t in suffixes for t in targets),
           f"target_modules {targets} are linear modules of {model_dir} (it has {sorted(suffixes)})")

    saved = load_file(adapter_dir / "adapter_model.safetensors")
    key_re = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
    bad_keys, bad_shapes, modules = [], [], set()
    for key, t in saved.items():
        m = key_re.match(key)
        if not m or m.group(1) not in linears:
            bad_keys.append(key)
            continue
        lin = linears[m.group(1)]
        modules.add(m.group(1))
        want = (r, lin.in_features) if m.group(2) == "A" else (lin.out_features, r)
        if tuple(t.shape) != want:
            bad_shapes.append(f"{key} {tuple(t.shape)} != {want}")
    report(not bad_keys, f"{len(saved)} keys named base_model.model.<linear>.lora_A/B.weight"
           + (f" (not: {bad_keys[:3]})" if bad_keys else ""))
    report(not bad_shapes, "shapes (r, in) and (out, r)" + (f" ({bad_shapes[:3]})" if bad_shapes else ""))
    adapted_suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    report(sorted(targets or []) == adapted_suffixes,
           f"target_modules equal the adapted modules' names {adapted_suffixes}")

    row = torch.arange(1, 17).remainder(base.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        base_logits = base(row).logits.clone()
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    held = {}
    for name, p in model.named_parameters():
        m = re.match(r"^(base_model\.model\..+)\.lora_([AB])\.default\.weight$", name)
        if m:
            held[f"{m.group(1)}.lora_{m.group(2)}.weight"] = p.detach()
    missing = sorted(set(saved) - set(held))
    extra = sorted(set(held) - set(saved))
    report(not missing and not extra,
           f"PEFT holds exactly the saved adapter tensors ({len(held)})"
           + (f" missing {missing[:3]}" if missing else "") + (f" extra {extra[:3]}" if extra else ""))
    differ = [k for k in saved if k in held and not torch.equal(saved[k].to(held[k].dtype), held[k])]
    report(not differ, "every loaded LoRA weight equals the saved tensor" + (f" (not: {differ[:3]})" if differ else ""))

    with torch.no_grad():
        peft_logits = model(row).logits
        with model.disable_adapter():
            off = model(row).logits
    b_nonzero = any(k.endswith("lora_B.weight") and bool(t.abs().max() > 0) for k, t in saved.items())
    scale = base_logits.abs().max().item()
    if b_nonzero:
        d = (peft_logits - base_logits).abs().max().item() / scale
        report(d > 1e-6, f"the adapter changes the logits (max relative change {d:.2e})")
    else:
        d = (peft_logits - base_logits).abs().max().item() / scale
        report(d <= 1e-6, f"every lora_B is zero (untrained) and the logits equal the base ({d:.2e})")
    d_off = (off - base_logits).abs().max().item() / scale
    report(d_off <= 1e-6, f"with the adapter disabled the logits are the base model's ({d_off:.2e})")

    print("all ok" if not FAILED else f"FAILED: {len(FAILED)} check(s)")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
