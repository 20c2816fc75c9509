//! `lorascope daemon`: the process that owns the sweeps.
//!
//! - The listener accepts clients on the Unix socket and serves each on its own task; a
//!   client that sends garbage gets an error reply, one that sends more than
//!   [`MAX_MESSAGE`](super::protocol::MAX_MESSAGE) bytes in a line, or says nothing within
//!   [`HELLO_TIMEOUT`], is dropped; none of that reaches the sweep.
//! - The manager runs the queued sweeps one after another through
//!   [`run_sweep`](crate::orchestrator::run_sweep) (one worker per device of the profile),
//!   forwards client commands to it, publishes its events to every attached client, and
//!   rewrites `state.json` on every queue change.
//! - SIGHUP is ignored (the daemon outlives the session); SIGTERM and SIGINT stop it like
//!   `lorascope daemon stop`: the running runs are interrupted and re-queued at the next
//!   start.
//!
//! A restart (after a stop, a crash or `kill -9`) reads `state.json`: rows the store left
//! `running` become `interrupted`, and those runs are queued again ahead of the rest, in the
//! order, with the skips and retries, that the queue last had. Finished results are never
//! touched (they were committed before their run left the queue).

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};

use super::protocol::{
    ClientMsg, MAX_MESSAGE, PROTOCOL_VERSION, ServerMsg, Stamped, StatusReport, Submit, SweepInfo,
    server_codec,
};
use super::state::{History, Job, Persisted, STATE_VERSION};
use crate::grid::expand_profile;
use crate::orchestrator::preflight::{load_profile, preflight, profile_key};
use crate::orchestrator::{
    self, Command, EntryState, Event, OrchestratorConfig, PlannedRun, Request, SweepPlan, entry_id,
    plan_runs,
};
use crate::profile;
use crate::store::Store;
use crate::summary::RunStatus;

/// How long a new connection may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Events buffered per client before it counts as fallen behind (and gets a fresh replay).
const BROADCAST_CAPACITY: usize = 8192;

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub socket: PathBuf,
    /// Where `state.json` lives.
    pub state_dir: PathBuf,
    pub worker: orchestrator::WorkerCommand,
    /// A test worker stands in for the engine: skip the engine's preflight checks.
    pub worker_overridden: bool,
    /// SIGTERM -> SIGKILL grace period when runs are interrupted or cancelled.
    pub grace: Duration,
}

/// Runs the daemon in the foreground until it is stopped.
///
/// Errors: another daemon holds the socket's lock, the socket cannot be bound, or the state
/// directory is unusable.
pub fn run(opts: DaemonOptions) -> Result<()> {
    let parent = opts
        .socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if !parent.exists() || parent == super::runtime_dir() {
        super::ensure_private_dir(&parent).map_err(anyhow::Error::msg)?;
    }
    super::ensure_private_dir(&opts.state_dir).map_err(anyhow::Error::msg)?;
    // One daemon per socket: the lock is held for the life of the process (and released by
    // the kernel however it ends, kill -9 included).
    let lock_path = lock_path(&opts.socket);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "a lorascope daemon is already running on {} (see `lorascope status`; stop it with `lorascope daemon stop`)",
            opts.socket.display()
        );
    }
    // Whatever is at the socket path now is stale: no daemon holds the lock.
    let _ = std::fs::remove_file(&opts.socket);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let r = rt.block_on(serve(opts.clone()));
    let _ = std::fs::remove_file(&opts.socket);
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(lock);
    r
}

fn lock_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

