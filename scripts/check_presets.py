#!/usr/bin/env python3
"""Load every preset config in src/engine/presets/ with transformers and count its parameters.

Each `<name>.json` is copied into a temporary directory as `config.json`, read with
`AutoConfig.from_pretrained`, and the model is instantiated on the meta device (no memory, no
weights) with `AutoModelForCausalLM.from_config`. The parameter count is the number of distinct
parameter elements (a tied lm_head is the embedding and is counted once), the figure Hugging Face
model cards publish. Also prints what transformers resolved from the config (RoPE, layer types),
so a preset's math-relevant keys can be read off in one place.

Usage: python scripts/check_presets.py [--markdown]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

transformers.logging.set_verbosity_error()
PRESETS = Path(__file__).resolve().parent.parent / "src" / "engine" / "presets"


def count(path: Path) -> dict:
    with tempfile.TemporaryDirectory() as td:
        shutil.copy(path, Path(td) / "config.json")
        cfg = AutoConfig.from_pretrained(td)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    lt = getattr(cfg, "layer_types", None)
    kinds = sorted(set(lt)) if lt else None
    return {
        "preset": path.stem,
        "architecture": type(model).__name__,
        "parameters": n,
        "tied": bool(cfg.tie_word_embeddings),
        "rope_parameters": cfg.rope_parameters,
        "layer_types": ({k: lt.count(k) for k in kinds} if lt else None),
        "sliding_window": getattr(cfg, "sliding_window", None),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args()
    rows = [count(p) for p in sorted(PRESETS.glob("*.json"))]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    if args.markdown:
        print("| preset | class | parameters | tied |")
        print("|---|---|---:|---|")
        for r in rows:
            print(f"| `{r['preset']}` | {r['architecture']} | {r['parameters']:,} "
                  f"({r['parameters'] / 1e9:.2f} B) | {'yes' if r['tied'] else 'no'} |")
    else:
        for r in rows:
            rp = {k: v for k, v in (r["rope_parameters"] or {}).items()
                  if k not in ("long_factor", "short_factor")}
            print(f"{r['preset']:16s} {r['architecture']:22s} {r['parameters']:>14,} "
                  f"tied={r['tied']!s:5s} sliding_window={r['sliding_window']} "
                  f"layer_types={r['layer_types']} rope={json.dumps(rp, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
