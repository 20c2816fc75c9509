//! The Slurm backend: a sweep's points go to Slurm as one job array per submission (one task
//! per point, `[slurm]` giving the `sbatch` options), and the orchestrator follows them from
//! the login node: it tails each task's JSON-lines file and asks `squeue` (and `sacct` for
//! tasks that ended) once per poll for all the sweep's arrays.
//!
//! - `script`: the generated batch script and `sbatch` command line (pure).
//! - `state`: `squeue`/`sacct` output and Slurm states -> lorascope statuses (pure).
//! - `follow`: reading the tasks' files, whole lines only.
//! - `driver`: the tasks in flight of one sweep: submit, poll, finish, detach.
//!
//! Slurm's own commands (`sbatch`, `squeue`, `sacct`, `scontrol`, `scancel`) are run as
//! child processes; they must be on `PATH` (a login node, or `module load slurm`).

pub mod driver;
pub mod follow;
pub mod script;
pub mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::profile::SlurmSection;
use state::{SACCT_FORMAT, SQUEUE_FORMAT, TaskState, parse_sacct, parse_squeue};

/// Why a Slurm operation failed: one line each, for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlurmError {
    #[error(
        "`sbatch` is not on PATH: run lorascope on a Slurm login node (or `module load slurm`), or set [run] backend = \"local\""
    )]
    NoSbatch,
    #[error(
        "Slurm partition `{partition}` does not exist (partitions here: {known}): fix slurm.partition"
    )]
    NoPartition { partition: String, known: String },
    #[error("Slurm refuses the submission: {message}")]
    Rejected { message: String },
    #[error("slurm.workdir {} is not writable: {error} (it must be a directory every node sees)", path.display())]
    Workdir { path: PathBuf, error: String },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
}

/// A task recorded in the store by an earlier orchestrator of the sweep, to follow again
/// instead of submitting its point again (`--resume`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The store's run row, still `running`.
    pub run_id: i64,
    /// The array job id.
    pub array: String,
    /// The task id inside the array.
    pub task: u32,
    /// The attempt number of that run.
    pub attempt: u32,
}

/// The Slurm backend of one sweep: `[slurm]`, the workdir, and the tasks to re-attach.
#[derive(Debug, Clone)]
pub struct SlurmBackend {
    pub section: SlurmSection,
    /// The absolute workdir (files of sweep N in `<workdir>/N/`).
    pub workdir: PathBuf,
    /// Seconds between polls.
    pub poll: std::time::Duration,
    /// Entries (by entry id) already on Slurm from an earlier orchestrator.
    pub attach: HashMap<String, Attached>,
    /// The sweep's name, for the batch script's comment and nothing else.
    pub sweep_name: String,
}

fn first_lines(o: &Output) -> String {
    let text = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        format!("exit status {}", o.status)
    } else {
        lines.join("; ")
    }
}

fn run_blocking(program: &str, args: &[&str]) -> Result<Output, SlurmError> {
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound if program == "sbatch" => SlurmError::NoSbatch,
            _ => SlurmError::Command {
                command: program.to_string(),
                message: format!("cannot run it: {e}"),
            },
        })
}

/// Runs a Slurm control command (`scontrol ...`, `scancel ...`); its stderr is the error.
pub fn control(program: &str, args: &[&str]) -> Result<(), SlurmError> {
    let o = run_blocking(program, args)?;
    if o.status.success() {
        Ok(())
    } else {
        Err(SlurmError::Command {
            command: format!("{program} {}", args.join(" ")),
            message: first_lines(&o),
        })
    }
}

impl SlurmBackend {
    /// The backend of `section`, its workdir resolved: `slurm.workdir` (relative to
    /// `profile_dir`), else `lorascope-slurm/` next to the results database `db`.
    pub fn new(section: SlurmSection, profile_dir: &Path, db: &Path) -> SlurmBackend {
        let workdir = match &section.workdir {
            Some(w) => profile_dir.join(w),
            None => db
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .join("lorascope-slurm"),
        };
        let workdir = std::path::absolute(&workdir).unwrap_or(workdir);
        SlurmBackend {
            section,
            workdir,
            poll: std::time::Duration::from_secs(2),
            attach: HashMap::new(),
            sweep_name: String::new(),
        }
    }

    /// The directory of sweep `sweep_id`'s scripts, JSON lines and logs.
    pub fn sweep_dir(&self, sweep_id: i64) -> PathBuf {
        self.workdir.join(sweep_id.to_string())
    }