fn bind_private(socket: &Path) -> std::io::Result<UnixListener> {
    // The socket is created with mode 0600: no window in which others could connect.
    // SAFETY: umask(2) only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(socket);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn serve(opts: DaemonOptions) -> Result<()> {
    let state_path = opts.state_dir.join("state.json");
    let persisted = match Persisted::load(&state_path) {
        Ok(p) => p,
        Err(e) => {
            // Keep the bad file for a person to look at; start empty.
            let bad = opts.state_dir.join("state.json.bad");
            let _ = std::fs::rename(&state_path, &bad);
            log(&format!(
                "unreadable state ({e}); moved to {} and starting with an empty queue",
                bad.display()
            ));
            Persisted::default()
        }
    };
    let listener = bind_private(&opts.socket)
        .with_context(|| format!("cannot listen on {}", opts.socket.display()))?;
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let hub = Arc::new(Hub::new(opts.socket.clone(), ctl_tx.clone()));
    let manager = Manager {
        hub: hub.clone(),
        jobs: persisted.jobs.into(),
        paused: persisted.paused,
        stop: None,
        state_path,
        cfg: OrchestratorConfig {
            worker: opts.worker.clone(),
            grace: opts.grace,
            telemetry_period: crate::telemetry::SAMPLE_PERIOD,
        },
        worker_overridden: opts.worker_overridden,
    };
    // Before the first client can ask: the queued sweeps count as pending.
    manager.sync(false);
    log(&format!(
        "listening on {} (pid {}, protocol {PROTOCOL_VERSION}); {} sweep(s) from {}",
        opts.socket.display(),
        std::process::id(),
        manager.jobs.len(),
        manager.state_path.display()
    ));
    {
        let hub = hub.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve_client(stream, hub.clone()));
                    }
                    Err(e) => {
                        // E.g. out of file descriptors: wait a little rather than spin.
                        log(&format!("accept: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let ctl = ctl_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = hup.recv() => log("SIGHUP ignored: the daemon keeps running"),
                    _ = term.recv() => {
                        log("SIGTERM: stopping (running runs are interrupted and re-queued)");
                        let (tx, _rx) = oneshot::channel();
                        let _ = ctl.send(Ctl::Stop(false, tx));
                    }
                    _ = int.recv() => {
                        log("SIGINT: stopping (running runs are interrupted and re-queued)");
                        let (tx, _rx) = oneshot::channel();
                        let _ = ctl.send(Ctl::Stop(false, tx));
                    }
                }
            }
        });
    }
    drop(ctl_tx);
    manager.run(ctl_rx).await;
    log("stopped");
    Ok(())
}

/// One line on the daemon's stderr (the journal under systemd, `daemon.log` when started
/// by `run --detach`). Write errors are ignored.
fn log(msg: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "lorascope daemon [{}]: {msg}",
        crate::store::utc_timestamp(crate::store::now_unix())
    );
}

/// Requests from connections to the manager, each with its reply.
enum Ctl {
    Submit(Box<Submit>, oneshot::Sender<Result<(i64, usize), String>>),
    Command(Command, oneshot::Sender<Result<(), String>>),
    Stop(bool, oneshot::Sender<String>),
}

#[derive(Debug, Clone)]
enum Bcast {
    Event(Stamped),
    /// Another sweep started: attached clients get a fresh replay.
    NewSweep,
}

/// What `wait` learned: `Some((complete, message))` once done, and the results database the
/// awaited sweep id was found in.
type WaitState = (Option<(bool, String)>, Option<PathBuf>);

/// How a sweep ended.
#[derive(Debug, Clone)]
struct Ended {
    /// Every run finished (false: a stop interrupted it, or it could not start).
    complete: bool,
    /// Why it could not start (its profile, devices or database), if so.
    error: Option<String>,
}

impl Ended {
    /// What `wait` prints for sweep `id`.
    fn message(&self, id: i64) -> String {
        match (&self.error, self.complete) {
            (Some(e), _) => format!("sweep {id} could not start: {e}"),
            (None, true) => format!("sweep {id} finished"),
            (None, false) => {
                format!("sweep {id} ended early (see `lorascope report --sweep {id}`)")
            }
        }
    }
}

/// What connections read; written by the manager.
#[derive(Default)]
struct Shared {
    history: Option<History>,
    /// A sweep is running.
    busy: bool,
    pending: Vec<SweepInfo>,
    paused: bool,
    stopping: Option<String>,
    /// Sweeps that ended in this daemon's life, by (results database, sweep id).
    ended: HashMap<(PathBuf, i64), Ended>,
    /// The sweep that ended last.
    last_ended: Option<(PathBuf, i64)>,
    /// Sequence number of the last broadcast.
    seq: u64,
}

struct Hub {
    start: Instant,
    socket: PathBuf,
    ctl: mpsc::UnboundedSender<Ctl>,
    shared: Mutex<Shared>,
    tx: broadcast::Sender<(u64, Bcast)>,
    changed: watch::Sender<u64>,
}

