//! Retry and un-skip are kept: a run the user queued again (retry of a cancelled run,
//! un-skip of a skipped one) is recorded `queued` when the sweep is quit before it starts,
//! and `lorascope run --resume` runs it (real child processes: the fake worker).

use crate::common;

use std::time::Duration;

use lorascope::grid;
use lorascope::orchestrator::preflight::{load_profile, profile_key};
use lorascope::orchestrator::{
    Command, EntryState, Event, OrchestratorConfig, SweepPlan, WorkerCommand, plan_runs, run_sweep,
};
use lorascope::spec::Device;
use lorascope::store::Store;
use lorascope::summary::RunStatus;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_and_unskip_survive_quit_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let worker = common::fake_worker(dir.path(), 0.2);
    let path = dir.path().join("p.toml");
    std::fs::write(&path, common::profile(&[1, 2, 4], 2, "")).unwrap();
    let lp = load_profile(Some(&path)).unwrap();
    let specs = grid::expand(&lp);
    let ids: Vec<String> = specs.iter().map(|s| s.id.clone()).collect();
    let db = dir.path().join("r.db");
    let mut store = Store::open(&db).unwrap();
    // The sweep as `lorascope run p.toml` records it, so that `--resume` finds it.
    let sweep_id = store
        .create_sweep(&lp.name(), &profile_key(&lp), &lp.source)
        .unwrap();
    let (runs, _) = plan_runs(specs.len(), 1, |_, _| None);
    let plan = SweepPlan {
        sweep_id,
        specs,
        repeats: 1,
        runs,
        already_done: 0,
        devices: vec![Device::Cpu],
        finished: vec![],
        backend: Default::default(),
    };
    let cfg = OrchestratorConfig {
        worker: WorkerCommand {
            program: worker.clone(),
        },
        grace: Duration::from_millis(300),
        telemetry_period: Duration::from_millis(50),
        context_cache: None,
    };
    let (ctx, crx) = mpsc::unbounded_channel();
    let (etx, mut erx) = mpsc::unbounded_channel();
    // The last point is skipped before anything starts; the first is cancelled as it starts.
    ctx.send(Command::Skip { id: ids[2].clone() }).unwrap();
    let driver = async {
        let mut requeued = false;
        while let Some(e) = erx.recv().await {
            match &e {
                Event::RunStarted { id, .. } if *id == ids[0] && !requeued => {
                    ctx.send(Command::Cancel { id: id.clone() }).unwrap();
                }
                // What the dashboard's `r` and `s` send, then `q` once the queue shows them.
                Event::RunFinished { id, summary, .. }
                    if *id == ids[0] && summary.status == Some(RunStatus::Cancelled) =>
                {
                    ctx.send(Command::Pause).unwrap();
                    ctx.send(Command::Retry { id: ids[0].clone() }).unwrap();
                    ctx.send(Command::Retry { id: ids[2].clone() }).unwrap();
                    requeued = true;
                }
                Event::QueueChanged { queue }
                    if requeued
                        && [&ids[0], &ids[2]].iter().all(|id| {
                            queue
                                .entries
                                .iter()
                                .any(|e| &&e.id == id && e.state == EntryState::Queued)
                        }) =>
                {
                    // Later snapshots match too, once the sweep may have ended.
                    let _ = ctx.send(Command::Shutdown);
                }
                _ => {}
            }
        }
    };
    let (out, ()) = tokio::join!(run_sweep(plan, &mut store, &cfg, crx, etx), driver);
    assert!(out.unwrap().shutdown);
    let latest = store.latest_statuses(sweep_id).unwrap();
    assert_eq!(latest[&(ids[0].clone(), 0)], RunStatus::Queued);
    assert_eq!(latest[&(ids[2].clone(), 0)], RunStatus::Queued);
    let calls_before = common::calls(dir.path()).len();
    drop(store);

    // `--resume` runs both (and whatever the quit interrupted), and nothing else.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lorascope"))
        .arg("run")
        .arg(&path)
        .arg("--db")
        .arg(&db)
        .arg("--resume")
        .env("LORASCOPE_WORKER", &worker)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let calls = common::calls(dir.path());
    let resumed = &calls[calls_before..];
    assert!(resumed.contains(&"1 none".to_string()), "{resumed:?}");
    assert!(resumed.contains(&"4 none".to_string()), "{resumed:?}");
    let store = Store::open(&db).unwrap();
    let latest = store.latest_statuses(sweep_id).unwrap();
    assert!(latest.values().all(|s| *s == RunStatus::Ok), "{latest:?}");
}
