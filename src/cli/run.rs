//! `lorascope run [PROFILE]`: the sweep runner. It expands the profile's grid, opens (or with
//! `--resume` continues) the sweep in the results database, runs it through the
//! orchestrator with the dashboard on a terminal or the [`Headless`] printer otherwise, and
//! prints the comparison table on stdout. `--detach` queues the sweep on the daemon instead.
//!
//! Progress goes to stderr and the table to stdout, so `lorascope run p.toml > table.txt`
//! keeps the table alone. Ctrl-C, SIGTERM or SIGHUP stop the runs in flight (recorded
//! `interrupted`) and exit 128 + the signal's number ([`Interrupted`]); `--resume` continues.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use super::headless::Headless;
use super::{RunArgs, client_rt, grace, worker_command, worker_overridden};
use crate::daemon::client::{Client, spawn_daemon};
use crate::daemon::protocol::Submit;
use crate::grid;
use crate::orchestrator::preflight::{load_profile, preflight, profile_key};
use crate::orchestrator::{
    self, Command, Event, OrchestratorConfig, SweepOutcome, SweepPlan, plan_runs,
};
use crate::report;
use crate::store::Store;

/// Runs the sweep of `args` (or queues it on the daemon with `--detach`).
///
/// Errors: the profile, its checks, its devices or the database fail; the sweep was
/// interrupted; or no point finished ok.
pub fn run(args: RunArgs) -> Result<()> {
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
    let devices = orchestrator::backend::devices(&lp.profile)
        .map_err(|e| anyhow::anyhow!("{}: {e}", lp.path.display()))?;
    // Slurm's checks come before anything is recorded.
    let mut backend = orchestrator::backend::for_profile(
        &lp.profile,
        &lp.name(),
        &lp.base_dir,
        &args.db,
        specs.len() * repeats as usize,
    )?;
    let profile_key = profile_key(&lp);
    let mut store = Store::open(&args.db)?;

    let resumed = if args.resume {
        store.latest_sweep_for(&profile_key)?
    } else {
        None
    };
    let resumed_at = resumed.as_ref().map(|sw| sw.started_at);
    let (sweep_id, runs, finished) = match resumed {
        Some(sw) => {
            let (interrupted, attached) =
                orchestrator::backend::resume_rows(&mut backend, &store, sw.id, &specs, repeats)?;
            if attached > 0 {
                eprintln!(
                    "resuming sweep {}: following {attached} task(s) still on Slurm",
                    sw.id
                );
            }
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
            if runs.is_empty() {
                let db = if args.db == Path::new(super::DEFAULT_DB) {
                    String::new()
                } else {
                    format!(" --db {}", args.db.display())
                };
                eprintln!(
                    "sweep {}: every point has a result, nothing to run (`lorascope view --sweep {}{db}` browses it; `--retry-failed` runs failed and cancelled points again)",
                    sw.id, sw.id
                );
            }
            (sw.id, runs, finished)
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
            (id, runs, vec![])
        }
    };
    let already_done = finished.len();

    let cfg = OrchestratorConfig {
        worker: worker_command(args.worker.clone())?,
        grace: grace(args.grace_secs),
        telemetry_period: crate::telemetry::SAMPLE_PERIOD,
        context_cache: Some(
            crate::daemon::state_dir().join(crate::orchestrator::fit::ContextCache::FILE),
        ),
    };
    let plan = SweepPlan {
        sweep_id,
        specs,
        repeats,
        runs,
        already_done,
        devices,
        // Shown in the queue and the table beside the new runs; never launched.
        finished,
        backend,
    };
    let steps = lp.profile.run.steps;
    let dashboard = !args.headless
        && std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::io::IsTerminal::is_terminal(&std::io::stdin());
    let app = match dashboard {
        false => None,
        true => {
            let mut app = crate::ui::App::new(lp.name(), lp.profile.clone(), plan.specs.clone());
            app.mem_total = crate::ui::mem_total();
            app.color = crate::ui::Theme::from_env().color;
            // A resumed sweep shows the results it already has.
            if let Some(t0) = resumed_at {
                let done: Vec<(usize, u32)> = plan
                    .finished
                    .iter()
                    .map(|(r, _)| (r.spec_index, r.repeat))
                    .collect();
                crate::ui::recorded::preload(&mut app, &store, sweep_id, t0, |i, r| {
                    done.contains(&(i, r))
                })?;
                app.now = 0.0;
            }
            Some(app)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (outcome, stopped_by) = rt.block_on(async {
        match app {
            Some(app) => Ok((run_with_dashboard(app, plan, &mut store, &cfg).await?, None)),
            None => run_headless(plan, &mut store, &cfg, steps).await,
        }
    })?;
    if !outcome.shutdown {
        store.finish_sweep(sweep_id)?;
    }
    let rows = report::rows(&store.runs(sweep_id)?);
    let table = report::Table::build(&rows, &report::TableOptions::default());
    let width = crate::cli::commands::report::default_width();
    let mut out = std::io::stdout().lock();
    let head = format!("sweep {sweep_id} ({})", lp.name());
    writeln!(out, "{}", report::table::cut(&head, width))?;
    out.write_all(table.render_text(width).as_bytes())?;
    out.flush()?;
    if outcome.shutdown {
        let by = match stopped_by {
            Some(libc::SIGTERM) => " by SIGTERM",
            Some(libc::SIGHUP) => " by SIGHUP",
            Some(_) => " by SIGINT",
            None => "",
        };
        return Err(Interrupted {
            sweep_id,
            profile: lp.path.display().to_string(),
            signal: stopped_by,
            by: by.into(),
        }
        .into());
    }
    if !rows.is_empty() && rows.iter().all(|r| !r.status.starts_with("ok")) {
        bail!(
            "no point of sweep {sweep_id} finished ok; see each run's cause above (`lorascope report --sweep {sweep_id}`)"
        );
    }
    Ok(())
}

/// A sweep stopped by a signal or the user before it finished: its runs in flight are
/// recorded `interrupted` and `--resume` continues it. The process exits
/// [`Interrupted::exit_code`].
#[derive(Debug, thiserror::Error)]
#[error("sweep {sweep_id} interrupted{by}; continue with `lorascope run {profile} --resume`")]
pub struct Interrupted {
    /// The sweep's id in the results database.
    pub sweep_id: i64,
    /// The profile as given (for the resume hint).
    pub profile: String,
    /// The signal number that stopped it (`None`: the dashboard was quit mid-sweep).
    pub signal: Option<i32>,
    /// ` by SIGTERM`, or empty.
    by: String,
}

impl Interrupted {
    /// The exit status: 128 + the signal's number, as a shell reports a process the signal
    /// killed (130 SIGINT, 143 SIGTERM, 129 SIGHUP); 130 when the dashboard was quit.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal.unwrap_or(libc::SIGINT)
    }
}

/// The signals that stop a headless sweep: SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`,
/// systemd, Slurm) and SIGHUP (the terminal or SSH session went away). SIGHUP is left alone
/// when it is ignored on entry (`nohup lorascope run ...` keeps running after logout).
struct StopSignals {
    int: Signal,
    term: Signal,
    hup: Option<Signal>,
}

impl StopSignals {
    /// Installs the handlers (from here on these signals no longer kill the process).
    ///
    /// Errors: a handler cannot be installed.
    fn install() -> std::io::Result<StopSignals> {
        let hup = if sighup_ignored() {
            None
        } else {
            Some(signal(SignalKind::hangup())?)
        };
        Ok(StopSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup,
        })
    }

    /// The next signal: its number and name.
    async fn next(&mut self) -> (i32, &'static str) {
        let StopSignals { int, term, hup } = self;
        let hup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = int.recv() => (libc::SIGINT, "SIGINT"),
            _ = term.recv() => (libc::SIGTERM, "SIGTERM"),
            _ = hup => (libc::SIGHUP, "SIGHUP"),
        }
    }
}

