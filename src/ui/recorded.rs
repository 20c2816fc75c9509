//! A recorded sweep as dashboard state: `lorascope view` browses one read-only
//! ([`viewer`]), and `lorascope run PROFILE --resume` shows the results it already has
//! ([`preload`]). Both replay the store's rows as the orchestrator events a live sweep would
//! have sent, dated by the recorded start and finish times.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{App, Feed};
use crate::grid::{RunSpec, expand_profile};
use crate::orchestrator::{Entry, EntryState, Event, QueueSnapshot, entry_id};
use crate::store::{RunRow, Store, StoreError, SweepRow};
use crate::summary::{RunStatus, RunSummary};

/// Why a recorded sweep cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum RecordedError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The recorded profile text no longer parses (recorded by another lorascope version).
    #[error("sweep {0}: its recorded profile does not parse with this lorascope: {1}")]
    Profile(i64, String),
}

/// The events of one recorded run (latest row of its point and repeat), as `id`: started,
/// its steps, finished. Rows that never ran (skipped, queued) only finish.
fn run_feed(store: &Store, t0: f64, id: &str, row: &RunRow) -> Result<Vec<Feed>, StoreError> {
    let at = |t: f64| Some((t - t0).max(0.0));
    let mut out = Vec::new();
    let ran = !matches!(row.status, RunStatus::Skipped | RunStatus::Queued);
    if ran {
        out.push(Feed::Event {
            at: at(row.started_at),
            event: Event::RunStarted {
                id: id.to_string(),
                run_id: row.id,
                label: row.label.clone(),
                device: row.device.clone(),
                attempt: 1,
            },
        });
        for record in store.steps(row.id)? {
            let t = row.started_at + record.t;
            out.push(Feed::Event {
                at: at(t),
                event: Event::Step {
                    id: id.to_string(),
                    record,
                },
            });
        }
    }
    let summary = row.summary.clone().unwrap_or_else(|| RunSummary {
        status: Some(row.status),
        cause: row.cause.clone(),
        ..RunSummary::default()
    });
    out.push(Feed::Event {
        at: at(row.finished_at.unwrap_or(row.started_at)),
        event: Event::RunFinished {
            id: id.to_string(),
            run_id: Some(row.id),
            label: row.label.clone(),
            summary: Box::new(summary),
        },
    });
    Ok(out)
}

/// Each `(spec index, repeat)` of `specs` that has a recorded row: its entry id and row.
fn recorded<'a>(
    specs: &[RunSpec],
    repeats: u32,
    rows: &'a [RunRow],
) -> Vec<(usize, u32, String, &'a RunRow)> {
    // The latest row (highest id) of each point and repeat.
    let mut latest: HashMap<(String, u32), &RunRow> = HashMap::new();
    for r in rows {
        let key = (r.spec_id.clone(), r.repeat);
        if latest.get(&key).is_none_or(|prev| prev.id < r.id) {
            latest.insert(key, r);
        }
    }
    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        for repeat in 0..repeats {
            if let Some(row) = latest.get(&(spec.id.clone(), repeat)) {
                out.push((i, repeat, entry_id(&spec.id, repeat, repeats), *row));
            }
        }
    }
    out
}

/// A read-only dashboard of sweep `sweep` and the feed that fills it: every point with a
/// recorded run, finished as recorded (steps included, for the detail view), then the
/// sweep's end. Points with no row are left out.
///
/// Errors: the database fails, or the recorded profile does not parse.
pub fn viewer(store: &Store, sweep: &SweepRow) -> Result<(App, Vec<Feed>), RecordedError> {
    let profile = crate::profile::parse_str(&sweep.profile_toml, &sweep.profile_path)
        .map_err(|e| RecordedError::Profile(sweep.id, e.to_string()))?;
    let base = Path::new(&sweep.profile_path)
        .parent()
        .unwrap_or(Path::new("."));
    let specs = expand_profile(&profile, base);
    let repeats = profile.run.repeats.max(1);
    let name = profile.name.clone().unwrap_or_else(|| sweep.name.clone());
    let mut app = App::new(name, profile, specs);
    app.read_only = true;
    let rows = store.runs(sweep.id)?;
    let t0 = sweep.started_at;
    let mut feed = vec![Feed::from(Event::SweepStarted {
        sweep_id: sweep.id,
        queued: 0,
        already_done: 0,
    })];
    let mut entries = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut last = t0;
    for (spec_index, repeat, id, row) in recorded(&app.specs, repeats, &rows) {
        feed.push(Feed::from(Event::RunQueued {
            id: id.clone(),
            spec_id: row.spec_id.clone(),
            label: row.label.clone(),
        }));
        feed.extend(run_feed(store, t0, &id, row)?);
        *counts.entry(row.status.as_str().to_string()).or_default() += 1;
        last = last.max(row.finished_at.unwrap_or(row.started_at));
        entries.push(Entry {
            id,
            spec_index,
            repeat,
            state: EntryState::Done { status: row.status },
            attempts: 1,
        });
    }
    feed.push(Feed::from(Event::QueueChanged {
        queue: QueueSnapshot {
            paused: false,
            shutting_down: false,
            queued: vec![],
            entries,
        },
    }));
    feed.push(Feed::from(Event::SweepFinished {
        sweep_id: sweep.id,
        counts,
        shutdown: false,
    }));
    // The clock reads the time of the last recorded event.
    app.clock_base = (last - t0).max(0.0);
    app.now = app.clock_base;
    Ok((app, feed))
}

/// Fills `app` (a dashboard of the resumed sweep `sweep_id`) with the recorded results of
/// the entries that `--resume` does not run again (`done(spec index, repeat)`), so the
/// table and the chart show them beside the new runs.
///
/// Errors: the database fails.
pub fn preload(
    app: &mut App,
    store: &Store,
    sweep_id: i64,
    t0: f64,
    done: impl Fn(usize, u32) -> bool,
) -> Result<(), StoreError> {
    let rows = store.runs(sweep_id)?;
    let repeats = app.profile.run.repeats.max(1);
    let now = app.now;
    for (spec_index, repeat, id, row) in recorded(&app.specs, repeats, &rows) {
        if done(spec_index, repeat) {
            for f in run_feed(store, t0, &id, row)? {
                super::apply_feed(app, f, now);
            }
        }
    }
    Ok(())
}
