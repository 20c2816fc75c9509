//! The sweep half of the command line: `run`, `report`, `profile check`, and the daemon
//! verbs (`daemon`, `attach`, `status`, `queue`, `wait`; see [`crate::daemon`]).
//! `main.rs` flattens [`SweepCommand`] into its subcommands and calls [`execute`].
//!
//! `run` prints progress lines to stderr and the comparison table to stdout, so
//! `lorascope run p.toml > table.txt` keeps the table alone. Ctrl-C stops the runs in flight
//! (recorded `interrupted`) and exits non-zero; `--resume` continues.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

use crate::daemon::client::Client;
use crate::daemon::protocol::{ClientMsg, ServerMsg};
use crate::grid;
use crate::orchestrator::preflight::{self, load_profile, preflight, profile_key};
use crate::orchestrator::{
    self, Command, Event, OrchestratorConfig, SweepPlan, WorkerCommand, plan_runs,
};
use crate::profile;
use crate::report::{self, Format};
use crate::store::Store;
use crate::summary::RunStatus;

/// Sweep subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SweepCommand {
    /// Run every point of a profile's grid and print the comparison table.
    Run(RunArgs),
    /// Print the comparison table of a recorded sweep.
    Report(ReportArgs),
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

/// `--socket`, shared by the daemon verbs.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArg {
    /// The daemon's socket (default: $LORASCOPE_RUNTIME_DIR, else $XDG_RUNTIME_DIR/lorascope,
    /// then lorascope.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl SocketArg {
    fn path(&self) -> PathBuf {
        crate::daemon::client::socket_or_default(self.socket.as_ref())
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

/// Where `queue move` puts a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MoveArg {
    Up,
    Down,
    Top,
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
        to: MoveArg,
    },
    /// Drop a queued run (recorded `skipped`).
    Skip { id: String },
    /// Stop a running run (recorded `cancelled`), or skip a queued one.
    Cancel { id: String },
    /// Queue a finished run again.
    Retry { id: String },
}

impl QueueAction {
    /// The orchestrator command.
    pub fn command(&self) -> Command {
        match self.clone() {
            QueueAction::Pause => Command::Pause,
            QueueAction::Resume => Command::Resume,
            QueueAction::Move { id, to } => Command::Move {
                id,
                to: match to {
                    MoveArg::Up => orchestrator::MoveTo::Up,
                    MoveArg::Down => orchestrator::MoveTo::Down,
                    MoveArg::Top => orchestrator::MoveTo::Top,
                },
            },
            QueueAction::Skip { id } => Command::Skip { id },
            QueueAction::Cancel { id } => Command::Cancel { id },
            QueueAction::Retry { id } => Command::Retry { id },
        }
    }
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

/// Runs a sweep subcommand. Errors are meant to be printed on one line (`{:#}`).
pub fn execute(cmd: SweepCommand) -> Result<()> {
    match cmd {
        SweepCommand::Run(args) => run(args),
        SweepCommand::Report(args) => report_cmd(args),
        SweepCommand::Profile {
            command: ProfileCommand::Check { profile, argv },
        } => check(&profile, argv),
        SweepCommand::Daemon(args) => daemon_cmd(args),
        SweepCommand::Attach { json, socket } => {
            let socket = socket.path();
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::io::IsTerminal::is_terminal(&std::io::stdin());
            if !json && !terminal {
                anyhow::bail!(
                    "attach: the dashboard needs a terminal on stdin and stdout; use `lorascope attach --json` (events as JSON lines) or `lorascope status`"
                );
            }
            client_rt()?.block_on(async {
                if json {
                    crate::daemon::client::attach_json(&socket).await
                } else {
                    crate::daemon::client::attach_dashboard(&socket).await
                }
            })
        }
        SweepCommand::Status { json, socket } => status_cmd(&socket.path(), json),
        SweepCommand::Queue { action, socket } => {
            let socket = socket.path();
            let command = action.command();
            client_rt()?.block_on(async {
                let mut c = Client::connect(&socket).await?;
                c.request(&ClientMsg::Command { command }).await?;
                Ok(())
            })
        }
        SweepCommand::Wait { sweep, db, socket } => {
            let socket = socket.path();
            let db = db.map(|p| crate::daemon::db_path(&p));
            client_rt()?.block_on(async {
                let mut c = Client::connect(&socket).await?;
                c.send(&ClientMsg::Wait { sweep, db }).await?;
                let what = sweep
                    .map(|s| format!("sweep {s}"))
                    .unwrap_or_else(|| "the queued sweeps".into());
                match c.reply_unbounded().await? {
                    Some(ServerMsg::Done {
                        complete, message, ..
                    }) => {
                        if !complete {
                            bail!("{message}");
                        }
                        println!("{message}");
                        Ok(())
                    }
                    Some(other) => bail!(
                        "unexpected reply from the daemon: {}",
                        crate::daemon::client::kind(&other)
                    ),
                    None => bail!(
                        "the daemon stopped before {what} finished; start it again (`lorascope daemon`) to continue"
                    ),
                }
            })
        }
    }
}

fn client_rt() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn grace(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.clamp(0.0, 3600.0)).unwrap_or(Duration::from_secs(5))
}