/// Whether SIGHUP's disposition is "ignore" (as `nohup` sets it).
fn sighup_ignored() -> bool {
    // SAFETY: a null `act` only reads the current disposition into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Runs the sweep with the [`Headless`] printer on stderr. The first SIGINT, SIGTERM or
/// SIGHUP shuts the sweep down (runs in flight are recorded `interrupted`) and is returned;
/// a second one exits at once (128 + its number).
async fn run_headless(
    plan: SweepPlan,
    store: &mut Store,
    cfg: &OrchestratorConfig,
    steps: u32,
) -> Result<(SweepOutcome, Option<i32>)> {
    let (ctx, crx) = mpsc::unbounded_channel::<Command>();
    let (etx, mut erx) = mpsc::unbounded_channel::<Event>();
    let signalled = Arc::new(AtomicI32::new(0));
    let watcher = {
        let ctx = ctx.clone();
        let signalled = signalled.clone();
        // Installed before the first worker starts: a signal from here on is ours.
        let mut signals = StopSignals::install().context("cannot install signal handlers")?;
        tokio::spawn(async move {
            let (sig, name) = signals.next().await;
            signalled.store(sig, Ordering::SeqCst);
            // Not eprintln!: stderr may be a terminal that hung up.
            let _ = writeln!(
                std::io::stderr(),
                "{name}: stopping the run in flight (a second signal exits at once)"
            );
            let _ = ctx.send(Command::Shutdown);
            let (sig, _) = signals.next().await;
            std::process::exit(128 + sig);
        })
    };
    let printer = tokio::spawn(async move {
        let mut h = Headless::new(steps);
        while let Some(e) = erx.recv().await {
            h.on(&e);
        }
    });
    let r = orchestrator::run_sweep(plan, store, cfg, crx, etx).await;
    watcher.abort();
    drop(ctx);
    let _ = printer.await;
    let sig = match signalled.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    };
    Ok((r?, sig))
}

