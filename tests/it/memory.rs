//! A model too big for memory: a Qwen2.5-7B config (no weights: synthetic) on the CPU ends
//! `oom` in one line, before allocating, in `train`, in a sweep row and in `profile check`;
//! and an allocation that fails anyway (under `RLIMIT_AS`) is `oom` with exit status 3, not
//! an abort. `estimate` prints every point's prediction.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lorascope::store::Store;
use lorascope::summary::RunStatus;

const BIN: &str = env!("CARGO_BIN_EXE_lorascope");

fn qwen7b() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2.5-7b")
}

fn train_7b(cmd: &mut Command) -> Output {
    cmd.args(["train", "--model"])
        .arg(qwen7b())
        .args(["--device", "cpu", "--steps", "1", "--seq-len", "32"])
        .args(["--batch-size", "1", "--json"])
        .output()
        .expect("run lorascope")
}

fn one_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(!err.contains("memory allocation of"), "an abort: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    lines[0].to_string()
}

fn profile_7b(dir: &Path) -> PathBuf {
    let p = dir.join("big.toml");
    let text = format!(
        "name = \"big\"\n[model]\npath = {:?}\n[data]\npath = \"sample\"\n\
         [run]\nsteps = 1\ndevices = [\"cpu\"]\n[grid]\nbatch_size = [1]\nseq_len = [32]\n\
         quant = [\"none\"]\n",
        qwen7b().display().to_string()
    );
    std::fs::write(&p, text).unwrap();
    p
}

/// `train` refuses before allocating: the bytes needed, the bytes available, what to do;
/// exit status 3 (the out-of-memory status the sweep records as `oom`).
#[test]
fn train_refuses_a_model_over_the_host_memory() {
    let o = train_7b(Command::new(BIN).env("LORASCOPE_MEM_AVAILABLE", "8GiB"));
    let line = one_line(&o);
    assert_eq!(o.status.code(), Some(3), "{line}");
    for want in [
        "needs ~",
        "of host memory",
        "f32 weights",
        "8.0 GiB available",
        "--quant nf4",
    ] {
        assert!(line.contains(want), "`{want}` not in: {line}");
    }
    // 7.6 B parameters in f32: 28.4 GiB of weights alone.
    assert!(line.contains("28.4 GiB for f32 weights"), "{line}");
}

/// The same limit from the kernel: `prlimit --as` is seen as `RLIMIT_AS`.
#[test]
fn train_sees_an_address_space_limit() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit (util-linux) not installed");
        return;
    }
    let mut cmd = Command::new("prlimit");
    cmd.args(["--as=4294967296", "--", BIN]);
    let o = train_7b(&mut cmd);
    let line = one_line(&o);
    assert_eq!(o.status.code(), Some(3), "{line}");
    assert!(
        line.contains("RLIMIT_AS") && line.contains("needs ~"),
        "{line}"
    );
}

/// With the check turned off, the allocation that fails under `RLIMIT_AS` is caught: `oom`
/// (exit 3) in one line, never `memory allocation of N bytes failed` and SIGABRT.
#[test]
fn a_failing_allocation_is_oom_not_an_abort() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit (util-linux) not installed");
        return;
    }
    let mut cmd = Command::new("prlimit");
    cmd.args(["--as=2147483648", "--", BIN])
        .env("LORASCOPE_MEM_AVAILABLE", "unlimited");
    let o = train_7b(&mut cmd);
    let line = one_line(&o);
    assert_eq!(o.status.code(), Some(3), "{line}");
    assert!(line.contains("out of memory"), "{line}");
}

/// In a sweep the point's row is `oom` with the one-line cause, and the sweep finishes.
#[test]
fn a_sweep_row_is_oom() {
    let dir = tempfile::tempdir().unwrap();
    let p = profile_7b(dir.path());
    let db = dir.path().join("r.db");
    let o = Command::new(BIN)
        .arg("run")
        .arg(&p)
        .arg("--headless")
        .arg("--db")
        .arg(&db)
        .env("LORASCOPE_MEM_AVAILABLE", "8GiB")
        .env("LORASCOPE_STATE_DIR", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("signal 6") && !err.contains("panicked"),
        "{err}"
    );
    let st = Store::open(&db).unwrap();
    let sweep = st.latest_sweep_for(&p.canonicalize().unwrap().display().to_string());
    let sweep = sweep.unwrap().expect("a sweep");
    let runs = st.runs(sweep.id).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Oom, "{err}");
    let cause = runs[0].cause.clone().unwrap_or_default();
    assert!(
        cause.contains("needs ~") && cause.contains("host memory"),
        "{cause}"
    );
    assert!(!cause.contains('\n'));
}

