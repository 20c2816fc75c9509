#!/usr/bin/env python3
"""Reference fixtures from transformers + PEFT for lorascope's engine tests (issue 13).

For every case below this builds a tiny random model from a config (hidden 64, vocab 320,
2-3 layers, fp32), saves it with ``save_pretrained`` (safetensors), reloads it from the saved
directory with ``attn_implementation="eager"`` and records what transformers computes:

  tests/fixtures/hf/<case>/config.json                as save_pretrained wrote it (transformers 5
                                                      spelling, ``rope_parameters``), or post-edited
                                                      into an older spelling for the legacy cases
  tests/fixtures/hf/<case>/model.safetensors          fp32 weights
  tests/fixtures/hf/<case>/adapter_model.safetensors  PEFT LoRA adapter (A and B random, nonzero)
  tests/fixtures/hf/<case>/adapter_config.json        as PEFT save_pretrained wrote it
  tests/fixtures/hf/<case>/lora_grads.safetensors     d(adapter loss)/d(every lora_A / lora_B)
  tests/fixtures/hf/<case>/expected.json              rows, labels, logits, losses, versions
  tests/fixtures/hf/chat/                             chat-template / assistant-mask case

Every number in the fixtures comes from running torch / transformers / peft / tokenizers;
nothing is typed in by hand.  See tests/fixtures/hf/README.md for the file format.

Usage:
  python scripts/make_hf_fixtures.py                 # (re)write tests/fixtures/hf
  python scripts/make_hf_fixtures.py --out DIR       # write elsewhere
  python scripts/make_hf_fixtures.py --check         # regenerate into a temp dir, compare with
                                                     # the committed tree, exit 1 on a mismatch
  python scripts/make_hf_fixtures.py --only llama3,qwen2   # a subset (with or without --check)

Needs torch, transformers >= 5, peft, tokenizers, safetensors (CPU is enough).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
import tokenizers  # noqa: E402
import safetensors  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "hf"

VOCAB = 320
BATCH = 2
LORA_R = 4
LORA_ALPHA = 8
STD_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# Std of the seeded normals used for the LoRA matrices (A and B both nonzero, see README).
LORA_A_STD = 0.1
LORA_B_STD = 0.05
# Std of the seeded perturbation of RMSNorm weights and of the biases (transformers initialises
# norms to a constant and biases to zero, which would leave their loading untested).
NORM_STD = 0.1
BIAS_STD = 0.1
# transformers' own normal init, raised from 0.02 so that logits are not flat.
INIT_RANGE = 0.2

# Base config shared by every case (each case overrides what it exercises).
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    initializer_range=INIT_RANGE,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attention_dropout=0.0,
    use_cache=False,
)


def seed_of(name: str) -> int:
    """A stable per-name seed (crc32 of the name)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------
# Config post-edits into the older spellings (top-level rope_theta + rope_scaling, no
# layer_types), the way the configs published on the Hub are written.
# --------------------------------------------------------------------------------------------


def _pop_rope(cfg: dict) -> dict:
    rp = cfg.pop("rope_parameters")
    assert isinstance(rp, dict)
    return rp


def edit_rope_theta_top_level(cfg: dict) -> dict:
    """rope_parameters {rope_type: default, rope_theta: X} -> top-level rope_theta: X."""
    rp = _pop_rope(cfg)
    assert rp.get("rope_type", "default") == "default", rp
    cfg["rope_theta"] = rp["rope_theta"]
    return cfg


def edit_rope_scaling(key: str) -> Callable[[dict], dict]:
    """rope_parameters {..} -> rope_theta + rope_scaling {key: <type>, ..} (key: type|rope_type)."""

    def edit(cfg: dict) -> dict:
        rp = _pop_rope(cfg)
        cfg["rope_theta"] = rp.pop("rope_theta")
        kind = rp.pop("rope_type")
        rp.pop("type", None)
        cfg["rope_scaling"] = {key: kind, **rp}
        return cfg

    edit.__doc__ = f"rope_parameters -> top-level rope_theta + rope_scaling with `{key}`"
    return edit


def edit_qwen2_legacy(cfg: dict) -> dict:
    """Qwen2.5 spelling: top-level rope_theta, no layer_types; sliding_window kept next to
    use_sliding_window (a small window with use_sliding_window false must be ignored)."""
    edit_rope_theta_top_level(cfg)
    cfg.pop("layer_types", None)
    if not cfg.get("use_sliding_window", False):
        # transformers wrote sliding_window null; the published Qwen2.5 configs carry a number
        # here next to use_sliding_window: false. Put a window far below the row length, which
        # transformers ignores (Qwen2Config.__post_init__ sets it to None).
        cfg["sliding_window"] = 4
        cfg["max_window_layers"] = 1
    return cfg


def edit_gemma2_legacy(cfg: dict) -> dict:
    """gemma-2-2b spelling: top-level rope_theta, no layer_types, hidden_act next to
    hidden_activation."""
    edit_rope_theta_top_level(cfg)
    cfg.pop("layer_types")
    cfg["hidden_act"] = cfg["hidden_activation"]
    return cfg


