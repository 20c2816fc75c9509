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
//!
//! Parts: this file starts the process (lock, socket, signals); `connection` serves one
//! client; `handlers/<message>.rs` answer one message type each; `hub` is what connections
//! and the manager share; `manager` owns and runs the jobs; `plan` rebuilds a job's sweep
//! plan on (re)start.

mod connection;
mod handlers;
mod hub;
mod manager;
mod plan;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::error::DaemonError;
use super::protocol::PROTOCOL_VERSION;
use super::state::Persisted;
use crate::orchestrator::{self, OrchestratorConfig};
use hub::Hub;
use manager::{Ctl, Manager};

/// How long a new connection may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping daemon waits for its connections to write their last replies.
const REPLY_DRAIN: Duration = Duration::from_secs(2);

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
/// Errors: another daemon holds the socket's lock ([`DaemonError::AlreadyRunning`]), the
/// socket cannot be bound, or the state directory is unusable.
pub fn run(opts: DaemonOptions) -> Result<(), DaemonError> {
    let parent = opts
        .socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if !parent.exists() || parent == super::runtime_dir() {
        super::ensure_private_dir(&parent)?;
    }
    super::ensure_private_dir(&opts.state_dir)?;
    // One daemon per socket: the lock is held for the life of the process (and released by
    // the kernel however it ends, kill -9 included).
    let lock_path = lock_path(&opts.socket);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(DaemonError::io(format!(
            "cannot open {}",
            lock_path.display()
        )))?;
    if lock.try_lock().is_err() {
        return Err(DaemonError::AlreadyRunning {
            socket: opts.socket.clone(),
        });
    }
    // Whatever is at the socket path now is stale: no daemon holds the lock.
    let _ = std::fs::remove_file(&opts.socket);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::io("cannot start the async runtime"))?;
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

async fn serve(opts: DaemonOptions) -> Result<(), DaemonError> {
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
    let listener = bind_private(&opts.socket).map_err(DaemonError::io(format!(
        "cannot listen on {}",
        opts.socket.display()
    )))?;
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
            context_cache: Some(
                opts.state_dir
                    .join(crate::orchestrator::fit::ContextCache::FILE),
            ),
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
    // Connections are tracked so that the last replies (`stop` to an idle daemon) are
    // written before the process exits.
    let connections = tokio_util::task::TaskTracker::new();
    {
        let hub = hub.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        connections.spawn(connection::serve(stream, hub.clone()));
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
        let handler =
            |kind| signal(kind).map_err(DaemonError::io("cannot install the signal handlers"));
        let mut hup = handler(SignalKind::hangup())?;
        let mut term = handler(SignalKind::terminate())?;
        let mut int = handler(SignalKind::interrupt())?;
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
    // Let connections write what the manager last replied; a client that stays attached is
    // not waited for beyond the drain time.
    connections.close();
    let _ = tokio::time::timeout(REPLY_DRAIN, connections.wait()).await;
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
