//! Slurm job states as lorascope reads them: the text output of `squeue` and `sacct` (their
//! `--json` is wrong or ignores `-j` in Slurm 22.05), and the mapping of Slurm's states to
//! lorascope's. Pure functions: no commands run here.
//!
//! Tasks are keyed by `ARRAYJOB_TASK` (squeue `%i`, sacct `JobID`), never by the raw job id
//! each task also has.

use std::collections::HashMap;

use crate::spec::wire::EXIT_OOM;
use crate::summary::RunStatus;

/// `squeue` output format: task key, state, reason, node list (`|`-separated; the node list
/// is empty while pending).
pub const SQUEUE_FORMAT: &str = "%i|%T|%r|%N";
/// `sacct -o` fields, read with `-n -X -P` (no header, allocations only, `|`-separated).
pub const SACCT_FORMAT: &str = "JobID,State,ExitCode,NodeList";

/// One task as `squeue` or `sacct` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// The Slurm state's first word (`CANCELLED by 0` -> `CANCELLED`).
    pub state: String,
    /// squeue's reason (`JobArrayTaskLimit`, `JobHeldUser`...); empty from sacct.
    pub reason: String,
    /// Node list; empty while pending.
    pub node: String,
    /// `CODE:SIGNAL` as sacct reports it; `None` from squeue (it has no exit code).
    pub exit: Option<(i32, i32)>,
}

/// Where lorascope puts a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Waiting in Slurm's queue (held, behind `%N`, for resources...).
    Queued,
    /// Running (or starting, or being cleaned up) on `node`.
    Running { node: String },
    /// Ended: lorascope's status, and the cause for a status other than ok.
    Ended {
        status: RunStatus,
        cause: Option<String>,
        exit_code: Option<i32>,
    },
}

/// Parses `squeue -h -r -t all -o '%i|%T|%r|%N'` lines into tasks by `ARRAYJOB_TASK` key.
/// A pending meta-record (`37_[1-5%1]`, only without `-r`) and malformed lines are skipped.
pub fn parse_squeue(text: &str) -> HashMap<String, TaskState> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.trim().splitn(4, '|').collect();
        if f.len() < 3 || f[0].contains('[') || !f[0].contains('_') {
            continue;
        }
        out.insert(
            f[0].to_string(),
            TaskState {
                state: first_word(f[1]),
                reason: f[2].to_string(),
                node: f.get(3).map(|s| s.trim().to_string()).unwrap_or_default(),
                exit: None,
            },
        );
    }
    out
}

/// Parses `sacct -n -X -P -o JobID,State,ExitCode,NodeList` lines (see [`SACCT_FORMAT`]).
/// Pending meta-records (`55_[1-3%1]`) and lines of other jobs are skipped; `None List`
/// (sacct's empty node list) reads as empty.
pub fn parse_sacct(text: &str) -> HashMap<String, TaskState> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.trim().split('|').collect();
        if f.len() < 4 || f[0].contains('[') || !f[0].contains('_') || f[0].contains('.') {
            continue;
        }
        let exit = f[2]
            .split_once(':')
            .and_then(|(c, s)| Some((c.trim().parse().ok()?, s.trim().parse().ok()?)));
        let node = match f[3].trim() {
            "None assigned" | "None" => String::new(),
            n => n.to_string(),
        };
        out.insert(
            f[0].to_string(),
            TaskState {
                state: first_word(f[1]),
                reason: String::new(),
                node,
                exit,
            },
        );
    }
    out
}

fn first_word(s: &str) -> String {
    s.split_whitespace()
        .next()
        .unwrap_or("")
        .trim_end_matches('+')
        .to_string()
}

/// Whether a Slurm state is final (the task will not run again by itself).
pub fn is_terminal(state: &str) -> bool {
    !matches!(
        map_state(state, None),
        Phase::Queued | Phase::Running { .. }
    )
}

