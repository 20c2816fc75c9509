//! The `slurm_tasks` table: which Slurm array task runs a run row (Slurm backend), so that an
//! orchestrator started again (`--resume`) follows the task instead of submitting its point
//! again.

use rusqlite::params;

use super::{Result, Store};

/// A run row still `running` whose task is on Slurm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmRun {
    pub run_id: i64,
    pub spec_id: String,
    pub repeat: u32,
    /// The array job id.
    pub array_job: String,
    pub task: u32,
}

impl Store {
    /// Records that run `run_id` is task `task` of array `array_job`.
    pub fn record_slurm_task(&self, run_id: i64, array_job: &str, task: u32) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO slurm_tasks (run_id, array_job, task) VALUES (?1, ?2, ?3)",
            params![run_id, array_job, task],
        )?;
        Ok(())
    }

    /// Sets the device text of a run (the node and job id once a Slurm task runs).
    pub fn set_run_device(&self, run_id: i64, device: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE runs SET device = ?2 WHERE id = ?1",
            params![run_id, device],
        )?;
        Ok(())
    }

    /// The sweep's `running` rows that have a Slurm task, by row id.
    pub fn slurm_running(&self, sweep_id: i64) -> Result<Vec<SlurmRun>> {
        let mut st = self.conn.prepare(
            "SELECT r.id, r.spec_id, r.repeat, s.array_job, s.task FROM runs r
             JOIN slurm_tasks s ON s.run_id = r.id
             WHERE r.sweep_id = ?1 AND r.status = 'running' ORDER BY r.id",
        )?;
        let rows = st.query_map([sweep_id], |r| {
            Ok(SlurmRun {
                run_id: r.get(0)?,
                spec_id: r.get(1)?,
                repeat: r.get(2)?,
                array_job: r.get(3)?,
                task: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// As [`Store::mark_interrupted`], but leaves the rows that have a Slurm task (they are
    /// followed again). Returns how many were marked.
    pub fn mark_interrupted_local(&self, sweep_id: i64) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE runs SET status = 'interrupted',
                cause = 'orchestrator stopped while the run was in flight'
             WHERE sweep_id = ?1 AND status = 'running'
               AND id NOT IN (SELECT run_id FROM slurm_tasks)",
            [sweep_id],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::expand_profile;
    use crate::profile::load_embedded;

    #[test]
    fn slurm_rows_survive_and_resume_finds_them() {
        let s = Store::open_in_memory().unwrap();
        let lp = load_embedded().unwrap();
        let specs = expand_profile(&lp.profile, std::path::Path::new("."));
        let sw = s.create_sweep("q", "/q.toml", "").unwrap();
        let a = s.start_run(sw, &specs[0], 0, "slurm 7_0", &[]).unwrap();
        let b = s.start_run(sw, &specs[1], 0, "cpu", &[]).unwrap();
        s.record_slurm_task(a, "7", 0).unwrap();
        s.set_run_device(a, "vm (slurm 7_0)").unwrap();
        assert_eq!(s.mark_interrupted_local(sw).unwrap(), 1);
        let rows = s.slurm_running(sw).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].run_id, rows[0].array_job.as_str(), rows[0].task),
            (a, "7", 0)
        );
        let runs = s.runs(sw).unwrap();
        assert_eq!(
            runs.iter().find(|r| r.id == a).unwrap().device,
            "vm (slurm 7_0)"
        );
        assert_eq!(
            runs.iter().find(|r| r.id == b).unwrap().status,
            crate::summary::RunStatus::Interrupted
        );
    }
}