fn daemon_cmd(args: DaemonArgs) -> Result<()> {
    let socket = args.socket.path();
    match args.action {
        Some(DaemonAction::Stop { finish }) => client_rt()?.block_on(async {
            let mut c = Client::connect(&socket).await?;
            let pid = c.pid;
            match c.request(&ClientMsg::Stop { finish }).await? {
                ServerMsg::Ok { message } => eprintln!("daemon (pid {pid}): {message}"),
                other => bail!(
                    "unexpected reply from the daemon: {}",
                    crate::daemon::client::kind(&other)
                ),
            }
            // The daemon closes every connection as it exits.
            while c.recv().await.ok().flatten().is_some() {}
            eprintln!("daemon (pid {pid}) stopped");
            Ok(())
        }),
        None => {
            let overridden = args.worker.is_some()
                || std::env::var_os("LORASCOPE_WORKER").is_some_and(|w| !w.is_empty());
            let worker = match args.worker {
                Some(program) => WorkerCommand { program },
                None => {
                    WorkerCommand::from_env().context("cannot locate the lorascope executable")?
                }
            };
            crate::daemon::server::run(crate::daemon::server::DaemonOptions {
                socket,
                state_dir: crate::daemon::state_dir(),
                worker,
                worker_overridden: overridden,
                grace: grace(args.grace_secs),
            })
        }
    }
}

