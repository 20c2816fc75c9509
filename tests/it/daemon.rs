//! The daemon end to end with real processes (the built binary and a fake worker): detached
//! sweeps, clients that attach, detach, die or send garbage, kill -9 and restart, the queue
//! verbs, two device slots, and the socket's permissions. Every wait has a deadline.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lorascope::store::Store;
use lorascope::summary::RunStatus;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lorascope");

/// An isolated runtime dir (socket), state dir, fake worker and results database.
struct Env {
    dir: tempfile::TempDir,
    /// Daemons this test started directly.
    children: Vec<Child>,
}

impl Env {
    fn new(step_sleep: f64) -> Env {
        let dir = tempfile::tempdir().unwrap();
        common::fake_worker(dir.path(), step_sleep);
        Env {
            dir,
            children: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn runtime(&self) -> PathBuf {
        self.path("run")
    }

    fn socket(&self) -> PathBuf {
        self.runtime().join("lorascope.sock")
    }

    fn db(&self) -> PathBuf {
        self.path("r.db")
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("LORASCOPE_RUNTIME_DIR", self.runtime())
            .env("LORASCOPE_STATE_DIR", self.path("state"))
            .env("LORASCOPE_WORKER", self.path("fake-worker.sh"))
            .env("NO_COLOR", "1");
        c
    }

    fn profile(&self, batch_sizes: &[u32], steps: u32, extra_run: &str) -> PathBuf {
        let p = self.path("p.toml");
        std::fs::write(&p, common::profile(batch_sizes, steps, extra_run)).unwrap();
        p
    }

    /// Runs the binary with `args` to completion (at most `secs`).
    fn run(&self, args: &[&str], secs: u64) -> Output {
        let mut c = self.cmd();
        c.args(args);
        output_within(c, secs)
    }

    /// `lorascope run PROFILE --detach --db DB`, asserting success; returns stdout.
    fn detach(&self, profile: &Path, db: &Path) -> String {
        self.ok(
            &[
                "run",
                profile.to_str().unwrap(),
                "--detach",
                "--db",
                db.to_str().unwrap(),
            ],
            30,
        )
    }

    /// Like [`Env::run`], asserting success; returns stdout.
    fn ok(&self, args: &[&str], secs: u64) -> String {
        let o = self.run(args, secs);
        assert!(
            o.status.success(),
            "lorascope {args:?}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn status(&self) -> Option<Value> {
        let o = self.run(&["status", "--json"], 20);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    }

    /// Polls `status --json` until `f` holds (at most `secs`).
    fn status_until(&self, secs: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if let Some(s) = &s
                && f(s)
            {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `lorascope daemon` as a child of the test and waits until it answers.
    fn start_daemon(&mut self) -> u32 {
        let mut c = self.cmd();
        c.args(["daemon", "--grace-secs", "0.3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.path(&format!("daemon{}.log", self.children.len())))
                    .unwrap(),
            );
        let child = c.spawn().unwrap();
        let pid = child.id();
        self.children.push(child);
        self.status_until(20, "the daemon to answer", |s| s["pid"] == pid);
        pid
    }

    /// Whether something answers on the socket.
    fn alive(&self) -> bool {
        UnixStream::connect(self.socket()).is_ok()
    }

    fn wait_gone(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.alive() {
            assert!(Instant::now() < deadline, "the daemon is still listening");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn calls(&self) -> Vec<String> {
        common::calls(self.dir.path())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Whatever daemon still answers (started by `run --detach` or not): kill it.
        if let Some(pid) = self
            .status()
            .and_then(|s| s["pid"].as_u64())
            .filter(|p| *p > 0)
        {
            kill(pid as u32, libc::SIGKILL);
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this test started; no memory is touched.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits for a command with a deadline (killing it and failing the test after `secs`).
fn output_within(mut c: Command, secs: u64) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "{c:?} did not finish within {secs} s: {}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads one line with a deadline (on a thread, so a silent peer cannot hang the test).
fn line_within<R: Read + Send + 'static>(r: R, secs: u64) -> (String, BufReader<R>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send((line, r));
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("no line in time")
}

fn entries(status: &Value) -> Vec<String> {
    status["current"]["queue"]["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn count(status: &Value, key: &str) -> u64 {
    status["current"]["counts"][key].as_u64().unwrap_or(0)
}

fn runs(db: &Path, sweep: i64) -> Vec<lorascope::store::RunRow> {
    Store::open(db).unwrap().runs(sweep).unwrap()
}

#[test]
fn socket_is_private_and_bad_clients_get_errors_while_the_daemon_lives_on() {
    let mut env = Env::new(0.01);
    let pid = env.start_daemon();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.socket()), 0o600, "socket mode");
    assert_eq!(mode(&env.runtime()), 0o700, "runtime dir mode");

    // Garbage after a hello: an error reply, and the connection still works.
    let mut s = UnixStream::connect(env.socket()).unwrap();
    s.write_all(b"{\"type\":\"hello\",\"version\":1}\n")
        .unwrap();
    let (hello, mut r) = line_within(s.try_clone().unwrap(), 10);
    assert!(hello.contains("\"type\":\"hello\""), "{hello}");
    s.write_all(b"this is not json\n{\"type\":\"status\"}\n")
        .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["type"], "error");
    assert!(v["message"].as_str().unwrap().contains("malformed"), "{v}");
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"type\":\"status\""), "{line}");
    // A line that is not UTF-8 after hello: the same error reply, and the connection works.
    s.write_all(b"{\"type\":\"st\xffatus\"}\n{\"type\":\"status\"}\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["type"], "error", "{line}");
    assert!(v["message"].as_str().unwrap().contains("not UTF-8"), "{v}");
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"type\":\"status\""), "{line}");

    // No hello first; a foreign protocol version; a first line that is not UTF-8.
    for (msg, want) in [
        (&b"{\"type\":\"status\"}\n"[..], "hello"),
        (
            &b"{\"type\":\"hello\",\"version\":99}\n"[..],
            "protocol version 99",
        ),
        (&b"\xfe\xff hello\n"[..], "not UTF-8"),
    ] {
        let mut s = UnixStream::connect(env.socket()).unwrap();
        s.write_all(msg).unwrap();
        let (line, _) = line_within(s, 10);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "error", "{line}");
        assert!(v["message"].as_str().unwrap().contains(want), "{v}");
    }

    // An oversized message (2 MiB, no newline): an error reply, then the daemon hangs up.
    let s = UnixStream::connect(env.socket()).unwrap();
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = w.write_all(b"{\"type\":\"hello\",\"version\":1}\n");
        let _ = w.write_all(&vec![b'a'; 2 << 20]);
    });
    let (hello, r) = line_within(s, 10);
    assert!(hello.contains("hello"), "{hello}");
    // The same reader: the error line may already sit in its buffer with the hello.
    let (line, mut r) = line_within(r, 10);
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["type"], "error", "{line}");
    assert!(
        v["message"].as_str().unwrap().contains("longer than"),
        "{v}"
    );
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);

