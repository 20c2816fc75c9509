//! What the report reads besides runs and steps: the `sweep_meta` table (where a sweep ran:
//! lorascope version, CPU model, GPU name and driver), and a run's telemetry samples.

use rusqlite::params;

use super::{Result, Store};
use crate::telemetry::TelemetrySample;

impl Store {
    /// Records `pairs` for sweep `sweep_id`; a key recorded before is kept (the first session
    /// of a resumed sweep names where it ran).
    pub fn set_sweep_meta(&self, sweep_id: i64, pairs: &[(String, String)]) -> Result<()> {
        for (k, v) in pairs {
            self.conn.execute(
                "INSERT OR IGNORE INTO sweep_meta (sweep_id, key, value) VALUES (?1, ?2, ?3)",
                params![sweep_id, k, v],
            )?;
        }
        Ok(())
    }

    /// The recorded `(key, value)` pairs of a sweep, by key; none for a database written
    /// before the `sweep_meta` table existed (opened read-only, its schema is not upgraded).
    pub fn sweep_meta(&self, sweep_id: i64) -> Result<Vec<(String, String)>> {
        let has_table: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sweep_meta')",
            [],
            |r| r.get(0),
        )?;
        if !has_table {
            return Ok(Vec::new());
        }
        let mut st = self
            .conn
            .prepare("SELECT key, value FROM sweep_meta WHERE sweep_id = ?1 ORDER BY key")?;
        let rows = st.query_map([sweep_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// A run's telemetry samples in time order (`gpu` and the NVML fields are None on CPU).
    pub fn telemetry(&self, run_id: i64) -> Result<Vec<TelemetrySample>> {
        let mut st = self.conn.prepare(
            "SELECT t, gpu, power_w, energy_mj, mem_used_bytes, proc_mem_bytes, util_pct,
                    sm_clock_mhz, temp_c, power_limit_w, rss_bytes, hwm_bytes
             FROM telemetry WHERE run_id = ?1 ORDER BY t, rowid",
        )?;
        let u = |v: Option<i64>| v.map(|v| v.max(0) as u64);
        let rows = st.query_map([run_id], |r| {
            Ok(TelemetrySample {
                t: r.get(0)?,
                gpu: r.get(1)?,
                power_w: r.get(2)?,
                energy_mj: r.get(3)?,
                mem_used_bytes: u(r.get(4)?),
                proc_mem_bytes: u(r.get(5)?),
                util_pct: r.get(6)?,
                sm_clock_mhz: r.get(7)?,
                temp_c: r.get(8)?,
                power_limit_w: r.get(9)?,
                rss_bytes: u(r.get(10)?),
                hwm_bytes: u(r.get(11)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}
