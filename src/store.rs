//! Results in SQLite (WAL): sweeps, runs, steps and telemetry samples.
//!
//! A run row is inserted (status `running`) when its child starts, and completed — status,
//! summary, every step and sample — in one transaction when it ends, before the next run on
//! that slot starts. A killed orchestrator therefore loses at most the runs in flight, whose
//! rows stay `running`; [`Store::mark_interrupted`] turns them into `interrupted` on resume.
//!
//! Resume policy: see [`RunStatus::is_finished`] (ok/oom/failed/cancelled are kept,
//! interrupted/skipped are re-run; `--retry-failed` re-runs failed/cancelled too).

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use crate::grid::RunSpec;
use crate::spec::wire::StepRecord;
use crate::summary::{RunStatus, RunSummary};
use crate::telemetry::TelemetrySample;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database: bad JSON in a stored row: {0}")]
    Json(#[from] serde_json::Error),
}

type Result<T> = std::result::Result<T, StoreError>;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sweeps (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,
    profile_path  TEXT NOT NULL,
    profile_toml  TEXT NOT NULL,
    started_at    REAL NOT NULL,
    finished_at   REAL
);
CREATE TABLE IF NOT EXISTS runs (
    id            INTEGER PRIMARY KEY,
    sweep_id      INTEGER NOT NULL REFERENCES sweeps(id),
    spec_id       TEXT NOT NULL,
    repeat        INTEGER NOT NULL,
    grid_index    INTEGER NOT NULL,
    label         TEXT NOT NULL,
    device        TEXT NOT NULL,
    config_json   TEXT NOT NULL,
    argv_json     TEXT NOT NULL,
    status        TEXT NOT NULL,
    cause         TEXT,
    started_at    REAL NOT NULL,
    finished_at   REAL,
    header_json   TEXT,
    worker_summary_json TEXT,
    summary_json  TEXT,
    tokens_per_s  REAL,
    s_per_10k_tokens REAL,
    peak_mem_bytes INTEGER,
    mean_w        REAL,
    j_per_token   REAL,
    final_loss    REAL
);
CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs(sweep_id, spec_id, repeat);
CREATE TABLE IF NOT EXISTS steps (
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    step          INTEGER NOT NULL,
    t             REAL NOT NULL,
    tokens        INTEGER NOT NULL,
    padded_tokens INTEGER,
    target_tokens INTEGER,
    step_seconds  REAL NOT NULL,
    loss          REAL,
    lr            REAL,
    loss_scale    REAL,
    skipped       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS steps_by_run ON steps(run_id);
CREATE TABLE IF NOT EXISTS telemetry (
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    t             REAL NOT NULL,
    gpu           INTEGER,
    power_w       REAL,
    energy_mj     REAL,
    mem_used_bytes INTEGER,
    proc_mem_bytes INTEGER,
    util_pct      INTEGER,
    sm_clock_mhz  INTEGER,
    temp_c        INTEGER,
    power_limit_w REAL,
    rss_bytes     INTEGER,
    hwm_bytes     INTEGER
);
CREATE INDEX IF NOT EXISTS telemetry_by_run ON telemetry(run_id);
"#;

/// A `sweeps` row.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRow {
    pub id: i64,
    pub name: String,
    pub profile_path: String,
    pub profile_toml: String,
    /// Unix time (s).
    pub started_at: f64,
    pub finished_at: Option<f64>,
}

/// A `runs` row.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: i64,
    pub sweep_id: i64,
    pub spec_id: String,
    pub repeat: u32,
    pub grid_index: usize,
    pub label: String,
    pub device: String,
    pub config: Value,
    pub status: RunStatus,
    pub cause: Option<String>,
    pub started_at: f64,
    pub finished_at: Option<f64>,
    pub header: Option<Value>,
    pub summary: Option<RunSummary>,
}

