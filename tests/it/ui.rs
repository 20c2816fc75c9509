//! Dashboard tests: snapshots of every view at 80x24 and 160x48 on deterministic data
//! (ratatui's TestBackend + insta), and the key -> orchestrator command mapping.

use std::path::Path;

use lorascope::grid::expand_profile;
use lorascope::orchestrator::{Command, Entry, EntryState, Event, MoveTo, QueueSnapshot, entry_id};
use lorascope::profile::parse_str;
use lorascope::spec::wire::StepRecord;
use lorascope::summary::{GrowthSource, MemoryGrowth, RunStatus, RunSummary};
use lorascope::telemetry::TelemetrySample;
use lorascope::ui::{Action, App, Column, Modal, View, view};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

pub(crate) const PROFILE: &str = r#"
name = "demo"
[model]
preset = "tiny"
[data]
path = "sample"
[lora]
rank = 8
alpha = 16.0
targets = ["q", "v"]
[run]
steps = 40
warmup_steps = 5
devices = ["cpu"]
[grid]
batch_size = [1, 2]
seq_len = [64, 128]
optimizer = ["adamw", "adamw8bit"]
"#;

pub(crate) fn summary(
    status: RunStatus,
    tps: f64,
    mem: u64,
    loss: f64,
    cause: Option<&str>,
) -> RunSummary {
    let ok = status == RunStatus::Ok;
    RunSummary {
        status: Some(status),
        cause: cause.map(str::to_string),
        steps: if ok { 40 } else { 3 },
        timed_steps: if ok { 35 } else { 0 },
        tokens: 40 * 128,
        tokens_per_s: ok.then_some(tps),
        s_per_10k_tokens: ok.then_some(10_000.0 / tps),
        peak_mem_bytes: Some(mem),
        peak_mem_kind: Some("rss".into()),
        peak_rss_bytes: Some(mem),
        final_loss: ok.then_some(loss),
        wall_seconds: 12.0,
        ..Default::default()
    }
}

pub(crate) fn step(step: u64, tps: f64, loss: f64) -> StepRecord {
    StepRecord {
        step,
        tokens: 128,
        padded_tokens: None,
        target_tokens: None,
        step_seconds: 128.0 / tps,
        loss: Some(loss),
        lr: None,
        grad_norm: None,
        loss_scale: None,
        skipped: false,
        mem_bytes: None,
        t: step as f64 * 0.1,
    }
}

