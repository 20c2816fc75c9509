//! The orchestrator against a fake worker (real child processes): queue commands, exit codes.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use lorascope::grid::{RunSpec, expand_profile};
use lorascope::orchestrator::{
    Command, Event, MoveTo, OrchestratorConfig, PlannedRun, SweepPlan, WorkerCommand, run_sweep,
};
use lorascope::profile::parse_str;
use lorascope::spec::Device;
use lorascope::store::Store;
use lorascope::summary::RunStatus;
use tokio::sync::mpsc;

fn specs(batch_sizes: &[u32], steps: u32, extra_run: &str) -> Vec<RunSpec> {
    let p = parse_str(&common::profile(batch_sizes, steps, extra_run), "t.toml").unwrap();
    expand_profile(&p, Path::new("."))
}

fn plan(store: &Store, specs: Vec<RunSpec>, devices: Vec<Device>) -> SweepPlan {
    let sweep_id = store.create_sweep("t", "/t.toml", "").unwrap();
    let runs = (0..specs.len())
        .map(|i| PlannedRun {
            spec_index: i,
            repeat: 0,
        })
        .collect();
    SweepPlan {
        sweep_id,
        specs,
        repeats: 1,
        runs,
        already_done: 0,
        devices,
        finished: vec![],
        backend: Default::default(),
    }
}

fn cfg(dir: &Path, sleep: f64) -> OrchestratorConfig {
    OrchestratorConfig {
        worker: WorkerCommand {
            program: common::fake_worker(dir, sleep),
        },
        grace: Duration::from_millis(300),
        telemetry_period: Duration::from_millis(20),
        context_cache: None,
    }
}

