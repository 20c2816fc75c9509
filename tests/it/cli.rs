//! The `lorascope` binary end to end with a fake worker: run, report, profile check, and
//! kill -9 of the orchestrator mid-sweep followed by `--resume`.

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lorascope::store::Store;
use lorascope::summary::RunStatus;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lorascope"))
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn run_prints_table_and_report_formats() {
    let dir = tempfile::tempdir().unwrap();
    let worker = common::fake_worker(dir.path(), 0.01);
    let profile = write(dir.path(), "p.toml", &common::profile(&[1, 3, 5], 3, ""));
    let db = dir.path().join("r.db");
    let out = bin()
        .arg("run")
        .arg(&profile)
        .arg("--db")
        .arg(&db)
        .env("LORASCOPE_WORKER", &worker)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("tok/s") && stdout.contains("s/10k tok"),
        "{stdout}"
    );
    assert!(stdout.contains("CUDA out of memory"), "{stdout}");
    assert!(
        stdout.contains("unsupported optimizer: adamw8bit"),
        "{stdout}"
    );
    assert!(stdout.contains("fastest: bs1 ("), "{stdout}");
    assert!(stdout.lines().all(|l| l.chars().count() <= 120), "{stdout}");
    assert!(stderr.contains("step 3/3"), "{stderr}");

    let report = |fmt: &str| {
        let o = bin()
            .args(["report", "--format", fmt, "--db"])
            .arg(&db)
            .output()
            .unwrap();
        assert!(o.status.success());
        String::from_utf8(o.stdout).unwrap()
    };
    let csv = report("csv");
    let data: Vec<&str> = csv.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(data.len(), 4, "{csv}");
    assert!(data[1].contains(",ok,"));
    assert!(csv.contains("# lorascope_version: "), "{csv}");
    let json: serde_json::Value = serde_json::from_str(&report("json")).unwrap();
    assert_eq!(json["runs"].as_array().unwrap().len(), 3);
    assert_eq!(json["runs"][1]["status"], "oom");
    assert_eq!(json["runs"][1]["batch_size"], 3);
    assert!(json["meta"]["cpu_model"].is_string() || json["meta"]["host"].is_string());
    let md = report("md");
    assert!(md.contains("| # | id | batch |"), "{md}");
    assert!(md.starts_with("## sweep 1 (p)\n\n"), "{md}");
    let narrow = bin()
        .args(["report", "--width", "80", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let narrow = String::from_utf8(narrow.stdout).unwrap();
    assert!(narrow.lines().all(|l| l.chars().count() <= 80), "{narrow}");

    let o = bin()
        .args(["report", "--sweep", "99", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);

    // A reader that went away (`lorascope report | head -0`): quiet success, not
    // "error: Broken pipe". The pipe's read end is closed before the child starts.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = bin()
        .args(["report", "--db"])
        .arg(&db)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && stderr.is_empty(),
        "{:?}: {stderr}",
        o.status
    );
}

#[test]
fn profile_check_shipped_profiles_and_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let check = |p: &Path| bin().args(["profile", "check"]).arg(p).output().unwrap();

    let o = check(&root.join("profiles/quickstart.toml"));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{s}");
    assert!(s.contains("4 point(s)"), "{s}");

    let o = check(&root.join("profiles/rtx4060-case-study.toml"));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{s}");
    // After the header line (`#  id  point  predicted memory`): the label, then the memory.
    let points: Vec<&str> = s
        .lines()
        .skip_while(|l| !l.trim_start().starts_with('#'))
        .skip(1)
        .map(|l| l[20..].split("  ").next().unwrap_or("").trim())
        .collect();
    assert_eq!(points[0], "bs1 seq512 adamw fp16 nf4 r16 gc");
    assert_eq!(points[1], "bs2 seq2048 paged_adamw8bit fp16 nf4 r16 gc");
    assert_eq!(points[2], "bs2 seq1024 paged_adamw8bit bf16 nf4 r16 gc");
    assert_eq!(
        points.len(),
        24,
        "three case-study points within the 2x3x2x2 factorial"
    );

    let o = check(&root.join("profiles/h200-grid.toml"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.toml",
        &common::profile(&[1], 3, "").replace("seq_len = [16]", "seq_len = [16, 0]"),
    );
    let o = check(&bad);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("bad.toml:11:") && err.contains("grid.seq_len[1]"),
        "{err}"
    );

    let o = check(&dir.path().join("missing.toml"));
    assert!(!o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);
}