def edit_gemma3_legacy(cfg: dict) -> dict:
    """gemma-3-1b spelling: rope_theta (global) + rope_local_base_freq (sliding layers),
    sliding_window_pattern instead of layer_types, rope_scaling on the global layers."""
    rp = cfg.pop("rope_parameters")
    full, local = rp["full_attention"], rp["sliding_attention"]
    assert local["rope_type"] == "default"
    cfg["rope_theta"] = full["rope_theta"]
    cfg["rope_local_base_freq"] = local["rope_theta"]
    scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    cfg["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
    cfg.pop("layer_types")
    cfg.pop("_sliding_window_pattern", None)
    assert "sliding_window_pattern" in cfg
    return cfg


def edit_phi3_legacy(cfg: dict) -> dict:
    """Phi-3.5-mini spelling: rope_scaling {type: longrope, long_factor, short_factor}, top-level
    rope_theta and original_max_position_embeddings."""
    rp = _pop_rope(cfg)
    cfg["rope_theta"] = rp.pop("rope_theta")
    kind = rp.pop("rope_type")
    orig = rp.pop("original_max_position_embeddings")
    assert cfg["original_max_position_embeddings"] == orig
    rp.pop("partial_rotary_factor", None)
    cfg["rope_scaling"] = {"type": kind, "long_factor": rp.pop("long_factor"),
                           "short_factor": rp.pop("short_factor")}
    assert not rp, rp
    return cfg


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    model_type: str
    config: dict
    seq: int
    exercises: list[str]
    targets: list[str] = field(default_factory=lambda: list(STD_TARGETS))
    # Weights (and LoRA adapter) built with another case's seeds: the same tensors, since the
    # config differences (RoPE, window, activation, soft-capping) add no parameters. The files
    # are then symlinks to that case's.
    weights_of: str | None = None
    # Post-edit of config.json after save_pretrained (legacy spellings).
    edit: Callable[[dict], dict] | None = None
    # Config overrides that switch the exercised feature off: the loss is recomputed with each
    # (same weights, same rows) and the difference recorded, proving the fixture is sensitive.
    sensitivity: dict[str, Callable[[object], None]] = field(default_factory=dict)
    # A spelling-only variant of another case: same weights, rows, adapter; every expected
    # value must come out identical (asserted), and lora_grads is shared too.
    same_function_as: str | None = None

    def model_name(self) -> str:
        return self.weights_of or self.name

    def __post_init__(self):
        if self.same_function_as and not self.weights_of:
            self.weights_of = self.same_function_as  # resolved to the root in build_cases()

    @property
    def rows_of(self) -> str:
        return self.same_function_as or self.name


def _set(attr, value):
    def f(cfg):
        setattr(cfg, attr, value)
    return f


def _rope_default(cfg):
    theta = cfg.rope_parameters["rope_theta"]
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}


def _qwen2_no_sliding(cfg):
    cfg.sliding_window = None
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers


def _gemma_no_sliding(cfg):
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers


def _gemma3_same_theta(cfg):
    rp = copy.deepcopy(cfg.rope_parameters)
    rp["sliding_attention"]["rope_theta"] = rp["full_attention"]["rope_theta"]
    cfg.rope_parameters = rp


def _gemma3_no_global_scaling(cfg):
    rp = copy.deepcopy(cfg.rope_parameters)
    rp["full_attention"] = {"rope_type": "default",
                            "rope_theta": rp["full_attention"]["rope_theta"]}
    cfg.rope_parameters = rp


def _gelu_to_silu(attr):
    return _set(attr, "silu")


def longrope_factors(head_dim: int) -> dict:
    """Seeded, increasing long/short factors (the shape of Phi-3.5's lists), head_dim/2 each."""
    g = torch.Generator().manual_seed(seed_of("longrope-factors"))
    n = head_dim // 2
    long_f = torch.sort(1.0 + 7.0 * torch.rand(n, generator=g)).values
    short_f = torch.sort(1.0 + 0.5 * torch.rand(n, generator=g)).values
    return {"long_factor": [round(float(x), 4) for x in long_f],
            "short_factor": [round(float(x), 4) for x in short_f]}