fn status_cmd(socket: &Path, json: bool) -> Result<()> {
    let report = client_rt()?.block_on(async {
        let mut c = Client::connect(socket).await?;
        match c.request(&ClientMsg::Status).await? {
            ServerMsg::Status(r) => Ok(r),
            other => bail!(
                "unexpected reply from the daemon: {}",
                crate::daemon::client::kind(&other)
            ),
        }
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

fn hms(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// `lorascope status` for people.
pub fn render_status(r: &crate::daemon::protocol::StatusReport) -> String {
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

/// `lorascope run --detach`: queue the sweep on the daemon, starting one if none answers.
fn run_detached(args: &RunArgs) -> Result<()> {
    // Fail here, on the terminal, for what would fail in the daemon.
    let lp = load_profile(args.profile.as_deref())?;
    let overridden = args.worker.is_some()
        || std::env::var_os("LORASCOPE_WORKER").is_some_and(|w| !w.is_empty());
    if !overridden {
        preflight(&lp)?;
    }
    let socket = args.socket.path();
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let submit = crate::daemon::protocol::Submit {
        profile: args.profile.as_deref().map(abs),
        db: crate::daemon::db_path(&args.db),
        resume: args.resume,
        retry_failed: args.retry_failed,
    };
    let rt = client_rt()?;
    let mut started = None;
    let mut client = match rt.block_on(Client::connect(&socket)) {
        Ok(c) => c,
        Err(_) => {
            let mut extra: Vec<std::ffi::OsString> =
                vec!["--grace-secs".into(), args.grace_secs.to_string().into()];
            if let Some(w) = &args.worker {
                extra.push("--worker".into());
                extra.push(abs(w).into());
            }
            started = Some(crate::daemon::client::spawn_daemon(&socket, &extra)?);
            rt.block_on(Client::connect(&socket))?
        }
    };
    let reply = rt.block_on(client.request(&ClientMsg::Submit(Box::new(submit))))?;
    let ServerMsg::Submitted { sweep_id, position } = reply else {
        bail!(
            "unexpected reply from the daemon: {}",
            crate::daemon::client::kind(&reply)
        );
    };
    let mut out = std::io::stdout().lock();
    let daemon = match started {
        Some(pid) => format!("a new daemon (pid {pid})"),
        None => format!("the daemon (pid {})", client.pid),
    };
    let when = if position == 0 {
        "starts now".to_string()
    } else {
        format!("starts after {position} other sweep(s)")
    };
    writeln!(
        out,
        "sweep {sweep_id} ({}) queued on {daemon}; it {when}. Watch: `lorascope attach` (q detaches), `lorascope status`, `lorascope wait {sweep_id}`",
        lp.name()
    )?;
    Ok(())
}

fn check(path: &Path, argv: bool) -> Result<()> {
    let lp = profile::load(path)?;
    let specs = grid::expand(&lp);
    preflight::model_and_data(&lp, &specs)?;
    let p = &lp.profile;
    let model = p
        .model
        .preset
        .as_ref()
        .map(|m| format!("preset {m}"))
        .or_else(|| p.model.path.as_ref().map(|m| format!("path {m}")))
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: ok — {} ({}), data {}, {} steps ({} warm-up), {} point(s) x {} repeat(s) on {}",
        path.display(),
        lp.name(),
        model,
        p.data.path,
        p.run.steps,
        p.run.warmup_steps,
        specs.len(),
        p.run.repeats,
        p.run.devices.join(", ")
    )?;
    writeln!(out, "{:>4}  {:<12}  point", "#", "id")?;
    for s in &specs {
        writeln!(out, "{:>4}  {:<12}  {}", s.index + 1, s.id, s.label())?;
        if argv {
            writeln!(out, "      lorascope {}", s.train_args().join(" "))?;
        }
    }
    Ok(())
}

fn open_store(db: &Path) -> Result<Store> {
    Ok(Store::open(db)?)
}

fn report_cmd(args: ReportArgs) -> Result<()> {
    if !args.db.exists() {
        bail!(
            "no results database at {} (run a sweep first, or pass --db)",
            args.db.display()
        );
    }
    let store = open_store(&args.db)?;
    if args.list {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{:>5}  {:<24}  {:>5}  state     profile",
            "sweep", "name", "runs"
        )?;
        for sw in store.sweeps()? {
            let runs = store.runs(sw.id)?.len();
            let state = if sw.finished_at.is_some() {
                "finished"
            } else {
                "partial "
            };
            writeln!(
                out,
                "{:>5}  {:<24}  {:>5}  {state}  {}",
                sw.id, sw.name, runs, sw.profile_path
            )?;
        }
        return Ok(());
    }
    let sweep = match args.sweep {
        Some(id) => store
            .sweep(id)?
            .with_context(|| format!("no sweep {id} in {}", args.db.display()))?,
        None => store
            .latest_sweep()?
            .with_context(|| format!("no sweeps in {}", args.db.display()))?,
    };
    let rows = report::rows(&store.runs(sweep.id)?);
    let text = report::render(&rows, args.format);
    let mut out = std::io::stdout().lock();
    if args.format == Format::Table {
        writeln!(out, "sweep {} ({})", sweep.id, sweep.name)?;
    }
    out.write_all(text.as_bytes())?;
    Ok(())
}

/// Prints one progress line per few steps and one per finished run (to stderr).
struct Headless {
    steps: u32,
    every: u64,
    total: usize,
    started: usize,
    pos: HashMap<String, (usize, String)>,
}

impl Headless {
    fn on(&mut self, e: &Event) {
        let mut err = std::io::stderr().lock();
        match e {
            Event::SweepStarted {
                sweep_id,
                queued,
                already_done,
            } => {
                self.total = *queued;
                let _ = if *already_done > 0 {
                    writeln!(
                        err,
                        "sweep {sweep_id}: {queued} run(s) to go, {already_done} already done"
                    )
                } else {
                    writeln!(err, "sweep {sweep_id}: {queued} run(s)")
                };
            }
            Event::RunStarted {
                id, label, device, ..
            } => {
                self.started += 1;
                self.pos.insert(id.clone(), (self.started, label.clone()));
                let _ = writeln!(
                    err,
                    "[{}/{}] {id} {label}: started on {device}",
                    self.started, self.total
                );
            }
            Event::Step { id, record }
                if record.step % self.every == 0 || record.step == u64::from(self.steps) =>
            {
                let (n, label) = self.pos.get(id).cloned().unwrap_or_default();
                let tps = if record.step_seconds > 0.0 {
                    format!("{:.0} tok/s", record.tokens as f64 / record.step_seconds)
                } else {
                    "-".into()
                };
                let loss = record
                    .loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    err,
                    "[{n}/{}] {id} {label}: step {}/{}  loss {loss}  {tps}",
                    self.total, record.step, self.steps
                );
            }
            Event::Warning { id, message } => {
                let _ = writeln!(
                    err,
                    "warning{}: {message}",
                    id.as_ref().map(|i| format!(" ({i})")).unwrap_or_default()
                );
            }
            Event::RunFinished { id, summary: s, .. } => {
                let (n, label) = self.pos.get(id).cloned().unwrap_or_default();
                let status = s.status.unwrap_or(RunStatus::Failed);
                let detail = if status == RunStatus::Ok {
                    format!(
                        "{} tok/s, peak {}{}",
                        s.tokens_per_s
                            .map(|v| format!("{v:.1}"))
                            .unwrap_or_else(|| "-".into()),
                        report::human_bytes(s.peak_mem_bytes),
                        if s.peak_mem_kind.as_deref() == Some("rss") {
                            " RSS"
                        } else {
                            ""
                        }
                    )
                } else {
                    s.cause.clone().unwrap_or_default()
                };
                let _ = writeln!(
                    err,
                    "[{n}/{}] {id} {label}: {status} ({detail}; {:.1} s)",
                    self.total, s.wall_seconds
                );
            }
            Event::CommandRejected { command, reason } => {
                let _ = writeln!(err, "command {command:?} rejected: {reason}");
            }
            _ => {}
        }
    }
}

/// Runs the sweep with the dashboard on the terminal. If the dashboard ends first (the
/// terminal went away, a signal, a panic) the sweep is shut down; otherwise the dashboard
/// stays open after the sweep until the user quits.
#[allow(clippy::too_many_arguments)]
async fn run_with_dashboard(
    app: crate::ui::App,
    plan: SweepPlan,
    store: &mut Store,
    cfg: &OrchestratorConfig,
    ctx: mpsc::UnboundedSender<Command>,
    crx: mpsc::UnboundedReceiver<Command>,
    etx: mpsc::UnboundedSender<Event>,
    erx: mpsc::UnboundedReceiver<Event>,
) -> Result<orchestrator::SweepOutcome> {
    let mut ui = tokio::spawn(crate::ui::run(app, ctx.clone(), erx));
    let sweep = orchestrator::run_sweep(plan, store, cfg, crx, etx);
    tokio::pin!(sweep);
    let mut ui_result = None;
    let outcome = loop {
        tokio::select! {
            r = &mut sweep => break r,
            r = &mut ui, if ui_result.is_none() => {
                let _ = ctx.send(Command::Shutdown);
                ui_result = Some(r);
            }
        }
    };
    drop(ctx);
    let ui_result = match ui_result {
        Some(r) => r,
        None => ui.await,
    };
    // stderr may be a terminal that is gone: never panic on writing to it.
    match ui_result {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            let _ = writeln!(std::io::stderr(), "dashboard: {e}");
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "dashboard stopped: {e}");
        }
    }
    Ok(outcome?)
}