/// Latest status per spec id, and run rows per spec id, of the only sweep.
fn db_state(db: &Path) -> (HashMap<String, RunStatus>, HashMap<String, usize>) {
    let store = Store::open(db).unwrap();
    let Some(sw) = store.latest_sweep().unwrap() else {
        return Default::default();
    };
    let mut latest = HashMap::new();
    let mut rows = HashMap::new();
    for r in store.runs(sw.id).unwrap() {
        latest.insert(r.spec_id.clone(), r.status);
        *rows.entry(r.spec_id).or_insert(0) += 1;
    }
    (latest, rows)
}

/// `lorascope run PROFILE --db DB` with the fake worker, stdout/stderr as given.
pub(crate) fn spawn_sweep(
    profile: &Path,
    db: &Path,
    worker: &Path,
    piped: bool,
) -> std::process::Child {
    let io = || if piped { Stdio::piped() } else { Stdio::null() };
    bin()
        .arg("run")
        .arg(profile)
        .arg("--db")
        .arg(db)
        .env("LORASCOPE_WORKER", worker)
        .stdout(io())
        .stderr(io())
        .spawn()
        .unwrap()
}

/// `lorascope run PROFILE --db DB --resume` with the fake worker, to completion.
fn resume_sweep(profile: &Path, db: &Path, worker: &Path) -> std::process::Output {
    bin()
        .arg("run")
        .arg(profile)
        .arg("--db")
        .arg(db)
        .arg("--resume")
        .env("LORASCOPE_WORKER", worker)
        .output()
        .unwrap()
}

/// Poll the results database every 20 ms until `done` holds for the latest status per spec
/// (30 s at most).
pub(crate) fn wait_for_db(db: &Path, done: impl Fn(&HashMap<String, RunStatus>) -> bool) {
    let t0 = Instant::now();
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "sweep did not progress"
        );
        std::thread::sleep(Duration::from_millis(20));
        if db.exists() && done(&db_state(db).0) {
            return;
        }
    }
}

