//! Point expansion: the `[grid]` section becomes its ordered, duplicate-free list of points
//! (the order is in [`super`]'s docs). The axes with their defaults are the profile's
//! [`Axes`]; everything about combining them is here.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::profile::{Axes, GridSection, PartialPoint};
use crate::spec::{Card, Optimizer, Precision, Quant};

/// One point of the grid: a value for every axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Point {
    /// Sequences per step.
    pub batch_size: u32,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Compute precision.
    pub precision: Precision,
    /// Base-weight quantisation.
    pub quant: Quant,
    /// Adapter rank r.
    pub lora_rank: u32,
    /// Activation checkpointing on.
    pub grad_checkpointing: bool,
    /// The card emulated (its memory is the point's VRAM limit), from the `card` axis.
    /// Left out of the serialisation when absent, so points without it keep their ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<Card>,
}

impl Point {
    /// Short human label, e.g. `bs2 seq128 adamw fp32 none r8 gc` (`... @rtx4060` with a card).
    pub fn label(&self) -> String {
        let v = |n: u32| match n {
            crate::profile::AXIS_MAX => "=max".to_string(),
            n => n.to_string(),
        };
        let card = self.card.map(|c| format!(" @{c}")).unwrap_or_default();
        format!(
            "bs{} seq{} {} {} {} r{}{}{card}",
            v(self.batch_size),
            v(self.seq_len),
            self.optimizer,
            self.precision,
            self.quant,
            self.lora_rank,
            if self.grad_checkpointing { " gc" } else { "" }
        )
    }

    /// Whether every key set in `p` equals this point's value.
    pub fn matches(&self, p: &PartialPoint) -> bool {
        p.batch_size.is_none_or(|v| v == self.batch_size)
            && p.seq_len.is_none_or(|v| v == self.seq_len)
            && p.optimizer.is_none_or(|v| v == self.optimizer)
            && p.precision.is_none_or(|v| v == self.precision)
            && p.quant.is_none_or(|v| v == self.quant)
            && p.lora_rank.is_none_or(|v| v == self.lora_rank)
            && p.grad_checkpointing
                .is_none_or(|v| v == self.grad_checkpointing)
            && p.card.is_none_or(|v| Some(v) == self.card)
    }

    /// The point an `include` entry describes: unset keys take each axis's first value.
    pub fn complete(p: &PartialPoint, axes: &Axes) -> Point {
        Point {
            batch_size: p.batch_size.unwrap_or(axes.batch_size[0]),
            seq_len: p.seq_len.unwrap_or(axes.seq_len[0]),
            optimizer: p.optimizer.unwrap_or(axes.optimizer[0]),
            precision: p.precision.unwrap_or(axes.precision[0]),
            quant: p.quant.unwrap_or(axes.quant[0]),
            lora_rank: p.lora_rank.unwrap_or(axes.lora_rank[0]),
            grad_checkpointing: p.grad_checkpointing.unwrap_or(axes.grad_checkpointing[0]),
            card: p.card.or(axes.card[0]),
        }
    }

    /// This point with every key set (an `include` or `exclude` entry matching it alone).
    pub fn to_partial(&self) -> PartialPoint {
        PartialPoint {
            batch_size: Some(self.batch_size),
            seq_len: Some(self.seq_len),
            optimizer: Some(self.optimizer),
            precision: Some(self.precision),
            quant: Some(self.quant),
            lora_rank: Some(self.lora_rank),
            grad_checkpointing: Some(self.grad_checkpointing),
            card: self.card,
        }
    }
}

/// The full factorial product of `axes`, in the documented nesting order.
///
/// Allocates one [`Point`] per point: callers expand only profiles that passed validation,
/// which caps the count at [`crate::profile::MAX_GRID_POINTS`].
pub fn factorial(axes: &Axes) -> Vec<Point> {
    let len = usize::try_from(axes.factorial_len()).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(len.min(crate::profile::MAX_GRID_POINTS as usize));
    for &card in &axes.card {
        for &batch_size in &axes.batch_size {
            for &seq_len in &axes.seq_len {
                for &optimizer in &axes.optimizer {
                    for &precision in &axes.precision {
                        for &quant in &axes.quant {
                            for &lora_rank in &axes.lora_rank {
                                for &grad_checkpointing in &axes.grad_checkpointing {
                                    out.push(Point {
                                        batch_size,
                                        seq_len,
                                        optimizer,
                                        precision,
                                        quant,
                                        lora_rank,
                                        grad_checkpointing,
                                        card,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Result of [`expand_points`].
#[derive(Debug, Clone, PartialEq)]
pub struct PointExpansion {
    /// Includes, then the factorial minus excludes; no duplicates.
    pub points: Vec<Point>,
    /// Indices of `exclude` entries that matched no factorial point (likely typos).
    pub unmatched_excludes: Vec<usize>,
}

/// Expands `[grid]` into points (see the module docs for the order). Linear in the number of
/// points (duplicates are found with a hash set).
pub fn expand_points(g: &GridSection, default_rank: u32) -> PointExpansion {
    let axes = Axes::from_grid(g, default_rank);
    let all = factorial(&axes);
    let unmatched_excludes = g
        .exclude
        .iter()
        .enumerate()
        .filter(|(_, ex)| !all.iter().any(|p| p.matches(ex)))
        .map(|(i, _)| i)
        .collect();
    let includes = g.include.iter().map(|p| Point::complete(p, &axes));
    let kept = all
        .into_iter()
        .filter(|p| !g.exclude.iter().any(|ex| p.matches(ex)));
    let mut seen: HashSet<Point> = HashSet::with_capacity(g.include.len());
    let points: Vec<Point> = includes.chain(kept).filter(|p| seen.insert(*p)).collect();
    PointExpansion {
        points,
        unmatched_excludes,
    }
}
