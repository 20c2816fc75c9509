//! The dashboard's chart view, the live view's phase line, un-skip and read-only keys, and
//! `lorascope view`'s state rebuilt from a results database (TestBackend + insta).

use std::path::Path;

use lorascope::grid::expand_profile;
use lorascope::orchestrator::{Command, Event};
use lorascope::profile::parse_str;
use lorascope::spec::wire::{Phase, PhaseRecord};
use lorascope::store::{FinishedRun, Store};
use lorascope::summary::RunStatus;
use lorascope::ui::recorded::viewer;
use lorascope::ui::{Action, View, apply_feed};

use crate::ui::{PROFILE, ch, draw, fixture, snap_both, step, summary};

/// Ok runs only (the OOM point is left out), one dataset per optimizer; on CPU the x axis is
/// peak RSS and there are no J/token bars; on a GPU with a `vram_limit`, the limit's line
/// and the bars, fewest J/token first.
#[test]
fn chart_view() {
    let mut app = fixture(false);
    app.view = View::Chart;
    snap_both("chart_cpu", &app);
    let mut app = fixture(true);
    for (i, (gib, j)) in [(5u64, 0.0021), (7, 0.0017)].into_iter().enumerate() {
        let id = app.start_order[i].clone();
        let s = app.runs.get_mut(&id).unwrap().summary.as_mut().unwrap();
        s.peak_mem_kind = Some("vram_process".into());
        s.peak_mem_bytes = Some(gib << 30);
        s.j_per_token = Some(j);
    }
    app.vram_limit = Some(8 << 30);
    app.view = View::Chart;
    snap_both("chart_gpu", &app);
}

/// Before the first step of a (re)started run, the live view says what the worker is doing
/// and for how long, instead of `step 0/40 ETA –`.
#[test]
fn live_view_shows_the_phase_before_the_first_step() {
    let mut app = fixture(true);
    let id = app.running()[0].clone();
    app.on_event(&Event::RunStarted {
        id: id.clone(),
        run_id: 9,
        label: "x".into(),
        device: "cuda:0".into(),
        attempt: 2,
    });
    for (phase, now) in [(Phase::Quantising, 41.5), (Phase::CompilingKernels, 44.0)] {
        app.now = now;
        app.on_event(&Event::Phase {
            id: id.clone(),
            record: PhaseRecord {
                phase,
                t_s: now - 41.0,
            },
        });
    }
    app.now = 56.0;
    app.view = View::Live;
    let screen = draw(&app, 120, 36);
    assert!(
        screen.contains("phase: compiling CUDA kernels (12s)"),
        "{screen}"
    );
    insta::assert_snapshot!("live_phase_120x36", screen);
    // The first step replaces it.
    app.on_event(&Event::Step {
        id,
        record: step(1, 1000.0, 6.0),
    });
    assert!(!draw(&app, 120, 36).contains("phase:"));
}

#[test]
fn s_unskips_and_a_recorded_sweep_is_read_only() {
    let mut app = fixture(false);
    let skipped = app.queue.entries[5].id.clone();
    app.selected = Some(skipped.clone());
    assert_eq!(
        app.on_key(ch('s')),
        Some(Action::Send(Command::Retry { id: skipped }))
    );
    app.read_only = true;
    for c in ['s', 'r', 'c', 'p', 'K', 't'] {
        assert_eq!(app.on_key(ch(c)), None, "{c}");
        let msg = app.message.clone().unwrap().0;
        assert!(msg.starts_with("read-only"), "{c}: {msg}");
    }
    assert_eq!(app.on_key(ch('4')), None);
    assert_eq!(app.view, View::Chart);
    // The footer offers no key that would change the queue.
    app.view = View::Queue;
    app.message = None;
    let footer = draw(&app, 120, 36).lines().last().unwrap_or("").to_string();
    for word in ["skip", "cancel", "retry", "pause", "move"] {
        assert!(!footer.contains(word), "{word} in {footer}");
    }
    assert!(footer.contains("help"), "{footer}");
}

/// `lorascope view`: a sweep recorded in a database comes back as a finished dashboard:
/// every recorded point with its result, the skipped one skipped, the table and the chart.
#[test]
fn viewer_rebuilds_a_recorded_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("r.db")).unwrap();
    let p = parse_str(PROFILE, "demo.toml").unwrap();
    let specs = expand_profile(&p, Path::new("."));
    let sweep_id = store
        .create_sweep("demo", "/profiles/demo.toml", PROFILE)
        .unwrap();
    let results = [
        summary(RunStatus::Ok, 1180.0, 40 << 20, 5.02, None),
        summary(RunStatus::Ok, 1530.0, 52 << 20, 4.98, None),
        summary(RunStatus::Oom, 0.0, 15 << 30, 0.0, Some("out of memory")),
    ];
    for (i, s) in results.iter().enumerate() {
        let run = store.start_run(sweep_id, &specs[i], 0, "cpu", &[]).unwrap();
        let steps: Vec<_> = (1..=5)
            .map(|k| step(k, 1000.0, 6.0 - k as f64 * 0.1))
            .collect();
        let fin = FinishedRun {
            summary: s,
            header: None,
            worker_summary: None,
            steps: &steps,
            samples: &[],
        };
        store.finish_run(run, &fin).unwrap();
    }
    store.record_skipped(sweep_id, &specs[3], 0).unwrap();
    let sweep = store.sweep(sweep_id).unwrap().unwrap();
    let (mut app, feed) = viewer(&store, &sweep).unwrap();
    let now = app.now;
    for f in feed {
        apply_feed(&mut app, f, now);
    }
    assert!(app.sweep_finished && app.read_only);
    assert_eq!(app.queue.entries.len(), 4);
    assert_eq!(app.table_rows().len(), 3);
    let id = app.table_rows()[0].clone();
    assert_eq!(app.runs[&id].steps.len(), 5);
    app.view = View::Table;
    insta::assert_snapshot!("viewer_table_100x30", draw(&app, 100, 30));
    app.view = View::Queue;
    insta::assert_snapshot!("viewer_queue_100x30", draw(&app, 100, 30));
}
