//! Hostile input against the real binary: each test is one way a user can feed lorascope
//! something bad, and checks that it is refused in one line with the documented exit status,
//! never a panic, abort, hang or a result that lies.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lorascope"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A refusal: a non-zero exit, one line on stderr, no panic or backtrace.
fn assert_one_line_refusal(o: &Output) -> String {
    let (out, err) = text(o);
    assert!(!o.status.success(), "expected a refusal:\n{out}\n{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected:\n{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    err
}

fn list(range: std::ops::RangeInclusive<u32>) -> String {
    let v: Vec<String> = range.map(|i| i.to_string()).collect();
    format!("[{}]", v.join(", "))
}

#[test]
fn huge_grids_are_counted_and_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bs, seq, rank, count) in [
        ("g6.toml", 100, 100, 100, "1,000,000"),
        ("g8.toml", 2000, 200, 2000, "800,000,000"),
    ] {
        let src = format!(
            "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = 2\n[grid]\nbatch_size = {}\nseq_len = {}\nlora_rank = {}\n",
            list(1..=bs),
            list(1..=seq),
            list(1..=rank)
        );
        let p = write(dir.path(), name, &src);
        for cmd in ["check", "run"] {
            let mut c = bin();
            if cmd == "check" {
                c.args(["profile", "check"]);
            } else {
                c.arg("run").arg("--db").arg(dir.path().join("r.db"));
            }
            let t0 = Instant::now();
            let o = c.arg(&p).output().unwrap();
            let took = t0.elapsed();
            let err = assert_one_line_refusal(&o);
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(err.contains(count) && err.contains("100,000"), "{err}");
            assert!(took < Duration::from_secs(3), "{cmd} {name} took {took:?}");
        }
    }
}

#[test]
fn sigterm_and_sighup_stop_a_headless_run_like_ctrl_c() {
    use lorascope::store::Store;
    use lorascope::summary::RunStatus;
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        let dir = tempfile::tempdir().unwrap();
        let worker = common::fake_worker(dir.path(), 0.2);
        let profile = write(dir.path(), "p.toml", &common::profile(&[1], 50, ""));
        let db = dir.path().join("r.db");
        let child = crate::cli::spawn_sweep(&profile, &db, &worker, true);
        crate::cli::wait_for_db(&db, |latest| {
            latest.values().any(|s| *s == RunStatus::Running)
        });
        let t0 = Instant::now();
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(child.id() as libc::pid_t, sig);
        }
        let out = child.wait_with_output().unwrap();
        let (_, err) = text(&out);
        assert!(t0.elapsed() < Duration::from_secs(15), "{name}: slow stop");
        assert_eq!(out.status.code(), Some(128 + sig), "{name}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.contains(&format!("interrupted by {name}")) && last.contains("--resume"),
            "{err}"
        );
        let store = Store::open(&db).unwrap();
        let sw = store.latest_sweep().unwrap().unwrap();
        let runs = store.runs(sw.id).unwrap();
        assert_eq!(runs.len(), 1, "{name}");
        assert_eq!(runs[0].status, RunStatus::Interrupted, "{name}: {err}");
    }
}

#[test]
fn cuda_devices_on_a_cpu_build_are_refused_by_check() {
    if candle_core::utils::cuda_is_available() {
        eprintln!("skipped: this build has CUDA, so cuda:0 is a valid device");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "p.toml",
        &common::profile(&[1], 2, "devices = [\"cuda:0\"]"),
    );
    let o = bin().args(["profile", "check"]).arg(&p).output().unwrap();
    let (out, err) = text(&o);
    // Still checked (a GPU profile is often checked on a laptop), but it says so.
    assert!(o.status.success(), "{err}");
    assert!(out.contains("1 point(s)"), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("warning: ") && err.contains("built without CUDA"),
        "{err}"
    );
}

