//! The terminal dashboard of `lorascope run` (ratatui + crossterm on a tokio event loop).
//!
//! - [`app`]: the state, built from orchestrator [`Event`]s.
//! - [`keys`]: every key in one table, for key handling, the help overlay and the footer.
//! - `input`: keys -> what happens ([`App::on_key`]): state changes and [`Command`]s.
//! - [`view`]: rendering, one file per panel (queue, live, table, detail) and for the dialogs.
//! - [`theme`]: 16-colour styles, `NO_COLOR`.
//! - [`save`]: the sweep as a TOML profile, written atomically.
//!
//! [`run`] owns the terminal: raw mode and the alternate screen, restored by a guard on
//! every exit path and by a chained panic hook (restore, then the previous hook). It redraws at most every
//! [`FRAME`] and only when the state changed. Key input is read on a thread that polls
//! with a timeout and stops when the loop ends; a read error (the terminal went away),
//! SIGHUP, SIGTERM or SIGINT shut the sweep down and leave the loop, so nothing keeps
//! spinning without a terminal.

pub mod app;
mod input;
pub mod keys;
pub mod recorded;
pub mod save;
pub mod theme;
pub mod view;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self as ct, KeyEvent};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

pub use app::{Action, App, Column, Modal, View};
pub use theme::Theme;

use crate::orchestrator::{Command, Event};

/// The shortest time between two redraws (at most ~10 per second).
pub const FRAME: Duration = Duration::from_millis(100);

/// Host memory from `/proc/meminfo` (bytes): the scale of the RSS gauge on CPU.
pub fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How the dashboard ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The user quit (after the sweep finished or was shut down).
    Quit,
    /// The terminal went away (read/draw error or SIGHUP): the sweep was told to shut down.
    Lost,
    /// SIGTERM or SIGINT: the sweep was told to shut down.
    Signal,
}

enum Input {
    Key(KeyEvent),
    Resize,
    Lost,
}

/// What feeds the dashboard. A local sweep sends plain orchestrator events (`Event`
/// converts); `lorascope attach` sends events stamped with the daemon clock, a fresh state
/// when the daemon moves on to another sweep, and messages about the connection.
#[derive(Debug)]
pub enum Feed {
    /// An orchestrator event; `at` (daemon clock, s) dates it when it is replayed.
    Event {
        /// When it happened on the daemon clock (s); `None`: now.
        at: Option<f64>,
        /// The event.
        event: Event,
    },
    /// Replace the state (another sweep started); colours and the clock are kept.
    Reset(Box<App>),
    /// A status line message and whether it is an error.
    Message(String, bool),
}

impl From<Event> for Feed {
    fn from(event: Event) -> Feed {
        Feed::Event { at: None, event }
    }
}

/// Applies one feed item; `now` is the loop's clock.
pub fn apply_feed(app: &mut App, feed: Feed, now: f64) {
    match feed {
        Feed::Event { at, event } => {
            if let Some(t) = at {
                app.now = t;
            }
            app.on_event(&event);
            app.now = now;
        }
        Feed::Reset(new) => {
            let (color, mem_total, clock_base, attached) =
                (app.color, app.mem_total, app.clock_base, app.attached);
            let read_only = app.read_only;
            *app = *new;
            app.color = color;
            app.mem_total = mem_total;
            app.clock_base = clock_base;
            app.attached = attached;
            app.read_only = read_only;
            app.now = now;
            app.dirty = true;
        }
        Feed::Message(m, err) => {
            app.message = Some((m, err));
            app.dirty = true;
        }
    }
}

/// Leaves raw mode and the alternate screen and shows the cursor. Errors are ignored: the
/// terminal may be gone (and then nothing may be printed about it either — a failed
/// `eprintln!` would panic).
pub fn restore_terminal() {
    let _ = ratatui::crossterm::terminal::disable_raw_mode();
    let _ = ratatui::crossterm::execute!(
        std::io::stdout(),
        ratatui::crossterm::terminal::LeaveAlternateScreen,
        ratatui::crossterm::cursor::Show
    );
}

/// Restores the terminal before the previous panic hook prints the message (installed once).
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            prev(info);
        }));
    });
}

type Term = ratatui::Terminal<ratatui::backend::CrosstermBackend<std::io::Stdout>>;

fn init_terminal() -> std::io::Result<Term> {
    install_panic_hook();
    ratatui::crossterm::terminal::enable_raw_mode()?;
    let setup = ratatui::crossterm::execute!(
        std::io::stdout(),
        ratatui::crossterm::terminal::EnterAlternateScreen
    )
    .and_then(|()| {
        ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(std::io::stdout()))
    });
    if setup.is_err() {
        restore_terminal();
    }
    setup
}

struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn spawn_input(stop: Arc<AtomicBool>, tx: mpsc::UnboundedSender<Input>) {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let msg = match ct::poll(FRAME) {
                Ok(false) => continue,
                Ok(true) => match ct::read() {
                    Ok(ct::Event::Key(k)) => Input::Key(k),
                    Ok(ct::Event::Resize(..)) => Input::Resize,
                    Ok(_) => continue,
                    Err(_) => Input::Lost,
                },
                Err(_) => Input::Lost,
            };
            let lost = matches!(msg, Input::Lost);
            if tx.send(msg).is_err() || lost {
                break;
            }
        }
    });
}

/// Runs the dashboard until the user quits (the sweep finished, or was shut down at the
/// user's request), the terminal is lost, or a signal arrives. Key presses go to `commands`;
/// `events` ([`Event`]s of a local sweep, or the [`Feed`] of a daemon connection) update the
/// state. Saving writes on a blocking thread, never in the loop.
///
/// The same loop serves `lorascope run` and `lorascope attach`: with [`App::attached`] set,
/// quitting, losing the terminal and signals only end this client (no `Shutdown` is sent).
///
/// Errors: the terminal cannot be set up (then `Shutdown` has been sent, unless attached).
pub async fn run<F: Into<Feed>>(
    mut app: App,
    commands: mpsc::UnboundedSender<Command>,
    mut events: mpsc::UnboundedReceiver<F>,
) -> std::io::Result<Exit> {
    let attached = app.attached;
    // Stops a local sweep; a client of the daemon just leaves.
    let shutdown = |commands: &mpsc::UnboundedSender<Command>| {
        if !attached {
            let _ = commands.send(Command::Shutdown);
        }
    };
    let mut terminal = match init_terminal() {
        Ok(t) => t,
        Err(e) => {
            shutdown(&commands);
            return Err(e);
        }
    };
    let _restore = Restore;
    let stop = Arc::new(AtomicBool::new(false));
    let (itx, mut irx) = mpsc::unbounded_channel();
    spawn_input(stop.clone(), itx);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (stx, mut srx) = mpsc::unbounded_channel::<Result<PathBuf, String>>();
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut events_open = true;
    let mut last_second = 0u64;
    let exit = loop {
        tokio::select! {
            e = events.recv(), if events_open => match e {
                Some(e) => {
                    let now = app.clock_base + start.elapsed().as_secs_f64();
                    apply_feed(&mut app, e.into(), now);
                    // Take whatever else is waiting: one redraw per batch.
                    while let Ok(e) = events.try_recv() {
                        apply_feed(&mut app, e.into(), now);
                    }
                }
                None => {
                    events_open = false;
                    app.sweep_finished = true;
                    if attached {
                        app.message =
                            Some(("the daemon closed the connection: q to quit".into(), true));
                    }
                    app.dirty = true;
                }
            },
            m = irx.recv() => match m {
                Some(Input::Key(k)) => match app.on_key(k) {
                    Some(Action::Send(cmd)) => {
                        let _ = commands.send(cmd);
                    }
                    Some(Action::Save(path)) => {
                        let (order, skipped) = app.save_order();
                        match save::profile_text(&app.profile, &app.specs, &order, &skipped) {
                            Ok(text) => {
                                let stx = stx.clone();
                                tokio::task::spawn_blocking(move || {
                                    let r = save::write_atomic(&path, &text)
                                        .map(|()| path)
                                        .map_err(|e| e.to_string());
                                    let _ = stx.send(r);
                                });
                                app.message = Some(("saving…".into(), false));
                            }
                            Err(e) => app.message = Some((e.to_string(), true)),
                        }
                    }
                    Some(Action::Quit) => break Exit::Quit,
                    None => {}
                },
                Some(Input::Resize) => app.dirty = true,
                Some(Input::Lost) | None => {
                    shutdown(&commands);
                    break Exit::Lost;
                }
            },
            r = srx.recv() => {
                if let Some(r) = r {
                    app.message = Some(match r {
                        Ok(p) => (format!("saved {} (run it with `lorascope run {}`)", p.display(), p.display()), false),
                        Err(e) => (format!("save failed: {e}"), true),
                    });
                    app.dirty = true;
                }
            }
            _ = sighup.recv() => {
                shutdown(&commands);
                break Exit::Lost;
            }
            _ = sigterm.recv() => {
                shutdown(&commands);
                break Exit::Signal;
            }
            _ = sigint.recv() => {
                shutdown(&commands);
                break Exit::Signal;
            }
            _ = tick.tick() => {
                app.now = app.clock_base + start.elapsed().as_secs_f64();
                // Elapsed times and ETAs move once a second while something runs.
                let sec = app.now as u64;
                if sec != last_second && !app.running().is_empty() {
                    app.dirty = true;
                }
                last_second = sec;
                if app.dirty {
                    if terminal.draw(|f| view::render(f, &app)).is_err() {
                        shutdown(&commands);
                        break Exit::Lost;
                    }
                    app.dirty = false;
                }
            }
        }
        if app.quitting && (app.sweep_finished || attached) {
            break Exit::Quit;
        }
    };
    stop.store(true, Ordering::Relaxed);
    Ok(exit)
}