    // A client that disconnects mid-message, and one that never speaks.
    let mut s = UnixStream::connect(env.socket()).unwrap();
    s.write_all(b"{\"type\":\"hel").unwrap();
    drop(s);
    let _silent = UnixStream::connect(env.socket()).unwrap();

    // Still the same daemon, answering; idle queue verbs.
    let st = env.status().expect("the daemon answers");
    assert_eq!(st["pid"], pid);
    env.ok(&["queue", "pause"], 20);
    assert_eq!(env.status().unwrap()["paused"], true);
    let o = env.run(&["queue", "skip", "nope"], 20);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no sweep is running") && err.lines().count() == 1,
        "{err}"
    );
    env.ok(&["daemon", "stop"], 30);
    env.wait_gone(10);
    assert!(!env.socket().exists(), "the socket is removed on stop");
}

#[test]
fn detached_sweep_attach_detach_kill_client_reattach_same_state() {
    let env = Env::new(0.15);
    let profile = env.profile(&[1, 2, 4, 6], 6, "");
    let db = env.db();
    let out = env.detach(&profile, &db);
    assert!(
        out.contains("sweep 1") && out.contains("queued on a new daemon"),
        "{out}"
    );
    let st = env.status_until(20, "a run in flight", |s| count(s, "running") == 1);
    let pid = st["pid"].as_u64().unwrap() as u32;
    assert_eq!(entries(&st).len(), 4);
    // Paused, so that the sweep cannot end while the clients come and go.
    env.ok(&["queue", "pause"], 20);

    // A JSON client attaches, sees the sweep, and is killed mid-stream.
    let mut a = env.cmd();
    a.args(["attach", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut a = a.spawn().unwrap();
    let (first, _r) = line_within(a.stdout.take().unwrap(), 20);
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["type"], "attached");
    assert_eq!(first["sweep"]["sweep_id"], 1);
    assert!(!first["replay"].as_array().unwrap().is_empty());

    // A second client at the same time builds the same dashboard state.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = env.socket();
    let state = || {
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                lorascope::cli::attach::attached_state(&socket),
            )
            .await
        })
        .expect("attach in time")
        .unwrap()
        .expect("a sweep to show")
    };
    let b = state();
    assert_eq!(b.sweep_id, Some(1));
    assert!(b.attached);
    let ids: Vec<String> = b.queue.entries.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, entries(&env.status().unwrap()));
    assert!(!b.running().is_empty() || b.queue.queued.len() < 4);

    kill(a.id(), libc::SIGKILL);
    let _ = a.wait();
    // SIGHUP (the session went away) does not stop the daemon.
    kill(pid, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));

    // The real dashboard on a pseudo-terminal: q detaches and leaves the sweep running.
    if Path::new("/usr/bin/script").exists() {
        let mut c = Command::new("/usr/bin/script");
        c.args(["-qec", &format!("{BIN} attach"), "/dev/null"])
            .env("LORASCOPE_RUNTIME_DIR", env.runtime())
            .env("TERM", "xterm")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut d = c.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        d.stdin.as_mut().unwrap().write_all(b"q").unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = d.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = d.kill();
                panic!("the attached dashboard did not detach on q");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "attach exited with {status}");
    }
    let st = env
        .status()
        .expect("the daemon survived the clients and SIGHUP");
    assert_eq!(st["pid"], pid);
    assert!(st["stopping"].is_null(), "{st}");
    assert!(!st["current"]["ended"].as_bool().unwrap(), "{st}");

    // Reattach: the same sweep, the same entries, nothing lost.
    let c = state();
    assert_eq!(c.sweep_id, Some(1));
    let ids2: Vec<String> = c.queue.entries.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, ids2);
    for id in b.table_rows() {
        assert!(
            c.table_rows().contains(&id),
            "finished run {id} still shown"
        );
    }

    assert_eq!(st["paused"], true);
    env.ok(&["queue", "resume"], 20);
    let out = env.ok(&["wait", "1"], 60);
    assert!(out.contains("sweep 1 finished"), "{out}");
    let rows = runs(&db, 1);
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.status == RunStatus::Ok), "{rows:?}");
    // After the sweep, a client still sees it, finished, with every result.
    let d = state();
    assert!(d.sweep_finished);
    assert_eq!(d.table_rows().len(), 4);
    env.ok(&["daemon", "stop"], 30);
    env.wait_gone(10);
}

