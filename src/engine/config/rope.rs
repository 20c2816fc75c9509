//! Rotary position embedding settings as transformers 5 resolves them
//! (`modeling_rope_utils.py`, `ROPE_INIT_FUNCTIONS`): one [`Rope`] per attention type, giving the
//! inverse frequencies (head_dim / 2 values) and the attention factor that multiplies both cos
//! and sin.
//!
//! - default: `inv_freq[i] = theta ** (-2i/d)`;
//! - linear: default / `factor`;
//! - dynamic (NTK): `theta' = theta * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2))`
//!   when the row length `L` exceeds `max_position_embeddings`, plain theta otherwise.
//!   transformers keeps the largest `L` seen so far (stateful); lorascope computes it from each
//!   forward's row length, which is what a fresh transformers model does for that row;
//! - llama3: wavelengths `2 pi / f` above `original_max / low_freq_factor` divided by `factor`,
//!   below `original_max / high_freq_factor` kept, the band between smoothed;
//! - yarn: a blend of `inv_freq` and `inv_freq / factor` with a linear ramp between the
//!   correction dims of `beta_fast` and `beta_slow`, and `attention_factor` (default
//!   `0.1 ln(factor) + 1`, or the `mscale` / `mscale_all_dim` ratio);
//! - longrope: `inv_freq = 1 / (ext * theta ** (2i/d))` with `ext` the long factors when
//!   `L > original_max_position_embeddings`, else the short ones, chosen per forward, and
//!   `attention_factor = sqrt(1 + ln(f) / ln(original_max))`, `f = max_pos / original_max`.

use serde_json::{Map, Value};

/// The scaling rule of a [`Rope`] (transformers' `rope_type`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// Divisor of every frequency.
        factor: f64,
    },
    /// Dynamic NTK: theta raised from the row length when it exceeds `max_position_embeddings`.
    Dynamic {
        /// Scaling factor.
        factor: f64,
        /// The model's `max_position_embeddings`, the length above which theta grows.
        max_position_embeddings: usize,
    },
    /// Llama 3.1 frequency-band scaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original_max / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Pre-training context length.
        original_max_position_embeddings: usize,
    },
    /// YaRN (Peng et al. 2023).
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// Pre-training context length.
        original_max_position_embeddings: usize,
        /// Rotations bounding the extrapolated dims (default 32).
        beta_fast: f64,
        /// Rotations bounding the interpolated dims (default 1).
        beta_slow: f64,
        /// Round the correction range to whole dims (default true).
        truncate: bool,
        /// Multiplies cos and sin.
        attention_factor: f64,
    },
    /// LongRoPE (Phi-3.5 / Phi-3-128k).
    #[serde(rename = "longrope")]
    LongRope {
        /// Per-frequency divisors for rows up to `original_max_position_embeddings`.
        short_factor: Vec<f64>,
        /// Per-frequency divisors for longer rows.
        long_factor: Vec<f64>,
        /// Pre-training context length: rows longer than this use `long_factor`.
        original_max_position_embeddings: usize,
        /// Multiplies cos and sin (both cases).
        attention_factor: f64,
    },
}

/// One RoPE: base frequency and scaling.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rope {
    /// Base `theta`.
    pub theta: f64,
    /// Scaling rule.
    pub scaling: RopeScaling,
}

impl Rope {
    /// Plain RoPE with base `theta`.
    pub fn plain(theta: f64) -> Self {
        Self {
            theta,
            scaling: RopeScaling::Default,
        }
    }

    /// `(inv_freq, attention_factor)` for a head of `head_dim` (even) over rows of `seq_len`
    /// positions: `head_dim / 2` f32 frequencies (radians per position) as transformers
    /// computes them in f32, and the factor that multiplies cos and sin.
    pub fn inv_freq(&self, head_dim: usize, seq_len: usize) -> (Vec<f32>, f64) {
        let d = head_dim;
        // torch: base ** (arange(0, d, 2).float() / d), in f32.
        let expo = |i: usize| (2 * i) as f32 / d as f32;
        let plain = |theta: f64| -> Vec<f32> {
            (0..d / 2)
                .map(|i| 1.0f32 / (theta.powf(expo(i) as f64) as f32))
                .collect()
        };
        match &self.scaling {
            RopeScaling::Default => (plain(self.theta), 1.0),
            RopeScaling::Linear { factor } => (
                plain(self.theta)
                    .into_iter()
                    .map(|f| f / *factor as f32)
                    .collect(),
                1.0,
            ),
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                let l = seq_len.max(*max_position_embeddings) as f64;
                let m = *max_position_embeddings as f64;
                let base = self.theta
                    * ((factor * l / m) - (factor - 1.0)).powf(d as f64 / (d as f64 - 2.0));
                (plain(base), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
                let v = plain(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wl = 2.0 * std::f64::consts::PI / f as f64;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / *factor as f32
                        } else {
                            let s = ((old / wl - low_freq_factor)
                                / (high_freq_factor - low_freq_factor))
                                as f32;
                            (1.0 - s) * f / *factor as f32 + s * f
                        }
                    })
                    .collect();
                (v, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                let (base, dim) = (self.theta, d as f64);
                let orig = *original_max_position_embeddings as f64;
                let corr = |rot: f64| {
                    dim * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let v = (0..d / 2)
                    .map(|i| {
                        let pos = base.powf(expo(i) as f64) as f32;
                        let extra = 1.0 / pos;
                        let inter = 1.0 / (*factor as f32 * pos);
                        let ramp =
                            ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let ext = 1.0 - ramp;
                        inter * (1.0 - ext) + extra * ext
                    })
                    .collect();
                (v, *attention_factor)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let ext = if seq_len > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                let v = (0..d / 2)
                    .map(|i| 1.0 / (ext[i] as f32 * self.theta.powf(expo(i) as f64) as f32))
                    .collect();
                (v, *attention_factor)
            }
        }
    }
}