fn run(args: RunArgs) -> Result<()> {
    if args.detach {
        return run_detached(&args);
    }
    let lp = load_profile(args.profile.as_deref())?;
    let specs = grid::expand(&lp);
    if args.worker.is_none() {
        // Only the real engine has these constraints (test workers stand in for it).
        preflight(&lp)?;
    }
    let repeats = lp.profile.run.repeats;
    let devices = profile::resolve_devices(&lp.profile.run.devices)
        .map_err(|e| anyhow::anyhow!("{}: {e}", lp.path.display()))?;
    let profile_key = profile_key(&lp);
    let mut store = open_store(&args.db)?;

    let resumed = if args.resume {
        store.latest_sweep_for(&profile_key)?
    } else {
        None
    };
    let (sweep_id, runs, already_done) = match resumed {
        Some(sw) => {
            let interrupted = store.mark_interrupted(sw.id)?;
            let statuses = store.latest_statuses(sw.id)?;
            let (runs, finished) = plan_runs(specs.len(), repeats, |i, r| {
                statuses
                    .get(&(specs[i].id.clone(), r))
                    .copied()
                    .filter(|st| st.is_finished(args.retry_failed))
            });
            if interrupted > 0 {
                eprintln!(
                    "resuming sweep {}: {interrupted} interrupted run(s) will be re-run",
                    sw.id
                );
            }
            (sw.id, runs, finished.len())
        }
        None => {
            if args.resume {
                eprintln!(
                    "no earlier sweep of {}: starting a new one",
                    lp.path.display()
                );
            }
            let id = store.create_sweep(&lp.name(), &profile_key, &lp.source)?;
            let (runs, _) = plan_runs(specs.len(), repeats, |_, _| None);
            (id, runs, 0)
        }
    };

    let worker = match args.worker.clone() {
        Some(program) => WorkerCommand { program },
        None => WorkerCommand::from_env().context("cannot locate the lorascope executable")?,
    };
    let cfg = OrchestratorConfig {
        worker,
        grace: grace(args.grace_secs),
        telemetry_period: crate::telemetry::SAMPLE_PERIOD,
    };
    let plan = SweepPlan {
        sweep_id,
        specs,
        repeats,
        runs,
        already_done,
        devices,
        finished: vec![],
    };
    let steps = lp.profile.run.steps;
    let dashboard = !args.headless
        && std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::io::IsTerminal::is_terminal(&std::io::stdin());
    let app = dashboard.then(|| {
        let mut app = crate::ui::App::new(lp.name(), lp.profile.clone(), plan.specs.clone());
        app.mem_total = crate::ui::mem_total();
        app.color = crate::ui::Theme::from_env().color;
        app
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = rt.block_on(async {
        let (ctx, crx) = mpsc::unbounded_channel::<Command>();
        let (etx, mut erx) = mpsc::unbounded_channel::<Event>();
        if let Some(app) = app {
            return run_with_dashboard(app, plan, &mut store, &cfg, ctx, crx, etx, erx).await;
        }
        let ctrlc = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("interrupt: stopping the run in flight (Ctrl-C again to force)");
                    let _ = ctx.send(Command::Shutdown);
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                }
            })
        };
        let printer = tokio::spawn(async move {
            let mut h = Headless {
                steps,
                every: u64::from((steps / 4).max(1)),
                total: 0,
                started: 0,
                pos: HashMap::new(),
            };
            while let Some(e) = erx.recv().await {
                h.on(&e);
            }
        });
        let r = orchestrator::run_sweep(plan, &mut store, &cfg, crx, etx).await;
        ctrlc.abort();
        drop(ctx);
        let _ = printer.await;
        r.map_err(anyhow::Error::from)
    })?;
    if !outcome.shutdown {
        store.finish_sweep(sweep_id)?;
    }
    let rows = report::rows(&store.runs(sweep_id)?);
    let mut out = std::io::stdout().lock();
    writeln!(out, "sweep {sweep_id} ({})", lp.name())?;
    out.write_all(report::render(&rows, Format::Table).as_bytes())?;
    out.flush()?;
    if outcome.shutdown {
        bail!(
            "sweep {sweep_id} interrupted; continue with `lorascope run {} --resume`",
            lp.path.display()
        );
    }
    if !rows.is_empty() && rows.iter().all(|r| !r.status.starts_with("ok")) {
        bail!(
            "no point of sweep {sweep_id} finished ok; see each run's cause above (`lorascope report --sweep {sweep_id}`)"
        );
    }
    Ok(())
}