/// `profile check` says which points will not fit, and `estimate` prints the split.
#[test]
fn check_and_estimate_show_the_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let p = profile_7b(dir.path());
    let o = Command::new(BIN)
        .args(["profile", "check"])
        .arg(&p)
        .env("LORASCOPE_MEM_AVAILABLE", "8GiB")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("host, over by") && out.contains("-> oom"),
        "{out}"
    );
    let o = Command::new(BIN)
        .args(["estimate"])
        .arg(&p)
        .env("LORASCOPE_MEM_AVAILABLE", "64GiB")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("weights") && out.contains("fits"), "{out}");
    let o = Command::new(BIN)
        .args(["estimate", "--json"])
        .arg(&p)
        .env("LORASCOPE_MEM_AVAILABLE", "8GiB")
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    let weights = v["estimate"]["weights"].as_u64().unwrap();
    // Qwen2.5-7B: 7,615,616,512 parameters, four bytes each in f32.
    assert_eq!(weights, 4 * 7_615_616_512);
    assert!(v["verdict"].as_str().unwrap().starts_with("over by"));
}

mod sweep {
    //! The orchestrator's use of the model, against the fake worker (batch size 3 ends `oom`).

    use crate::common;
    use std::path::Path;
    use std::time::Duration;

    use lorascope::engine::config::ModelSource;
    use lorascope::grid::{RunSpec, expand_profile};
    use lorascope::orchestrator::fit::memory_point;
    use lorascope::orchestrator::{
        Command, Event, OrchestratorConfig, PlannedRun, SweepPlan, WorkerCommand, run_sweep,
    };
    use lorascope::profile::parse_str;
    use lorascope::spec::Device;
    use lorascope::store::Store;
    use lorascope::summary::RunStatus;
    use tokio::sync::mpsc;

    fn specs(batch: &str, run: &str) -> Vec<RunSpec> {
        let text = format!(
            "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = 3\nwarmup_steps = 1\ndevices = [\"cuda:0\"]\n{run}\n[grid]\nbatch_size = {batch}\nseq_len = [16]\n"
        );
        expand_profile(&parse_str(&text, "t.toml").unwrap(), Path::new("."))
    }

    async fn sweep(dir: &Path, specs: Vec<RunSpec>) -> (Store, i64) {
        sweep_with(dir, specs, 0.01, false).await
    }

    /// [`sweep`] with the fake worker sleeping `step_sleep` s per step, and with `cancel`,
    /// a `Cancel` of the first run as soon as it has started.
    async fn sweep_with(
        dir: &Path,
        specs: Vec<RunSpec>,
        step_sleep: f64,
        cancel: bool,
    ) -> (Store, i64) {
        let mut store = Store::open(&dir.join("r.db")).unwrap();
        let sweep_id = store.create_sweep("t", "/t.toml", "").unwrap();
        let runs = (0..specs.len())
            .map(|i| PlannedRun {
                spec_index: i,
                repeat: 0,
            })
            .collect();
        let plan = SweepPlan {
            sweep_id,
            specs,
            repeats: 1,
            runs,
            already_done: 0,
            devices: vec![Device::Cuda(0)],
            finished: vec![],
            backend: Default::default(),
        };
        let cfg = OrchestratorConfig {
            worker: WorkerCommand {
                program: common::fake_worker(dir, step_sleep),
            },
            grace: Duration::from_millis(300),
            telemetry_period: Duration::from_millis(20),
            context_cache: None,
        };
        let (ctx, crx) = mpsc::unbounded_channel::<Command>();
        let (etx, mut erx) = mpsc::unbounded_channel();
        let canceller = tokio::spawn(async move {
            while let Some(e) = erx.recv().await {
                if let Event::RunStarted { id, .. } = e
                    && cancel
                {
                    let _ = ctx.send(Command::Cancel { id });
                }
            }
        });
        run_sweep(plan, &mut store, &cfg, crx, etx).await.unwrap();
        canceller.await.unwrap();
        (store, sweep_id)
    }

    /// A limit between the tiny preset's predicted peaks at batch 2 and 3 (seq 16): the
    /// largest batch predicted to fit it is 2.
    fn limit_between_batch_2_and_3() -> u64 {
        let base = specs("[1]", "vram_limit = \"8GiB\"");
        let cfg = ModelSource::resolve("tiny").unwrap().config;
        let at = |b: usize| {
            let mut p = memory_point(&base[0], &cfg, None, true);
            p.batch_size = b;
            lorascope::engine::memory::estimate(&p).peak
        };
        (at(2) + at(3)) / 2
    }

