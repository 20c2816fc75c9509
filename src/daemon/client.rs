//! The client side of the socket: a [`Client`] connection past the hello, one method per
//! request the command line makes, and starting a daemon for `run --detach`
//! ([`spawn_daemon`]). The dashboard as a client (`lorascope attach`) is built on this in
//! `cli::attach`; nothing here knows about terminals.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LinesCodec};

use super::error::DaemonError;
use super::protocol::{
    ClientMsg, PROTOCOL_VERSION, ServerMsg, Stamped, StatusReport, Submit, SweepInfo, client_codec,
};
use crate::orchestrator::Command;

/// How long a request may wait for the daemon's reply (the daemon answers at once; only
/// `wait` and `daemon stop` wait longer, without this limit).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The framed socket of a connection: one JSON message per line.
pub type Conn = Framed<UnixStream, LinesCodec>;

/// A connection to the daemon, past the hello.
pub struct Client {
    io: Conn,
    /// The daemon's process id.
    pub pid: u32,
    /// The daemon clock at the hello (s).
    pub now: f64,
}

/// What [`Client::attach`] returns: the daemon clock, the sweep (none before the first) and
/// the events to rebuild its state from.
pub struct Attached {
    pub now: f64,
    pub sweep: Option<SweepInfo>,
    pub replay: Vec<Stamped>,
}

impl Client {
    /// Connects and exchanges hellos.
    ///
    /// Errors: [`DaemonError::NoDaemon`] when nothing listens on `socket`; the daemon's
    /// refusal ([`DaemonError::Refused`]) when it speaks another protocol version.
    pub async fn connect(socket: &Path) -> Result<Client, DaemonError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|error| DaemonError::NoDaemon {
                socket: socket.to_path_buf(),
                error,
            })?;
        let io = Framed::new(stream, client_codec());
        let mut c = Client {
            io,
            pid: 0,
            now: 0.0,
        };
        match c
            .request(&ClientMsg::Hello {
                version: PROTOCOL_VERSION,
            })
            .await?
        {
            ServerMsg::Hello { pid, now, .. } => {
                c.pid = pid;
                c.now = now;
                Ok(c)
            }
            other => Err(DaemonError::UnexpectedFirst(other.kind())),
        }
    }

    /// Sends one message.
    ///
    /// Errors: [`DaemonError::SendFailed`]: the daemon went away.
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), DaemonError> {
        let line = serde_json::to_string(msg).map_err(DaemonError::Encode)?;
        self.io.send(line).await.map_err(DaemonError::SendFailed)
    }

    /// The next message; `None` when the daemon closed the connection.
    ///
    /// Errors: [`DaemonError::Read`] or [`DaemonError::Malformed`].
    pub async fn recv(&mut self) -> Result<Option<ServerMsg>, DaemonError> {
        match self.io.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(DaemonError::Read(e)),
            Some(Ok(line)) => Ok(Some(
                serde_json::from_str(&line).map_err(DaemonError::Malformed)?,
            )),
        }
    }

    /// Sends `msg` and returns the reply ([`ServerMsg::Error`] becomes
    /// [`DaemonError::Refused`]), within [`REPLY_TIMEOUT`].
    ///
    /// Errors: the daemon refused the request (its reason), went away
    /// ([`DaemonError::Closed`]) or did not answer ([`DaemonError::NoReply`]).
    pub async fn request(&mut self, msg: &ClientMsg) -> Result<ServerMsg, DaemonError> {
        self.send(msg).await?;
        let reply = tokio::time::timeout(REPLY_TIMEOUT, self.recv())
            .await
            .map_err(|_| DaemonError::NoReply)?;
        match reply? {
            None => Err(DaemonError::Closed),
            Some(ServerMsg::Error { message }) => Err(DaemonError::Refused(message)),
            Some(m) => Ok(m),
        }
    }

    /// Waits for the next message with no time limit; `None` when the daemon closed the
    /// connection. Replies of [`ServerMsg::Error`] become [`DaemonError::Refused`].
    ///
    /// Errors: as [`Client::recv`], or the daemon's error message.
    pub async fn reply_unbounded(&mut self) -> Result<Option<ServerMsg>, DaemonError> {
        match self.recv().await? {
            Some(ServerMsg::Error { message }) => Err(DaemonError::Refused(message)),
            m => Ok(m),
        }
    }

    /// `lorascope status`: the daemon's status report.
    ///
    /// Errors: as [`Client::request`], or [`DaemonError::Unexpected`].
    pub async fn status(&mut self) -> Result<StatusReport, DaemonError> {
        match self.request(&ClientMsg::Status).await? {
            ServerMsg::Status(r) => Ok(*r),
            other => Err(DaemonError::Unexpected(other.kind())),
        }
    }

    /// `lorascope queue ...`: an orchestrator command for the running sweep.
    ///
    /// Errors: as [`Client::request`]; the queue's reason when it rejects the command.
    pub async fn command(&mut self, command: Command) -> Result<(), DaemonError> {
        self.request(&ClientMsg::Command { command }).await?;
        Ok(())
    }

    /// `lorascope run --detach`: queues a sweep; returns its id and its position (0: it
    /// starts now, n: after n others).
    ///
    /// Errors: as [`Client::request`] (the daemon's reason when the profile, its checks or
    /// the database fail), or [`DaemonError::Unexpected`].
    pub async fn submit(&mut self, submit: Submit) -> Result<(i64, usize), DaemonError> {
        match self.request(&ClientMsg::Submit(Box::new(submit))).await? {
            ServerMsg::Submitted { sweep_id, position } => Ok((sweep_id, position)),
            other => Err(DaemonError::Unexpected(other.kind())),
        }
    }

    /// `lorascope daemon stop`: asks the daemon to stop and returns what it said it will do.
    /// The daemon then closes the connection as it exits: see [`Client::until_closed`].
    ///
    /// Errors: as [`Client::request`], or [`DaemonError::Unexpected`].
    pub async fn stop(&mut self, finish: bool) -> Result<String, DaemonError> {
        match self.request(&ClientMsg::Stop { finish }).await? {
            ServerMsg::Ok { message } => Ok(message),
            other => Err(DaemonError::Unexpected(other.kind())),
        }
    }

    /// Reads until the daemon closes the connection (or the connection fails).
    pub async fn until_closed(&mut self) {
        while self.recv().await.ok().flatten().is_some() {}
    }

    /// `lorascope wait`: waits with no time limit until sweep `sweep` (every queued sweep
    /// with `None`) has ended; `db` picks the database when the id is queued from several.
    /// Returns `Some((complete, message))`, or `None` when the daemon stopped first.
    ///
    /// Errors: as [`Client::reply_unbounded`] (e.g. the sweep is not queued), or
    /// [`DaemonError::Unexpected`].
    pub async fn wait(
        &mut self,
        sweep: Option<i64>,
        db: Option<PathBuf>,
    ) -> Result<Option<(bool, String)>, DaemonError> {
        self.send(&ClientMsg::Wait { sweep, db }).await?;
        match self.reply_unbounded().await? {
            Some(ServerMsg::Done {
                complete, message, ..
            }) => Ok(Some((complete, message))),
            Some(other) => Err(DaemonError::Unexpected(other.kind())),
            None => Ok(None),
        }
    }

    /// Attaches: the sweep and its replay; from then on the daemon sends every event (read
    /// them from [`Client::into_conn`]).
    ///
    /// Errors: as [`Client::request`], or [`DaemonError::Unexpected`].
    pub async fn attach(&mut self) -> Result<Attached, DaemonError> {
        match self.request(&ClientMsg::Attach).await? {
            ServerMsg::Attached { now, sweep, replay } => Ok(Attached { now, sweep, replay }),
            other => Err(DaemonError::Unexpected(other.kind())),
        }
    }

    /// The framed socket, for a client that reads the event stream itself.
    pub fn into_conn(self) -> Conn {
        self.io
    }
}