/// Keys a RoPE dictionary (`rope_parameters` or `rope_scaling`) may hold.
const ROPE_KEYS: &[&str] = &[
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "truncate",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "long_factor",
    "short_factor",
    "partial_rotary_factor",
];

/// What the model around a RoPE dictionary contributes to it.
pub(crate) struct RopeContext {
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `head_dim`, to check LongRoPE factor lengths.
    pub head_dim: usize,
    /// A top-level `original_max_position_embeddings` that wins over the dictionary's (Phi-3).
    pub original_max_override: Option<usize>,
    /// Map the old names `su` and `yarn` to `longrope` (Phi-3).
    pub phi3_names: bool,
}

/// Parse one RoPE dictionary `d` (theta inside as `rope_theta`, or `theta` given). `what`
/// names it in errors (`rope_parameters`, `rope_scaling`).
///
/// Errors (one line each): an unknown key, an unknown or unsupported `rope_type`, a missing or
/// ill-typed factor, `partial_rotary_factor` other than 1.
pub(crate) fn parse_rope(
    d: &Map<String, Value>,
    theta: f64,
    what: &str,
    cx: &RopeContext,
) -> Result<Rope, String> {
    if let Some(k) = d.keys().find(|k| !ROPE_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "{what}.{k} is not a RoPE setting lorascope knows (it would change the math): remove it or use a supported config"
        ));
    }
    let num = |k: &str| -> Result<Option<f64>, String> {
        match d.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{what}.{k} must be a number, got {v}")),
        }
    };
    let need = |k: &str, ty: &str| -> Result<f64, String> {
        num(k)?.ok_or_else(|| format!("{what}.{k} is required for rope_type {ty}"))
    };
    if let Some(p) = num("partial_rotary_factor")?
        && p != 1.0
    {
        return Err(format!(
            "{what}.partial_rotary_factor {p} is not supported (lorascope rotates the whole head); only 1.0 is"
        ));
    }
    let theta = num("rope_theta")?.unwrap_or(theta);
    // rope_type wins over the older `type` when both are given.
    let ty = d
        .get("rope_type")
        .filter(|v| !v.is_null())
        .or_else(|| d.get("type").filter(|v| !v.is_null()))
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{what}.rope_type must be a string, got {v}"))
        })
        .transpose()?
        .unwrap_or_else(|| "default".into());
    let ty = match ty.as_str() {
        "su" | "yarn" if cx.phi3_names => "longrope".to_string(),
        _ => ty,
    };
    let orig = match cx.original_max_override {
        Some(o) => o,
        None => num("original_max_position_embeddings")?
            .map(|v| v as usize)
            .unwrap_or(cx.max_position_embeddings),
    };
    let scaling = match ty.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need("factor", "linear")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: need("factor", "dynamic")?,
            max_position_embeddings: cx.max_position_embeddings,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor", "llama3")?,
            low_freq_factor: need("low_freq_factor", "llama3")?,
            high_freq_factor: need("high_freq_factor", "llama3")?,
            original_max_position_embeddings: orig,
        },
        "yarn" => {
            let factor = need("factor", "yarn")?;
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match (
                num("attention_factor")?,
                num("mscale")?,
                num("mscale_all_dim")?,
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale(factor, m) / mscale(factor, all)
                }
                _ => mscale(factor, 1.0),
            };
            let truncate = match d.get("truncate") {
                None | Some(Value::Null) => true,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| format!("{what}.truncate must be true or false"))?,
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                beta_fast: num("beta_fast")?.filter(|v| *v != 0.0).unwrap_or(32.0),
                beta_slow: num("beta_slow")?.filter(|v| *v != 0.0).unwrap_or(1.0),
                truncate,
                attention_factor,
            }
        }
        "longrope" => {
            let list = |k: &str| -> Result<Vec<f64>, String> {
                let v = d
                    .get(k)
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| format!("{what}.{k} (a list) is required for longrope"))?;
                let v: Vec<f64> = v.iter().filter_map(|x| x.as_f64()).collect();
                if v.len() != cx.head_dim / 2 {
                    return Err(format!(
                        "{what}.{k} has {} values, expected head_dim / 2 = {}",
                        v.len(),
                        cx.head_dim / 2
                    ));
                }
                Ok(v)
            };
            let factor = num("factor")?.unwrap_or(cx.max_position_embeddings as f64 / orig as f64);
            let attention_factor = match num("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (orig as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                original_max_position_embeddings: orig,
                attention_factor,
            }
        }
        other => {
            return Err(format!(
                "{what}.rope_type `{other}` is not supported (supported: default, linear, dynamic, llama3, yarn, longrope)"
            ));
        }
    };
    Ok(Rope { theta, scaling })
}