def build_cases() -> list[Case]:
    C = []
    qwen2 = dict(tie_word_embeddings=True, intermediate_size=172,
                 rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    C.append(Case("qwen2", "qwen2", qwen2, 24, [
        "Qwen2ForCausalLM: q/k/v biases (no o_proj bias), tied lm_head, GQA 4q/2kv heads",
        "rope_theta 1e6 given inside rope_parameters (transformers 5 spelling)",
        "intermediate_size 172 (not a power of two)"]))
    C.append(Case("qwen2-untied", "qwen2", {**qwen2, "tie_word_embeddings": False}, 24, [
        "Qwen2 with a separate lm_head.weight (tie_word_embeddings false, like Qwen2.5-7B)"]))
    C.append(Case("qwen2-legacy-rope-theta", "qwen2", qwen2, 24, [
        "same model and rows as `qwen2`, config in the published Qwen2.5 spelling: top-level "
        "rope_theta, no rope_parameters, no layer_types",
        "use_sliding_window false next to sliding_window 4 and max_window_layers 1: the window "
        "must be IGNORED (transformers sets sliding_window to None when use_sliding_window is "
        "false); expected values are identical to `qwen2`"],
        same_function_as="qwen2", edit=edit_qwen2_legacy))
    qwen2s = dict(qwen2, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    C.append(Case("qwen2-sliding", "qwen2", qwen2s, 32, [
        "weights of `qwen2`; use_sliding_window true, sliding_window 6, max_window_layers 1: "
        "layers with index >= max_window_layers slide, so layer_types = [full, sliding]; a "
        "sliding query at position i sees keys j with i - 6 < j <= i (6 keys incl. itself)"],
        weights_of="qwen2", sensitivity={"no_sliding_window": _qwen2_no_sliding}))
    C.append(Case("qwen2-sliding-legacy", "qwen2", qwen2s, 32, [
        "same model and rows as `qwen2-sliding` without layer_types in config.json (the engine "
        "must derive the sliding layers from use_sliding_window / max_window_layers) and with "
        "top-level rope_theta"],
        same_function_as="qwen2-sliding", edit=edit_qwen2_legacy))

    llama = dict(tie_word_embeddings=False, head_dim=24,
                 rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    C.append(Case("llama", "llama", llama, 24, [
        "LlamaForCausalLM, GQA 4q/2kv heads, explicit head_dim 24 != hidden/heads (16), "
        "untied lm_head, no biases, plain RoPE theta 1e4"]))
    C.append(Case("llama-bias", "llama", dict(llama, attention_bias=True, mlp_bias=True), 24, [
        "attention_bias true: q/k/v AND o_proj biases; mlp_bias true: gate/up/down biases "
        "(all biases random, nonzero)"]))
    C.append(Case("llama-gelu-tanh", "llama", dict(llama, hidden_act="gelu_pytorch_tanh"), 24, [
        "weights of `llama`; hidden_act gelu_pytorch_tanh in the gated MLP: "
        "down(gelu_tanh(gate(x)) * up(x))"],
        weights_of="llama", sensitivity={"hidden_act_silu": _gelu_to_silu("hidden_act")}))
    lin = dict(llama, rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0})
    C.append(Case("llama-rope-linear", "llama", lin, 40, [
        "weights of `llama`; RoPE linear scaling (rope_parameters rope_type linear, factor 4): "
        "inv_freq / factor"],
        weights_of="llama", sensitivity={"rope_default": _rope_default}))
    C.append(Case("llama-linear-legacy-type", "llama", lin, 40, [
        "same model and rows as `llama-rope-linear`, old spelling: top-level rope_theta + "
        "rope_scaling {\"type\": \"linear\", \"factor\": 4.0} (the pre-4.45 `type` key)"],
        same_function_as="llama-rope-linear", edit=edit_rope_scaling("type")))
    dyn = dict(llama, max_position_embeddings=32,
               rope_parameters={"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 2.0})
    C.append(Case("llama-rope-dynamic", "llama", dyn, 48, [
        "weights of `llama`; RoPE dynamic NTK (factor 2, max_position_embeddings 32, rows of "
        "48): transformers recomputes base = theta * (factor*L/max_pos - (factor-1)) ** "
        "(dim/(dim-2)) with L = max(position_ids)+1 = 48 (the row length); rows <= "
        "max_position_embeddings use plain theta"],
        weights_of="llama", sensitivity={"rope_default": _rope_default}))
    llama3 = dict(llama, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    C.append(Case("llama3", "llama", llama3, 48, [
        "weights of `llama`; Llama 3.1/3.2 RoPE (rope_type llama3: factor 8, low_freq_factor 1, "
        "high_freq_factor 4, original_max_position_embeddings 32, theta 5e5) in "
        "rope_parameters; head_dim 24 puts the 12 frequencies in all three regimes (wavelength "
        "< 8 kept, 8..32 smoothed, > 32 divided by 8); rows of 48 > 32"],
        weights_of="llama", sensitivity={"rope_default": _rope_default}))
    C.append(Case("llama3-legacy-spelling", "llama", llama3, 48, [
        "same model and rows as `llama3`, config as published for Llama-3.x: top-level "
        "rope_theta + rope_scaling {\"rope_type\": \"llama3\", ...}"],
        same_function_as="llama3", edit=edit_rope_scaling("rope_type")))
    yarn = dict(llama, max_position_embeddings=128,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 32})
    C.append(Case("llama-yarn", "llama", yarn, 48, [
        "weights of `llama`; YaRN (factor 4, original_max_position_embeddings 32, beta_fast 32 / "
        "beta_slow 1 by default, truncate true): inv_freq blended between theta**(-2i/d) and "
        "that / factor with a linear ramp over dims [0, 3) (fractional at i = 1, 2), and the "
        "attention factor 0.1*ln(4)+1 multiplying BOTH cos and sin (so q.k scales by its "
        "square); rows of 48 > 32"],
        weights_of="llama", sensitivity={"rope_default": _rope_default}))

    qwen3 = dict(tie_word_embeddings=True, head_dim=32,
                 rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    C.append(Case("qwen3", "qwen3", qwen3, 24, [
        "Qwen3ForCausalLM: per-head RMSNorm on q and k (q_norm/k_norm over head_dim, applied "
        "before RoPE), explicit head_dim 32 (4 heads x 32 = 128 != hidden 64), no q/k/v bias, "
        "tied"]))
    qwen3y = dict(qwen3, max_position_embeddings=64,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 16})
    C.append(Case("qwen3-yarn", "qwen3", qwen3y, 48, [
        "weights of `qwen3`; YaRN as the Qwen3 model cards tell users to enable it, in the "
        "legacy spelling: rope_theta + rope_scaling {\"rope_type\": \"yarn\", \"factor\": 4.0, "
        "\"original_max_position_embeddings\": 16}; rows of 48 > 16"],
        weights_of="qwen3", edit=edit_rope_scaling("rope_type"),
        sensitivity={"rope_default": _rope_default}))

    C.append(Case("mistral", "mistral", dict(
        tie_word_embeddings=False, sliding_window=6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}), 32, [
        "MistralForCausalLM with sliding_window 6 on every layer (Mistral-7B-v0.1 style; v0.3 "
        "has sliding_window null); query i sees keys i-5..i"],
        sensitivity={"no_sliding_window": _set("sliding_window", None)}))

    gemma2 = dict(num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=48, sliding_window=6,
                  attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                  hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    C.append(Case("gemma2", "gemma2", gemma2, 32, [
        "Gemma2ForCausalLM: embeddings * sqrt(hidden) (= 8.0), RMSNorm x*(1+w) computed in fp32, "
        "GeGLU with gelu_pytorch_tanh (hidden_activation), input/post-attention/pre-feedforward/"
        "post-feedforward norms, attention scale query_pre_attn_scalar**-0.5 = 48**-0.5 (head_dim "
        "32), attention logit soft-capping 2.0 (tanh, before the mask), final logit soft-capping "
        "3.0, alternating layers [sliding, full, sliding] (window 6), tied",
        "soft-capping values are far below the published 50/30 so that tanh actually bends the "
        "tiny model's logits"],
        sensitivity={"no_attn_softcap": _set("attn_logit_softcapping", None),
                     "no_final_softcap": _set("final_logit_softcapping", None),
                     "no_sliding_window": _gemma_no_sliding,
                     "query_pre_attn_scalar_eq_head_dim": _set("query_pre_attn_scalar", 32)}))
    C.append(Case("gemma2-legacy", "gemma2", gemma2, 32, [
        "same model and rows as `gemma2`, config spelled as the published gemma-2-2b: no "
        "layer_types (layer i slides when i is even), top-level rope_theta, hidden_act next to "
        "hidden_activation"],
        same_function_as="gemma2", edit=edit_gemma2_legacy))
    gemma3 = dict(num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=48, sliding_window=6,
                  sliding_window_pattern=3, hidden_activation="gelu_pytorch_tanh",
                  tie_word_embeddings=True, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
    C.append(Case("gemma3-text", "gemma3_text", gemma3, 32, [
        "Gemma3ForCausalLM (gemma3_text): Gemma 2 layout plus per-head q_norm/k_norm ((1+w) "
        "RMSNorm) before RoPE, no soft-capping, layer_types [sliding, sliding, full] "
        "(sliding_window_pattern 3: layer i is full when (i+1) % 3 == 0), sliding layers use "
        "RoPE theta 1e4 (rope_local_base_freq), full layers theta 1e6, query_pre_attn_scalar 48"],
        sensitivity={"same_theta_all_layers": _gemma3_same_theta,
                     "no_sliding_window": _gemma_no_sliding}))
    C.append(Case("gemma3-text-legacy", "gemma3_text", gemma3, 32, [
        "same model and rows as `gemma3-text`, config spelled as the published gemma-3-1b-it: "
        "rope_theta + rope_local_base_freq + sliding_window_pattern, rope_scaling null, no "
        "layer_types / rope_parameters"],
        same_function_as="gemma3-text", edit=edit_gemma3_legacy))
    C.append(Case("gemma3-text-softcap", "gemma3_text",
                  dict(gemma3, final_logit_softcapping=3.0), 32, [
        "weights of `gemma3-text`; final_logit_softcapping 3.0 (the config allows it; null in "
        "the published Gemma 3 configs)"],
        weights_of="gemma3-text",
        sensitivity={"no_final_softcap": _set("final_logit_softcapping", None)}))
    C.append(Case("gemma3-text-rope-linear", "gemma3_text",
                  dict(gemma3, rope_scaling={"rope_type": "linear", "factor": 8.0}), 32, [
        "weights of `gemma3-text`; rope_scaling {rope_type: linear, factor: 8} as in the "
        "gemma-3-4b/12b/27b text configs: transformers applies it to the FULL-attention layers "
        "only, sliding layers keep plain theta 1e4. config.json in the legacy spelling"],
        weights_of="gemma3-text", edit=edit_gemma3_legacy,
        sensitivity={"no_global_scaling": _gemma3_no_global_scaling}))

    phi3 = dict(tie_word_embeddings=False, sliding_window=6,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    C.append(Case("phi3", "phi3", phi3, 32, [
        "Phi3ForCausalLM: fused qkv_proj (rows: q, then k, then v) and gate_up_proj (first half "
        "gate, second half up), GQA 4q/2kv, untied, sliding_window 6 on every layer (Phi-3-mini-"
        "4k ships sliding_window 2047); PEFT targets qkv_proj, o_proj, gate_up_proj, down_proj"],
        targets=list(PHI3_TARGETS),
        sensitivity={"no_sliding_window": _set("sliding_window", None)}))
    lr = dict(tie_word_embeddings=False, max_position_embeddings=64,
              original_max_position_embeddings=16,
              rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0,
                               **longrope_factors(16)})
    C.append(Case("phi3-longrope", "phi3", lr, 48, [
        "weights of `phi3`, no sliding window; Phi-3.5-style LongRoPE (rope_parameters): rows of "
        "48 > original_max_position_embeddings 16, so inv_freq = 1/(long_factor * "
        "theta**(2i/d)); cos and sin both multiplied by sqrt(1 + ln(64/16)/ln(16)) (factor = "
        "max_position_embeddings / original_max_position_embeddings)"],
        targets=list(PHI3_TARGETS), weights_of="phi3",
        sensitivity={"rope_default": _rope_default}))
    C.append(Case("phi3-longrope-short", "phi3", lr, 12, [
        "weights and config of `phi3-longrope` with rows of 12 <= 16: the SHORT factors are "
        "used (same attention factor)"],
        targets=list(PHI3_TARGETS), weights_of="phi3",
        sensitivity={"rope_default": _rope_default}))
    C.append(Case("phi3-longrope-legacy", "phi3", lr, 48, [
        "same model and rows as `phi3-longrope`, config spelled as the published Phi-3.5-mini: "
        "rope_scaling {\"type\": \"longrope\", long_factor, short_factor}, top-level rope_theta "
        "and original_max_position_embeddings"],
        targets=list(PHI3_TARGETS), same_function_as="phi3-longrope", edit=edit_phi3_legacy))

    by = {c.name: c for c in C}
    for c in C:
        if c.same_function_as:
            root = by[c.same_function_as]
            c.weights_of = root.weights_of or root.name
            assert c.seq == root.seq and c.targets == root.targets, c.name
        if c.weights_of:
            assert by[c.weights_of].weights_of is None, c.name
            assert C.index(by[c.weights_of]) < C.index(c), c.name
    return C


# --------------------------------------------------------------------------------------------
# Model building
# --------------------------------------------------------------------------------------------


def make_config(case: Case):
    kw = dict(COMMON)
    kw.update(copy.deepcopy(case.config))
    return AutoConfig.for_model(case.model_type, **kw)


def build_model(case: Case):
    """transformers' own init (seeded), then seeded perturbation of norms and biases."""
    name = case.model_name()
    torch.manual_seed(seed_of(name))
    cfg = make_config(case)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                             dtype=torch.float32)
    g = torch.Generator().manual_seed(seed_of(name + "/perturb"))
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if pname.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * BIAS_STD)
            elif p.ndim == 1 and "norm" in pname:
                # Llama-style norms start at 1, Gemma's (1 + w) norms at 0: perturb around that.
                p.add_(torch.randn(p.shape, generator=g) * NORM_STD)
            else:
                assert p.ndim == 2, pname
    model.eval()
    return model


def load_model(d: Path, config=None):
    kw = {"config": config} if config is not None else {}
    m = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager",
                                             dtype=torch.float32, **kw)
    m.eval()
    return m


def make_rows(case: Case) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_of(case.rows_of + "/rows"))
    # Avoid the special ids 0..2 so that no row depends on pad handling.
    return torch.randint(3, VOCAB, (BATCH, case.seq), generator=g)


def make_labels(rows: torch.Tensor) -> torch.Tensor:
    labels = rows.clone()
    seq = rows.shape[1]
    # Row 0: a 3-token "prompt" masked (labels[0, 0] never enters the loss anyway: the first
    # token is nobody's target); row 1: one masked position in the middle.
    labels[0, :3] = -100
    labels[1, seq // 2] = -100
    return labels


def logit_positions(seq: int) -> list[list[int]]:
    pos = [[0, 0], [0, 1], [0, seq // 2], [0, seq - 1],
           [1, 0], [1, seq // 3], [1, seq - 2], [1, seq - 1]]
    out = []
    for p in pos:
        if p not in out:
            out.append(p)
    return out


def flist(t: torch.Tensor) -> list:
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1).tolist()]


def rope_tables(model) -> dict:
    """inv_freq and the cos/sin multiplier transformers used in the last forward pass (per
    layer type where the model has several RoPEs: Gemma 3)."""
    rot = model.model.rotary_emb
    types = sorted(rot.rope_type) if isinstance(rot.rope_type, dict) else None
    if types is None:
        return {"all_layers": {"rope_type": rot.rope_type, "inv_freq": flist(rot.inv_freq),
                               "attention_scaling": float(rot.attention_scaling)}}
    return {lt: {"rope_type": rot.rope_type[lt], "inv_freq": flist(getattr(rot, f"{lt}_inv_freq")),
                 "attention_scaling": float(getattr(rot, f"{lt}_attention_scaling"))}
            for lt in types}


def forward(model, rows, labels):
    with torch.no_grad():
        out = model(input_ids=rows, labels=labels)
    return out.logits.float(), float(out.loss)


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


def lora_config(case: Case):
    return peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                           target_modules=list(case.targets), bias="none",
                           task_type="CAUSAL_LM")


def peft_key(param_name: str) -> str:
    """named_parameters name -> key in adapter_model.safetensors (adapter name dropped)."""
    assert ".default." in param_name, param_name
    return param_name.replace(".lora_A.default.", ".lora_A.").replace(
        ".lora_B.default.", ".lora_B.")


def run_lora(case: Case, base_dir: Path, rows, labels, out_dir: Path) -> dict:
    model = load_model(base_dir)
    pm = peft.get_peft_model(model, lora_config(case))
    pm.peft_config["default"].base_model_name_or_path = f"tests/fixtures/hf/{case.model_name()}"
    g = torch.Generator().manual_seed(seed_of(case.model_name() + "/lora"))
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if not p.requires_grad:
                continue
            if ".lora_A." in n:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_A_STD)
            elif ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_B_STD)
            else:
                raise AssertionError(f"unexpected trainable parameter {n}")
    pm.eval()
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=rows, labels=labels)
    out.loss.backward()
    grads = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            assert float(p.grad.abs().max()) > 0, f"zero gradient for {n}"
            grads[peft_key(n)] = p.grad.detach().clone().contiguous()
    with tempfile.TemporaryDirectory() as td:
        pm.save_pretrained(td, safe_serialization=True)
        shutil.copy(Path(td) / "adapter_model.safetensors", out_dir / "adapter_model.safetensors")
        # PEFT keeps target_modules as a set and writes it in hash order; sort it so that the
        # file is reproducible (same content: PEFT reads it back as a set).
        ac = json.loads((Path(td) / "adapter_config.json").read_text())
        ac["target_modules"] = sorted(ac["target_modules"])
        (out_dir / "adapter_config.json").write_text(json.dumps(ac, indent=2, sort_keys=True) + "\n")
    saved = load_file(out_dir / "adapter_model.safetensors")
    assert set(saved) == set(grads), (sorted(saved)[:4], sorted(grads)[:4])
    save_file({k: grads[k] for k in sorted(grads)}, out_dir / "lora_grads.safetensors",
              metadata={"what": "d(lora.loss)/d(weight), fp32, keys as in adapter_model.safetensors"})
    # Round trip: the saved adapter loaded by PEFT onto a fresh base gives the same loss.
    fresh = peft.PeftModel.from_pretrained(load_model(base_dir), out_dir)
    fresh.eval()
    with torch.no_grad():
        reloaded = float(fresh(input_ids=rows, labels=labels).loss)
    loss = float(out.loss)
    assert math.isclose(reloaded, loss, rel_tol=1e-6), (reloaded, loss)
    cfg = pm.peft_config["default"]
    return {
        "peft_config": {
            "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted(cfg.target_modules), "bias": cfg.bias,
            "task_type": str(cfg.task_type), "use_rslora": cfg.use_rslora,
            "fan_in_fan_out": cfg.fan_in_fan_out,
        },
        "scaling": cfg.lora_alpha / cfg.r,
        "init": f"after get_peft_model every lora_A weight is replaced by N(0, {LORA_A_STD}) and "
                f"every lora_B weight by N(0, {LORA_B_STD}) from a seeded torch.Generator (both "
                "nonzero, so both gradients are nonzero); the values are the ones saved in "
                "adapter_model.safetensors",
        "loss": loss,
        "adapter_file": "adapter_model.safetensors",
        "adapter_config_file": "adapter_config.json",
        "grads_file": "lora_grads.safetensors",
        "num_adapter_tensors": len(grads),
        "grad_abs_max": max(float(t.abs().max()) for t in grads.values()),
    }


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    if isinstance(x, bool) or x is None:
        return json.dumps(x)
    if isinstance(x, float):
        # fp32 values: 9 significant digits round-trip a float32 exactly.
        return repr(float(f"{x:.9g}")) if math.isfinite(x) else json.dumps(x)
    return json.dumps(x, ensure_ascii=False)


