//! Which axes tell a sweep's points apart: the ones whose value differs between rows get a
//! table column (and a CSV/JSON field always); the constant ones go to one header line.

use super::rows::PointRow;
use crate::spec::Optimizer;

/// A grid axis, or where a point ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Axis {
    /// The model as written (`tiny`, a directory).
    Model,
    /// The card whose memory the point was limited to (the `card` grid axis; `-` without one).
    Card,
    /// Sequences per step.
    BatchSize,
    /// Tokens per sequence.
    SeqLen,
    /// The optimizer.
    Optimizer,
    /// Compute precision (fp32/fp16/bf16).
    Precision,
    /// Base-weight quantisation (none/nf4).
    Quant,
    /// LoRA rank r.
    LoraRank,
    /// Activation checkpointing.
    GradCheckpointing,
    /// The device (`cpu`, `cuda:N`) or Slurm node a point ran on.
    Device,
}

impl Axis {
    /// Every axis, in column order (the grid's nesting order, then model and device).
    pub const ALL: [Axis; 10] = [
        Axis::Model,
        Axis::Card,
        Axis::BatchSize,
        Axis::SeqLen,
        Axis::Optimizer,
        Axis::Precision,
        Axis::Quant,
        Axis::LoraRank,
        Axis::GradCheckpointing,
        Axis::Device,
    ];

    /// The field name in CSV/JSON (the profile's key).
    pub fn key(self) -> &'static str {
        match self {
            Axis::Model => "model",
            Axis::Card => "card",
            Axis::BatchSize => "batch_size",
            Axis::SeqLen => "seq_len",
            Axis::Optimizer => "optimizer",
            Axis::Precision => "precision",
            Axis::Quant => "quant",
            Axis::LoraRank => "lora_rank",
            Axis::GradCheckpointing => "grad_checkpointing",
            Axis::Device => "device",
        }
    }

    /// The column title in a table.
    pub fn title(self) -> &'static str {
        match self {
            Axis::Model => "model",
            Axis::Card => "card",
            Axis::BatchSize => "batch",
            Axis::SeqLen => "seq",
            Axis::Optimizer => "optimizer",
            Axis::Precision => "precision",
            Axis::Quant => "quant",
            Axis::LoraRank => "rank",
            Axis::GradCheckpointing => "ckpt",
            Axis::Device => "device",
        }
    }

    /// The narrow column title.
    pub fn short_title(self) -> &'static str {
        match self {
            Axis::Model => "model",
            Axis::Card => "card",
            Axis::BatchSize => "bs",
            Axis::SeqLen => "seq",
            Axis::Optimizer => "optim",
            Axis::Precision => "prec",
            Axis::Quant => "quant",
            Axis::LoraRank => "r",
            Axis::GradCheckpointing => "gc",
            Axis::Device => "dev",
        }
    }

    /// The legend line of this axis's column (`batch: batch size, sequences per step`).
    pub fn legend(self) -> String {
        let what = match self {
            Axis::Model => "the model (preset or directory)",
            Axis::Card => "the card whose memory the point was limited to",
            Axis::BatchSize => "batch size, sequences per step",
            Axis::SeqLen => "sequence length, tokens per sequence",
            Axis::Optimizer => {
                "optimizer (p_adamw8 = paged_adamw8bit, p_adamw = paged_adamw, adamw8 = adamw8bit)"
            }
            Axis::Precision => "compute precision",
            Axis::Quant => "base-weight quantisation (none = dense)",
            Axis::LoraRank => "LoRA rank r",
            Axis::GradCheckpointing => "gradient checkpointing on/off",
            Axis::Device => "the device or Slurm node the point ran on",
        };
        format!("{}: {what}", self.title())
    }

    /// The row's value of this axis as text (`-` when unknown).
    pub fn value(self, r: &PointRow) -> String {
        let p = r.point;
        let max = |n: u32| match n {
            crate::profile::AXIS_MAX => "max".to_string(),
            n => n.to_string(),
        };
        match self {
            Axis::Model => r.model.clone().unwrap_or_else(|| "-".into()),
            Axis::Device => r.device.clone(),
            _ => match p {
                None => "-".into(),
                Some(p) => match self {
                    Axis::Card => p.card.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    Axis::BatchSize => max(p.batch_size),
                    Axis::SeqLen => max(p.seq_len),
                    Axis::Optimizer => p.optimizer.to_string(),
                    Axis::Precision => p.precision.to_string(),
                    Axis::Quant => p.quant.to_string(),
                    Axis::LoraRank => p.lora_rank.to_string(),
                    Axis::GradCheckpointing => {
                        if p.grad_checkpointing { "on" } else { "off" }.into()
                    }
                    Axis::Model | Axis::Device => unreachable!("handled above"),
                },
            },
        }
    }

    /// The value abbreviated for narrow tables (`paged_adamw8bit` becomes `p_adamw8`).
    pub fn short_value(self, r: &PointRow) -> String {
        match (self, r.point) {
            (Axis::Optimizer, Some(p)) => match p.optimizer {
                Optimizer::AdamW => "adamw",
                Optimizer::AdamW8bit => "adamw8",
                Optimizer::PagedAdamW => "p_adamw",
                Optimizer::PagedAdamW8bit => "p_adamw8",
            }
            .into(),
            _ => self.value(r),
        }
    }

    /// The value in a constant-axes header line (`batch 2`, `adamw`, `r8`).
    fn header_text(self, r: &PointRow) -> String {
        let v = self.value(r);
        match self {
            Axis::Model => format!("model {v}"),
            Axis::Card => format!("card {v}"),
            Axis::BatchSize => format!("batch {v}"),
            Axis::SeqLen => format!("seq {v}"),
            Axis::LoraRank => format!("LoRA r{v}"),
            Axis::GradCheckpointing => format!("checkpointing {v}"),
            Axis::Device => format!("on {v}"),
            Axis::Quant if v == "none" => "no quantisation".into(),
            Axis::Optimizer | Axis::Precision | Axis::Quant => v,
        }
    }
}

