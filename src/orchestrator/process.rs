//! One run as a child process: spawn the worker, read its JSON lines, sample telemetry,
//! honour a kill request (SIGTERM to the child's process group, SIGKILL after a grace period)
//! and classify the exit.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use crate::spec::Device;
use crate::spec::wire::{EXIT_OK, EXIT_OOM, PhaseRecord, StepRecord};
use crate::summary::{RunOutcome, RunStatus, RunSummary, WorkerLine, parse_worker_line, summarize};
use crate::telemetry::{Sampler, TelemetrySample};

/// How to start the worker: `program` followed by the spec's `train ...` argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    pub program: PathBuf,
}

impl WorkerCommand {
    /// `$LORASCOPE_WORKER` if set (tests, a fake worker), else this executable.
    pub fn from_env() -> std::io::Result<WorkerCommand> {
        match std::env::var_os("LORASCOPE_WORKER") {
            Some(p) if !p.is_empty() => Ok(WorkerCommand { program: p.into() }),
            _ => Ok(WorkerCommand {
                program: std::env::current_exe()?,
            }),
        }
    }
}

/// Messages a run sends while in flight.
#[derive(Debug, Clone)]
pub enum RunMsg {
    Step(StepRecord),
    Telemetry(TelemetrySample),
    Warning(String),
    /// The worker's phase changed.
    Phase(PhaseRecord),
}

/// Everything recorded about one finished child.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub summary: RunSummary,
    pub header: Option<Value>,
    pub worker_summary: Option<Value>,
    pub steps: Vec<StepRecord>,
    pub samples: Vec<TelemetrySample>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub worker: WorkerCommand,
    pub argv: Vec<String>,
    pub device: Device,
    pub warmup_steps: u32,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    pub telemetry_period: Duration,
}

fn signal_group(pid: u32, sig: libc::c_int) {
    // The child leads its own process group (see `spawn`), so this reaches grandchildren too.
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
    unsafe {
        libc::kill(-(pid as libc::pid_t), sig);
    }
}

