//! The sweep half of the command line: `run`, `report` and `profile check`.
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

use crate::grid::{self, RunSpec};
use crate::orchestrator::{
    self, Command, Event, OrchestratorConfig, PlannedRun, SweepPlan, WorkerCommand,
};
use crate::profile::{self, Device};
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
    }
}

fn check(path: &Path, argv: bool) -> Result<()> {
    let lp = profile::load(path)?;
    let specs = grid::expand(&lp);
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

fn plan_runs(
    specs: &[RunSpec],
    repeats: u32,
    done: &dyn Fn(&RunSpec, u32) -> bool,
) -> (Vec<PlannedRun>, usize) {
    let mut runs = Vec::new();
    let mut already = 0;
    // Repeat-major: every point once, then every point again (spreads drift over repeats).
    for repeat in 0..repeats {
        for (i, s) in specs.iter().enumerate() {
            if done(s, repeat) {
                already += 1;
            } else {
                runs.push(PlannedRun {
                    spec_index: i,
                    repeat,
                });
            }
        }
    }
    (runs, already)
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
    let lp = match &args.profile {
        Some(p) => profile::load(p)?,
        None => profile::load_embedded()?,
    };
    let specs = grid::expand(&lp);
    if args.worker.is_none() {
        // Only the real engine has these constraints (test workers stand in for it).
        preflight(&lp)?;
    }
    let repeats = lp.profile.run.repeats;
    let devices: Vec<Device> = lp
        .profile
        .run
        .devices
        .iter()
        .filter_map(|d| Device::parse(d))
        .collect();
    let profile_key = std::fs::canonicalize(&lp.path)
        .unwrap_or_else(|_| lp.path.clone())
        .display()
        .to_string();
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
            let (runs, already) = plan_runs(&specs, repeats, &|s: &RunSpec, r: u32| {
                statuses
                    .get(&(s.id.clone(), r))
                    .is_some_and(|st| st.is_finished(args.retry_failed))
            });
            if interrupted > 0 {
                eprintln!(
                    "resuming sweep {}: {interrupted} interrupted run(s) will be re-run",
                    sw.id
                );
            }
            (sw.id, runs, already)
        }
        None => {
            if args.resume {
                eprintln!(
                    "no earlier sweep of {}: starting a new one",
                    lp.path.display()
                );
            }
            let id = store.create_sweep(&lp.name(), &profile_key, &lp.source)?;
            let (runs, already) = plan_runs(&specs, repeats, &|_, _| false);
            (id, runs, already)
        }
    };

    let worker = match args.worker.clone() {
        Some(program) => WorkerCommand { program },
        None => WorkerCommand::from_env().context("cannot locate the lorascope executable")?,
    };
    let cfg = OrchestratorConfig {
        worker,
        grace: Duration::try_from_secs_f64(args.grace_secs.clamp(0.0, 3600.0))
            .unwrap_or(Duration::from_secs(5)),
        telemetry_period: crate::telemetry::SAMPLE_PERIOD,
    };
    let plan = SweepPlan {
        sweep_id,
        specs,
        repeats,
        runs,
        already_done,
        devices,
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

/// Checks, before any run starts, what would make every point fail the same way: a missing
/// data file, or CUDA devices in a build without CUDA.
fn preflight(lp: &profile::LoadedProfile) -> Result<()> {
    let data = &lp.profile.data.path;
    if data != "sample" {
        let p = lp.base_dir.join(data);
        if !p.exists() {
            bail!(
                "{}: data.path `{data}` not found (resolved to {}; paths are relative to the profile)",
                lp.path.display(),
                p.display()
            );
        }
    }
    let wants_cuda = lp.profile.run.devices.iter().any(|d| d.starts_with("cuda"));
    if wants_cuda && !candle_core::utils::cuda_is_available() {
        bail!(
            "{}: run.devices asks for a GPU but this lorascope was built without CUDA; rebuild with `cargo build --release --features cuda` or use devices = [\"cpu\"]",
            lp.path.display()
        );
    }
    Ok(())
}