fn statuses(store: &Store, sweep: i64) -> Vec<(String, RunStatus, Option<String>)> {
    store
        .runs(sweep)
        .unwrap()
        .into_iter()
        .map(|r| (r.label, r.status, r.cause))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_are_recorded_and_the_sweep_continues() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("r.db")).unwrap();
    let plan = plan(&store, specs(&[1, 3, 5, 2], 3, ""), vec![Device::Cpu]);
    let sweep = plan.sweep_id;
    let (_ctx, crx) = mpsc::unbounded_channel::<Command>();
    let (etx, mut erx) = mpsc::unbounded_channel();
    let out = run_sweep(plan, &mut store, &cfg(dir.path(), 0.01), crx, etx)
        .await
        .unwrap();
    assert!(!out.shutdown);
    let st = statuses(&store, sweep);
    assert_eq!(st[0].1, RunStatus::Ok);
    assert_eq!(st[1].1, RunStatus::Oom);
    assert_eq!(
        st[1].2.as_deref(),
        Some("CUDA out of memory: tried to allocate 2.00 GiB")
    );
    assert_eq!(st[2].1, RunStatus::Failed);
    assert_eq!(
        st[2].2.as_deref(),
        Some("unsupported optimizer: adamw8bit (not implemented yet)")
    );
    assert_eq!(st[3].1, RunStatus::Ok);
    assert_eq!(out.counts["ok"], 2);

    // The ok run: steps stored, throughput from the timed window (steps 2..3), RSS sampled.
    let runs = store.runs(sweep).unwrap();
    let s = runs[0].summary.clone().unwrap();
    assert_eq!(s.steps, 3);
    assert_eq!(s.timed_steps, 2);
    assert_eq!(s.tokens, 32);
    assert!((s.tokens_per_s.unwrap() - 16.0 / 0.05).abs() < 1e-6);
    assert_eq!(s.final_loss, Some(5.3));
    assert_eq!(s.peak_mem_kind.as_deref(), Some("rss"));
    assert!(s.peak_mem_bytes.unwrap() >= 1048576);
    assert_eq!(store.steps(runs[0].id).unwrap().len(), 3);
    assert!(runs[0].header.is_some());

    let mut warnings = 0;
    let mut finished = false;
    while let Ok(e) = erx.try_recv() {
        match e {
            Event::Warning { .. } => warnings += 1,
            Event::SweepFinished { .. } => finished = true,
            _ => {}
        }
    }
    assert_eq!(warnings, 2, "one non-JSON line per ok run");
    assert!(finished);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_reorder_skip_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_in_memory().unwrap();
    let specs = specs(&[1, 2, 4, 6], 2, "");
    let ids: Vec<String> = specs.iter().map(|s| s.id.clone()).collect();
    let plan = plan(&store, specs, vec![Device::Cpu]);
    let sweep = plan.sweep_id;
    let (ctx, crx) = mpsc::unbounded_channel();
    let (etx, mut erx) = mpsc::unbounded_channel();
    // Sent before the sweep starts: nothing launches until Resume.
    ctx.send(Command::Pause).unwrap();
    ctx.send(Command::Move {
        id: ids[3].clone(),
        to: MoveTo::Top,
    })
    .unwrap();
    ctx.send(Command::Move {
        id: ids[0].clone(),
        to: MoveTo::Down,
    })
    .unwrap();
    ctx.send(Command::Skip { id: ids[1].clone() }).unwrap();
    ctx.send(Command::Skip { id: "nope".into() }).unwrap();
    ctx.send(Command::Resume).unwrap();
    run_sweep(plan, &mut store, &cfg(dir.path(), 0.01), crx, etx)
        .await
        .unwrap();
    let mut started = Vec::new();
    let mut rejected = 0;
    while let Ok(e) = erx.try_recv() {
        match e {
            Event::RunStarted { id, .. } => started.push(id),
            Event::CommandRejected { .. } => rejected += 1,
            _ => {}
        }
    }
    // Order after the commands: [6, 1, 2, 4] -> move 1 down -> [6, 2, 1, 4] -> skip 2.
    assert_eq!(
        started,
        vec![ids[3].clone(), ids[0].clone(), ids[2].clone()]
    );
    assert_eq!(rejected, 1);
    assert_eq!(
        common::calls(dir.path()),
        vec!["6 none", "1 none", "4 none"]
    );
    let st = statuses(&store, sweep);
    assert_eq!(st[1].1, RunStatus::Skipped);
    assert_eq!(st.iter().filter(|s| s.1 == RunStatus::Ok).count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_escalates_to_sigkill_and_retry_requeues() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_in_memory().unwrap();
    // 9 hangs ignoring SIGTERM; 5 fails (retried once); 1 is ok.
    let specs = specs(&[9, 5, 1], 2, "");
    let ids: Vec<String> = specs.iter().map(|s| s.id.clone()).collect();
    let plan = plan(&store, specs, vec![Device::Cpu]);
    let sweep = plan.sweep_id;
    let (ctx, crx) = mpsc::unbounded_channel();
    let (etx, mut erx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let driver = async {
        let mut retried = false;
        let mut log = Vec::new();
        while let Some(e) = erx.recv().await {
            match &e {
                Event::Step { id, .. } if *id == ids[0] => {}
                Event::RunStarted { id, .. } if *id == ids[0] => {
                    ctx.send(Command::Cancel { id: id.clone() }).unwrap();
                }
                Event::RunFinished { id, .. } if *id == ids[1] && !retried => {
                    retried = true;
                    ctx.send(Command::Retry { id: id.clone() }).unwrap();
                }
                _ => {}
            }
            if let Event::RunFinished { id, summary, .. } = &e {
                log.push((id.clone(), summary.status));
            }
        }
        log
    };
    let cfg = cfg(dir.path(), 0.01);
    let (res, log) = tokio::join!(run_sweep(plan, &mut store, &cfg, crx, etx), driver);
    res.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "cancel took {:?}",
        t0.elapsed()
    );
    assert_eq!(
        log,
        vec![
            (ids[0].clone(), Some(RunStatus::Cancelled)),
            (ids[1].clone(), Some(RunStatus::Failed)),
            (ids[2].clone(), Some(RunStatus::Ok)),
            (ids[1].clone(), Some(RunStatus::Failed)),
        ]
    );
    let st = statuses(&store, sweep);
    assert_eq!(st[0].1, RunStatus::Cancelled);
    assert_eq!(st[0].2.as_deref(), Some("cancelled by user"));
    assert_eq!(st.iter().filter(|s| s.1 == RunStatus::Failed).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_run_per_gpu_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_in_memory().unwrap();
    let specs = specs(&[1, 2, 4, 6], 4, "devices = [\"cuda:0\", \"cuda:1\"]");
    let plan = plan(&store, specs, vec![Device::Cuda(0), Device::Cuda(1)]);
    let sweep = plan.sweep_id;
    let (_ctx, crx) = mpsc::unbounded_channel::<Command>();
    let (etx, mut erx) = mpsc::unbounded_channel();
    run_sweep(plan, &mut store, &cfg(dir.path(), 0.05), crx, etx)
        .await
        .unwrap();
    let mut running = 0i32;
    let mut max_running = 0;
    while let Ok(e) = erx.try_recv() {
        match e {
            Event::RunStarted { .. } => {
                running += 1;
                max_running = max_running.max(running);
            }
            Event::RunFinished { .. } => running -= 1,
            _ => {}
        }
    }
    assert_eq!(max_running, 2);
    let calls = common::calls(dir.path());
    assert_eq!(calls.len(), 4);
    assert!(calls.iter().any(|c| c.ends_with(" 0")) && calls.iter().any(|c| c.ends_with(" 1")));
    let runs = store.runs(sweep).unwrap();
    assert!(runs.iter().all(|r| r.status == RunStatus::Ok));
    // No NVML here: the reason is recorded once per run; on a GPU machine fields are real.
    if lorascope::telemetry::nvml_status().is_err() {
        let note = runs[0]
            .summary
            .as_ref()
            .unwrap()
            .note
            .clone()
            .unwrap_or_default();
        assert!(note.contains("NVML unavailable"), "{note}");
    }
}