/// Reads one line (without its newline), replacing invalid UTF-8, so that odd bytes never
/// stop the reading (a pipe nobody reads would block the worker). `None` at end of stream.
async fn next_line_lossy<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if r.read_until(b'\n', &mut buf).await? == 0 {
        return Ok(None);
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Classifies an exit: [`EXIT_OK`] = ok, [`EXIT_OOM`] = oom, other = failed (cause = last
/// stderr line).
pub fn classify_exit(
    code: Option<i32>,
    signal: Option<i32>,
    last_stderr: Option<&str>,
) -> (RunStatus, Option<String>) {
    let stderr = last_stderr.map(str::to_string);
    match (code, signal) {
        (Some(EXIT_OK), _) => (RunStatus::Ok, None),
        (Some(EXIT_OOM), _) => (
            RunStatus::Oom,
            Some(stderr.unwrap_or_else(|| "CUDA out of memory".into())),
        ),
        (Some(c), _) => (
            RunStatus::Failed,
            Some(stderr.unwrap_or_else(|| format!("worker exited with code {c}"))),
        ),
        (None, Some(s)) => (
            RunStatus::Failed,
            Some(match stderr {
                Some(e) => format!("killed by signal {s}: {e}"),
                None => format!("killed by signal {s}"),
            }),
        ),
        (None, None) => (RunStatus::Failed, stderr),
    }
}

/// Runs one child to completion. `kill` requests termination; `tx` receives live messages.
pub async fn execute(
    req: RunRequest,
    kill: oneshot::Receiver<()>,
    tx: mpsc::UnboundedSender<RunMsg>,
) -> RunResult {
    let t0 = Instant::now();
    let mut cmd = tokio::process::Command::new(&req.worker.program);
    cmd.args(&req.argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Own process group: a Ctrl-C at the terminal reaches only the orchestrator, which
        // shuts down cleanly, and kills can target the worker and its children together.
        .process_group(0);
    if let Device::Cuda(i) = req.device {
        cmd.env("CUDA_VISIBLE_DEVICES", i.to_string());
        // NVML numbers GPUs in PCI bus order; make CUDA agree so telemetry watches the right card.
        cmd.env("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
    }
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Die with the orchestrator (kill -9 included): no orphan keeps a GPU busy.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let outcome = RunOutcome {
                status: Some(RunStatus::Failed),
                cause: Some(format!(
                    "cannot start worker {}: {e}",
                    req.worker.program.display()
                )),
                wall_seconds: t0.elapsed().as_secs_f64(),
                ..Default::default()
            };
            return RunResult {
                summary: summarize(&[], &[], req.warmup_steps, &outcome),
                ..Default::default()
            };
        }
    };
    let pid = child.id().unwrap_or(0);
    let sampler = {
        let tx = tx.clone();
        Sampler::start(
            req.device,
            pid,
            t0,
            req.telemetry_period,
            Box::new(move |s| {
                let _ = tx.send(RunMsg::Telemetry(s.clone()));
            }),
        )
    };
    let mut stdout = child.stdout.take().map(BufReader::new);
    let mut stderr = child.stderr.take().map(BufReader::new);
    let mut result = RunResult::default();
    let mut last_stderr: Option<String> = None;
    let mut last_error_line: Option<String> = None;
    let mut exit: Option<std::process::ExitStatus> = None;
    let mut kill = Some(kill);
    let mut kill_deadline: Option<tokio::time::Instant> = None;
    let mut sigkilled = false;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);

    loop {
        if exit.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            line = async { next_line_lossy(stdout.as_mut().unwrap()).await }, if stdout.is_some() => {
                match line {
                    Ok(Some(line)) if line.trim().is_empty() => {}
                    Ok(Some(line)) => match parse_worker_line(&line) {
                        WorkerLine::Step(mut s) => {
                            s.t = t0.elapsed().as_secs_f64();
                            let _ = tx.send(RunMsg::Step(s.clone()));
                            result.steps.push(s);
                        }
                        WorkerLine::Header(v) => result.header = Some(v),
                        WorkerLine::Summary(v) => result.worker_summary = Some(v),
                        // The orchestrator samples local children itself.
                        WorkerLine::Other(_) | WorkerLine::Telemetry(_) => {}
                        WorkerLine::Warning(w) => { let _ = tx.send(RunMsg::Warning(w)); }
                        WorkerLine::Phase(p) => { let _ = tx.send(RunMsg::Phase(p)); }
                    },
                    Ok(None) | Err(_) => stdout = None,
                }
            }
            line = async { next_line_lossy(stderr.as_mut().unwrap()).await }, if stderr.is_some() => {
                match line {
                    Ok(Some(line)) => {
                        let line = line.trim();
                        // Rust's panic epilogue is not a cause.
                        let epilogue = line.starts_with("note: run with `RUST_BACKTRACE");
                        if !line.is_empty() && !epilogue {
                            last_stderr = Some(line.to_string());
                        }
                        if line.starts_with("error:") {
                            last_error_line = Some(line.to_string());
                        }
                    }
                    Ok(None) | Err(_) => stderr = None,
                }
            }
            status = child.wait(), if exit.is_none() => {
                exit = status.ok().or(Some(std::process::ExitStatus::default()));
                // Grandchildren may hold the pipes open: read what is left, briefly.
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(2));
            }
            r = async { kill.as_mut().unwrap().await }, if kill.is_some() => {
                kill = None;
                if r.is_ok() && exit.is_none() {
                    signal_group(pid, libc::SIGTERM);
                    kill_deadline = Some(tokio::time::Instant::now() + req.grace);
                }
            }
            _ = tokio::time::sleep_until(kill_deadline.unwrap_or_else(far)),
                if kill_deadline.is_some() && !sigkilled && exit.is_none() => {
                sigkilled = true;
                signal_group(pid, libc::SIGKILL);
            }
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(far)),
                if drain_deadline.is_some() => {
                break;
            }
        }
    }
    if kill_deadline.is_some() {
        // Leave nothing of a killed worker behind.
        signal_group(pid, libc::SIGKILL);
    }
    let (samples, telemetry_note) = sampler.finish();
    result.samples = samples;
    use std::os::unix::process::ExitStatusExt;
    let (code, signal) = exit.map(|e| (e.code(), e.signal())).unwrap_or((None, None));
    // The cause is the last stderr line, unless an `error: ...` line came earlier (e.g. a
    // usage message follows it): then the last such line.
    let cause_line = last_error_line.or(last_stderr);
    let (status, cause) = classify_exit(code, signal, cause_line.as_deref());
    let outcome = RunOutcome {
        status: Some(status),
        cause,
        exit_code: code,
        wall_seconds: t0.elapsed().as_secs_f64(),
        worker_summary: result.worker_summary.clone(),
        worker_header: result.header.clone(),
        telemetry_note,
    };
    result.summary = summarize(&result.steps, &result.samples, req.warmup_steps, &outcome);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_survive_invalid_utf8() {
        let data: &[u8] = b"ok\n\xff\xfe bad\r\nlast";
        let mut r = tokio::io::BufReader::new(data);
        assert_eq!(
            next_line_lossy(&mut r).await.unwrap().as_deref(),
            Some("ok")
        );
        assert_eq!(
            next_line_lossy(&mut r).await.unwrap().as_deref(),
            Some("\u{fffd}\u{fffd} bad")
        );
        assert_eq!(
            next_line_lossy(&mut r).await.unwrap().as_deref(),
            Some("last")
        );
        assert_eq!(next_line_lossy(&mut r).await.unwrap(), None);
    }

    #[test]
    fn exit_classification() {
        assert_eq!(
            classify_exit(Some(0), None, Some("x")),
            (RunStatus::Ok, None)
        );
        assert_eq!(
            classify_exit(Some(3), None, Some("CUDA out of memory. Tried 2 GiB")),
            (
                RunStatus::Oom,
                Some("CUDA out of memory. Tried 2 GiB".into())
            )
        );
        assert_eq!(
            classify_exit(Some(2), None, Some("unsupported optimizer: adamw8bit")),
            (
                RunStatus::Failed,
                Some("unsupported optimizer: adamw8bit".into())
            )
        );
        assert_eq!(
            classify_exit(Some(1), None, None),
            (RunStatus::Failed, Some("worker exited with code 1".into()))
        );
        assert_eq!(
            classify_exit(None, Some(9), None),
            (RunStatus::Failed, Some("killed by signal 9".into()))
        );
    }
}