#[test]
fn kill_9_mid_run_then_restart_keeps_finished_results_and_reruns_the_interrupted_one() {
    let mut env = Env::new(0.15);
    let profile = env.profile(&[1, 2, 4, 6], 8, "");
    let db = env.db();
    env.detach(&profile, &db);
    // Mid-run: at least one run finished, another a few steps in.
    let st = env.status_until(60, "a later run in flight", |s| {
        count(s, "ok") >= 1
            && s["current"]["running"]
                .as_array()
                .is_some_and(|r| r.len() == 1 && r[0]["step"].as_u64().unwrap_or(0) >= 2)
    });
    let pid = st["pid"].as_u64().unwrap() as u32;
    kill(pid, libc::SIGKILL);
    env.wait_gone(10);
    // What the store holds at the kill: finished results, and the row of the run in flight.
    let at_kill = runs(&db, 1);
    let before: Vec<_> = at_kill
        .iter()
        .filter(|r| r.status == RunStatus::Ok)
        .cloned()
        .collect();
    assert!(!before.is_empty());
    let in_flight: Vec<_> = at_kill
        .iter()
        .filter(|r| r.status == RunStatus::Running)
        .collect();
    assert_eq!(in_flight.len(), 1, "{at_kill:?}");
    let spec = in_flight[0].spec_id.clone();

    let pid2 = env.start_daemon();
    assert_ne!(pid, pid2);
    let out = env.ok(&["wait", "1"], 90);
    assert!(out.contains("sweep 1 finished"), "{out}");

    let after = runs(&db, 1);
    // Every finished result intact: same rows, same values.
    for b in &before {
        let a = after.iter().find(|a| a.id == b.id).expect("row kept");
        assert_eq!(a, b);
    }
    // The run in flight was recorded interrupted, then run again to completion.
    let of_spec: Vec<_> = after.iter().filter(|r| r.spec_id == spec).collect();
    assert_eq!(
        of_spec.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![RunStatus::Interrupted, RunStatus::Ok],
        "{after:?}"
    );
    // Every point has an ok result, and only the interrupted one ran twice.
    assert_eq!(
        after.iter().filter(|r| r.status == RunStatus::Ok).count(),
        4
    );
    assert_eq!(after.len(), 5, "{after:?}");
    assert_eq!(env.calls().len(), 5, "{:?}", env.calls());
    // Nothing left to do in the persisted state.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(env.path("state/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["jobs"].as_array().unwrap().len(), 0, "{state}");
    env.ok(&["daemon", "stop"], 30);
    env.wait_gone(10);
}

