//! The `runs`, `steps` and `telemetry` tables: a run's row from start to finish, and what
//! the report and resume read back.

use std::collections::HashMap;

use rusqlite::params;

use super::{FinishedRun, Result, RunRow, Store, now_unix};
use crate::grid::RunSpec;
use crate::spec::wire::StepRecord;
use crate::summary::RunStatus;

impl Store {
    /// Inserts a run row with status `running` (committed at once); returns the run id.
    pub fn start_run(
        &self,
        sweep_id: i64,
        spec: &RunSpec,
        repeat: u32,
        device: &str,
        argv: &[String],
    ) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO runs (sweep_id, spec_id, repeat, grid_index, label, device, config_json,
                               argv_json, status, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'running', ?9)",
            params![
                sweep_id,
                spec.id,
                repeat,
                spec.index as i64,
                spec.label(),
                device,
                serde_json::to_string(&spec.config)?,
                serde_json::to_string(argv)?,
                now_unix()
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Records a point that was skipped without running (status `skipped`).
    pub fn record_skipped(&self, sweep_id: i64, spec: &RunSpec, repeat: u32) -> Result<i64> {
        self.record_unrun(sweep_id, spec, repeat, "skipped", "skipped by user", true)
    }

    /// Records that the user queued a point again (retry of a finished run, un-skip of a
    /// skipped one): a row with status `queued`, so that the latest status of the point is
    /// `queued` (not `cancelled`/`skipped`) until it starts, and `--resume` runs it when the
    /// sweep stops first. The row that starts it later is a new one (the latest wins).
    pub fn record_queued(&self, sweep_id: i64, spec: &RunSpec, repeat: u32) -> Result<i64> {
        self.record_unrun(
            sweep_id,
            spec,
            repeat,
            "queued",
            "queued again by user",
            false,
        )
    }

    /// A row for a point that has not run: `status` and `cause` as given, no device or
    /// argv, started now and (when `finished`) finished now.
    fn record_unrun(
        &self,
        sweep_id: i64,
        spec: &RunSpec,
        repeat: u32,
        status: &str,
        cause: &str,
        finished: bool,
    ) -> Result<i64> {
        let now = now_unix();
        self.conn.execute(
            "INSERT INTO runs (sweep_id, spec_id, repeat, grid_index, label, device, config_json,
                               argv_json, status, cause, started_at, finished_at)
             VALUES (?1, ?2, ?3, ?4, ?5, '', ?6, '[]', ?7, ?8, ?9, ?10)",
            params![
                sweep_id,
                spec.id,
                repeat,
                spec.index as i64,
                spec.label(),
                serde_json::to_string(&spec.config)?,
                status,
                cause,
                now,
                finished.then_some(now)
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Completes a run in one transaction: status, summary, steps and samples.
    pub fn finish_run(&mut self, run_id: i64, f: &FinishedRun<'_>) -> Result<()> {
        let s = f.summary;
        let status = s.status.unwrap_or(RunStatus::Failed);
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare(
                "INSERT INTO steps (run_id, step, t, tokens, padded_tokens, target_tokens,
                                    step_seconds, loss, lr, loss_scale, skipped)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            for r in f.steps {
                st.execute(params![
                    run_id,
                    r.step as i64,
                    r.t,
                    r.tokens as i64,
                    r.padded_tokens.map(|v| v as i64),
                    r.target_tokens.map(|v| v as i64),
                    r.step_seconds,
                    r.loss,
                    r.lr,
                    r.loss_scale,
                    r.skipped
                ])?;
            }
            let mut st = tx.prepare(
                "INSERT INTO telemetry (run_id, t, gpu, power_w, energy_mj, mem_used_bytes,
                    proc_mem_bytes, util_pct, sm_clock_mhz, temp_c, power_limit_w, rss_bytes,
                    hwm_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?;
            for x in f.samples {
                st.execute(params![
                    run_id,
                    x.t,
                    x.gpu,
                    x.power_w,
                    x.energy_mj,
                    x.mem_used_bytes.map(|v| v as i64),
                    x.proc_mem_bytes.map(|v| v as i64),
                    x.util_pct,
                    x.sm_clock_mhz,
                    x.temp_c,
                    x.power_limit_w,
                    x.rss_bytes.map(|v| v as i64),
                    x.hwm_bytes.map(|v| v as i64)
                ])?;
            }
            tx.execute(
                "UPDATE runs SET status = ?2, cause = ?3, finished_at = ?4, header_json = ?5,
                    worker_summary_json = ?6, summary_json = ?7, tokens_per_s = ?8,
                    s_per_10k_tokens = ?9, peak_mem_bytes = ?10, mean_w = ?11,
                    j_per_token = ?12, final_loss = ?13
                 WHERE id = ?1",
                params![
                    run_id,
                    status.as_str(),
                    s.cause,
                    now_unix(),
                    f.header.map(serde_json::to_string).transpose()?,
                    f.worker_summary.map(serde_json::to_string).transpose()?,
                    serde_json::to_string(s)?,
                    s.tokens_per_s,
                    s.s_per_10k_tokens,
                    s.peak_mem_bytes.map(|v| v as i64),
                    s.mean_w,
                    s.j_per_token,
                    s.final_loss
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Turns the sweep's `running` rows (left by a killed orchestrator) into `interrupted`.
    /// Returns how many.
    pub fn mark_interrupted(&self, sweep_id: i64) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE runs SET status = 'interrupted',
                cause = 'orchestrator stopped while the run was in flight'
             WHERE sweep_id = ?1 AND status = 'running'",
            [sweep_id],
        )?)
    }

    /// The status of the latest run (highest row id) of each `(spec_id, repeat)` in a sweep.
    pub fn latest_statuses(&self, sweep_id: i64) -> Result<HashMap<(String, u32), RunStatus>> {
        let mut st = self
            .conn
            .prepare("SELECT spec_id, repeat, status FROM runs WHERE sweep_id = ?1 ORDER BY id")?;
        let rows = st.query_map([sweep_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = HashMap::new();
        for row in rows {
            let (spec, repeat, status) = row?;
            out.insert(
                (spec, repeat),
                RunStatus::parse(&status).unwrap_or(RunStatus::Interrupted),
            );
        }
        Ok(out)
    }

    /// All runs of a sweep, by grid position, repeat, then row id.
    pub fn runs(&self, sweep_id: i64) -> Result<Vec<RunRow>> {
        let mut st = self.conn.prepare(
            "SELECT id, sweep_id, spec_id, repeat, grid_index, label, device, config_json, status,
                    cause, started_at, finished_at, header_json, summary_json
             FROM runs WHERE sweep_id = ?1 ORDER BY grid_index, repeat, id",
        )?;
        let rows = st.query_map([sweep_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, String>(8)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, f64>(10)?,
                r.get::<_, Option<f64>>(11)?,
                r.get::<_, Option<String>>(12)?,
                r.get::<_, Option<String>>(13)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                id,
                sweep_id,
                spec_id,
                repeat,
                gi,
                label,
                device,
                config,
                status,
                cause,
                sa,
                fa,
                h,
                s,
            ) = row?;
            out.push(RunRow {
                id,
                sweep_id,
                spec_id,
                repeat,
                grid_index: gi.max(0) as usize,
                label,
                device,
                config: serde_json::from_str(&config)?,
                status: RunStatus::parse(&status).unwrap_or(RunStatus::Interrupted),
                cause,
                started_at: sa,
                finished_at: fa,
                header: h.as_deref().map(serde_json::from_str).transpose()?,
                summary: s.as_deref().map(serde_json::from_str).transpose()?,
            });
        }
        Ok(out)
    }

    /// The step records of a run, in order.
    pub fn steps(&self, run_id: i64) -> Result<Vec<StepRecord>> {
        let mut st = self.conn.prepare(
            "SELECT step, t, tokens, padded_tokens, target_tokens, step_seconds, loss, lr,
                    loss_scale, skipped FROM steps WHERE run_id = ?1 ORDER BY rowid",
        )?;
        let rows = st.query_map([run_id], |r| {
            Ok(StepRecord {
                step: r.get::<_, i64>(0)? as u64,
                t: r.get(1)?,
                tokens: r.get::<_, i64>(2)? as u64,
                padded_tokens: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                target_tokens: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                step_seconds: r.get(5)?,
                loss: r.get(6)?,
                lr: r.get(7)?,
                grad_norm: None,
                loss_scale: r.get(8)?,
                skipped: r.get(9)?,
                mem_bytes: None,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Number of telemetry samples stored for a run.
    pub fn telemetry_count(&self, run_id: i64) -> Result<usize> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM telemetry WHERE run_id = ?1",
            [run_id],
            |r| r.get::<_, i64>(0),
        )? as usize)
    }
}
