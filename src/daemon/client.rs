//! Clients of the daemon: the connection, starting a daemon for `run --detach`, and the
//! dashboard as a client (`lorascope attach`), which is the same [`crate::ui::run`] loop as
//! a local sweep fed from the socket instead of an in-process orchestrator.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LinesCodec};

use super::protocol::{ClientMsg, PROTOCOL_VERSION, ServerMsg, Stamped, SweepInfo, client_codec};
use crate::grid::expand_profile;
use crate::orchestrator::Command;
use crate::ui::{App, Feed};

/// How long a request may wait for the daemon's reply (the daemon answers at once; only
/// `wait` and `daemon stop` wait longer, without this limit).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to the daemon, past the hello.
pub struct Client {
    io: Framed<UnixStream, LinesCodec>,
    /// The daemon's process id.
    pub pid: u32,
    /// The daemon clock at the hello (s).
    pub now: f64,
}

/// The one-line error for "nothing listens on the socket".
fn no_daemon(socket: &Path, e: &std::io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "no lorascope daemon on {} ({e}); start one with `lorascope daemon` or `lorascope run PROFILE --detach`",
        socket.display()
    )
}

impl Client {
    /// Connects and exchanges hellos.
    ///
    /// Errors: no daemon listens on `socket`, or it speaks another protocol version.
    pub async fn connect(socket: &Path) -> Result<Client> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| no_daemon(socket, &e))?;
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
            other => bail!("unexpected first reply from the daemon: {}", kind(&other)),
        }
    }

    /// Sends one message.
    ///
    /// Errors: the daemon went away.
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<()> {
        let line = serde_json::to_string(msg)?;
        self.io
            .send(line)
            .await
            .context("the daemon closed the connection")
    }

    /// The next message; `None` when the daemon closed the connection.
    ///
    /// Errors: a read error or a line that is not a daemon message.
    pub async fn recv(&mut self) -> Result<Option<ServerMsg>> {
        match self.io.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(anyhow::anyhow!("reading from the daemon: {e}")),
            Some(Ok(line)) => Ok(Some(
                serde_json::from_str(&line).context("a malformed message from the daemon")?,
            )),
        }
    }

    /// Sends `msg` and returns the reply ([`ServerMsg::Error`] becomes an error), within
    /// [`REPLY_TIMEOUT`].
    ///
    /// Errors: the daemon refused the request (its reason), went away or did not answer.
    pub async fn request(&mut self, msg: &ClientMsg) -> Result<ServerMsg> {
        self.send(msg).await?;
        let reply = tokio::time::timeout(REPLY_TIMEOUT, self.recv())
            .await
            .map_err(|_| anyhow::anyhow!("the daemon did not answer within 30 s"))?;
        match reply? {
            None => bail!("the daemon closed the connection"),
            Some(ServerMsg::Error { message }) => Err(anyhow::Error::msg(message)),
            Some(m) => Ok(m),
        }
    }

    /// Waits for the next message with no time limit; `None` when the daemon closed the
    /// connection. Replies of [`ServerMsg::Error`] become errors.
    ///
    /// Errors: as [`Client::recv`], or the daemon's error message.
    pub async fn reply_unbounded(&mut self) -> Result<Option<ServerMsg>> {
        match self.recv().await? {
            Some(ServerMsg::Error { message }) => Err(anyhow::Error::msg(message)),
            m => Ok(m),
        }
    }
}

/// The message type's name, for errors.
pub fn kind(m: &ServerMsg) -> &'static str {
    match m {
        ServerMsg::Hello { .. } => "hello",
        ServerMsg::Error { .. } => "error",
        ServerMsg::Ok { .. } => "ok",
        ServerMsg::Submitted { .. } => "submitted",
        ServerMsg::Status(_) => "status",
        ServerMsg::Attached { .. } => "attached",
        ServerMsg::Event(_) => "event",
        ServerMsg::Done { .. } => "done",
    }
}

