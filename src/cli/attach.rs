//! `lorascope attach [--json]`: the dashboard as a client of the daemon, the same
//! [`crate::ui::run`] loop as a local sweep, fed from the socket instead of an in-process
//! orchestrator; keys become commands sent back over the socket. q, D or Ctrl-C detach and
//! leave the sweep running. `--json` prints the attach stream as JSON lines instead.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::client_rt;
use crate::daemon::client::{Attached, Client};
use crate::daemon::protocol::{ClientMsg, ServerMsg, Stamped, SweepInfo};
use crate::grid::expand_profile;
use crate::orchestrator::Command;
use crate::ui::{App, Feed};

/// Attaches to the daemon on `socket`: the dashboard, or with `json` the event stream.
///
/// Errors: the dashboard without a terminal on stdin and stdout, no daemon, or no sweep
/// yet.
pub fn run(socket: &Path, json: bool) -> Result<()> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::io::IsTerminal::is_terminal(&std::io::stdin());
    if !json && !terminal {
        bail!(
            "attach: the dashboard needs a terminal on stdin and stdout; use `lorascope attach --json` (events as JSON lines) or `lorascope status`"
        );
    }
    client_rt()?.block_on(async {
        if json {
            attach_json(socket).await
        } else {
            attach_dashboard(socket).await
        }
    })
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
/// Errors: as [`Client::connect`] and [`Client::attach`], or as [`app_for`].
pub async fn attached_state(socket: &Path) -> Result<Option<App>> {
    let mut c = Client::connect(socket).await?;
    let Attached { now, sweep, replay } = c.attach().await?;
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
    let Attached { now, sweep, replay } = c.attach().await?;
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
    let mut io = c.into_conn();
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
    let sweep_id = app.sweep_id.unwrap_or(info.sweep_id);
    let r = crate::ui::run(app, ctx, frx).await;
    bridge.abort();
    if r.context("dashboard")? == crate::ui::Exit::Quit {
        // Not println!: the terminal may be gone.
        let _ = writeln!(
            std::io::stdout(),
            "detached: sweep {sweep_id} goes on in the daemon (pid {pid}); `lorascope attach` shows it again, `lorascope status` sums it up"
        );
    }
    Ok(())
}

/// `lorascope attach --json`: the attach stream as JSON lines on stdout (the replay, then
/// every event) until the daemon or stdout goes away.
///
/// Errors: no daemon.
pub async fn attach_json(socket: &Path) -> Result<()> {
    let mut c = Client::connect(socket).await?;
    c.send(&ClientMsg::Attach).await?;
    let mut io = c.into_conn();
    let mut out = tokio::io::stdout();
    while let Some(Ok(line)) = io.next().await {
        if out.write_all(line.as_bytes()).await.is_err()
            || out.write_all(b"\n").await.is_err()
            || out.flush().await.is_err()
        {
            break;
        }
    }
    Ok(())
}