/// A sweep of 8 points: 3 finished (ok, ok, oom), 1 running at step 24, one skipped,
/// 3 queued (the last one moved to the top). `gpu` adds NVML telemetry.
pub(crate) fn fixture(gpu: bool) -> App {
    let p = parse_str(PROFILE, "demo.toml").unwrap();
    let specs = expand_profile(&p, Path::new("."));
    let mut app = App::new("demo".into(), p, specs.clone());
    app.mem_total = Some(16 << 30);
    let ids: Vec<String> = specs.iter().map(|s| entry_id(&s.id, 0, 1)).collect();
    app.on_event(&Event::SweepStarted {
        sweep_id: 7,
        queued: 8,
        already_done: 0,
    });
    for s in &specs {
        app.on_event(&Event::RunQueued {
            id: s.id.clone(),
            spec_id: s.id.clone(),
            label: s.label(),
        });
    }
    let results = [
        summary(RunStatus::Ok, 1180.0, 40 << 20, 5.02, None),
        summary(RunStatus::Ok, 1530.0, 52 << 20, 4.98, None),
        summary(
            RunStatus::Oom,
            0.0,
            15 << 30,
            0.0,
            Some("out of memory: 14.9 GiB > vram_limit"),
        ),
    ];
    for (i, r) in results.iter().enumerate() {
        app.now = i as f64 * 12.0;
        app.on_event(&Event::RunStarted {
            id: ids[i].clone(),
            run_id: i as i64 + 1,
            label: specs[i].label(),
            device: "cpu".into(),
            attempt: 1,
        });
        for k in 1..=10u64 {
            app.on_event(&Event::Step {
                id: ids[i].clone(),
                record: step(k, 1000.0 + (k % 4) as f64 * 60.0, 6.0 - k as f64 * 0.05),
            });
        }
        app.now += 12.0;
        app.on_event(&Event::RunFinished {
            id: ids[i].clone(),
            run_id: Some(i as i64 + 1),
            label: specs[i].label(),
            summary: Box::new(r.clone()),
        });
    }
    app.now = 36.0;
    app.on_event(&Event::RunStarted {
        id: ids[3].clone(),
        run_id: 4,
        label: specs[3].label(),
        device: if gpu { "cuda:0" } else { "cpu" }.into(),
        attempt: 1,
    });
    for k in 1..=24u64 {
        app.on_event(&Event::Step {
            id: ids[3].clone(),
            record: step(
                k,
                900.0 + (k * 37 % 11) as f64 * 20.0,
                6.2 - k as f64 * 0.04,
            ),
        });
        let sample = if gpu {
            TelemetrySample {
                t: k as f64 * 0.1,
                gpu: Some(0),
                power_w: Some(250.0 + (k * 13 % 7) as f64 * 20.0),
                power_limit_w: Some(700.0),
                mem_used_bytes: Some(30 << 30),
                proc_mem_bytes: Some(28 << 30),
                util_pct: Some(93),
                ..Default::default()
            }
        } else {
            TelemetrySample {
                t: k as f64 * 0.1,
                rss_bytes: Some(48 << 20),
                hwm_bytes: Some(50 << 20),
                ..Default::default()
            }
        };
        app.on_event(&Event::Telemetry {
            id: ids[3].clone(),
            sample,
        });
    }
    app.now = 41.0;
    let state = |i: usize| match i {
        0 | 1 => EntryState::Done {
            status: RunStatus::Ok,
        },
        2 => EntryState::Done {
            status: RunStatus::Oom,
        },
        3 => EntryState::Running { slot: 0 },
        5 => EntryState::Done {
            status: RunStatus::Skipped,
        },
        _ => EntryState::Queued,
    };
    app.on_event(&Event::QueueChanged {
        queue: QueueSnapshot {
            paused: false,
            shutting_down: false,
            queued: vec![ids[7].clone(), ids[4].clone(), ids[6].clone()],
            entries: (0..8)
                .map(|i| Entry {
                    id: ids[i].clone(),
                    spec_index: i,
                    repeat: 0,
                    state: state(i),
                    attempts: u32::from(i <= 3),
                })
                .collect(),
        },
    });
    app.selected = Some(ids[4].clone());
    app.message = None;
    app
}

pub(crate) fn draw(app: &App, w: u16, h: u16) -> String {
    let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
    term.draw(|f| view::render(f, app)).unwrap();
    format!("{}", term.backend())
}

pub(crate) fn snap_both(name: &str, app: &App) {
    insta::assert_snapshot!(format!("{name}_80x24"), draw(app, 80, 24));
    insta::assert_snapshot!(format!("{name}_160x48"), draw(app, 160, 48));
}

#[test]
fn queue_view() {
    snap_both("queue", &fixture(false));
}

#[test]
fn live_view_cpu_and_gpu() {
    let mut app = fixture(false);
    app.view = View::Live;
    snap_both("live_cpu", &app);
    let mut app = fixture(true);
    app.view = View::Live;
    snap_both("live_gpu", &app);
}

#[test]
fn table_view_sorted_with_baseline() {
    let mut app = fixture(false);
    app.view = View::Table;
    snap_both("table", &app);
    app.sort = Column::TokensPerS;
    app.sort_desc = true;
    app.baseline = app.table_rows().get(1).cloned();
    app.table_selected = app
        .table_rows()
        .into_iter()
        .find(|id| app.runs[id].summary.as_ref().unwrap().status == Some(RunStatus::Oom));
    snap_both("table_sorted", &app);
}

