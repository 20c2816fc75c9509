//! The `lorascope` command line: the clap types of every subcommand and the dispatch to
//! them; `src/main.rs` only calls [`main`].
//!
//! - [`run`]: `run` (sweep a profile with the dashboard or the [`headless`] printer, or
//!   `--detach` it to the daemon).
//! - [`attach`]: the dashboard (or JSON lines) as a client of the daemon.
//! - [`train`]: `train`, one run: the worker the orchestrator launches.
//! - [`selftest`]: the hidden engine and optimizer checks.
//! - [`commands`]: one file per remaining verb: `report`, `profile check`, `daemon`,
//!   `status`, `queue`, `wait`.
//!
//! Errors are `anyhow` here, at the edge: [`main`] prints one line (`error: ...`, the
//! context chain joined) and returns the exit status.

pub mod attach;
pub mod commands;
pub mod headless;
pub mod run;
pub mod selftest;
pub mod train;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::orchestrator::{MoveTo, WorkerCommand};
use crate::report::Format;

/// Profile LoRA/QLoRA fine-tuning: tokens/s, peak memory and J/token across a grid.
#[derive(Debug, Parser)]
#[command(name = "lorascope", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run one LoRA fine-tuning run (the worker the sweep orchestrator launches).
    Train(Box<train::TrainArgs>),
    #[command(flatten)]
    Sweep(SweepCommand),
    /// Maintenance checks of the engine and its CUDA kernels (hidden).
    #[command(hide = true)]
    Selftest {
        #[command(subcommand)]
        what: Selftest,
    },
}

/// `lorascope selftest ...`.
#[derive(Debug, Subcommand)]
pub enum Selftest {
    /// The engine on a device against the CPU path on the tiny preset: logits and adapter
    /// gradients in fp16/bf16, dense and NF4, with and without checkpointing. With
    /// `--fixtures DIR`: every transformers + PEFT fixture case instead (one line per case and
    /// variant).
    Engine {
        /// Device under test (cuda:N, or cpu for the CPU half-precision paths).
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// Directory of transformers fixtures (`tests/fixtures/hf`, written by
        /// scripts/make_hf_fixtures.py): compare every case with transformers and PEFT.
        #[arg(long, value_name = "DIR")]
        fixtures: Option<std::path::PathBuf>,
        /// With --fixtures: only these cases (comma-separated directory names).
        #[arg(long, value_name = "LIST", requires = "fixtures")]
        cases: Option<String>,
    },
    /// Fused optimizer kernels (unpaged and paged) and the gradient norm against the CPU
    /// code: prints the largest error per case and exits 1 if any case is beyond tolerance or
    /// its state is placed wrongly. CUDA builds only.
    Optim {
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Updates per case.
        #[arg(long, default_value_t = 20)]
        steps: usize,
    },
}