#[test]
fn queue_verbs_two_device_slots_and_stop_requeues() {
    // Runs of 3 s: the two in flight are still running when the stop comes.
    let mut env = Env::new(0.5);
    let profile = env.profile(&[1, 2, 4, 6], 6, "devices = [\"cuda:0\", \"cuda:1\"]");
    let db = env.db();
    env.start_daemon();
    // Paused while idle: the sweep starts paused.
    env.ok(&["queue", "pause"], 20);
    let out = env.detach(&profile, &db);
    assert!(out.contains("queued on the daemon"), "{out}");
    let st = env.status_until(20, "the paused sweep", |s| count(s, "queued") == 4);
    assert_eq!(st["paused"], true);
    let ids = entries(&st);
    // 8-character prefixes (what the dashboard shows) name runs; each verb says what it did.
    let moved = env.ok(&["queue", "move", &ids[3][..8], "top"], 20);
    assert_eq!(
        moved.trim(),
        format!(
            "moved {} (bs6) to the top: now 1st of 4 queued",
            &ids[3][..8]
        )
    );
    let skipped = env.ok(&["queue", "skip", &ids[1][..8]], 20);
    assert!(
        skipped.starts_with(&format!("skipped {} (bs2)", &ids[1][..8])),
        "{skipped}"
    );
    assert!(env.ok(&["queue", "pause"], 20).starts_with("paused"));
    let o = env.run(&["queue", "skip", "zzz"], 20);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no run with id zzz"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let st = env.status().unwrap();
    let queued: Vec<&str> = st["current"]["queue"]["queued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(queued, vec![&ids[3][..], &ids[0][..], &ids[2][..]]);
    env.ok(&["queue", "resume"], 20);

    // Two at a time, one per device slot.
    let st = env.status_until(20, "two runs in flight", |s| count(s, "running") == 2);
    let mut devices: Vec<String> = st["current"]["running"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["device"].as_str().unwrap().to_string())
        .collect();
    devices.sort();
    assert_eq!(devices, vec!["cuda:0", "cuda:1"]);
    let human = env.ok(&["status"], 20);
    assert!(
        human.contains("cuda:0") && human.contains("cuda:1"),
        "{human}"
    );

    // Stop: the two runs are interrupted; the daemon exits; a restart finishes the rest.
    env.ok(&["daemon", "stop"], 30);
    env.wait_gone(10);
    let rows = runs(&db, 1);
    assert_eq!(
        rows.iter()
            .filter(|r| r.status == RunStatus::Interrupted)
            .count(),
        2,
        "{rows:?}"
    );
    env.start_daemon();
    // The persisted pause was lifted by `resume`; the skip is kept.
    env.ok(&["wait"], 60);
    let rows = runs(&db, 1);
    let latest = |spec: &str| {
        rows.iter()
            .filter(|r| r.spec_id == spec)
            .max_by_key(|r| r.id)
            .map(|r| r.status)
    };
    assert_eq!(latest(&ids[1]), Some(RunStatus::Skipped));
    for i in [0, 2, 3] {
        assert_eq!(latest(&ids[i]), Some(RunStatus::Ok), "{rows:?}");
    }
    let calls = env.calls();
    assert!(calls.iter().any(|c| c.ends_with(" 0")) && calls.iter().any(|c| c.ends_with(" 1")));
    assert!(
        !calls.iter().any(|c| c.starts_with("2 ")),
        "skipped point ran: {calls:?}"
    );
    env.ok(&["daemon", "stop", "--finish"], 30);
    env.wait_gone(10);
}

#[test]
fn a_sweep_that_cannot_start_is_reported_by_wait() {
    let mut env = Env::new(0.05);
    let profile = env.profile(&[1], 2, "");
    let db = env.db();
    env.start_daemon();
    env.ok(&["queue", "pause"], 20);
    env.detach(&profile, &db);
    env.detach(&profile, &db);
    env.status_until(20, "sweep 1 running, sweep 2 queued", |s| {
        s["current"]["info"]["sweep_id"] == 1
            && s["pending"].as_array().is_some_and(|p| p.len() == 1)
    });
    // Sweep 1 keeps its open database; sweep 2 will find a directory where its database was.
    for ext in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    std::fs::create_dir(&db).unwrap();
    env.ok(&["queue", "resume"], 20);
    let o = env.run(&["wait", "2"], 60);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("sweep 2 could not start"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let o = env.run(&["wait"], 30);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("no sweep running or queued; the last one: sweep 2 could not start"),
        "{err}"
    );
    let o = env.run(&["wait", "7"], 30);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("lorascope report --sweep 7"),
        "{err}"
    );
    // Nothing runs now: a retry is done by queueing the sweep again.
    let o = env.run(&["queue", "retry", "abc"], 30);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--resume --retry-failed"),
        "{err}"
    );
    // `status --json | head -0`: a reader that went away ends the client quietly.
    for args in [&["status", "--json"][..], &["status"][..]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = env
            .cmd()
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.is_empty(), "{args:?}: {err}");
    }
    env.ok(&["daemon", "stop"], 30);
    env.wait_gone(10);
}