#[test]
fn kill_9_mid_sweep_then_resume_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let worker = common::fake_worker(dir.path(), 0.05);
    let sizes = [1, 2, 4, 6, 7];
    let profile = write(dir.path(), "p.toml", &common::profile(&sizes, 6, ""));
    let db = dir.path().join("r.db");
    let mut child = spawn_sweep(&profile, &db, &worker, false);
    // Wait until two runs are finished and a third is in flight, then kill -9.
    wait_for_db(&db, |latest| {
        let count = |st: RunStatus| latest.values().filter(|s| **s == st).count();
        count(RunStatus::Ok) >= 2 && count(RunStatus::Running) == 1
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (before, _) = db_state(&db);
    let finished_before: Vec<String> = before
        .iter()
        .filter(|(_, s)| **s == RunStatus::Ok)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(finished_before.len() >= 2);
    // Normally 1; 0 if the kill landed between one run's commit and the next one's start.
    let in_flight = before
        .values()
        .filter(|s| **s == RunStatus::Running)
        .count();
    assert!(in_flight <= 1);
    std::thread::sleep(Duration::from_millis(200)); // the orphaned worker dies too (PDEATHSIG)

    let out = resume_sweep(&profile, &db, &worker);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    if in_flight == 1 {
        assert!(
            stderr.contains("1 interrupted run(s) will be re-run"),
            "{stderr}"
        );
    }

    let (latest, rows) = db_state(&db);
    assert_eq!(latest.len(), sizes.len());
    assert!(latest.values().all(|s| *s == RunStatus::Ok), "{latest:?}");
    for id in &finished_before {
        assert_eq!(rows[id], 1, "finished run {id} was repeated");
    }
    // Only the interrupted point has two rows: the interrupted run and its re-run.
    assert_eq!(rows.values().filter(|n| **n == 2).count(), in_flight);
    let store = Store::open(&db).unwrap();
    let sw = store.latest_sweep().unwrap().unwrap();
    assert_eq!(store.sweeps().unwrap().len(), 1);
    assert!(sw.finished_at.is_some());
    let interrupted: Vec<_> = store
        .runs(sw.id)
        .unwrap()
        .into_iter()
        .filter(|r| r.status == RunStatus::Interrupted)
        .collect();
    assert_eq!(interrupted.len(), in_flight);
    // Worker invocations: every batch size once, plus at most one for the interrupted run
    // (none if the kill came before its worker started); finished points exactly once.
    let calls = common::calls(dir.path());
    assert!(
        (sizes.len()..=sizes.len() + in_flight).contains(&calls.len()),
        "{calls:?}"
    );
    let all_runs = store.runs(sw.id).unwrap();
    for id in &finished_before {
        let run = all_runs.iter().find(|r| &r.spec_id == id).unwrap();
        let bs = run.config["point"]["batch_size"].as_u64().unwrap();
        let n = calls.iter().filter(|c| **c == format!("{bs} none")).count();
        assert_eq!(n, 1, "worker for finished point bs={bs} started {n} times");
    }
    let n_calls = calls.len();

    // Resuming a finished sweep runs nothing.
    let out = resume_sweep(&profile, &db, &worker);
    assert!(out.status.success());
    assert_eq!(common::calls(dir.path()).len(), n_calls);
}

#[test]
fn sigint_interrupts_then_resume_completes_and_repeats_are_summarised() {
    let dir = tempfile::tempdir().unwrap();
    let worker = common::fake_worker(dir.path(), 0.05);
    let profile = write(
        dir.path(),
        "p.toml",
        &common::profile(&[1, 2], 5, "repeats = 2"),
    );
    let db = dir.path().join("r.db");
    let child = spawn_sweep(&profile, &db, &worker, true);
    wait_for_db(&db, |latest| {
        latest.values().any(|s| *s == RunStatus::Running)
    });
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.lines().last().unwrap().contains("--resume"),
        "{stderr}"
    );
    let store = Store::open(&db).unwrap();
    let sw = store.latest_sweep().unwrap().unwrap();
    assert!(sw.finished_at.is_none());
    let runs = store.runs(sw.id).unwrap();
    // The run in flight is recorded interrupted (none if the signal fell between two runs).
    let interrupted = runs
        .iter()
        .filter(|r| r.status == RunStatus::Interrupted)
        .count();
    assert!(interrupted <= 1);
    assert!(
        runs.iter()
            .all(|r| matches!(r.status, RunStatus::Ok | RunStatus::Interrupted))
    );
    assert!(runs.len() < 4, "the sweep stopped early");
    drop(store);

    let out = resume_sweep(&profile, &db, &worker);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = common::calls(dir.path());
    assert!(
        (4..=4 + interrupted).contains(&calls.len()),
        "2 points x 2 repeats + the interrupted run: {calls:?}"
    );
    let o = bin()
        .args(["report", "--format", "json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = json["runs"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert_eq!(r["runs"], 2);
        assert_eq!(r["status"], "ok");
        assert_eq!(r["tokens_per_s"]["n"], 2);
    }
}

/// `profile check` resolves the model, checks every sequence length against the model's
/// `max_position_embeddings`, the LoRA targets against its modules and the data path, each
/// failure a single line naming the profile.
#[test]
fn profile_check_catches_unknown_model_long_sequences_and_missing_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = 2\n[grid]\nbatch_size = [1]\nseq_len = [64]\n";
    let cases = [
        (base.replace("\"tiny\"", "\"huge\""), "not a preset"),
        (
            base.replace("[64]", "[64, 100000]"),
            "max_position_embeddings",
        ),
        (base.replace("\"sample\"", "\"nope.json\""), "not found"),
        (
            base.replace("[run]", "[lora]\ntargets = [\"qkv_proj\"]\n[run]"),
            "lora.targets: LoRA target `qkv_proj`: Qwen2ForCausalLM has no such module",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("bad{i}.toml"), text);
        let o = bin().args(["profile", "check"]).arg(&p).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "case {i} passed: {err}");
        assert_eq!(err.trim().lines().count(), 1, "case {i}: {err}");
        assert!(
            err.contains(needle) && err.contains(&format!("bad{i}.toml")),
            "case {i}: {err}"
        );
    }
    let ok = write(dir.path(), "ok.toml", base);
    assert!(
        bin()
            .args(["profile", "check"])
            .arg(&ok)
            .output()
            .unwrap()
            .status
            .success()
    );
}

/// A point recorded without running (here a `"max"` point with no memory limit: host memory
/// unlimited on the CPU) gets its number and label in the headless progress line, and the
/// cause says what to do on the CPU.
#[test]
fn a_point_recorded_without_running_is_numbered_and_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("p.toml");
    std::fs::write(
        &profile,
        "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = 2\nwarmup_steps = 1\n\
         [grid]\nbatch_size = [\"max\"]\nseq_len = [32]\n",
    )
    .unwrap();
    let o = bin()
        .arg("run")
        .arg(&profile)
        .arg("--headless")
        .arg("--db")
        .arg(dir.path().join("r.db"))
        .env("LORASCOPE_MEM_AVAILABLE", "unlimited")
        .env_remove("LORASCOPE_WORKER")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains(": failed ("))
        .unwrap_or_else(|| panic!("no failed line: {stderr}"));
    assert!(line.starts_with("[1/1] "), "{line}");
    assert!(line.contains(" bs=max seq32 "), "{line}");
    assert!(line.contains("LORASCOPE_MEM_AVAILABLE a size"), "{line}");
}
