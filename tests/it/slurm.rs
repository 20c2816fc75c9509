//! The Slurm backend end to end against the real one-node test cluster (`tests/slurm/up.sh`,
//! see tests/slurm/README.md): the quick-start grid as one array (4 CPU points, `%2`), paused
//! (held) and resumed (released), one pending task cancelled, the orchestrator killed (its
//! sweep dropped mid-flight, nothing cleaned up, as `kill -9` leaves it) and the sweep resumed
//! with `lorascope run --resume`, which follows the recorded tasks instead of submitting
//! them again. Runs when `LORASCOPE_SLURM=1` (set by .ci/run after up.sh); otherwise it says
//! why on stderr and returns.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command as Proc;
use std::time::{Duration, Instant};

use lorascope::orchestrator::{
    Command, Event, OrchestratorConfig, SweepPlan, WorkerCommand, backend, plan_runs, run_sweep,
};
use lorascope::store::Store;
use lorascope::summary::RunStatus;
use tokio::sync::mpsc;

/// Whether the test cluster is up; prints the reason when not.
fn cluster_up() -> bool {
    if std::env::var("LORASCOPE_SLURM").as_deref() == Ok("1") {
        return true;
    }
    let why = std::env::var("LORASCOPE_SLURM_SKIP_REASON")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "LORASCOPE_SLURM not set: run tests/slurm/up.sh".into());
    eprintln!("SLURM TEST SKIPPED: {why}");
    false
}

/// Cancels the arrays a test submitted, however it ends.
struct Scancel(BTreeSet<String>);

impl Drop for Scancel {
    fn drop(&mut self) {
        for a in &self.0 {
            let _ = Proc::new("scancel").arg(a).status();
        }
    }
}

/// Steps per point: enough that, in an optimised build, tasks are still running when the
/// first ok result and the cancellation are in (the kill must find tasks in flight).
const STEPS: usize = 120;

fn profile(workdir: &Path) -> String {
    let q = include_str!("../../profiles/quickstart.toml")
        .replace("steps = 30", &format!("steps = {STEPS}"))
        .replace(
            "devices = [\"cpu\"]",
            "devices = [\"cpu\"]\nbackend = \"slurm\"",
        );
    format!(
        "{q}\n[slurm]\ngres = \"\"\narray_parallelism = 2\ntime = \"10\"\nworkdir = {:?}\n",
        workdir.display().to_string()
    )
}