/// Sweep subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SweepCommand {
    /// Run every point of a profile's grid and print the comparison table.
    Run(RunArgs),
    /// Print the comparison table of a recorded sweep.
    Report(ReportArgs),
    /// Browse a recorded sweep in the dashboard, read-only (table, detail, chart views).
    View {
        /// Sweep id (default: the latest sweep; `lorascope report --list` lists them).
        #[arg(long)]
        sweep: Option<i64>,
        /// Results database.
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
    },
    /// Predict every point's peak memory (VRAM or host RAM) and whether it fits its limit.
    Estimate {
        /// The profile (TOML).
        profile: PathBuf,
        /// One JSON object per point instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Profile tools.
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Run the background daemon that owns queued sweeps (foreground; `stop` stops it).
    Daemon(DaemonArgs),
    /// The dashboard as a client of the daemon; q or D detaches, the sweep keeps running.
    Attach {
        /// Print the daemon's replay and events as JSON lines instead of the dashboard.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// What the daemon is running: the sweep, each device's run, the queue.
    Status {
        /// The daemon's status report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Change the daemon's queue: pause, resume, move, skip, cancel, retry.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Wait until a sweep (default: every queued sweep) has finished on the daemon.
    Wait {
        /// Sweep id (as printed by `run --detach` and `status`).
        sweep: Option<i64>,
        /// The sweep's results database, when the same id is queued from several.
        #[arg(long, requires = "sweep")]
        db: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// The results database when `--db` is not given.
pub const DEFAULT_DB: &str = "lorascope.db";

/// `--socket`, shared by the daemon verbs.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArg {
    /// The daemon's socket (default: $LORASCOPE_RUNTIME_DIR, else $XDG_RUNTIME_DIR/lorascope,
    /// then lorascope.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl SocketArg {
    /// `--socket`, else the default socket in the runtime directory.
    pub fn path(&self) -> PathBuf {
        crate::daemon::socket_path(self.socket.as_deref())
    }
}

/// `lorascope daemon`.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    #[command(subcommand)]
    pub action: Option<DaemonAction>,
    #[command(flatten)]
    pub socket: SocketArg,
    /// Worker program instead of this executable (tests); also `$LORASCOPE_WORKER`.
    #[arg(long, hide = true)]
    pub worker: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when a run is cancelled or interrupted.
    #[arg(long, default_value_t = 5.0, hide = true)]
    pub grace_secs: f64,
}

/// `lorascope daemon ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DaemonAction {
    /// Stop the daemon: interrupt the running runs (they run again at the next start), or
    /// with --finish let them finish first. Waits until the daemon has exited.
    Stop {
        /// Start nothing new and stop once the running runs have finished.
        #[arg(long)]
        finish: bool,
    },
}

/// `lorascope queue ...`: the orchestrator's commands for the daemon's running sweep.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum QueueAction {
    /// Start nothing new (running runs continue).
    Pause,
    /// Start runs again.
    Resume,
    /// Move a queued run.
    Move {
        /// The run's id (see `lorascope status`).
        id: String,
        #[arg(value_enum)]
        to: MoveTo,
    },
    /// Drop a queued run (recorded `skipped`).
    Skip { id: String },
    /// Stop a running run (recorded `cancelled`), or skip a queued one.
    Cancel { id: String },
    /// Queue a finished run again.
    Retry { id: String },
}

/// `lorascope run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The profile (TOML), e.g. profiles/h200-grid.toml. Without one, the embedded quick-start
    /// profile runs (CPU, tiny preset, bundled sample).
    pub profile: Option<PathBuf>,
    /// Progress lines on stderr instead of the dashboard (automatic when stdin or stdout is
    /// not a terminal).
    #[arg(long)]
    pub headless: bool,
    /// Continue this profile's latest sweep: skip points whose latest run finished
    /// (ok, oom, failed, cancelled), re-run interrupted and skipped ones.
    #[arg(long)]
    pub resume: bool,
    /// With --resume, also re-run failed and cancelled points.
    #[arg(long, requires = "resume")]
    pub retry_failed: bool,
    /// Results database.
    #[arg(long, default_value = "lorascope.db")]
    pub db: PathBuf,
    /// Worker program instead of this executable (tests); also `$LORASCOPE_WORKER`.
    #[arg(long, hide = true)]
    pub worker: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when a run is cancelled.
    #[arg(long, default_value_t = 5.0, hide = true)]
    pub grace_secs: f64,
    /// Queue the sweep on the background daemon (started if none runs) and return; watch
    /// it with `lorascope attach`, `status` or `wait`.
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// `lorascope report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Sweep id (default: the latest sweep).
    #[arg(long)]
    pub sweep: Option<i64>,
    /// Results database.
    #[arg(long, default_value = "lorascope.db")]
    pub db: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// The chart of `--format svg|png`.
    #[arg(long, value_enum, default_value_t = crate::report::ChartKind::Pareto)]
    pub chart: crate::report::ChartKind,
    /// Write to this file instead of stdout (needed for `--format png`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Width of `--format table`, characters, at least 20 (no line is longer); default: the
    /// terminal's width on a terminal, else 120.
    #[arg(long, value_parser = clap::value_parser!(u16).range(20..))]
    pub width: Option<u16>,
    /// List the recorded sweeps instead.
    #[arg(long, conflicts_with = "sweep")]
    pub list: bool,
}

