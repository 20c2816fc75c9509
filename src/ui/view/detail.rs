//! The run detail: the selected run's configuration and summary side by side, and its
//! tokens/s and loss per step below.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Wrap};

use super::super::app::{App, RunView};
use super::super::theme::Theme;
use super::widgets::{kv, spark};
use super::{fmt_dur, opt, status_style};
use crate::orchestrator::EntryState;
use crate::report::human_bytes;
use crate::summary::RunStatus;

/// Draws the selected run's configuration, summary (or state and ETA) and charts.
pub(super) fn draw(f: &mut Frame, app: &App, t: Theme, area: Rect) {
    let Some(id) = app.selected.clone() else {
        f.render_widget(Paragraph::new("no run selected"), area);
        return;
    };
    let r: RunView = app.runs.get(&id).cloned().unwrap_or_default();
    let title = format!(" Run {id} ");
    let block = Block::bordered().title(Span::styled(title, t.title()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [top, charts] = Layout::vertical([Constraint::Length(13), Constraint::Min(0)]).areas(inner);
    let [cfg_a, sum_a] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(top);
    let mut cfg = vec![Line::styled("configuration", t.title())];
    if let Some(spec) = app.specs.get(r.spec_index) {
        let c = &spec.config;
        let p = c.point;
        cfg.push(kv(t, "model", spec.model_arg.clone()));
        cfg.push(kv(
            t,
            "data",
            format!("{} ({})", spec.data_arg, c.data_format),
        ));
        cfg.push(kv(
            t,
            "batch × seq",
            format!("{} × {}", p.batch_size, p.seq_len),
        ));
        cfg.push(kv(t, "optimizer", p.optimizer.to_string()));
        cfg.push(kv(
            t,
            "precision/quant",
            format!("{} / {}", p.precision, p.quant),
        ));
        cfg.push(kv(
            t,
            "lora",
            format!(
                "r{} α{} {}",
                p.lora_rank,
                c.lora_alpha,
                c.lora_targets
                    .iter()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ));
        cfg.push(kv(t, "grad ckpt", p.grad_checkpointing.to_string()));
        cfg.push(kv(
            t,
            "steps",
            format!("{} ({} warm-up)", c.steps, c.warmup_steps),
        ));
        cfg.push(kv(t, "seed / lr", format!("{} / {}", c.seed, opt(c.lr))));
        cfg.push(kv(
            t,
            "device",
            format!(
                "{} (attempt {})",
                r.device.clone().unwrap_or_else(|| "–".into()),
                r.attempt
            ),
        ));
        cfg.push(kv(t, "spec id", spec.id.clone()));
    }
    f.render_widget(Paragraph::new(cfg), cfg_a);
    let mut sum = vec![Line::styled("summary", t.title())];
    match &r.summary {
        Some(s) => {
            let st = s.status.unwrap_or(RunStatus::Failed);
            sum.push(Line::from(vec![
                Span::styled(format!("{:<16}", "status"), t.dim()),
                Span::styled(st.to_string(), status_style(t, st)),
            ]));
            if let Some(c) = &s.cause {
                sum.push(Line::styled(c.clone(), t.bad()));
            }
            sum.push(kv(t, "tokens/s", opt(s.tokens_per_s)));
            sum.push(kv(t, "s / 10k tokens", opt(s.s_per_10k_tokens)));
            sum.push(kv(
                t,
                "peak memory",
                format!(
                    "{} ({})",
                    human_bytes(s.peak_mem_bytes),
                    s.peak_mem_kind.clone().unwrap_or_else(|| "–".into())
                ),
            ));
            if let Some(g) = s.mem_growth {
                sum.push(Line::from(vec![
                    Span::styled(format!("{:<16}", "memory"), t.dim()),
                    Span::styled(format!("grew {}: peak is not its cost", g.short()), t.bad()),
                ]));
            }
            sum.push(kv(
                t,
                "mean / max W",
                format!("{} / {}", opt(s.mean_w), opt(s.max_w)),
            ));
            sum.push(kv(t, "energy J", opt(s.energy_j)));
            sum.push(kv(t, "J / token", opt(s.j_per_token)));
            sum.push(kv(t, "final loss", opt(s.final_loss)));
            sum.push(kv(
                t,
                "steps (timed)",
                format!(
                    "{} ({})  skipped {}",
                    s.steps, s.timed_steps, s.skipped_steps
                ),
            ));
            sum.push(kv(t, "wall", fmt_dur(s.wall_seconds)));
        }
        None => {
            let st = app
                .state(&id)
                .map(|s| match s {
                    EntryState::Queued => "queued".to_string(),
                    EntryState::Running { .. } => "running".to_string(),
                    EntryState::Done { status } => status.to_string(),
                })
                .unwrap_or_default();
            sum.push(kv(t, "status", st));
            if let Some(eta) = app.run_eta(&id).or_else(|| app.queued_eta(&id)) {
                sum.push(kv(t, "ETA", fmt_dur(eta)));
            }
        }
    }
    f.render_widget(Paragraph::new(sum).wrap(Wrap { trim: true }), sum_a);
    if charts.height >= 2 {
        let tps: Vec<f64> = r.steps.iter().map(|s| s.tokens_per_s).collect();
        let loss: Vec<f64> = r.steps.iter().filter_map(|s| s.loss).collect();
        let [a, b] =
            Layout::vertical([Constraint::Ratio(1, 2), Constraint::Ratio(1, 2)]).areas(charts);
        spark(
            f,
            t,
            a,
            format!("tokens/s per step ({} steps)", tps.len()),
            &tps,
            1.0,
            0,
        );
        spark(f, t, b, "loss per step".to_string(), &loss, 1000.0, 1);
    }
}