/// squeue's reason for each pending task of `array`.
fn pending_reasons(array: &str) -> Vec<(String, String)> {
    let o = Proc::new("squeue")
        .args(["-h", "-r", "-t", "PD", "-j", array, "-o", "%i|%r"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn quickstart_grid_through_slurm_pause_cancel_kill_resume() {
    if !cluster_up() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.toml");
    std::fs::write(&path, profile(&dir.path().join("work"))).unwrap();
    let db = dir.path().join("l.db");
    let lp = lorascope::profile::load(&path).unwrap();
    let specs = lorascope::grid::expand(&lp);
    assert_eq!(specs.len(), 4);
    let backend = backend::for_profile(&lp.profile, "q", &lp.base_dir, &db, 4).unwrap();
    let key = lorascope::orchestrator::preflight::profile_key(&lp);
    let mut store = Store::open(&db).unwrap();
    let sweep_id = store.create_sweep("q", &key, &lp.source).unwrap();
    let (runs, _) = plan_runs(4, 1, |_, _| None);
    let plan = SweepPlan {
        sweep_id,
        specs: specs.clone(),
        repeats: 1,
        runs,
        already_done: 0,
        devices: vec![lorascope::spec::Device::Cpu],
        finished: vec![],
        backend,
    };
    let cfg = OrchestratorConfig {
        worker: WorkerCommand {
            program: env!("CARGO_BIN_EXE_lorascope").into(),
        },
        grace: Duration::from_secs(1),
        telemetry_period: Duration::from_millis(100),
        context_cache: None,
    };
    let mut arrays = Scancel(BTreeSet::new());
    let cancel_id = specs[3].id.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let finished_before_kill = rt.block_on(async {
        let (ctx, crx) = mpsc::unbounded_channel::<Command>();
        let (etx, mut erx) = mpsc::unbounded_channel::<Event>();
        let sweep = run_sweep(plan, &mut store, &cfg, crx, etx);
        tokio::pin!(sweep);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
        let mut submitted = 0;
        let mut paused_checked = false;
        let mut finished: Vec<(String, RunStatus)> = Vec::new();
        loop {
            tokio::select! {
                // Events first: on a loaded machine the last tasks can end within one poll, and
                // their RunFinished events must be handled before the sweep's own end.
                biased;
                ev = erx.recv() => match ev.expect("events") {
                    Event::RunStarted { device, .. } if device.starts_with("slurm ") => {
                        let k = device.trim_start_matches("slurm ");
                        arrays.0.insert(k.split('_').next().unwrap().to_string());
                        submitted += 1;
                        if submitted == 4 {
                            assert_eq!(arrays.0.len(), 1, "one array for the sweep");
                            ctx.send(Command::Pause).unwrap();
                        }
                    }
                    Event::QueueChanged { queue } if queue.paused && !paused_checked => {
                        paused_checked = true;
                        let array = arrays.0.iter().next().unwrap().clone();
                        let held = pending_reasons(&array);
                        assert!(
                            held.iter().all(|(_, r)| r.starts_with("JobHeld")),
                            "pending tasks held: {held:?}"
                        );
                        ctx.send(Command::Cancel { id: cancel_id.clone() }).unwrap();
                        ctx.send(Command::Resume).unwrap();
                    }
                    Event::RunFinished { id, summary, .. } => {
                        finished.push((id, summary.status.unwrap()));
                        let ok = finished.iter().any(|(_, s)| *s == RunStatus::Ok);
                        let cancelled = finished.iter().any(|(i, _)| *i == cancel_id);
                        if ok && cancelled {
                            // Kill the orchestrator: drop the sweep with tasks in flight.
                            break finished;
                        }
                    }
                    _ => {}
                },
                r = &mut sweep => {
                    // Events sent in the sweep's last poll are still queued: name them too.
                    while let Ok(ev) = erx.try_recv() {
                        if let Event::RunFinished { id, summary, .. } = ev {
                            finished.push((id, summary.status.unwrap()));
                        }
                    }
                    panic!("the sweep ended before the kill (every task finished first: make the points longer): {r:?} after {finished:?}")
                }
                _ = tokio::time::sleep_until(deadline) => panic!("timed out; finished {finished:?}"),
            }
        }
    });
    drop(rt);
    drop(store);
    assert!(
        finished_before_kill.contains(&(cancel_id.clone(), RunStatus::Cancelled)),
        "{finished_before_kill:?}"
    );
    let array = arrays.0.iter().next().unwrap().clone();
    assert!(
        pending_reasons(&array)
            .iter()
            .all(|(_, r)| !r.starts_with("JobHeld"))
    );

    // A new orchestrator: follows the tasks still on Slurm, submits nothing again.
    let t0 = Instant::now();
    let out = Proc::new(env!("CARGO_BIN_EXE_lorascope"))
        .args([
            "run",
            path.to_str().unwrap(),
            "--resume",
            "--headless",
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("still on Slurm"), "re-attached: {stderr}");
    assert!(t0.elapsed() < Duration::from_secs(240));

    let store = Store::open(&db).unwrap();
    let rows = store.runs(sweep_id).unwrap();
    let by_spec: Vec<(String, RunStatus)> =
        rows.iter().map(|r| (r.spec_id.clone(), r.status)).collect();
    assert_eq!(
        rows.len(),
        4,
        "one row per point, none lost or duplicated: {by_spec:?}"
    );
    for s in &specs {
        let st: Vec<RunStatus> = rows
            .iter()
            .filter(|r| r.spec_id == s.id)
            .map(|r| r.status)
            .collect();
        let want = if s.id == cancel_id {
            RunStatus::Cancelled
        } else {
            RunStatus::Ok
        };
        assert_eq!(st, vec![want], "{}: {by_spec:?}", s.id);
    }
    for r in rows.iter().filter(|r| r.status == RunStatus::Ok) {
        assert!(
            r.device.starts_with("vm (slurm ") || r.device.contains("(slurm "),
            "{}",
            r.device
        );
        assert!(
            store.steps(r.id).unwrap().len() == STEPS,
            "all steps ingested once"
        );
        assert!(
            store.telemetry_count(r.id).unwrap() > 0,
            "the worker's own samples"
        );
        assert!(
            r.summary
                .as_ref()
                .and_then(|s| s.tokens_per_s)
                .is_some_and(|t| t > 0.0)
        );
    }
    // Still one array: the resume submitted nothing.
    let names = Proc::new("sacct")
        .args(["-n", "-X", "-P", "-j", &array, "-o", "JobID"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&names.stdout).lines().count(), 4);
}

/// Errors before anything is recorded: a partition that does not exist, a refused option.
#[test]
fn slurm_refusals_are_one_line_before_any_point() {
    if !cluster_up() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = profile(&dir.path().join("work"));
    for (extra, want) in [
        (
            "partition = \"nosuchpart\"\n",
            "Slurm partition `nosuchpart` does not exist",
        ),
        (
            "extra_args = [\"--time=abc\"]\n",
            "Slurm refuses the submission: sbatch: error: Invalid --time specification",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        let db = dir.path().join("bad.db");
        let out = Proc::new(env!("CARGO_BIN_EXE_lorascope"))
            .args(["run", path.to_str().unwrap(), "--headless", "--db"])
            .arg(&db)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(&format!("error: {want}")), "{stderr}");
        assert!(!db.exists(), "nothing recorded");
    }
}