/// `lorascope profile ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ProfileCommand {
    /// Validate a profile and print its expanded grid with ids.
    Check {
        /// The profile (TOML).
        profile: PathBuf,
        /// Also print each point's worker command line (`train ... --json`).
        #[arg(long)]
        argv: bool,
    },
}

/// Parses the process's arguments, runs the subcommand and returns the exit status: 0 ok,
/// 1 an error (printed as one line on stderr), 128 + a signal's number for a sweep that
/// signal interrupted ([`run::Interrupted`]); `train` and `selftest` have their own codes.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Commands::Train(args) => train::run(&args),
        Commands::Selftest { what } => selftest::run(what),
        Commands::Sweep(cmd) => match execute(cmd) {
            Ok(()) => 0,
            // The reader went away (`lorascope report | head`): nothing left to tell anyone.
            Err(e) if is_broken_pipe(&e) => 0,
            Err(e) => {
                let code = e
                    .downcast_ref::<run::Interrupted>()
                    .map_or(1, run::Interrupted::exit_code);
                // One line for people: the context chain joined, no backtrace.
                let msg = format!("{e:#}");
                // Not eprintln!: stderr may be a terminal that hung up.
                let _ = writeln!(
                    std::io::stderr(),
                    "error: {}",
                    msg.lines().next().unwrap_or("unknown error")
                );
                code
            }
        },
    }
}

/// Runs a sweep subcommand. Errors are meant to be printed on one line (`{:#}`).
pub fn execute(cmd: SweepCommand) -> Result<()> {
    match cmd {
        SweepCommand::Run(args) => run::run(args),
        SweepCommand::Report(args) => commands::report::run(&args),
        SweepCommand::View { sweep, db } => commands::view::run(&db, sweep),
        SweepCommand::Profile {
            command: ProfileCommand::Check { profile, argv },
        } => commands::profile::check(&profile, argv),
        SweepCommand::Estimate { profile, json } => commands::estimate::run(&profile, json),
        SweepCommand::Daemon(args) => commands::daemon::run(args),
        SweepCommand::Attach { json, socket } => attach::run(&socket.path(), json),
        SweepCommand::Status { json, socket } => commands::status::run(&socket.path(), json),
        SweepCommand::Queue { action, socket } => commands::queue::run(&socket.path(), &action),
        SweepCommand::Wait { sweep, db, socket } => commands::wait::run(&socket.path(), sweep, db),
    }
}

/// Whether an error comes from writing to a closed pipe (directly, or through serde_json).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(BrokenPipe))
    })
}

/// A single-threaded runtime for the daemon's clients.
fn client_rt() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `--grace-secs` as a duration, clamped to [0, 3600] s (5 s when not a number).
fn grace(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.clamp(0.0, 3600.0)).unwrap_or(Duration::from_secs(5))
}

/// The worker to launch: `--worker`, else [`WorkerCommand::from_env`] (`$LORASCOPE_WORKER`,
/// else this executable).
fn worker_command(explicit: Option<PathBuf>) -> Result<WorkerCommand> {
    match explicit {
        Some(program) => Ok(WorkerCommand { program }),
        None => WorkerCommand::from_env().context("cannot locate the lorascope executable"),
    }
}

/// Whether a test worker stands in for the engine (`--worker` or `$LORASCOPE_WORKER`): then
/// the engine's preflight checks are skipped.
fn worker_overridden(explicit: Option<&std::path::Path>) -> bool {
    explicit.is_some() || std::env::var_os("LORASCOPE_WORKER").is_some_and(|w| !w.is_empty())
}