/// A tmpfs mounted on a fresh directory (unmounted on drop), or `None` with the reason
/// printed when this process may not mount (not root, no CAP_SYS_ADMIN, a container).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match o {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs ({})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount ({e})");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, opts: &str) {
        let o = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(self.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Writes zeros to `dir/filler` until the file system is full.
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

/// A finished sweep of the fake worker in `db`.
fn record_sweep(dir: &Path, db: &Path) {
    let worker = common::fake_worker(dir, 0.0);
    let p = write(dir, "p.toml", &common::profile(&[1, 2], 2, ""));
    let o = bin()
        .arg("run")
        .arg(&p)
        .arg("--db")
        .arg(db)
        .env("LORASCOPE_WORKER", &worker)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
}

#[test]
fn database_errors_say_their_cause_in_one_clause() {
    let dir = tempfile::tempdir().unwrap();
    let worker = common::fake_worker(dir.path(), 0.0);
    let p = write(dir.path(), "p.toml", &common::profile(&[1], 2, ""));
    // A directory where the database should be.
    let as_dir = dir.path().join("results.db");
    std::fs::create_dir(&as_dir).unwrap();
    for args in [vec!["run", p.to_str().unwrap()], vec!["report"]] {
        let o = bin()
            .args(&args)
            .arg("--db")
            .arg(&as_dir)
            .env("LORASCOPE_WORKER", &worker)
            .output()
            .unwrap();
        let err = assert_one_line_refusal(&o);
        assert!(err.contains("is a directory"), "{err}");
        assert_eq!(err.matches("unable to open").count(), 0, "{err}");
    }
    // A file that is not a database.
    let junk = write(dir.path(), "junk.db", &"not sqlite\n".repeat(500));
    let o = bin().arg("report").arg("--db").arg(&junk).output().unwrap();
    let err = assert_one_line_refusal(&o);
    assert!(err.contains("is not a SQLite database"), "{err}");
    // A missing parent directory.
    let o = bin()
        .arg("run")
        .arg(&p)
        .arg("--db")
        .arg(dir.path().join("nope/r.db"))
        .env("LORASCOPE_WORKER", &worker)
        .output()
        .unwrap();
    let err = assert_one_line_refusal(&o);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn report_reads_a_database_on_read_only_media_and_run_says_read_only() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let db = fs.path().join("r.db");
    record_sweep(fs.path(), &db);
    fs.remount("ro");
    let o = bin()
        .args(["report", "--format", "csv", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // The `# key: value` metadata lines, the header, two points.
    assert_eq!(
        out.lines().filter(|l| !l.starts_with("# ")).count(),
        3,
        "{out}"
    );
    let o = bin()
        .args(["report", "--list", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    // A command that records results says the database is read-only.
    let elsewhere = tempfile::tempdir().unwrap();
    let worker = common::fake_worker(elsewhere.path(), 0.0);
    let o = bin()
        .arg("run")
        .arg(fs.path().join("p.toml"))
        .arg("--db")
        .arg(&db)
        .env("LORASCOPE_WORKER", &worker)
        .output()
        .unwrap();
    let err = assert_one_line_refusal(&o);
    assert!(err.contains("read-only"), "{err}");
}

#[test]
fn a_result_is_told_only_once_committed_and_a_full_disk_is_named() {
    use lorascope::store::Store;
    use lorascope::summary::RunStatus;
    let Some(fs) = Tmpfs::mount("4m") else { return };
    let work = tempfile::tempdir().unwrap();
    let worker = common::fake_worker(work.path(), 0.1);
    let p = write(work.path(), "p.toml", &common::profile(&[1, 2], 8, ""));
    let db = fs.path().join("r.db");
    let child = crate::cli::spawn_sweep(&p, &db, &worker, true);
    crate::cli::wait_for_db(&db, |latest| {
        latest.values().any(|s| *s == RunStatus::Running)
    });
    fill(fs.path());
    let out = child.wait_with_output().unwrap();
    let (_, err) = text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // No progress line claims a result the database does not hold.
    for l in err.lines().filter(|l| l.starts_with('[')) {
        assert!(!l.contains(": ok ("), "{l}\n{err}");
    }
    assert!(err.contains("could not be recorded"), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("disk is full"), "{err}");
    assert_eq!(last.matches("disk").count(), 1, "one clause: {last}");
    // Space again: --resume runs the point whose result was lost, and keeps nothing twice.
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    let o = bin()
        .arg("run")
        .arg(&p)
        .arg("--db")
        .arg(&db)
        .arg("--resume")
        .env("LORASCOPE_WORKER", &worker)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    let store = Store::open(&db).unwrap();
    let sw = store.latest_sweep().unwrap().unwrap();
    let ok = store
        .runs(sw.id)
        .unwrap()
        .iter()
        .filter(|r| r.status == RunStatus::Ok)
        .count();
    assert_eq!(ok, 2);
}

/// `lorascope train ARGS --seq-len 32 --batch-size 1` (and `--steps 2` unless given).
fn train(args: &[&str]) -> Output {
    let mut c = bin();
    c.arg("train")
        .args(["--seq-len", "32", "--batch-size", "1"]);
    if !args.contains(&"--steps") {
        c.args(["--steps", "2"]);
    }
    c.args(args).output().unwrap()
}

/// A tiny-preset checkpoint in `dir` whose tensor `poisoned` holds `value` at element 5.
fn checkpoint_with(dir: &Path, poisoned: &str, value: f32) {
    use candle_core::{DType, Device, Tensor};
    use lorascope::engine::config::ModelSource;
    use lorascope::engine::lora::LoraConfig;
    use lorascope::engine::model::Model;
    use lorascope::engine::weights::{WeightSource, save_checkpoint};
    let src = ModelSource::resolve("tiny").unwrap();
    let lora = LoraConfig::default();
    let ws = WeightSource::Synthetic { seed: 3 };
    let model = Model::new(&src.config, &lora, &ws, DType::F32, &Device::Cpu, 3).unwrap();
    let mut tensors = model.base_tensors().unwrap();
    for (name, t) in tensors.iter_mut() {
        if name == poisoned {
            let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v[5] = value;
            *t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
        }
    }
    save_checkpoint(dir, &tensors, 1).unwrap();
    std::fs::write(
        dir.join("config.json"),
        include_str!("../../src/engine/presets/tiny.json"),
    )
    .unwrap();
}

#[test]
fn non_finite_weights_are_named_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    checkpoint_with(dir.path(), name, f32::NAN);
    let o = train(&["--model", dir.path().to_str().unwrap(), "--json"]);
    let err = assert_one_line_refusal(&o);
    assert!(
        err.contains(name) && err.contains("NaN at element 5") && !err.contains("--precision"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("\"step\""));
}

#[test]
fn a_directory_named_model_safetensors_is_called_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        include_str!("../../src/engine/presets/tiny.json"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("model.safetensors")).unwrap();
    let o = train(&["--model", dir.path().to_str().unwrap()]);
    let err = assert_one_line_refusal(&o);
    assert!(
        err.contains("is a directory") && !err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn a_dead_run_is_not_reported_ok() {
    let o = train(&["--model", "tiny", "--lr", "1000", "--steps", "10", "--json"]);
    let err = assert_one_line_refusal(&o);
    assert!(err.contains("dead run"), "{err}");
    assert!(!err.contains("--precision fp32"), "{err}");
    // The same run at a sane learning rate is healthy.
    let o = train(&["--model", "tiny", "--steps", "10", "--json"]);
    assert!(o.status.success(), "{}", text(&o).1);
}

#[test]
fn report_says_when_a_wal_needs_a_writable_directory() {
    use lorascope::store::Store;
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("r.db");
    // An open writer: its sweep is in r.db-wal, not yet checkpointed into r.db.
    let store = Store::open(&db).unwrap();
    store.create_sweep("s", "p.toml", "").unwrap();
    let wal = work.path().join("r.db-wal");
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    std::fs::copy(&db, fs.path().join("r.db")).unwrap();
    std::fs::copy(&wal, fs.path().join("r.db-wal")).unwrap();
    drop(store);
    fs.remount("ro");
    let o = bin()
        .args(["report", "--list", "--db"])
        .arg(fs.path().join("r.db"))
        .output()
        .unwrap();
    let err = assert_one_line_refusal(&o);
    assert!(
        err.contains("-wal") && err.contains("writable directory"),
        "{err}"
    );
}