    /// Checks, before anything is recorded, what would make the submission fail: `sbatch`
    /// on PATH, the partition, the workdir writable, and `sbatch --test-only` of an array of
    /// `n_tasks` with the profile's options (Slurm's own message when it refuses: a bad gres,
    /// time, account or QOS).
    pub fn check(&self, n_tasks: usize) -> Result<(), SlurmError> {
        let v = run_blocking("sbatch", &["--version"])?;
        if !v.status.success() {
            return Err(SlurmError::Command {
                command: "sbatch --version".into(),
                message: first_lines(&v),
            });
        }
        if let Some(p) = &self.section.partition {
            let o = run_blocking("scontrol", &["show", "partition", p])?;
            if !o.status.success() {
                let known = run_blocking("sinfo", &["-h", "-o", "%P"])
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                return Err(SlurmError::NoPartition {
                    partition: p.clone(),
                    known,
                });
            }
        }
        let workdir_err = |e: std::io::Error| SlurmError::Workdir {
            path: self.workdir.clone(),
            error: e.to_string(),
        };
        std::fs::create_dir_all(&self.workdir).map_err(workdir_err)?;
        let probe = self
            .workdir
            .join(format!(".lorascope-probe-{}", std::process::id()));
        std::fs::write(&probe, b"probe").map_err(workdir_err)?;
        let _ = std::fs::remove_file(&probe);
        let mut args: Vec<String> = vec!["--test-only".into()];
        let opts = script::sbatch_options(
            &self.section,
            "lorascope-check",
            &self.workdir,
            n_tasks.max(1),
        );
        args.extend(opts);
        args.extend(self.section.extra_args.iter().cloned());
        args.push("--wrap=true".into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run_blocking("sbatch", &argv)?;
        if !o.status.success() {
            return Err(SlurmError::Rejected {
                message: first_lines(&o),
            });
        }
        Ok(())
    }

    /// Writes `script` to `path` and submits it; returns the array job id.
    pub fn submit(&self, path: &Path, script: &str) -> Result<String, SlurmError> {
        crate::fsutil::write_atomic(path, script).map_err(|e| SlurmError::Workdir {
            path: self.workdir.clone(),
            error: e.to_string(),
        })?;
        let args = script::sbatch_argv(&self.section, path);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run_blocking("sbatch", &argv)?;
        if !o.status.success() {
            return Err(SlurmError::Rejected {
                message: first_lines(&o),
            });
        }
        let out = String::from_utf8_lossy(&o.stdout);
        // `--parsable` prints `ID` or `ID;cluster`.
        let id = out.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SlurmError::Rejected {
                message: format!("sbatch printed no job id ({:?})", out.trim()),
            });
        }
        Ok(id)
    }

    /// The state of every task of `arrays`: one `squeue` call, then one `sacct` call for the
    /// tasks of `need_exit` that squeue reports ended or no longer knows (squeue has no exit
    /// code and forgets jobs after `MinJobAge`). Tasks neither knows are absent.
    pub async fn query(
        &self,
        arrays: &[String],
        need_exit: &[String],
    ) -> Result<HashMap<String, TaskState>, SlurmError> {
        if arrays.is_empty() {
            return Ok(HashMap::new());
        }
        let jobs = arrays.join(",");
        let o = run_async(
            "squeue",
            &["-h", "-r", "-t", "all", "-j", &jobs, "-o", SQUEUE_FORMAT],
        )
        .await?;
        let mut states = if o.status.success() {
            parse_squeue(&String::from_utf8_lossy(&o.stdout))
        } else if String::from_utf8_lossy(&o.stderr).contains("Invalid job id") {
            // One id squeue no longer knows: ask sacct.
            HashMap::new()
        } else {
            return Err(SlurmError::Command {
                command: "squeue".into(),
                message: first_lines(&o),
            });
        };
        let ask_sacct = need_exit
            .iter()
            .any(|k| states.get(k).is_none_or(|s| state::is_terminal(&s.state)));
        if ask_sacct {
            let o = run_async(
                "sacct",
                &["-n", "-X", "-P", "-j", &jobs, "-o", SACCT_FORMAT],
            )
            .await?;
            if o.status.success() {
                for (k, s) in parse_sacct(&String::from_utf8_lossy(&o.stdout)) {
                    let replace = states.get(&k).is_none_or(|q| {
                        state::is_terminal(&q.state) && state::is_terminal(&s.state)
                    });
                    if replace {
                        let mut s = s;
                        if let Some(q) = states.get(&k)
                            && s.node.is_empty()
                        {
                            s.node = q.node.clone();
                        }
                        states.insert(k, s);
                    }
                }
            }
        }
        Ok(states)
    }
}

async fn run_async(program: &str, args: &[&str]) -> Result<Output, SlurmError> {
    tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| SlurmError::Command {
            command: program.to_string(),
            message: format!("cannot run it: {e}"),
        })
}