/// Maps a task's Slurm state to lorascope's.
///
/// | Slurm | lorascope |
/// | --- | --- |
/// | PENDING, REQUEUED, REQUEUE_HOLD, REQUEUE_FED, RESV_DEL_HOLD | queued |
/// | RUNNING, CONFIGURING, COMPLETING, SIGNALING, STAGE_OUT, RESIZING, SUSPENDED, STOPPED | running |
/// | COMPLETED | ok |
/// | FAILED with exit code 3 (the worker's out-of-memory status), OUT_OF_MEMORY | oom |
/// | FAILED (other codes), TIMEOUT, DEADLINE, SPECIAL_EXIT, any other state | failed |
/// | CANCELLED, NODE_FAIL, PREEMPTED, BOOT_FAIL | interrupted (re-run by `--resume`) |
///
/// A `CANCELLED` task that lorascope cancelled itself (queue `cancel`) is recorded
/// `cancelled` by the queue, not here. The cause names the Slurm state and exit code.
pub fn map_state(state: &str, exit: Option<(i32, i32)>) -> Phase {
    let code = exit.map(|(c, _)| c);
    let exit_text = match exit {
        Some((c, s)) => format!(" (exit code {c}:{s})"),
        None => String::new(),
    };
    let ended = |status, cause: String| Phase::Ended {
        status,
        cause: Some(cause),
        exit_code: code,
    };
    match state {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD" => Phase::Queued,
        "RUNNING" | "CONFIGURING" | "COMPLETING" | "SIGNALING" | "STAGE_OUT" | "RESIZING"
        | "SUSPENDED" | "STOPPED" => Phase::Running {
            node: String::new(),
        },
        "COMPLETED" => Phase::Ended {
            status: RunStatus::Ok,
            cause: None,
            exit_code: code.or(Some(0)),
        },
        "FAILED" if code == Some(EXIT_OOM) => ended(
            RunStatus::Oom,
            format!("Slurm: FAILED{exit_text}: the worker ran out of memory"),
        ),
        "OUT_OF_MEMORY" => ended(
            RunStatus::Oom,
            format!("Slurm: OUT_OF_MEMORY{exit_text}: the task went over its memory limit"),
        ),
        "TIMEOUT" => ended(
            RunStatus::Failed,
            "Slurm: TIMEOUT: the task reached its time limit (raise slurm.time)".to_string(),
        ),
        "CANCELLED" => ended(
            RunStatus::Interrupted,
            "Slurm: CANCELLED outside lorascope (scancel, an admin or the cluster)".to_string(),
        ),
        "NODE_FAIL" | "PREEMPTED" | "BOOT_FAIL" => {
            ended(RunStatus::Interrupted, format!("Slurm: {state}{exit_text}"))
        }
        other => ended(RunStatus::Failed, format!("Slurm: {other}{exit_text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(state: &str, exit: Option<(i32, i32)>) -> (RunStatus, Option<i32>) {
        match map_state(state, exit) {
            Phase::Ended {
                status, exit_code, ..
            } => (status, exit_code),
            p => panic!("{state}: {p:?}"),
        }
    }

    #[test]
    fn states_map_to_lorascope_statuses() {
        assert_eq!(map_state("PENDING", None), Phase::Queued);
        assert!(matches!(map_state("RUNNING", None), Phase::Running { .. }));
        assert!(matches!(
            map_state("COMPLETING", None),
            Phase::Running { .. }
        ));
        assert_eq!(ended("COMPLETED", Some((0, 0))), (RunStatus::Ok, Some(0)));
        assert_eq!(ended("FAILED", Some((3, 0))), (RunStatus::Oom, Some(3)));
        assert_eq!(ended("FAILED", Some((1, 0))), (RunStatus::Failed, Some(1)));
        assert_eq!(ended("FAILED", Some((0, 9))).0, RunStatus::Failed);
        assert_eq!(ended("OUT_OF_MEMORY", Some((0, 125))).0, RunStatus::Oom);
        assert_eq!(ended("TIMEOUT", Some((0, 0))).0, RunStatus::Failed);
        assert_eq!(ended("CANCELLED", Some((0, 0))).0, RunStatus::Interrupted);
        assert_eq!(ended("NODE_FAIL", None).0, RunStatus::Interrupted);
        assert_eq!(ended("PREEMPTED", None).0, RunStatus::Interrupted);
        assert_eq!(ended("DEADLINE", None).0, RunStatus::Failed);
        match map_state("TIMEOUT", Some((0, 0))) {
            Phase::Ended { cause, .. } => assert!(cause.unwrap().starts_with("Slurm: TIMEOUT")),
            p => panic!("{p:?}"),
        }
        assert!(is_terminal("COMPLETED") && is_terminal("CANCELLED"));
        assert!(!is_terminal("PENDING") && !is_terminal("RUNNING"));
    }

    /// The outputs as Slurm 22.05.8 printed them (tests/slurm/facts-22.05.8.txt).
    #[test]
    fn squeue_and_sacct_lines() {
        let q = parse_squeue(
            "37_1|PENDING|JobArrayTaskLimit|\n37_0|RUNNING|None|vm\n37_[2-5%1]|PENDING|JobArrayTaskLimit|\n",
        );
        assert_eq!(q.len(), 2);
        assert_eq!(q["37_0"].node, "vm");
        assert_eq!(q["37_1"].state, "PENDING");
        assert_eq!(q["37_1"].reason, "JobArrayTaskLimit");
        assert_eq!(q["37_1"].node, "");
        let a = parse_sacct(
            "66_0|COMPLETED|0:0|vm\n66_1|FAILED|3:0|vm\n66_3|CANCELLED by 0|0:0|vm\n55_[1-3%1]|PENDING|0:0|None assigned\n66_2.batch|OUT_OF_MEMORY|0:125|vm\n",
        );
        assert_eq!(a.len(), 3);
        assert_eq!(a["66_1"].exit, Some((3, 0)));
        assert_eq!(a["66_3"].state, "CANCELLED");
        assert_eq!(a["66_0"].state, "COMPLETED");
    }
}