#[test]
fn detail_view() {
    let mut app = fixture(false);
    app.selected = app.start_order.first().cloned();
    app.view = View::Detail;
    snap_both("detail_done", &app);
    app.selected = app.running().first().cloned();
    snap_both("detail_running", &app);
}

/// A run whose memory kept rising: the table marks its peak (never "best") and the detail
/// says how much it grew.
#[test]
fn rising_memory_is_flagged_in_table_and_detail() {
    let mut app = fixture(false);
    let id = app.start_order[1].clone();
    let run = app.runs.get_mut(&id).unwrap();
    let s = run.summary.as_mut().unwrap();
    s.mem_growth = Some(MemoryGrowth {
        bytes: 660 << 20,
        steps: 24,
        source: GrowthSource::Steps,
    });
    app.view = View::Table;
    snap_both("table_rising_memory", &app);
    app.selected = Some(id);
    app.view = View::Detail;
    snap_both("detail_rising_memory", &app);
}

#[test]
fn overlays() {
    let mut app = fixture(false);
    app.modal = Some(Modal::Help);
    snap_both("help", &app);
    app.modal = Some(Modal::ConfirmCancel(app.running()[0].clone()));
    snap_both("confirm_cancel", &app);
    app.modal = Some(Modal::SaveAs("demo-saved.toml".into()));
    snap_both("save_as", &app);
}

#[test]
fn tiny_terminal_does_not_panic() {
    let app = fixture(false);
    for (w, h) in [(1, 1), (20, 5), (40, 10), (60, 12)] {
        draw(&app, w, h);
    }
}

