//! The daemon's one error type: what the server, the state file and the clients can fail
//! with. Every message is one line for people, causes included (there is no `source()`
//! chain to join), so it can be printed as is: by the binary (`error: ...`), in the daemon's
//! log, or sent to a client as [`ServerMsg::Error`](super::protocol::ServerMsg::Error).

use std::path::PathBuf;

use tokio_util::codec::LinesCodecError;

use super::protocol::{MAX_MESSAGE, PROTOCOL_VERSION};
use super::server::HELLO_TIMEOUT;
use super::state::STATE_VERSION;
use crate::fsutil::AtomicWriteError;
use crate::orchestrator::QueueError;
use crate::orchestrator::preflight::PreflightError;
use crate::profile::ProfileError;
use crate::store::StoreError;

/// Errors of the daemon and its clients.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    // --- The process and its files ---
    /// A system call on a file, directory, socket or process failed; `what` says which
    /// (`cannot open /run/user/1000/lorascope/lorascope.sock.lock`).
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// The socket's or state's directory is another user's: nothing was changed.
    #[error(
        "{} belongs to another user (uid {uid}); set LORASCOPE_RUNTIME_DIR to a directory of yours",
        dir.display()
    )]
    ForeignDir { dir: PathBuf, uid: u32 },
    /// Another daemon holds the socket's lock file.
    #[error(
        "a lorascope daemon is already running on {} (see `lorascope status`; stop it with `lorascope daemon stop`)",
        socket.display()
    )]
    AlreadyRunning { socket: PathBuf },
    /// `state.json` exists but cannot be read.
    #[error("{}: {error}", path.display())]
    StateRead {
        path: PathBuf,
        error: std::io::Error,
    },
    /// `state.json` is not a state file.
    #[error("{}: {error}", path.display())]
    StateParse {
        path: PathBuf,
        error: serde_json::Error,
    },
    /// `state.json` was written by a lorascope with another state format.
    #[error("{}: state version {found} (this lorascope reads {STATE_VERSION})", path.display())]
    StateVersion { path: PathBuf, found: u32 },
    /// Replacing `state.json` failed (directory not writable, disk full).
    #[error(transparent)]
    StateWrite(#[from] AtomicWriteError),
    /// A message or the state could not be serialised.
    #[error("{0}")]
    Encode(serde_json::Error),

    // --- A connection (sent to the client as an error reply) ---
    /// The first message was not a hello.
    #[error("expected {{\"type\":\"hello\",\"version\":{PROTOCOL_VERSION}}} first")]
    HelloExpected,
    /// A second hello on the same connection.
    #[error("hello was already received")]
    HelloAgain,
    /// The client speaks another protocol version.
    #[error(
        "protocol version {version} is not spoken here (this daemon speaks {PROTOCOL_VERSION}); restart the daemon after upgrading (`lorascope daemon stop`)"
    )]
    VersionMismatch { version: u32 },
    /// Nothing arrived within [`HELLO_TIMEOUT`].
    #[error("no hello within {} s: closing the connection", HELLO_TIMEOUT.as_secs())]
    HelloTimeout,
    /// A line longer than [`MAX_MESSAGE`] bytes.
    #[error("message longer than {MAX_MESSAGE} bytes: closing the connection")]
    TooLong,
    /// A line that is not a client message.
    #[error(
        "malformed message ({0}); send one JSON object per line, protocol version {PROTOCOL_VERSION}"
    )]
    BadMessage(serde_json::Error),
    /// A line that is not UTF-8 text.
    #[error(
        "malformed message (the line is not UTF-8); send one JSON object per line, protocol version {PROTOCOL_VERSION}"
    )]
    NotUtf8,
    /// The manager has stopped taking requests.
    #[error("the daemon is stopping")]
    Stopping,
    /// The sweep ended (or the daemon began stopping) before the request was taken.
    #[error("the sweep ended before the request was applied; see `lorascope status`")]
    NotApplied,

    // --- Requests the manager refuses ---
    /// A queue command while no sweep runs.
    #[error("no sweep is running (see `lorascope status`)")]
    NoSweep,
    /// `queue retry` while no sweep runs.
    #[error(
        "no sweep is running: to re-run the failed points of a finished sweep, queue it again with `lorascope run PROFILE --resume --retry-failed --detach`"
    )]
    NoSweepToRetry,
    /// `Shutdown` as a queue command: the daemon stops with `daemon stop` instead.
    #[error(
        "to stop the sweep, use `lorascope daemon stop` (runs are re-queued at the next start)"
    )]
    ShutdownCommand,
    /// The running sweep's queue rejected the command.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// `run --resume --detach` of a sweep that is already queued.
    #[error("sweep {0} is already queued on the daemon (see `lorascope status`)")]
    AlreadyQueued(i64),
    /// The submitted profile does not load.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The submitted profile fails the checks made before a sweep.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// The profile's `run.devices` cannot be resolved.
    #[error("{0}")]
    Devices(String),
    /// The Slurm backend's checks or commands failed.
    #[error(transparent)]
    Slurm(#[from] crate::orchestrator::backend::slurm::SlurmError),
    /// The results database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `wait` for a sweep this daemon does not know.
    #[error(
        "sweep {0} is not queued on this daemon (see `lorascope status`); if it ran under an earlier daemon, `lorascope report --sweep {0}` has its results"
    )]
    NotQueued(i64),
    /// `wait` for a sweep id queued from several results databases, without `--db`.
    #[error(
        "sweep {id} is queued from {} results databases ({}): add --db FILE",
        dbs.len(),
        dbs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Ambiguous { id: i64, dbs: Vec<PathBuf> },

    // --- The client side ---
    /// Nothing listens on the socket.
    #[error(
        "no lorascope daemon on {} ({error}); start one with `lorascope daemon` or `lorascope run PROFILE --detach`",
        socket.display()
    )]
    NoDaemon {
        socket: PathBuf,
        error: std::io::Error,
    },
    /// Writing to the daemon failed.
    #[error("the daemon closed the connection: {0}")]
    SendFailed(LinesCodecError),
    /// The daemon closed the connection before replying.
    #[error("the daemon closed the connection")]
    Closed,
    /// Reading from the daemon failed.
    #[error("reading from the daemon: {0}")]
    Read(LinesCodecError),
    /// A line from the daemon that is not a daemon message.
    #[error("a malformed message from the daemon: {0}")]
    Malformed(serde_json::Error),
    /// No reply within [`REPLY_TIMEOUT`](super::client::REPLY_TIMEOUT).
    #[error("the daemon did not answer within {} s", super::client::REPLY_TIMEOUT.as_secs())]
    NoReply,
    /// The daemon refused the request: its reason.
    #[error("{0}")]
    Refused(String),
    /// The daemon's first reply was not a hello (the message type's name).
    #[error("unexpected first reply from the daemon: {0}")]
    UnexpectedFirst(&'static str),
    /// A reply of the wrong type (the message type's name).
    #[error("unexpected reply from the daemon: {0}")]
    Unexpected(&'static str),
    /// The daemon started for `run --detach` exited before it listened.
    #[error("the daemon exited ({status}) before listening: {last_log} (log: {})", log.display())]
    DaemonExited {
        status: std::process::ExitStatus,
        last_log: String,
        log: PathBuf,
    },
    /// The daemon started for `run --detach` did not listen in time.
    #[error(
        "the daemon did not listen on {} within 15 s (log: {})",
        socket.display(),
        log.display()
    )]
    DaemonSilent { socket: PathBuf, log: PathBuf },
}

impl DaemonError {
    /// An [`DaemonError::Io`] error, `what` naming the operation and its path.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
        let what = what.into();
        move |error| DaemonError::Io { what, error }
    }
}
