//! Results in SQLite (WAL): sweeps, runs, steps and telemetry samples.
//!
//! A run row is inserted (status `running`) when its child starts, and completed — status,
//! summary, every step and sample — in one transaction when it ends, before the next run on
//! that slot starts. A killed orchestrator therefore loses at most the runs in flight, whose
//! rows stay `running`; [`Store::mark_interrupted`] turns them into `interrupted` on resume.
//!
//! Resume policy: see [`RunStatus::is_finished`] (ok/oom/failed/cancelled are kept,
//! interrupted/skipped are re-run; `--retry-failed` re-runs failed/cancelled too).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use crate::spec::wire::StepRecord;
use crate::summary::{RunStatus, RunSummary};
use crate::telemetry::TelemetrySample;

mod error;
mod meta;
mod runs;
mod slurm;
pub use slurm::SlurmRun;

pub use error::StoreError;

type Result<T> = std::result::Result<T, StoreError>;

/// The tables and indexes, created if absent (`IF NOT EXISTS`) on every open.
const SCHEMA: &str = include_str!("schema.sql");

/// A `sweeps` row.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRow {
    /// Row id: the sweep id.
    pub id: i64,
    /// The profile's name.
    pub name: String,
    /// The key `--resume` finds the sweep by (the profile's canonical path).
    pub profile_path: String,
    /// The profile text as run.
    pub profile_toml: String,
    /// Unix time (s).
    pub started_at: f64,
    /// Unix time (s) once every point has an outcome.
    pub finished_at: Option<f64>,
}

/// A `runs` row.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    /// Row id: the run id.
    pub id: i64,
    /// The sweep it belongs to.
    pub sweep_id: i64,
    /// The point's stable id ([`crate::grid::RunSpec::id`]).
    pub spec_id: String,
    /// Which repeat of the point (0-based).
    pub repeat: u32,
    /// The point's position in the grid ([`crate::grid::RunSpec::index`]).
    pub grid_index: usize,
    /// The point's label.
    pub label: String,
    /// `cpu` / `cuda:N`, on Slurm `NODE (slurm JOB_TASK)`; empty for a skipped point.
    pub device: String,
    /// The [`crate::grid::ResolvedConfig`] as JSON.
    pub config: Value,
    /// `running` until it finishes.
    pub status: RunStatus,
    /// Why it did not end `ok`.
    pub cause: Option<String>,
    /// Unix time (s).
    pub started_at: f64,
    /// Unix time (s).
    pub finished_at: Option<f64>,
    /// The worker's header record (model, parameter counts, ...), as JSON.
    pub header: Option<Value>,
    /// The summary computed by the orchestrator.
    pub summary: Option<RunSummary>,
}

/// What [`Store::finish_run`] records.
#[derive(Debug, Clone)]
pub struct FinishedRun<'a> {
    /// The run's summary (its status and cause go to the row too).
    pub summary: &'a RunSummary,
    /// The worker's header record.
    pub header: Option<&'a Value>,
    /// The worker's own summary record.
    pub worker_summary: Option<&'a Value>,
    /// Every step record.
    pub steps: &'a [StepRecord],
    /// Every telemetry sample.
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

/// `s` with the characters that mean something in a SQLite URI path (`%`, `?`, `#`)
/// percent-encoded.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

/// The results database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, in WAL mode.
    ///
    /// Errors: [`StoreError::Open`], its cause in words (a directory, a read-only directory
    /// or file, a full disk, not a database).
    pub fn open(path: &Path) -> Result<Store> {
        let open_err = |err| StoreError::Open {
            path: path.display().to_string(),
            err,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        Self::init(conn).map_err(|e| match e {
            StoreError::Sql(err) => open_err(err),
            e => e,
        })
    }

    /// Opens the database at `path` for reading only: nothing is created or written, so it
    /// works on read-only media and in read-only directories. When the directory is
    /// read-only and no WAL file holds pending results, the file is opened `immutable`
    /// (SQLite then needs no `-shm` file).
    ///
    /// Errors: [`StoreError::Missing`] when there is no file; [`StoreError::WalNeedsWritableDir`]
    /// when a non-empty `-wal` file sits in a directory SQLite cannot write; else
    /// [`StoreError::Open`] with its cause in words.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        use rusqlite::OpenFlags;
        let display = path.display().to_string();
        if !path.exists() {
            return Err(StoreError::Missing { path: display });
        }
        let open_err = |err| StoreError::Open {
            path: display.clone(),
            err,
        };
        if path.is_dir() {
            // SQLite's own answer ("unable to open") is explained from the file system.
            return Err(open_err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                None,
            )));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let probe = |conn: Connection| -> rusqlite::Result<Store> {
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.query_row("SELECT count(*) FROM sweeps", [], |r| r.get::<_, i64>(0))?;
            Ok(Store { conn })
        };
        let first = Connection::open_with_flags(path, flags).and_then(probe);
        let err = match first {
            Ok(store) => return Ok(store),
            Err(e) => e,
        };
        let wal = std::path::PathBuf::from(format!("{}-wal", path.display()));
        let wal_pending = std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0);
        let cannot_index = matches!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly)
        );
        if !cannot_index {
            return Err(open_err(err));
        }
        if wal_pending {
            return Err(StoreError::WalNeedsWritableDir { path: display });
        }
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let uri = format!(
            "file:{}?immutable=1",
            uri_escape(&abs.display().to_string())
        );
        Connection::open_with_flags(uri, flags)
            .and_then(probe)
            .map_err(open_err)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::RunSpec;
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
            mem_bytes: None,
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