fn key(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

pub(crate) fn ch(c: char) -> KeyEvent {
    let m = if c.is_ascii_uppercase() {
        KeyModifiers::SHIFT
    } else {
        KeyModifiers::NONE
    };
    KeyEvent::new(KeyCode::Char(c), m)
}

fn send(cmd: Command) -> Option<Action> {
    Some(Action::Send(cmd))
}

#[test]
fn keys_send_queue_commands() {
    let mut app = fixture(false);
    let queued = app.selected.clone().unwrap();
    let mv = |to| {
        send(Command::Move {
            id: queued.clone(),
            to,
        })
    };
    assert_eq!(app.on_key(ch('K')), mv(MoveTo::Up));
    assert_eq!(app.on_key(ch('J')), mv(MoveTo::Down));
    assert_eq!(
        app.on_key(KeyEvent::new(KeyCode::Up, KeyModifiers::SHIFT)),
        mv(MoveTo::Up)
    );
    assert_eq!(
        app.on_key(KeyEvent::new(KeyCode::Down, KeyModifiers::SHIFT)),
        mv(MoveTo::Down)
    );
    assert_eq!(app.on_key(ch('t')), mv(MoveTo::Top));
    assert_eq!(
        app.on_key(ch('s')),
        send(Command::Skip { id: queued.clone() })
    );
    // Cancel on a queued run needs no confirmation.
    assert_eq!(
        app.on_key(ch('c')),
        send(Command::Cancel { id: queued.clone() })
    );
    assert_eq!(app.on_key(ch('p')), send(Command::Pause));
    app.queue.paused = true;
    assert_eq!(app.on_key(ch('p')), send(Command::Resume));
}

#[test]
fn cancel_running_asks_first() {
    let mut app = fixture(false);
    let running = app.running()[0].clone();
    app.selected = Some(running.clone());
    assert_eq!(app.on_key(ch('c')), None);
    assert_eq!(app.modal, Some(Modal::ConfirmCancel(running.clone())));
    assert_eq!(app.on_key(ch('n')), None);
    assert_eq!(app.modal, None);
    app.on_key(ch('c'));
    assert_eq!(app.on_key(ch('y')), send(Command::Cancel { id: running }));
}

#[test]
fn retry_only_finished_runs() {
    let mut app = fixture(false);
    let oom = app.start_order[2].clone();
    app.selected = Some(oom.clone());
    assert_eq!(app.on_key(ch('r')), send(Command::Retry { id: oom }));
    // Moving or skipping a finished run sends nothing and says why.
    assert_eq!(app.on_key(ch('K')), None);
    assert_eq!(app.on_key(ch('s')), None);
    assert!(app.message.as_ref().unwrap().1);
    // Retry on a queued run: nothing.
    app.selected = app.queue.queued.first().cloned();
    assert_eq!(app.on_key(ch('r')), None);
}

#[test]
fn quit_confirms_then_shuts_down() {
    let mut app = fixture(false);
    assert_eq!(app.on_key(ch('q')), None);
    assert_eq!(app.modal, Some(Modal::ConfirmQuit));
    assert_eq!(app.on_key(ch('y')), send(Command::Shutdown));
    assert!(app.quitting);
    // Ctrl-C: no question.
    let mut app = fixture(false);
    assert_eq!(
        app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
        send(Command::Shutdown)
    );
    // After the sweep: q just quits.
    let mut app = fixture(false);
    app.sweep_finished = true;
    assert_eq!(app.on_key(ch('q')), Some(Action::Quit));
}

#[test]
fn save_prompt_returns_the_typed_path() {
    let mut app = fixture(false);
    assert_eq!(app.on_key(ch('w')), None);
    assert_eq!(app.modal, Some(Modal::SaveAs("demo-saved.toml".into())));
    // Ctrl-U clears, then type a name.
    app.on_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
    for c in "my.tomlx".chars() {
        app.on_key(ch(c));
    }
    app.on_key(key(KeyCode::Backspace));
    assert_eq!(
        app.on_key(key(KeyCode::Enter)),
        Some(Action::Save("my.toml".into()))
    );
    // Esc cancels.
    app.on_key(ch('w'));
    assert_eq!(app.on_key(key(KeyCode::Esc)), None);
    assert_eq!(app.modal, None);
}

#[test]
fn navigation_and_table_keys_send_nothing() {
    let mut app = fixture(false);
    let rows = app.rows();
    app.selected = Some(rows[0].clone());
    assert_eq!(app.on_key(ch('j')), None);
    assert_eq!(app.selected.as_ref(), Some(&rows[1]));
    assert_eq!(app.on_key(key(KeyCode::End)), None);
    assert_eq!(app.selected.as_ref(), rows.last());
    assert_eq!(app.on_key(ch('3')), None);
    assert_eq!(app.view, View::Table);
    assert_eq!(app.on_key(key(KeyCode::Right)), None);
    assert_eq!(app.sort, Column::TokensPerS);
    assert!(app.sort_desc);
    assert_eq!(app.on_key(ch('o')), None);
    assert!(!app.sort_desc);
    app.on_key(ch('j'));
    let sel = app.table_selected.clone().unwrap();
    assert_eq!(app.on_key(ch('b')), None);
    assert_eq!(app.baseline, Some(sel));
    assert_eq!(app.on_key(key(KeyCode::Enter)), None);
    assert_eq!(app.view, View::Detail);
    assert_eq!(app.on_key(key(KeyCode::Esc)), None);
    assert_eq!(app.on_key(ch('?')), None);
    assert_eq!(app.modal, Some(Modal::Help));
    assert_eq!(app.on_key(ch('x')), None);
    assert_eq!(app.modal, None);
}

#[test]
fn save_order_follows_the_queue() {
    let app = fixture(false);
    let (order, skipped) = app.save_order();
    // Started runs in start order, then the queue's order; the skipped point apart.
    assert_eq!(order, [0, 1, 2, 3, 7, 4, 6]);
    assert_eq!(skipped, [5]);
    let text =
        lorascope::ui::save::profile_text(&app.profile, &app.specs, &order, &skipped).unwrap();
    let again = expand_profile(&parse_str(&text, "s.toml").unwrap(), Path::new("."));
    let got: Vec<&str> = again.iter().map(|s| s.id.as_str()).collect();
    let want: Vec<&str> = order.iter().map(|&i| app.specs[i].id.as_str()).collect();
    assert_eq!(got, want);
}

#[test]
fn attached_dashboard_detaches_and_never_stops_the_sweep() {
    // A local sweep: q asks, D explains that there is nothing to detach from.
    let mut app = fixture(false);
    assert_eq!(app.on_key(ch('D')), None);
    assert!(app.message.as_ref().unwrap().0.contains("--detach"));
    assert_eq!(app.on_key(ch('q')), None);
    assert_eq!(app.modal, Some(Modal::ConfirmQuit));
    assert_eq!(app.on_key(ch('y')), send(Command::Shutdown));

    // Attached to the daemon: q, D and Ctrl-C leave at once, with no Shutdown.
    for k in [
        ch('q'),
        ch('D'),
        KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL),
    ] {
        let mut app = fixture(false);
        app.attached = true;
        assert_eq!(app.on_key(k), Some(Action::Quit), "{k:?}");
    }
    // The queue keys are the same commands as in a local sweep.
    let mut app = fixture(false);
    app.attached = true;
    assert_eq!(app.on_key(ch('p')), send(Command::Pause));
    // The footer and the help say "detach".
    app.message = None;
    let screen = draw(&app, 160, 48);
    assert!(screen.contains("q detach"), "{screen}");
    app.modal = Some(Modal::Help);
    let screen = draw(&app, 80, 24);
    assert!(
        screen.contains("detach (the sweep keeps running)"),
        "{screen}"
    );
}

