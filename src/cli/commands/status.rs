//! `lorascope status [--json]`: what the daemon is running: the sweep, each device's run
//! with its latest telemetry, the queue, and the sweeps waiting to start.

use std::io::Write;
use std::path::Path;

use anyhow::Result;

use crate::cli::client_rt;
use crate::daemon::client::Client;
use crate::daemon::protocol::StatusReport;
use crate::report;

/// Prints the status of the daemon on `socket`: for people ([`render_status`]), or with
/// `json` the report as pretty JSON.
///
/// Errors: no daemon answers, or stdout is closed.
pub fn run(socket: &Path, json: bool) -> Result<()> {
    let report = client_rt()?.block_on(async {
        let mut c = Client::connect(socket).await?;
        anyhow::Ok(c.status().await?)
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    write!(out, "{}", render_status(&report))?;
    Ok(())
}

/// A duration for people: `42s`, `3m07s`, `2h05m`.
fn hms(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// `lorascope status` for people.
pub fn render_status(r: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "daemon pid {}, up {}, socket {}",
        r.pid,
        hms(r.uptime_s),
        r.socket.display()
    );
    if let Some(s) = &r.stopping {
        let _ = writeln!(o, "stopping: {s}");
    }
    match &r.current {
        None => {
            let _ = writeln!(o, "idle: no sweep has run yet");
        }
        Some(c) => {
            let state = if c.ended {
                "ended"
            } else if r.paused {
                "paused"
            } else {
                "running"
            };
            let counts: Vec<String> = c.counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
            let _ = writeln!(
                o,
                "sweep {} {} [{state}]: {}  (db {})",
                c.info.sweep_id,
                c.info.name,
                counts.join(", "),
                c.info.db.display()
            );
            for run in &c.running {
                let mut extra = String::new();
                if let Some(t) = &run.telemetry {
                    if let Some(w) = t.power_w {
                        let _ = write!(extra, "  {w:.0} W");
                    }
                    if let Some(b) = t.proc_mem_bytes.or(t.mem_used_bytes).or(t.rss_bytes) {
                        let _ = write!(extra, "  {}", report::human_bytes(Some(b)));
                    }
                    if let Some(u) = t.util_pct {
                        let _ = write!(extra, "  {u}%");
                    }
                }
                let _ = writeln!(
                    o,
                    "  {:<7} {}  {}  step {}/{}  {}{extra}",
                    run.device,
                    run.id,
                    run.label,
                    run.step,
                    run.steps,
                    hms(run.elapsed_s)
                );
            }
            if let Some(q) = &c.queue
                && !q.queued.is_empty()
            {
                let _ = writeln!(o, "  next: {}", q.queued.join(" "));
            }
        }
    }
    for p in &r.pending {
        let _ = writeln!(
            o,
            "queued: sweep {} {} ({}, db {})",
            p.sweep_id,
            p.name,
            p.profile_path,
            p.db.display()
        );
    }
    o
}