impl Hub {
    fn new(socket: PathBuf, ctl: mpsc::UnboundedSender<Ctl>) -> Hub {
        Hub {
            start: Instant::now(),
            socket,
            ctl,
            shared: Mutex::new(Shared::default()),
            tx: broadcast::channel(BROADCAST_CAPACITY).0,
            changed: watch::channel(0).0,
        }
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves consistent-enough data: keep serving.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event of the current sweep and sends it to attached clients.
    fn publish(&self, event: Event) {
        let s = Stamped {
            t: self.now(),
            event,
        };
        let mut sh = self.lock();
        if let Some(h) = sh.history.as_mut() {
            h.record(&s);
        }
        sh.seq += 1;
        let _ = self.tx.send((sh.seq, Bcast::Event(s)));
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// The replay for a client and a subscription that continues right after it.
    fn attach(&self) -> (ServerMsg, broadcast::Receiver<(u64, Bcast)>, u64) {
        let sh = self.lock();
        let rx = self.tx.subscribe();
        (self.attached_msg(&sh), rx, sh.seq)
    }

    fn attached_msg(&self, sh: &Shared) -> ServerMsg {
        ServerMsg::Attached {
            now: self.now(),
            sweep: sh.history.as_ref().map(|h| h.info.clone()),
            replay: sh.history.as_ref().map(History::replay).unwrap_or_default(),
        }
    }

    fn status(&self) -> StatusReport {
        let sh = self.lock();
        StatusReport {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            socket: self.socket.clone(),
            uptime_s: self.now(),
            stopping: sh.stopping.clone(),
            paused: sh.paused,
            current: sh.history.as_ref().map(|h| h.status(self.now())),
            pending: sh.pending.clone(),
        }
    }

    /// `Some((complete, message))` once what `wait` waits for has happened, and the database
    /// sweep `id` was found in (a waiter keeps to it, so a later sweep with the same id from
    /// another database does not make its wait ambiguous). Sweep `id` is looked up in every
    /// results database the daemon has seen, or in `db` alone; an id found in several
    /// databases needs `db`.
    fn wait_state(&self, sweep: Option<i64>, db: Option<&Path>) -> Result<WaitState, String> {
        let sh = self.lock();
        let Some(id) = sweep else {
            if sh.busy || !sh.pending.is_empty() {
                return Ok((None, None));
            }
            let last = sh
                .last_ended
                .as_ref()
                .and_then(|k| Some((k.1, sh.ended.get(k)?)));
            return Ok((
                Some(match last {
                    Some((id, e)) => (
                        e.complete,
                        format!(
                            "no sweep running or queued; the last one: {}",
                            e.message(id)
                        ),
                    ),
                    None => (true, "no sweep running or queued".to_string()),
                }),
                None,
            ));
        };
        let wanted = |d: &Path| db.is_none_or(|w| w == d);
        // Databases where sweep `id` is running or queued, then where it has ended.
        let active: Vec<PathBuf> = sh
            .history
            .as_ref()
            .filter(|h| sh.busy && h.info.sweep_id == id && wanted(&h.info.db))
            .map(|h| h.info.db.clone())
            .into_iter()
            .chain(
                sh.pending
                    .iter()
                    .filter(|p| p.sweep_id == id && wanted(&p.db))
                    .map(|p| p.db.clone()),
            )
            .collect();
        let ended = sh
            .ended
            .keys()
            .filter(|(d, i)| *i == id && wanted(d))
            .map(|(d, _)| d.clone());
        let mut dbs: Vec<PathBuf> = active.iter().cloned().chain(ended).collect();
        dbs.sort();
        dbs.dedup();
        match dbs.as_slice() {
            [] => Err(format!(
                "sweep {id} is not queued on this daemon (see `lorascope status`); if it ran under an earlier daemon, `lorascope report --sweep {id}` has its results"
            )),
            // Running or queued again (`run --resume`) counts before an earlier end.
            [d] if active.contains(d) => Ok((None, Some(d.clone()))),
            [d] => Ok((
                sh.ended
                    .get(&(d.clone(), id))
                    .map(|e| (e.complete, e.message(id))),
                Some(d.clone()),
            )),
            several => Err(format!(
                "sweep {id} is queued from {} results databases ({}): add --db FILE",
                several.len(),
                several
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

type Conn = Framed<UnixStream, LinesCodec>;

async fn send(io: &mut Conn, msg: &ServerMsg) -> bool {
    match serde_json::to_string(msg) {
        Ok(line) => io.send(line).await.is_ok(),
        Err(_) => false,
    }
}

fn error(message: impl Into<String>) -> ServerMsg {
    ServerMsg::Error {
        message: message.into(),
    }
}

/// What a line from a client is.
enum Incoming {
    Msg(Box<ClientMsg>),
    /// Malformed: reply this error and carry on.
    Bad(String),
    /// Close the connection after replying this (if anything).
    Close(Option<String>),
}

fn incoming(line: Option<Result<String, LinesCodecError>>) -> Incoming {
    match line {
        None => Incoming::Close(None),
        Some(Err(LinesCodecError::MaxLineLengthExceeded)) => Incoming::Close(Some(format!(
            "message longer than {MAX_MESSAGE} bytes: closing the connection"
        ))),
        Some(Err(LinesCodecError::Io(_))) => Incoming::Close(None),
        Some(Ok(line)) => match serde_json::from_str::<ClientMsg>(&line) {
            Ok(m) => Incoming::Msg(Box::new(m)),
            Err(e) => Incoming::Bad(format!(
                "malformed message ({e}); send one JSON object per line, protocol version {PROTOCOL_VERSION}"
            )),
        },
    }
}

async fn serve_client(stream: UnixStream, hub: Arc<Hub>) {
    let mut io = Framed::new(stream, server_codec());
    let first = match tokio::time::timeout(HELLO_TIMEOUT, io.next()).await {
        Ok(l) => incoming(l),
        Err(_) => Incoming::Close(Some("no hello within 10 s: closing the connection".into())),
    };
    match first {
        Incoming::Msg(m) => match *m {
            ClientMsg::Hello { version } if version == PROTOCOL_VERSION => {
                let hello = ServerMsg::Hello {
                    version: PROTOCOL_VERSION,
                    pid: std::process::id(),
                    now: hub.now(),
                };
                if !send(&mut io, &hello).await {
                    return;
                }
            }
            ClientMsg::Hello { version } => {
                let _ = send(&mut io, &error(format!(
                    "protocol version {version} is not spoken here (this daemon speaks {PROTOCOL_VERSION}); restart the daemon after upgrading (`lorascope daemon stop`)"
                ))).await;
                return;
            }
            _ => {
                let _ = send(
                    &mut io,
                    &error(format!(
                        "expected {{\"type\":\"hello\",\"version\":{PROTOCOL_VERSION}}} first"
                    )),
                )
                .await;
                return;
            }
        },
        Incoming::Bad(e) => {
            let _ = send(&mut io, &error(e)).await;
            return;
        }
        Incoming::Close(e) => {
            if let Some(e) = e {
                let _ = send(&mut io, &error(e)).await;
            }
            return;
        }
    }
    let mut sub: Option<(broadcast::Receiver<(u64, Bcast)>, u64)> = None;
    let mut waiting: Option<(Option<i64>, Option<PathBuf>, watch::Receiver<u64>)> = None;
    loop {
        tokio::select! {
            line = io.next() => {
                let reply = match incoming(line) {
                    Incoming::Close(e) => {
                        if let Some(e) = e {
                            let _ = send(&mut io, &error(e)).await;
                        }
                        return;
                    }
                    Incoming::Bad(e) => error(e),
                    Incoming::Msg(m) => match *m {
                        ClientMsg::Hello { .. } => error("hello was already received"),
                        ClientMsg::Status => ServerMsg::Status(Box::new(hub.status())),
                        ClientMsg::Attach => {
                            let (msg, rx, seq) = hub.attach();
                            sub = Some((rx, seq));
                            msg
                        }
                        ClientMsg::Command { command } => {
                            let (tx, rx) = oneshot::channel();
                            ask(&hub, Ctl::Command(command, tx), rx, |r| match r {
                                Ok(()) => ServerMsg::Ok { message: "done".into() },
                                Err(e) => error(e),
                            }).await
                        }
                        ClientMsg::Submit(s) => {
                            let (tx, rx) = oneshot::channel();
                            ask(&hub, Ctl::Submit(s, tx), rx, |r| match r {
                                Ok((sweep_id, position)) => ServerMsg::Submitted { sweep_id, position },
                                Err(e) => error(e),
                            }).await
                        }
                        ClientMsg::Stop { finish } => {
                            let (tx, rx) = oneshot::channel();
                            ask(&hub, Ctl::Stop(finish, tx), rx, |message| ServerMsg::Ok { message }).await
                        }
                        ClientMsg::Wait { sweep, db } => match hub.wait_state(sweep, db.as_deref()) {
                            Ok((Some((complete, message)), _)) => ServerMsg::Done { sweep_id: sweep, complete, message },
                            Ok((None, resolved)) => {
                                waiting = Some((sweep, resolved.or(db), hub.changed.subscribe()));
                                continue;
                            }
                            Err(e) => error(e),
                        },
                    },
                };
                if !send(&mut io, &reply).await {
                    return;
                }
            }
            b = async { sub.as_mut().unwrap().0.recv().await }, if sub.is_some() => {
                let msg = match b {
                    Ok((seq, Bcast::Event(s))) => {
                        let last = &mut sub.as_mut().unwrap().1;
                        if seq <= *last {
                            continue;
                        }
                        *last = seq;
                        ServerMsg::Event(s)
                    }
                    // A new sweep, or this client fell behind: start it over from a replay.
                    Ok((_, Bcast::NewSweep)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        let (msg, seq) = {
                            let sh = hub.lock();
                            (hub.attached_msg(&sh), sh.seq)
                        };
                        sub.as_mut().unwrap().1 = seq;
                        msg
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !send(&mut io, &msg).await {
                    return;
                }
            }
            c = async { waiting.as_mut().unwrap().2.changed().await }, if waiting.is_some() => {
                if c.is_err() {
                    return;
                }
                let (sweep, db) = {
                    let w = waiting.as_ref().unwrap();
                    (w.0, w.1.clone())
                };
                let reply = match hub.wait_state(sweep, db.as_deref()) {
                    Ok((None, _)) => continue,
                    Ok((Some((complete, message)), _)) => ServerMsg::Done { sweep_id: sweep, complete, message },
                    Err(e) => error(e),
                };
                waiting = None;
                if !send(&mut io, &reply).await {
                    return;
                }
            }
        }
    }
}

/// Sends a request to the manager and turns its reply into a message.
async fn ask<T>(
    hub: &Hub,
    ctl: Ctl,
    rx: oneshot::Receiver<T>,
    f: impl FnOnce(T) -> ServerMsg,
) -> ServerMsg {
    if hub.ctl.send(ctl).is_err() {
        return error("the daemon is stopping");
    }
    match rx.await {
        Ok(r) => f(r),
        // The sweep ended (or the daemon is stopping) before the request was taken.
        Err(_) => error("the sweep ended before the request was applied; see `lorascope status`"),
    }
}

/// Owns the jobs; runs them one at a time.
struct Manager {
    hub: Arc<Hub>,
    jobs: VecDeque<Job>,
    /// `queue pause` in force.
    paused: bool,
    /// A stop was asked for: `Some(finish)`.
    stop: Option<bool>,
    state_path: PathBuf,
    cfg: OrchestratorConfig,
    worker_overridden: bool,
}

/// A job ready to run.
struct Prepared {
    plan: SweepPlan,
    store: Store,
    history: History,
}

impl Manager {
    fn persist(&self) {
        let p = Persisted {
            version: STATE_VERSION,
            paused: self.paused,
            jobs: self.jobs.iter().cloned().collect(),
        };
        if let Err(e) = p.save(&self.state_path) {
            log(&format!("cannot save the state: {e}"));
        }
    }

    /// Copies what connections show from the manager's state, and wakes waiters.
    fn sync(&self, busy: bool) {
        {
            let mut sh = self.hub.lock();
            sh.busy = busy;
            sh.paused = self.paused;
            sh.pending = self
                .jobs
                .iter()
                .skip(usize::from(busy))
                .map(|j| j.info.clone())
                .collect();
            sh.stopping = self.stop.map(|finish| {
                if finish {
                    "finishing the running runs, then stopping".to_string()
                } else {
                    "interrupting the running runs, then stopping".to_string()
                }
            });
        }
        self.hub.bump();
    }

    async fn run(mut self, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
        self.persist();
        self.sync(false);
        while self.stop.is_none() {
            if self.jobs.is_empty() {
                let Some(c) = ctl.recv().await else { break };
                match c {
                    Ctl::Submit(s, reply) => {
                        let _ = reply.send(self.submit(&s, false));
                    }
                    Ctl::Command(cmd, reply) => {
                        let _ = reply.send(match cmd {
                            Command::Pause | Command::Resume => {
                                self.paused = cmd == Command::Pause;
                                self.persist();
                                Ok(())
                            }
                            Command::Retry { .. } => Err("no sweep is running: to re-run the failed points of a finished sweep, queue it again with `lorascope run PROFILE --resume --retry-failed --detach`".into()),
                            _ => Err("no sweep is running (see `lorascope status`)".into()),
                        });
                    }
                    Ctl::Stop(finish, reply) => {
                        self.stop = Some(finish);
                        let _ = reply.send("stopping: no sweep is running".into());
                    }
                }
                self.sync(false);
                continue;
            }
            self.run_front(&mut ctl).await;
        }
        self.persist();
        self.sync(false);
    }

    /// Queues a sweep; returns its id and position.
    fn submit(&mut self, s: &Submit, busy: bool) -> Result<(i64, usize), String> {
        let lp = load_profile(s.profile.as_deref()).map_err(|e| e.to_string())?;
        if !self.worker_overridden {
            preflight(&lp).map_err(|e| e.to_string())?;
        }
        let store = Store::open(&s.db).map_err(|e| e.to_string())?;
        let key = profile_key(&lp);
        let existing = if s.resume {
            store.latest_sweep_for(&key).map_err(|e| e.to_string())?
        } else {
            None
        };
        let sweep_id = match existing {
            Some(sw) => {
                if self
                    .jobs
                    .iter()
                    .any(|j| j.info.sweep_id == sw.id && j.info.db == s.db)
                {
                    return Err(format!(
                        "sweep {} is already queued on the daemon (see `lorascope status`)",
                        sw.id
                    ));
                }
                sw.id
            }
            None => store
                .create_sweep(&lp.name(), &key, &lp.source)
                .map_err(|e| e.to_string())?,
        };
        let base_dir = std::path::absolute(&lp.base_dir).unwrap_or(lp.base_dir.clone());
        self.jobs.push_back(Job {
            info: SweepInfo {
                sweep_id,
                name: lp.name(),
                profile_path: lp.path.display().to_string(),
                profile_source: lp.source.clone(),
                base_dir,
                db: s.db.clone(),
            },
            retry_failed: s.retry_failed,
            queue: None,
        });
        self.persist();
        log(&format!("queued sweep {sweep_id} ({})", lp.name()));
        let position = self.jobs.len() - 1;
        self.sync(busy);
        Ok((sweep_id, position))
    }

    /// Builds the plan of a job from its last queue snapshot (a restart) or from the store.
    fn prepare(&self, job: &Job) -> Result<Prepared, String> {
        let info = &job.info;
        let p = profile::parse_str(&info.profile_source, &info.profile_path)
            .map_err(|e| e.to_string())?;
        let specs = expand_profile(&p, &info.base_dir);
        let repeats = p.run.repeats;
        let devices = profile::resolve_devices(&p.run.devices)?;
        let store = Store::open(&info.db).map_err(|e| e.to_string())?;
        let sweep = info.sweep_id;
        let interrupted = store.mark_interrupted(sweep).map_err(|e| e.to_string())?;
        if interrupted > 0 {
            log(&format!(
                "sweep {sweep}: {interrupted} run(s) left running by an earlier daemon marked interrupted; they run again"
            ));
        }
        let statuses = store.latest_statuses(sweep).map_err(|e| e.to_string())?;
        let stored = |spec: usize, repeat: u32| {
            statuses
                .get(&(specs[spec].id.clone(), repeat))
                .copied()
                .filter(|st| st.is_finished(job.retry_failed))
        };
        let valid = |snap: &orchestrator::QueueSnapshot| {
            snap.entries.iter().all(|e| {
                e.spec_index < specs.len()
                    && entry_id(&specs[e.spec_index].id, e.repeat, repeats) == e.id
            })
        };
        let mut runs = Vec::new();
        let mut finished = Vec::new();
        match &job.queue {
            Some(snap) if valid(snap) => {
                // Runs that were in flight first, then the queue in its last order.
                for e in &snap.entries {
                    let pr = PlannedRun {
                        spec_index: e.spec_index,
                        repeat: e.repeat,
                    };
                    match e.state {
                        EntryState::Running { .. }
                        | EntryState::Done {
                            status: RunStatus::Interrupted,
                        } => match stored(e.spec_index, e.repeat) {
                            // It finished before the daemon died: keep that result.
                            Some(st) => finished.push((pr, st)),
                            None => runs.push(pr),
                        },
                        EntryState::Done { status } => finished.push((pr, status)),
                        EntryState::Queued => {}
                    }
                }
                for id in &snap.queued {
                    if let Some(e) = snap.entries.iter().find(|e| &e.id == id) {
                        runs.push(PlannedRun {
                            spec_index: e.spec_index,
                            repeat: e.repeat,
                        });
                    }
                }
            }
            _ => (runs, finished) = plan_runs(specs.len(), repeats, stored),
        }
        // Earlier results, so that an attached dashboard shows them.
        let mut history = History::new(info.clone(), p.run.steps);
        let rows = store.runs(sweep).map_err(|e| e.to_string())?;
        let t = self.hub.now();
        for (pr, _) in &finished {
            let spec = &specs[pr.spec_index];
            let Some(row) = rows
                .iter()
                .filter(|r| r.spec_id == spec.id && r.repeat == pr.repeat)
                .max_by_key(|r| r.id)
            else {
                continue;
            };
            let Some(summary) = row.summary.clone() else {
                continue;
            };
            let id = entry_id(&spec.id, pr.repeat, repeats);
            for event in [
                Event::RunStarted {
                    id: id.clone(),
                    run_id: row.id,
                    label: spec.label(),
                    device: row.device.clone(),
                    attempt: 1,
                },
                Event::RunFinished {
                    id,
                    run_id: Some(row.id),
                    label: spec.label(),
                    summary: Box::new(summary),
                },
            ] {
                history.record(&Stamped { t, event });
            }
        }
        Ok(Prepared {
            plan: SweepPlan {
                sweep_id: sweep,
                specs,
                repeats,
                already_done: finished.len(),
                runs,
                devices,
                finished,
            },
            store,
            history,
        })
    }

    fn on_event(&mut self, ev: Event) {
        if let Event::QueueChanged { queue } = &ev
            && let Some(job) = self.jobs.front_mut()
        {
            job.queue = Some(queue.clone());
            self.persist();
        }
        self.hub.publish(ev);
    }

    /// Whether runs are in flight, per the latest snapshot.
    fn any_running(&self) -> bool {
        self.jobs
            .front()
            .and_then(|j| j.queue.as_ref())
            .is_some_and(|q| {
                q.entries
                    .iter()
                    .any(|e| matches!(e.state, EntryState::Running { .. }))
            })
    }

    /// Runs the first job until it ends or the daemon is stopped.
    async fn run_front(&mut self, ctl: &mut mpsc::UnboundedReceiver<Ctl>) {
        let Some(job) = self.jobs.front().cloned() else {
            return;
        };
        let sweep_id = job.info.sweep_id;
        let Prepared {
            plan,
            mut store,
            history,
        } = match self.prepare(&job) {
            Ok(p) => p,
            Err(e) => {
                log(&format!("sweep {sweep_id} cannot start: {e}; dropped"));
                self.jobs.pop_front();
                self.persist();
                let mut sh = self.hub.lock();
                let key = (job.info.db.clone(), sweep_id);
                sh.ended.insert(
                    key.clone(),
                    Ended {
                        complete: false,
                        error: Some(e),
                    },
                );
                sh.last_ended = Some(key);
                drop(sh);
                self.sync(false);
                return;
            }
        };
        log(&format!(
            "sweep {sweep_id} ({}): {} run(s) to go, {} already done",
            job.info.name,
            plan.runs.len(),
            plan.already_done
        ));
        {
            let mut sh = self.hub.lock();
            sh.history = Some(history);
            sh.seq += 1;
            let _ = self.hub.tx.send((sh.seq, Bcast::NewSweep));
        }
        self.sync(true);
        let (ctx, crx) = mpsc::unbounded_channel::<Request>();
        let (etx, mut erx) = mpsc::unbounded_channel::<Event>();
        if self.paused {
            let _ = ctx.send(Command::Pause.into());
        }
        let cfg = self.cfg.clone();
        let mut shutdown_sent = false;
        let result = {
            let sweep = orchestrator::run_sweep(plan, &mut store, &cfg, crx, etx);
            tokio::pin!(sweep);
            loop {
                tokio::select! {
                    r = &mut sweep => break r,
                    Some(ev) = erx.recv() => {
                        self.on_event(ev);
                        if self.stop == Some(true) && !shutdown_sent && !self.any_running() {
                            let _ = ctx.send(Command::Shutdown.into());
                            shutdown_sent = true;
                        }
                    }
                    c = ctl.recv() => match c {
                        None => {}
                        Some(Ctl::Submit(s, reply)) => {
                            let _ = reply.send(self.submit(&s, true));
                        }
                        Some(Ctl::Command(Command::Shutdown, reply)) => {
                            let _ = reply.send(Err("to stop the sweep, use `lorascope daemon stop` (runs are re-queued at the next start)".into()));
                        }
                        Some(Ctl::Command(cmd, reply)) => {
                            if matches!(cmd, Command::Pause | Command::Resume) {
                                self.paused = cmd == Command::Pause;
                                self.persist();
                                self.sync(true);
                            }
                            let _ = ctx.send(Request { command: cmd, reply: Some(reply) });
                        }
                        Some(Ctl::Stop(finish, reply)) => {
                            // Only ever from finish to interrupt, never back.
                            let finish = finish && self.stop != Some(false);
                            self.stop = Some(finish);
                            // Take the events already emitted, so the snapshot is current.
                            while let Ok(ev) = erx.try_recv() {
                                self.on_event(ev);
                            }
                            let msg = if finish {
                                let _ = ctx.send(Command::Pause.into());
                                if !self.any_running() && !shutdown_sent {
                                    let _ = ctx.send(Command::Shutdown.into());
                                    shutdown_sent = true;
                                }
                                "stopping once the running runs have finished; nothing new starts"
                            } else {
                                if !shutdown_sent {
                                    let _ = ctx.send(Command::Shutdown.into());
                                    shutdown_sent = true;
                                }
                                "stopping: the running runs are interrupted and re-queued for the next start"
                            };
                            log(msg);
                            self.sync(true);
                            let _ = reply.send(msg.to_string());
                        }
                    },
                }
            }
        };
        while let Ok(ev) = erx.try_recv() {
            self.on_event(ev);
        }
        let complete = match result {
            Ok(outcome) if !outcome.shutdown => {
                if let Err(e) = store.finish_sweep(sweep_id) {
                    log(&format!("sweep {sweep_id}: {e}"));
                }
                self.jobs.pop_front();
                log(&format!("sweep {sweep_id} finished: {:?}", outcome.counts));
                true
            }
            Ok(_) => {
                // Stopped: the job stays, with its last queue, for the next start.
                log(&format!(
                    "sweep {sweep_id} stopped; it continues at the next start"
                ));
                false
            }
            Err(e) => {
                log(&format!("sweep {sweep_id} aborted: {e}; dropped"));
                self.hub.publish(Event::Warning {
                    id: None,
                    message: format!("sweep {sweep_id} aborted: {e}"),
                });
                self.jobs.pop_front();
                false
            }
        };
        self.persist();
        {
            let mut sh = self.hub.lock();
            if let Some(h) = sh.history.as_mut() {
                h.ended = true;
            }
            let key = (job.info.db.clone(), sweep_id);
            sh.ended.insert(
                key.clone(),
                Ended {
                    complete,
                    error: None,
                },
            );
            sh.last_ended = Some(key);
        }
        self.sync(false);
    }
}