def dumps(obj, indent: int = 0) -> str:
    """JSON with dicts indented and lists of scalars kept on one line (compact fixtures)."""
    pad, pad1 = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(str(k), ensure_ascii=False)}: {dumps(v, indent + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return "[" + ", ".join(_fmt(v) for v in obj) + "]"
        return "[\n" + ",\n".join(pad1 + dumps(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return _fmt(obj)


def write_json(path: Path, obj) -> None:
    text = dumps(obj) + "\n"
    assert json.loads(text) is not None
    path.write_text(text)


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def share_files(case: Case, out: Path) -> list[str]:
    """Replace the files identical to the base case's by relative symlinks (keeps the tree
    small; each directory still loads as a model directory). Asserts they ARE identical."""
    d = out / case.name
    links = {f: case.weights_of for f in
             ("model.safetensors", "adapter_model.safetensors", "adapter_config.json")}
    if case.same_function_as:
        links["lora_grads.safetensors"] = case.same_function_as
    for f, owner in links.items():
        mine, theirs = d / f, out / owner / f
        assert not theirs.is_symlink(), (owner, f)
        if f == "lora_grads.safetensors":
            a, b = load_file(mine), load_file(theirs)
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), (case.name, f)
        elif f == "adapter_config.json":
            assert json.loads(mine.read_text()) == json.loads(theirs.read_text()), (case.name, f)
        else:
            assert mine.read_bytes() == theirs.read_bytes(), (case.name, f)
        mine.unlink()
        os.symlink(f"../{owner}/{f}", mine)
    return {f: f"../{owner}/{f}" for f, owner in links.items()}


def make_case(case: Case, out: Path) -> dict:
    d = out / case.name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model = build_model(case)
    model.save_pretrained(d, safe_serialization=True)
    (d / "generation_config.json").unlink(missing_ok=True)
    rows = make_rows(case)
    labels = make_labels(rows)
    ref_logits, ref_loss = forward(model, rows, labels)

    cfg_path = d / "config.json"
    saved_cfg = json.loads(cfg_path.read_text())
    edited = None
    if case.edit is not None:
        edited = case.edit(copy.deepcopy(saved_cfg))
        cfg_path.write_text(json.dumps(edited, indent=2, sort_keys=True) + "\n")

    # Everything recorded is computed from the directory as committed.
    loaded = load_model(d)
    logits, loss = forward(loaded, rows, labels)
    rope = rope_tables(loaded)
    max_diff = float((logits - ref_logits).abs().max())
    assert max_diff <= 1e-6 * max(1.0, float(ref_logits.abs().max())), (case.name, max_diff)
    assert math.isclose(loss, ref_loss, rel_tol=1e-6), (case.name, loss, ref_loss)
    if case.edit is not None:
        # The edit must really be an older spelling, not a no-op.
        assert edited != saved_cfg

    ln_v = math.log(VOCAB)
    assert abs(loss - ln_v) > 0.05, f"{case.name}: loss {loss} too close to ln(vocab) {ln_v}"

    sens = {}
    for label, fn in case.sensitivity.items():
        c2 = AutoConfig.from_pretrained(d)
        fn(c2)
        m2 = load_model(d, config=c2)
        lg2, l2 = forward(m2, rows, labels)
        diff = float((lg2 - logits).abs().max())
        assert diff > 1e-3, f"{case.name}: switching off {label} changes logits by only {diff}"
        sens[label] = {"loss": l2, "max_abs_logit_change": diff}

    lora = run_lora(case, d, rows, labels, d)
    assert abs(lora["loss"] - loss) > 1e-3, (case.name, lora["loss"], loss)

    shared = share_files(case, out) if case.weights_of else []

    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    pos = logit_positions(case.seq)
    layer_types = getattr(loaded.config, "layer_types", None)
    exp = {
        "case": case.name,
        "exercises": case.exercises,
        "architecture": loaded.config.architectures[0],
        "model_type": loaded.config.model_type,
        "weights_of": case.weights_of,
        "same_function_as": case.same_function_as,
        "shared_files": shared,
        "config_spelling": (case.edit.__doc__.strip() if case.edit is not None
                            else "as written by save_pretrained (transformers 5: rope_parameters)"),
        "attn_implementation": "eager",
        "dtype": "float32",
        "resolved": {
            "rope_parameters": loaded.config.rope_parameters,
            "layer_types": layer_types,
            "sliding_window": getattr(loaded.config, "sliding_window", None),
            "tie_word_embeddings": loaded.config.tie_word_embeddings,
            "num_parameters": sum(p.numel() for p in loaded.parameters()),
            "rope_tables_after_forward": rope,
        },
        "batch": BATCH,
        "seq_len": case.seq,
        "rows": rows.tolist(),
        "labels": labels.tolist(),
        "label_convention": "labels are NOT pre-shifted: labels[b][t] is rows[b][t] or -100; "
                            "transformers (ForCausalLMLoss) pads labels with one -100 on the "
                            "right and drops the first, so logits[b][t] is scored against "
                            "labels[b][t+1] (shift_labels[b][t]); loss = mean cross-entropy "
                            "over every (b, t) whose target is not -100, token-weighted across "
                            "the whole batch (not a mean of per-row means)",
        "shift_labels": shift.tolist(),
        "num_loss_tokens": int((shift != -100).sum()),
        "logits_positions": pos,
        "logits": [flist(logits[b, t]) for b, t in pos],
        "loss": loss,
        "ln_vocab": ln_v,
        "lora": lora,
        "sensitivity": sens,
        "versions": versions(),
    }
    write_json(d / "expected.json", exp)
    return exp


# --------------------------------------------------------------------------------------------
# Chat case
# --------------------------------------------------------------------------------------------

# The chat_template of Qwen/Qwen2.5-*-Instruct (tokenizer_config.json), verbatim: the Jinja text
# as vendored in github.com/mattt/Jinja Tests/JinjaTests/IntegrationTests.swift
# ("Qwen Qwen2.5-0.5B-Instruct") with the trailing newline the published tokenizer_config.json
# has. Raw string: the backslash-n pairs are Jinja string escapes, as in the original.
QWEN25_CHAT_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

# The same template with TRL-style {% generation %} markers around the assistant content and
# its <|im_end|> (not around the header, not around the newline after <|im_end|>): used only to
# cross-check the mask with transformers' own return_assistant_tokens_mask; never shipped.
_PLAIN_TURN = "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
_TAGGED_TURN = (
    "        {%- if message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n"
    "        {%- else %}\n" + _PLAIN_TURN + "        {%- endif %}\n")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "What does LoRA train?"},
        {"role": "assistant", "content": "Two small low-rank matrices per targeted projection, "
                                         "while the base weights stay frozen."},
    ],
    [
        {"role": "user", "content": "Name a prime number between 10 and 20."},
        {"role": "assistant", "content": "13 is one; 11, 17 and 19 are the others."},
        {"role": "user", "content": "And the sum of all of them?"},
        {"role": "assistant", "content": "11 + 13 + 17 + 19 = 60."},
    ],
    [
        {"role": "user", "content": "Write a haiku about gradient checkpointing."},
        {"role": "assistant", "content": "Forget the middle,\nrecompute it on the way back:\n"
                                         "memory for time."},
        {"role": "user", "content": "Now translate \"memory\" into French."},
        {"role": "assistant", "content": "mémoire"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
]

SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Corpus: the conversations' own text plus the repo's Alpaca sample (both in this repo).
    corpus = [m["content"] for conv in CONVERSATIONS for m in conv]
    corpus += ["system", "user", "assistant", "You are Qwen, created by Alibaba Cloud. You are "
               "a helpful assistant."]
    sample = REPO / "src" / "engine" / "data" / "sample_alpaca.jsonl"
    for line in sample.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            corpus += [str(v) for v in rec.values() if v]
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def assistant_mask_by_prefixes(tk, conv, ids) -> list[int]:
    """Mask from rendered prefixes: for assistant message i, tokens from
    len(tok(render(conv[:i], add_generation_prompt=True))) up to and including the <|im_end|>
    closing it, i.e. len(tok(render(conv[:i+1]))) - 1 (the trailing newline excluded)."""
    mask = [0] * len(ids)
    im_end = tk.convert_tokens_to_ids("<|im_end|>")
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        pre = tk.apply_chat_template(conv[:i], add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
        upto = tk.apply_chat_template(conv[:i + 1], tokenize=True, return_dict=False)
        assert ids[:len(pre)] == pre and ids[:len(upto)] == upto, "prefix property broken"
        end = len(upto) - 1  # the "\n" after <|im_end|>
        assert ids[end - 1] == im_end, (ids[end - 1], im_end)
        for t in range(len(pre), end):
            mask[t] = 1
    return mask


def make_chat(out: Path) -> dict:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = out / "chat"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    tok = train_tokenizer()
    tk = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", bos_token=None, unk_token=None,
                                 model_max_length=32768)
    tk.chat_template = QWEN25_CHAT_TEMPLATE
    with tempfile.TemporaryDirectory() as td:
        tk.save_pretrained(td)
        tdir = Path(td)
        cfg = json.loads((tdir / "tokenizer_config.json").read_text())
        jinja = tdir / "chat_template.jinja"
        if jinja.exists():
            assert jinja.read_text() in (QWEN25_CHAT_TEMPLATE, QWEN25_CHAT_TEMPLATE.rstrip("\n"))
        # The engine reads chat_template from tokenizer_config.json (where the Qwen2.5 repos
        # keep it), so put it there and drop the separate .jinja file transformers 5 writes.
        cfg["chat_template"] = QWEN25_CHAT_TEMPLATE
        # transformers 5 writes its new class name "TokenizersBackend"; the long-standing name
        # loads the same tokenizer.json in transformers 4 and 5.
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True,
                                                            ensure_ascii=False) + "\n")
        shutil.copy(tdir / "tokenizer.json", d / "tokenizer.json")
    tk2 = AutoTokenizer.from_pretrained(d)
    assert tk2.chat_template == QWEN25_CHAT_TEMPLATE
    tagged_template = QWEN25_CHAT_TEMPLATE.replace(_PLAIN_TURN, _TAGGED_TURN)
    assert tagged_template != QWEN25_CHAT_TEMPLATE

    with open(d / "messages.jsonl", "w") as f:
        for conv in CONVERSATIONS:
            f.write(json.dumps({"messages": conv}, ensure_ascii=False) + "\n")
    with open(d / "sharegpt.jsonl", "w") as f:
        for conv in CONVERSATIONS:
            sg = [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in conv]
            f.write(json.dumps({"conversations": sg}, ensure_ascii=False) + "\n")

    convs = []
    for conv in CONVERSATIONS:
        text = tk2.apply_chat_template(conv, tokenize=False)
        enc = tk2.apply_chat_template(conv, tokenize=True)  # transformers 5: a BatchEncoding
        ids = list(enc["input_ids"])
        assert ids == tk2(text, add_special_tokens=False)["input_ids"]
        mask = assistant_mask_by_prefixes(tk2, conv, ids)
        # Cross-check 1: character offsets of the assistant content + <|im_end|> in the text.
        off = tk2(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans, pos = [], 0
        for m in conv:
            head = f"<|im_start|>{m['role']}\n"
            k = text.index(head + m["content"] + "<|im_end|>", pos)
            if m["role"] == "assistant":
                spans.append([k + len(head), k + len(head) + len(m["content"]) + len("<|im_end|>")])
            pos = k + len(head) + len(m["content"])
        mask2 = [int(any(s <= a and b <= e and b > a for s, e in spans)) for a, b in off]
        assert mask2 == mask, "offset-based mask differs from the prefix-based mask"
        # Cross-check 2: transformers' return_assistant_tokens_mask (what TRL's assistant-only
        # loss uses) on the same template with {% generation %} around content + <|im_end|>.
        enc3 = tk2.apply_chat_template(conv, tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True,
                                       chat_template=tagged_template)
        assert list(enc3["input_ids"]) == ids
        assert list(enc3["assistant_masks"]) == mask, "generation-tag mask differs"
        convs.append({
            "messages": conv,
            "text": text,
            "input_ids": ids,
            "tokens": tk2.convert_ids_to_tokens(ids),
            "assistant_mask": mask,
            "assistant_char_spans": spans,
            "num_assistant_tokens": sum(mask),
        })
    special = {t: tk2.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    exp = {
        "case": "chat",
        "tokenizer": "byte-level BPE trained here with the `tokenizers` package (vocab 320, "
                     "GPT-2 byte-level pre-tokenizer) on this file's conversations and "
                     "src/engine/sample_alpaca.jsonl; ChatML special tokens",
        "special_token_ids": special,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": "Qwen2.5-Instruct's (tokenizer_config.json chat_template), verbatim",
        "render": "tokenizer.apply_chat_template(messages, tokenize=False) (add_generation_prompt "
                  "false, no tools); input_ids = apply_chat_template(messages, tokenize=True)"
                  "['input_ids'] == tokenizer(text, add_special_tokens=False).input_ids",
        "mask_rule": "assistant_mask[t] = 1 for the tokens of every assistant message's content "
                     "AND its closing <|im_end|>; 0 for the system/user turns, for the "
                     "'<|im_start|>assistant\\n' header and for the '\\n' after <|im_end|>. "
                     "Computed as: for assistant message i, ones from "
                     "len(ids(render(messages[:i], add_generation_prompt=True))) to "
                     "len(ids(render(messages[:i+1]))) - 2 inclusive; checked against the "
                     "character spans of content+'<|im_end|>' in the text and against "
                     "transformers' return_assistant_tokens_mask with {% generation %} around "
                     "content + '<|im_end|>' (the TRL assistant_only_loss convention)",
        "sharegpt_roles": {v: k for k, v in SHAREGPT_ROLE.items()},
        "conversations": convs,
        "versions": versions(),
    }
    write_json(d / "expected.json", exp)
    return exp


# --------------------------------------------------------------------------------------------
# --check
# --------------------------------------------------------------------------------------------

# Keys whose values legitimately differ between environments.
VOLATILE_KEYS = {"versions", "transformers_version", "peft_version"}


def cmp_json(a, b, path, errs, rtol, atol):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in VOLATILE_KEYS:
                continue
            if k not in a or k not in b:
                errs.append(f"{path}.{k}: only in {'new' if k in a else 'committed'}")
                continue
            cmp_json(a[k], b[k], f"{path}.{k}", errs, rtol, atol)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            errs.append(f"{path}: length {len(a)} != {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            cmp_json(x, y, f"{path}[{i}]", errs, rtol, atol)
    elif isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or not math.isclose(
                a, b, rel_tol=rtol, abs_tol=atol):
            errs.append(f"{path}: {a!r} != {b!r}")
    elif a != b:
        errs.append(f"{path}: {a!r} != {b!r}")


def cmp_tensors(fa: Path, fb: Path, errs, exact: bool, rtol=1e-4):
    a, b = load_file(fa), load_file(fb)
    if set(a) != set(b):
        errs.append(f"{fb.name}: keys differ")
        return
    for k in sorted(a):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            errs.append(f"{fb.name}:{k}: shape/dtype {x.shape}/{x.dtype} != {y.shape}/{y.dtype}")
        elif exact:
            if not torch.equal(x, y):
                errs.append(f"{fb.name}:{k}: values differ (max {float((x - y).abs().max())})")
        else:
            scale = float(y.abs().max()) or 1.0
            d = float((x - y).abs().max())
            if d > rtol * scale:
                errs.append(f"{fb.name}:{k}: max diff {d:.3g} > {rtol} x {scale:.3g}")


def check(new: Path, old: Path, names: list[str]) -> list[str]:
    errs: list[str] = []
    for name in names:
        dn, do = new / name, old / name
        if not do.is_dir():
            errs.append(f"{name}: missing in {old}")
            continue
        fn = sorted(p.name for p in dn.iterdir())
        fo = sorted(p.name for p in do.iterdir())
        if fn != fo:
            errs.append(f"{name}: files {fn} != committed {fo}")
        for f in fn:
            if f not in fo:
                continue
            e: list[str] = []
            if (dn / f).is_symlink() or (do / f).is_symlink():
                ln = os.readlink(dn / f) if (dn / f).is_symlink() else None
                lo = os.readlink(do / f) if (do / f).is_symlink() else None
                if ln != lo:
                    e.append(f"{f}: link {ln} != committed {lo}")
            elif f.endswith(".json"):
                ja, jb = json.loads((dn / f).read_text()), json.loads((do / f).read_text())
                cmp_json(ja, jb, f, e, rtol=2e-5, atol=2e-6)
            elif f.endswith(".safetensors"):
                cmp_tensors(dn / f, do / f, e, exact=(f != "lora_grads.safetensors"))
            else:
                if (dn / f).read_bytes() != (do / f).read_bytes():
                    e.append(f"{f}: bytes differ")
            errs += [f"{name}/{x}" for x in e]
    return errs


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temp dir and compare with --out (the committed tree)")
    ap.add_argument("--only", default="", help="comma-separated case names (chat included)")
    args = ap.parse_args(argv)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    cases = build_cases()
    names = [c.name for c in cases] + ["chat"]
    assert len(set(names)) == len(names)
    want = [n for n in args.only.split(",") if n] or names
    unknown = set(want) - set(names)
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; known: {', '.join(names)}")

    by_name = {c.name: c for c in cases}
    for n in list(want):
        if n == "chat":
            continue
        for dep in (by_name[n].weights_of, by_name[n].same_function_as):
            if dep and dep not in want:
                want.append(dep)  # shared files need the base case next to it

    target = Path(tempfile.mkdtemp(prefix="hf_fixtures_")) if args.check else args.out
    target.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; writing {target}")
    results = {}
    for c in cases:
        if c.name in want:
            e = make_case(c, target)
            results[c.name] = e
            if c.same_function_as:
                ref = results[c.same_function_as]
                for k in ("rows", "labels", "logits", "loss"):
                    assert e[k] == ref[k], f"{c.name}: {k} differs from {c.same_function_as}"
                assert e["lora"]["loss"] == ref["lora"]["loss"], c.name
            size = sum(p.stat().st_size for p in (target / c.name).iterdir()
                       if not p.is_symlink())
            sens = ", ".join(f"{k} {v['max_abs_logit_change']:.3g}"
                             for k, v in e["sensitivity"].items())
            print(f"  {c.name:26s} loss {e['loss']:.5f} (ln V {e['ln_vocab']:.3f}) "
                  f"lora {e['lora']['loss']:.5f}  {size / 1024:.0f} KiB"
                  + (f"  [off: {sens}]" if sens else ""))
    if "chat" in want:
        e = make_chat(target)
        print(f"  chat: {len(e['conversations'])} conversations, "
              f"{sum(len(c['input_ids']) for c in e['conversations'])} tokens")
    if args.check:
        errs = check(target, args.out, want)
        shutil.rmtree(target)
        if errs:
            print(f"MISMATCH ({len(errs)}):")
            for x in errs[:60]:
                print("  " + x)
            return 1
        print(f"OK: {len(want)} fixture directories match {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