    /// Points predicted over a 64 MiB limit by more than the stated error are recorded
    /// `predicted-oom` with the prediction and never launched; `verify_oom` runs them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn points_over_the_limit_are_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let (store, id) = sweep(dir.path(), specs("[1, 2]", "vram_limit = \"64MiB\"")).await;
        let runs = store.runs(id).unwrap();
        assert_eq!(runs.len(), 2);
        for r in &runs {
            assert_eq!(r.status, RunStatus::PredictedOom);
            let cause = r.cause.clone().unwrap();
            assert!(
                cause.contains("predicted ~") && cause.contains("run.verify_oom"),
                "{cause}"
            );
            assert!(r.summary.as_ref().unwrap().predicted_peak_bytes.is_some());
        }
        assert!(common::calls(dir.path()).is_empty(), "nothing launched");
        let dir = tempfile::tempdir().unwrap();
        let run = "vram_limit = \"64MiB\"\nverify_oom = true";
        let (store, id) = sweep(dir.path(), specs("[1, 2]", run)).await;
        let st: Vec<RunStatus> = store.runs(id).unwrap().iter().map(|r| r.status).collect();
        assert_eq!(st, [RunStatus::Ok, RunStatus::Ok]);
        assert_eq!(common::calls(dir.path()).len(), 2);
    }

    /// `batch_size = "max"`: predicted 2 under a limit between the predictions at 2 and 3,
    /// confirmed by probes (2 ok, 3 oom with the fake worker), run at 2, probes recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_size_max_is_predicted_then_probed() {
        let limit = limit_between_batch_2_and_3();
        let dir = tempfile::tempdir().unwrap();
        let run = format!("vram_limit = \"{limit}\"");
        let (store, id) = sweep(dir.path(), specs("[\"max\"]", &run)).await;
        let runs = store.runs(id).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].status, RunStatus::Ok, "{:?}", runs[0].cause);
        assert_eq!(runs[0].label, "bs=max seq16 adamw fp32 none r16");
        let note = runs[0].summary.clone().unwrap().note.unwrap_or_default();
        assert!(
            note.contains("batch_size = max: 2 (predicted 2; probes: 2 ok, 3 oom)"),
            "{note}"
        );
        assert_eq!(runs[0].summary.as_ref().unwrap().max_value, Some(2));
        // Run at the predicted value: the prediction is of this point and has an error.
        assert!(runs[0].summary.as_ref().unwrap().prediction_error.is_some());
        let calls: Vec<String> = common::calls(dir.path())
            .iter()
            .map(|c| c.split(' ').next().unwrap().to_string())
            .collect();
        assert_eq!(calls, ["2", "3", "2"], "two probes then the run");
    }

    /// A cancel while a `"max"` point is still probing ends the point `cancelled` without
    /// its full run (the probe has three 1 s steps; nothing starts after it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancel_while_probing_ends_the_point() {
        let dir = tempfile::tempdir().unwrap();
        let (store, id) = sweep_with(
            dir.path(),
            specs("[\"max\"]", "vram_limit = \"8GiB\""),
            1.0,
            true,
        )
        .await;
        let runs = store.runs(id).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].status, RunStatus::Cancelled, "{:?}", runs[0].cause);
        let cause = runs[0].cause.clone().unwrap_or_default();
        assert!(cause.contains("while probing batch_size = max"), "{cause}");
        // The probe may be stopped before its script logs the start; the full run never starts.
        assert!(common::calls(dir.path()).len() <= 1, "no full run");
    }

    /// A probe that finishes only by retrying a step after an out-of-memory is the edge: the
    /// search goes below it (predicted 2, which the fake worker passes only with a retry).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_that_needed_retries_does_not_fit() {
        let limit = limit_between_batch_2_and_3();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("retry-2"), "").unwrap();
        let run = format!("vram_limit = \"{limit}\"");
        let (store, id) = sweep(dir.path(), specs("[\"max\"]", &run)).await;
        let runs = store.runs(id).unwrap();
        assert_eq!(runs[0].status, RunStatus::Ok, "{:?}", runs[0].cause);
        let note = runs[0].summary.clone().unwrap().note.unwrap_or_default();
        assert!(
            note.contains(
                "batch_size = max: 1 (predicted 2; probes: 2 ok only with retries, 1 ok)"
            ),
            "{note}"
        );
        assert_eq!(runs[0].summary.as_ref().unwrap().max_value, Some(1));
        // Run below the predicted value: the prediction is of another point, so no error.
        let s = runs[0].summary.clone().unwrap();
        assert!(s.predicted_peak_bytes.is_some() && s.prediction_error.is_none());
    }
}