#[test]
fn feed_replays_with_daemon_times_and_resets_keep_the_clock() {
    use lorascope::ui::{Feed, apply_feed};
    let p = parse_str(PROFILE, "demo.toml").unwrap();
    let specs = expand_profile(&p, Path::new("."));
    let id = entry_id(&specs[0].id, 0, 1);
    let mut app = App::new("demo".into(), p.clone(), specs.clone());
    app.attached = true;
    app.clock_base = 100.0;
    apply_feed(
        &mut app,
        Feed::Event {
            at: Some(40.0),
            event: Event::RunStarted {
                id: id.clone(),
                run_id: 1,
                label: "x".into(),
                device: "cuda:1".into(),
                attempt: 1,
            },
        },
        100.0,
    );
    // Started at daemon time 40: 60 s ago, not "just now".
    assert_eq!(app.runs[&id].started_at, Some(40.0));
    assert_eq!(app.runs[&id].device.as_deref(), Some("cuda:1"));
    assert_eq!(app.now, 100.0);
    apply_feed(
        &mut app,
        Feed::Reset(Box::new(App::new("next".into(), p, specs))),
        120.0,
    );
    assert_eq!(app.name, "next");
    assert!(app.attached && app.clock_base == 100.0 && app.runs.is_empty());
    apply_feed(&mut app, Feed::Message("hello".into(), true), 121.0);
    assert_eq!(app.message, Some(("hello".into(), true)));
}

/// A finished sweep brings up the comparison table from the Queue or Live view, but leaves a
/// run's detail alone; a stopped sweep changes no view.
#[test]
fn finished_sweep_shows_the_table() {
    let finished = |shutdown| Event::SweepFinished {
        sweep_id: 7,
        counts: Default::default(),
        shutdown,
    };
    for (from, shutdown, want) in [
        (View::Queue, false, View::Table),
        (View::Live, false, View::Table),
        (View::Detail, false, View::Detail),
        (View::Queue, true, View::Queue),
    ] {
        let mut app = fixture(false);
        app.view = from;
        app.on_event(&finished(shutdown));
        assert_eq!(app.view, want, "from {from:?}, shutdown {shutdown}");
    }
}