/// Starts `lorascope daemon --socket SOCKET EXTRA...` in its own session (no controlling
/// terminal, so a hang-up does not reach it), logging to `state_dir()/daemon.log`, and waits
/// until it listens. Returns its pid.
///
/// Errors: it cannot be started ([`DaemonError::Io`]), exits
/// ([`DaemonError::DaemonExited`], with the log's last line) or stays silent for 15 s
/// ([`DaemonError::DaemonSilent`]).
pub fn spawn_daemon(socket: &Path, extra: &[OsString]) -> Result<u32, DaemonError> {
    let state = super::state_dir();
    super::ensure_private_dir(&state)?;
    let log_path = state.join("daemon.log");
    let open_log = DaemonError::io(format!("cannot open {}", log_path.display()));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .and_then(|l| Ok((l.try_clone()?, l)));
    let (log_out, log_err) = log.map_err(open_log)?;
    let exe = std::env::current_exe()
        .map_err(DaemonError::io("cannot locate the lorascope executable"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("daemon")
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log_out)
        .stderr(log_err);
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid(2) is async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(DaemonError::io("cannot start the daemon"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let last_log = || {
        std::fs::read_to_string(&log_path)
            .ok()
            .and_then(|t| t.lines().last().map(str::to_string))
            .unwrap_or_default()
    };
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(child.id());
        }
        let exited = child
            .try_wait()
            .map_err(DaemonError::io("cannot wait for the daemon"))?;
        if let Some(status) = exited {
            // Another daemon may have won a race to the socket.
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(child.id());
            }
            return Err(DaemonError::DaemonExited {
                status,
                last_log: last_log(),
                log: log_path,
            });
        }
        if Instant::now() > deadline {
            return Err(DaemonError::DaemonSilent {
                socket: socket.to_path_buf(),
                log: log_path,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