/// Runs the sweep with the dashboard on the terminal. If the dashboard ends first (the
/// terminal went away, a signal, a panic) the sweep is shut down; otherwise the dashboard
/// stays open after the sweep until the user quits.
async fn run_with_dashboard(
    app: crate::ui::App,
    plan: SweepPlan,
    store: &mut Store,
    cfg: &OrchestratorConfig,
) -> Result<SweepOutcome> {
    let (ctx, crx) = mpsc::unbounded_channel::<Command>();
    let (etx, erx) = mpsc::unbounded_channel::<Event>();
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

/// `lorascope run --detach`: queue the sweep on the daemon, starting one if none answers.
fn run_detached(args: &RunArgs) -> Result<()> {
    // Fail here, on the terminal, for what would fail in the daemon.
    let lp = load_profile(args.profile.as_deref())?;
    if !worker_overridden(args.worker.as_deref()) {
        preflight(&lp)?;
    }
    let n_tasks = grid::expand(&lp).len() * lp.profile.run.repeats as usize;
    orchestrator::backend::for_profile(&lp.profile, &lp.name(), &lp.base_dir, &args.db, n_tasks)?;
    let socket = args.socket.path();
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let submit = Submit {
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
            started = Some(spawn_daemon(&socket, &extra)?);
            rt.block_on(Client::connect(&socket))?
        }
    };
    let (sweep_id, position) = rt.block_on(client.submit(submit))?;
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
    // Sweep ids are per database: `wait` needs the database unless it is the default one.
    let db = if args.db == Path::new(super::DEFAULT_DB) {
        String::new()
    } else {
        format!(" --db {}", args.db.display())
    };
    writeln!(
        out,
        "sweep {sweep_id} ({}) queued on {daemon}; it {when}. Watch: `lorascope attach` (q detaches), `lorascope status`, `lorascope wait {sweep_id}{db}`",
        lp.name()
    )?;
    Ok(())
}