/// Starts `lorascope daemon --socket SOCKET EXTRA...` in its own session (no controlling
/// terminal, so a hang-up does not reach it), logging to `state_dir()/daemon.log`, and waits
/// until it listens. Returns its pid.
///
/// Errors: it cannot be started, or exits or stays silent for 15 s (with the log's last line).
pub fn spawn_daemon(socket: &Path, extra: &[OsString]) -> Result<u32> {
    let state = super::state_dir();
    super::ensure_private_dir(&state).map_err(anyhow::Error::msg)?;
    let log_path = state.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot locate the lorascope executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("daemon")
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
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
    let mut child = cmd.spawn().context("cannot start the daemon")?;
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
        if let Some(status) = child.try_wait()? {
            // Another daemon may have won a race to the socket.
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(child.id());
            }
            bail!(
                "the daemon exited ({status}) before listening: {} (log: {})",
                last_log(),
                log_path.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not listen on {} within 15 s (log: {})",
                socket.display(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A dashboard state for `info`, attached (quitting detaches), its clock at daemon time `now`.
///
/// Errors: the profile text no longer parses (a different lorascope version).
pub fn app_for(info: &SweepInfo, now: f64) -> Result<App> {
    let p = crate::profile::parse_str(&info.profile_source, &info.profile_path)
        .map_err(|e| anyhow::anyhow!("sweep {}: {e}", info.sweep_id))?;
    let specs = expand_profile(&p, &info.base_dir);
    let name = p.name.clone().unwrap_or_else(|| info.name.clone());
    let mut app = App::new(name, p, specs);
    app.attached = true;
    app.clock_base = now;
    app.now = now;
    Ok(app)
}

fn feed(s: Stamped) -> Feed {
    Feed::Event {
        at: Some(s.t),
        event: s.event,
    }
}

/// Connects, attaches and rebuilds the dashboard state from the replay (what `attach` shows
/// first). `None` when the daemon has not run a sweep yet.
///
/// Errors: as [`Client::connect`].
pub async fn attached_state(socket: &Path) -> Result<Option<App>> {
    let mut c = Client::connect(socket).await?;
    let ServerMsg::Attached { now, sweep, replay } = c.request(&ClientMsg::Attach).await? else {
        bail!("unexpected reply from the daemon");
    };
    let Some(info) = sweep else { return Ok(None) };
    let mut app = app_for(&info, now)?;
    for s in replay {
        crate::ui::apply_feed(&mut app, feed(s), now);
    }
    Ok(Some(app))
}

/// `lorascope attach`: the dashboard on this terminal as a client of the daemon. Keys send
/// commands; q, D or Ctrl-C detach and leave the sweep running.
///
/// Errors: no daemon, no sweep yet, or the terminal cannot be set up.
pub async fn attach_dashboard(socket: &Path) -> Result<()> {
    let mut c = Client::connect(socket).await?;
    let pid = c.pid;
    let ServerMsg::Attached { now, sweep, replay } = c.request(&ClientMsg::Attach).await? else {
        bail!("unexpected reply from the daemon");
    };
    let Some(info) = sweep else {
        bail!(
            "the daemon (pid {pid}) has not run a sweep yet: queue one with `lorascope run PROFILE --detach`"
        );
    };
    let mut app = app_for(&info, now)?;
    app.mem_total = crate::ui::mem_total();
    app.color = crate::ui::Theme::from_env().color;
    let (ftx, frx) = mpsc::unbounded_channel::<Feed>();
    for s in replay {
        let _ = ftx.send(feed(s));
    }
    let _ = ftx.send(Feed::Message(
        format!("attached to the daemon (pid {pid}): q or D detaches, the sweep keeps running"),
        false,
    ));
    let (ctx, mut crx) = mpsc::unbounded_channel::<Command>();
    let mut io = c.io;
    let bridge = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = io.next() => {
                    let Some(Ok(line)) = m else { break };
                    let _ = match serde_json::from_str::<ServerMsg>(&line) {
                        Ok(ServerMsg::Event(s)) => ftx.send(feed(s)),
                        Ok(ServerMsg::Attached { sweep: Some(info), replay, .. }) => {
                            match app_for(&info, 0.0) {
                                Ok(app) => {
                                    let _ = ftx.send(Feed::Reset(Box::new(app)));
                                    for s in replay {
                                        let _ = ftx.send(feed(s));
                                    }
                                    Ok(())
                                }
                                Err(e) => ftx.send(Feed::Message(e.to_string(), true)),
                            }
                        }
                        Ok(ServerMsg::Error { message }) => ftx.send(Feed::Message(message, true)),
                        Ok(_) => Ok(()),
                        Err(e) => ftx.send(Feed::Message(format!("a malformed message from the daemon: {e}"), true)),
                    };
                }
                c = crx.recv() => {
                    let Some(command) = c else { break };
                    let Ok(line) = serde_json::to_string(&ClientMsg::Command { command }) else { continue };
                    if io.send(line).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let r = crate::ui::run(app, ctx, frx).await;
    bridge.abort();
    r.context("dashboard")?;
    Ok(())
}

/// `lorascope attach --json`: the attach stream as JSON lines on stdout (the replay, then
/// every event) until the daemon or stdout goes away.
///
/// Errors: no daemon.
pub async fn attach_json(socket: &Path) -> Result<()> {
    let mut c = Client::connect(socket).await?;
    c.send(&ClientMsg::Attach).await?;
    let mut out = tokio::io::stdout();
    while let Some(Ok(line)) = c.io.next().await {
        if out.write_all(line.as_bytes()).await.is_err()
            || out.write_all(b"\n").await.is_err()
            || out.flush().await.is_err()
        {
            break;
        }
    }
    Ok(())
}

/// The socket path for the verbs: `--socket`, else the default in the runtime directory.
pub fn socket_or_default(explicit: Option<&PathBuf>) -> PathBuf {
    super::socket_path(explicit.map(PathBuf::as_path))
}
