//! CSV and JSON exports: one field per axis (`batch_size`, `seq_len`, `optimizer`,
//! `precision`, `quant`, `lora_rank`, `grad_checkpointing`, `model`, `device`) besides the
//! metrics, and the sweep's metadata: a JSON object `{"meta": {...}, "runs": [...]}`, CSV
//! `# key: value` comment lines before the header.

use serde_json::{Map, Value, json};

use super::axes::Axis;
use super::meta::SweepMeta;
use super::rows::PointRow;
use crate::summary::Spread;

/// An axis value as typed JSON (numbers as numbers, checkpointing as a bool).
fn axis_json(a: Axis, r: &PointRow) -> Value {
    let Some(p) = r.point else {
        return match a {
            Axis::Model => json!(r.model),
            Axis::Device => json!(r.device),
            _ => Value::Null,
        };
    };
    match a {
        Axis::Model => json!(r.model),
        Axis::Card => json!(p.card.map(|c| c.to_string())),
        // A `"max"` axis whose search did not record a value stays `"max"` (not u32::MAX).
        Axis::BatchSize | Axis::SeqLen => {
            let v = a.value(r);
            v.parse::<u32>().map_or_else(|_| json!(v), |n| json!(n))
        }
        Axis::Optimizer => json!(p.optimizer),
        Axis::Precision => json!(p.precision),
        Axis::Quant => json!(p.quant),
        Axis::LoraRank => json!(p.lora_rank),
        Axis::GradCheckpointing => json!(p.grad_checkpointing),
        Axis::Device => json!(r.device),
    }
}

/// One point as a JSON object: `index`, `id`, `label`, the axis fields, then every metric
/// of [`PointRow`] (spreads as `{median, min, max, n}`).
pub fn row_json(r: &PointRow) -> Value {
    let mut m = Map::new();
    m.insert("index".into(), json!(r.index + 1));
    m.insert("id".into(), json!(r.spec_id));
    m.insert("label".into(), json!(r.label));
    for a in Axis::ALL {
        m.insert(a.key().into(), axis_json(a, r));
    }
    if let Ok(Value::Object(rest)) = serde_json::to_value(r) {
        for (k, v) in rest {
            if matches!(
                k.as_str(),
                "index" | "spec_id" | "label" | "point" | "model" | "device"
            ) {
                continue;
            }
            m.insert(k, v);
        }
    }
    Value::Object(m)
}

/// `{"meta": {...}, "runs": [...]}`, pretty-printed, newline-terminated.
pub fn json(meta: &SweepMeta, rows: &[PointRow]) -> String {
    let v = json!({
        "meta": meta,
        "runs": rows.iter().map(row_json).collect::<Vec<_>>(),
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The CSV columns after `index,id,point` and the axis keys.
const METRICS: &str = "runs,status,cause,tokens_per_s,tokens_per_s_min,tokens_per_s_max,\
padded_tokens_per_s,s_per_10k_tokens,peak_mem_bytes,peak_mem_kind,mean_w,max_w,energy_j,\
energy_j_integrated,j_per_token,energy_source,final_loss,skipped_steps,mem_growth_bytes,\
mem_growth_steps,predicted_peak_bytes,prediction_error,slurm_job";

/// CSV (RFC 4180 quoting): `# key: value` lines of the metadata, a header, one line per
/// point. Spreads give their median (tokens/s also min and max).
pub fn csv(meta: &SweepMeta, rows: &[PointRow]) -> String {
    let mut out = String::new();
    for (k, v) in meta.pairs() {
        out.push_str(&format!("# {k}: {}\n", v.replace('\n', " ")));
    }
    let axes: Vec<&str> = Axis::ALL.iter().map(|a| a.key()).collect();
    out.push_str(&format!("index,id,point,{},{METRICS}\n", axes.join(",")));
    let f = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let med = |s: &Option<Spread>| f(s.map(|s| s.median));
    let u = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    for r in rows {
        let mut fields = vec![
            (r.index + 1).to_string(),
            r.spec_id.clone(),
            r.label.clone(),
        ];
        for a in Axis::ALL {
            fields.push(match axis_json(a, r) {
                Value::String(s) => s,
                Value::Null => String::new(),
                v => v.to_string(),
            });
        }
        fields.extend([
            r.runs.to_string(),
            r.status.clone(),
            r.cause.clone().unwrap_or_default(),
            med(&r.tokens_per_s),
            f(r.tokens_per_s.map(|s| s.min)),
            f(r.tokens_per_s.map(|s| s.max)),
            med(&r.padded_tokens_per_s),
            med(&r.s_per_10k_tokens),
            u(r.peak_mem_bytes),
            r.peak_mem_kind.clone().unwrap_or_default(),
            med(&r.mean_w),
            f(r.max_w),
            med(&r.energy_j),
            med(&r.energy_j_integrated),
            med(&r.j_per_token),
            r.energy_source.clone().unwrap_or_default(),
            med(&r.final_loss),
            r.skipped_steps.to_string(),
            u(r.mem_growth.map(|g| g.bytes)),
            r.mem_growth
                .map(|g| g.steps.to_string())
                .unwrap_or_default(),
            u(r.predicted_peak_bytes),
            med(&r.prediction_error),
            r.slurm_job.clone().unwrap_or_default(),
        ]);
        let line: Vec<String> = fields.iter().map(|s| csv_field(s)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}