/// The axes of a set of rows, split into those that vary and those that do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Axes {
    /// Axes with at least two values among the rows, in [`Axis::ALL`] order.
    pub varying: Vec<Axis>,
    /// The other axes with their one value (header text, e.g. `batch 2`).
    pub constant: Vec<(Axis, String)>,
}

impl Axes {
    /// Splits the axes of `rows`. With no rows (or no known value) an axis is in neither list.
    pub fn of(rows: &[PointRow]) -> Axes {
        let mut varying = Vec::new();
        let mut constant = Vec::new();
        // Rows that do not know a value (a point that never started has no device) neither
        // make an axis vary nor stop it being constant.
        let known = |v: &str| v != "-" && !v.is_empty();
        for a in Axis::ALL {
            let Some(first) = rows.iter().find(|r| known(&a.value(r))) else {
                continue;
            };
            let v0 = a.value(first);
            if rows.iter().any(|r| {
                let v = a.value(r);
                known(&v) && v != v0
            }) {
                varying.push(a);
            } else {
                constant.push((a, a.header_text(first)));
            }
        }
        Axes { varying, constant }
    }

    /// `same for all: model tiny · batch 2 · seq 64 · adamw · fp32 · LoRA r8 · on cpu`, or None
    /// when nothing is constant.
    pub fn header_line(&self) -> Option<String> {
        (!self.constant.is_empty()).then(|| {
            let parts: Vec<&str> = self.constant.iter().map(|(_, t)| t.as_str()).collect();
            format!("same for all: {}", parts.join(" · "))
        })
    }

    /// The row's varying values joined (`nf4 bf16`): how the table, winner lines and charts
    /// name a point. The full label when nothing varies.
    pub fn name(&self, r: &PointRow) -> String {
        if self.varying.is_empty() {
            return r.label.clone();
        }
        let parts: Vec<String> = self
            .varying
            .iter()
            .map(|a| match a {
                Axis::BatchSize => format!("bs{}", a.value(r)),
                Axis::Card => format!("@{}", a.value(r)),
                Axis::SeqLen => format!("seq{}", a.value(r)),
                Axis::LoraRank => format!("r{}", a.value(r)),
                Axis::GradCheckpointing => format!("gc {}", a.value(r)),
                _ => a.value(r),
            })
            .collect();
        parts.join(" ")
    }
}