#[test]
fn the_same_sweep_id_from_two_databases_needs_db_to_wait() {
    let mut env = Env::new(0.05);
    let profile = env.profile(&[1], 2, "");
    let (db_a, db_b) = (env.db(), env.path("other.db"));
    env.start_daemon();
    env.ok(&["queue", "pause"], 20);
    // Each database numbers its sweeps from 1. A wait that began while the id was unique keeps
    // to its database when the other sweep 1 arrives.
    assert!(env.detach(&profile, &db_a).contains("sweep 1"));
    let early_wait = env
        .cmd()
        .args(["wait", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(env.detach(&profile, &db_b).contains("sweep 1"));
    let o = env.run(&["wait", "1"], 30);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("sweep 1 is queued from 2 results databases") && err.contains("--db"),
        "{err}"
    );
    env.ok(&["queue", "resume"], 20);
    let o = early_wait.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success() && out.contains("sweep 1 finished"),
        "{out}{err}"
    );
    let out = env.ok(&["wait", "1", "--db", db_b.to_str().unwrap()], 60);
    assert!(out.contains("sweep 1 finished"), "{out}");
    assert_eq!(runs(&db_b, 1).len(), 1);
    assert_eq!(runs(&db_a, 1).len(), 1);
    env.ok(&["daemon", "stop"], 30);
    env.wait_gone(10);
}
