//! `lorascope view [--sweep N] [--db FILE]`: a recorded sweep in the dashboard, read-only:
//! the queue as it ended, the comparison table, each run's detail and the chart view. Keys
//! that would change the queue say "read-only".

use std::path::Path;

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

use crate::orchestrator::Command;
use crate::store::Store;
use crate::ui::recorded::viewer;
use crate::ui::{Feed, View};

/// Opens sweep `sweep` (default: the latest) of the database `db` in the dashboard.
///
/// Errors: no terminal on stdin and stdout, no database or no such sweep, or a recorded
/// profile this version cannot read.
pub fn run(db: &Path, sweep: Option<i64>) -> Result<()> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::io::IsTerminal::is_terminal(&std::io::stdin());
    if !terminal {
        bail!(
            "view: the dashboard needs a terminal on stdin and stdout; `lorascope report --db {}` prints the table",
            db.display()
        );
    }
    let store = Store::open_read_only(db)?;
    let sweep = match sweep {
        Some(id) => store.sweep(id)?.with_context(|| {
            format!(
                "no sweep {id} in {} (`lorascope report --list --db {}` lists them)",
                db.display(),
                db.display()
            )
        })?,
        None => store
            .latest_sweep()?
            .with_context(|| format!("no sweeps in {}", db.display()))?,
    };
    let (mut app, feed) = viewer(&store, &sweep)?;
    app.mem_total = crate::ui::mem_total();
    app.color = crate::ui::Theme::from_env().color;
    app.view = View::Table;
    let (ftx, frx) = mpsc::unbounded_channel::<Feed>();
    for f in feed {
        let _ = ftx.send(f);
    }
    let name = app.name.clone();
    let _ = ftx.send(Feed::Message(
        format!(
            "sweep {} ({name}), recorded: read-only; 4 chart, ⏎ detail, q quits",
            sweep.id
        ),
        false,
    ));
    drop(ftx);
    // Nothing reads the commands: a recorded sweep takes none.
    let (ctx, _crx) = mpsc::unbounded_channel::<Command>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(crate::ui::run(app, ctx, frx))
        .context("dashboard")?;
    Ok(())
}