/// What [`Store::finish_run`] records.
#[derive(Debug, Clone)]
pub struct FinishedRun<'a> {
    pub summary: &'a RunSummary,
    pub header: Option<&'a Value>,
    pub worker_summary: Option<&'a Value>,
    pub steps: &'a [StepRecord],
    pub samples: &'a [TelemetrySample],
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `unix` seconds as an RFC 3339 UTC timestamp with milliseconds, e.g.
/// `2026-11-30T01:58:10.123Z` (for log lines). Proleptic Gregorian calendar, Howard Hinnant's
/// `civil_from_days`; written out because no date crate is among the dependencies.
pub fn utc_timestamp(unix: f64) -> String {
    let ms_total = (unix.max(0.0) * 1000.0).floor() as i64;
    let (secs, ms) = (ms_total.div_euclid(1000), ms_total.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// The results database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, in WAL mode.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::init(conn).map_err(|e| match e {
            StoreError::Sql(source) => StoreError::Open {
                path: path.display().to_string(),
                source,
            },
            e => e,
        })
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store { conn })
    }

    /// Records a new sweep; returns its id.
    pub fn create_sweep(&self, name: &str, profile_path: &str, profile_toml: &str) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO sweeps (name, profile_path, profile_toml, started_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, profile_path, profile_toml, now_unix()],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Marks a sweep finished (all its points have an outcome).
    pub fn finish_sweep(&self, sweep_id: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE sweeps SET finished_at = ?1 WHERE id = ?2",
            params![now_unix(), sweep_id],
        )?;
        Ok(())
    }

    fn sweep_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SweepRow> {
        Ok(SweepRow {
            id: r.get(0)?,
            name: r.get(1)?,
            profile_path: r.get(2)?,
            profile_toml: r.get(3)?,
            started_at: r.get(4)?,
            finished_at: r.get(5)?,
        })
    }

    const SWEEP_COLS: &str = "id, name, profile_path, profile_toml, started_at, finished_at";

    /// A sweep by id.
    pub fn sweep(&self, id: i64) -> Result<Option<SweepRow>> {
        let sql = format!("SELECT {} FROM sweeps WHERE id = ?1", Self::SWEEP_COLS);
        Ok(self
            .conn
            .query_row(&sql, [id], Self::sweep_from_row)
            .optional()?)
    }

    /// The most recent sweep (highest id).
    pub fn latest_sweep(&self) -> Result<Option<SweepRow>> {
        let sql = format!(
            "SELECT {} FROM sweeps ORDER BY id DESC LIMIT 1",
            Self::SWEEP_COLS
        );
        Ok(self
            .conn
            .query_row(&sql, [], Self::sweep_from_row)
            .optional()?)
    }

    /// The most recent sweep of the profile at `profile_path` (as recorded).
    pub fn latest_sweep_for(&self, profile_path: &str) -> Result<Option<SweepRow>> {
        let sql = format!(
            "SELECT {} FROM sweeps WHERE profile_path = ?1 ORDER BY id DESC LIMIT 1",
            Self::SWEEP_COLS
        );
        Ok(self
            .conn
            .query_row(&sql, [profile_path], Self::sweep_from_row)
            .optional()?)
    }

    /// All sweeps, oldest first.
    pub fn sweeps(&self) -> Result<Vec<SweepRow>> {
        let sql = format!("SELECT {} FROM sweeps ORDER BY id", Self::SWEEP_COLS);
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map([], Self::sweep_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

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
        let now = now_unix();
        self.conn.execute(
            "INSERT INTO runs (sweep_id, spec_id, repeat, grid_index, label, device, config_json,
                               argv_json, status, cause, started_at, finished_at)
             VALUES (?1, ?2, ?3, ?4, ?5, '', ?6, '[]', 'skipped', 'skipped by user', ?7, ?7)",
            params![
                sweep_id,
                spec.id,
                repeat,
                spec.index as i64,
                spec.label(),
                serde_json::to_string(&spec.config)?,
                now
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::parse_str;

    /// Timestamps against Python's `datetime.fromtimestamp(t, timezone.utc)`, including a leap
    /// day and the end of a century.
    #[test]
    fn utc_timestamps() {
        for (t, want) in [
            (0.0, "1970-01-01T00:00:00.000Z"),
            (951_782_400.5, "2000-02-29T00:00:00.500Z"),
            (1_764_467_890.123, "2025-11-30T01:58:10.123Z"),
            (4_102_444_799.999, "2099-12-31T23:59:59.999Z"),
        ] {
            assert_eq!(utc_timestamp(t), want, "{t}");
        }
    }

    fn spec() -> RunSpec {
        let p = parse_str(
            "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = 3\n",
            "t.toml",
        )
        .unwrap();
        crate::grid::expand_profile(&p, Path::new(".")).remove(0)
    }

    #[test]
    fn round_trip_and_resume_bookkeeping() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = Store::open(&dir.path().join("r.db")).unwrap();
        let sw = st.create_sweep("q", "/p.toml", "x = 1").unwrap();
        assert_eq!(st.latest_sweep_for("/p.toml").unwrap().unwrap().id, sw);
        let spec = spec();
        let r1 = st
            .start_run(sw, &spec, 0, "cpu", &["train".into()])
            .unwrap();
        let steps = vec![StepRecord {
            step: 1,
            tokens: 10,
            padded_tokens: Some(12),
            target_tokens: None,
            step_seconds: 0.5,
            loss: Some(2.0),
            lr: None,
            grad_norm: None,
            loss_scale: None,
            skipped: false,
            t: 0.6,
        }];
        let summary = RunSummary {
            status: Some(RunStatus::Ok),
            tokens_per_s: Some(20.0),
            ..Default::default()
        };
        let samples = vec![TelemetrySample {
            t: 0.1,
            rss_bytes: Some(5),
            ..Default::default()
        }];
        st.finish_run(
            r1,
            &FinishedRun {
                summary: &summary,
                steps: &steps,
                samples: &samples,
                header: None,
                worker_summary: None,
            },
        )
        .unwrap();
        let r2 = st.start_run(sw, &spec, 1, "cpu", &[]).unwrap();
        assert_eq!(st.mark_interrupted(sw).unwrap(), 1);
        let latest = st.latest_statuses(sw).unwrap();
        assert_eq!(latest[&(spec.id.clone(), 0)], RunStatus::Ok);
        assert_eq!(latest[&(spec.id.clone(), 1)], RunStatus::Interrupted);
        let runs = st.runs(sw).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].summary.as_ref().unwrap().tokens_per_s, Some(20.0));
        assert_eq!(runs[1].id, r2);
        assert_eq!(st.steps(r1).unwrap(), steps);
        assert_eq!(st.telemetry_count(r1).unwrap(), 1);
        drop(st);
        // Reopening sees the committed data.
        let st = Store::open(&dir.path().join("r.db")).unwrap();
        assert_eq!(st.runs(sw).unwrap().len(), 2);
    }
}
