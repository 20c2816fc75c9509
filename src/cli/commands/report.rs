//! `lorascope report [--sweep N | --list] [--format F] [--chart C] [--out FILE] [--width N]
//! [--db FILE]`: a recorded sweep's comparison table, exports, charts or HTML report, or the
//! list of sweeps.

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result, bail};

use crate::cli::ReportArgs;
use crate::report::{ChartData, Format, SweepReport, charts, export, html, md_escape};
use crate::store::Store;

/// The width of `--format table` when `--width` is not given: the terminal's columns when
/// stdout is a terminal, else 120.
pub fn default_width() -> usize {
    if std::io::stdout().is_terminal()
        && let Ok((w, _)) = ratatui::crossterm::terminal::size()
        && w >= 20
    {
        return w as usize;
    }
    120
}

fn list(store: &Store) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>5}  {:<24}  {:>5}  state     profile",
        "sweep", "name", "runs"
    )?;
    for sw in store.sweeps()? {
        let runs = store.runs(sw.id)?.len();
        let state = if sw.finished_at.is_some() {
            "finished"
        } else {
            "partial "
        };
        writeln!(
            out,
            "{:>5}  {:<24}  {:>5}  {state}  {}",
            sw.id, sw.name, runs, sw.profile_path
        )?;
    }
    Ok(())
}

/// Prints (or writes to `--out`) sweep `--sweep` (default: the latest) in `--format`, or with
/// `--list` the recorded sweeps.
///
/// Errors: no database at `--db`, no such sweep, `--format png` without `--out`, an
/// unwritable `--out`, or the database fails.
pub fn run(args: &ReportArgs) -> Result<()> {
    let store = Store::open_read_only(&args.db)?;
    if args.list {
        return list(&store);
    }
    let sweep = match args.sweep {
        Some(id) => store.sweep(id)?.with_context(|| {
            format!(
                "no sweep {id} in {} (`lorascope report --list --db {}` lists its sweeps)",
                args.db.display(),
                args.db.display()
            )
        })?,
        None => store
            .latest_sweep()?
            .with_context(|| format!("no sweeps in {}", args.db.display()))?,
    };
    let rep = SweepReport::load(&store, sweep)?;
    let table = rep.table();
    let needs_curves = matches!(args.format, Format::Html)
        || (matches!(args.format, Format::Svg | Format::Png)
            && args.chart == crate::report::ChartKind::Curves);
    let curves = if needs_curves {
        rep.curves(&store, &table.axes)?
    } else {
        vec![]
    };
    let data = ChartData {
        rows: &rep.rows,
        axes: &table.axes,
        limit: rep.limit(),
        curves: &curves,
    };
    if let Some(dir) = args
        .out
        .as_deref()
        .and_then(|o| o.parent())
        .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
    {
        bail!(
            "cannot write --out: the directory {} does not exist (create it, or give another path)",
            dir.display()
        );
    }
    // The sweep as the table and Markdown formats name it.
    let title = format!("sweep {} ({})", rep.sweep.id, rep.sweep.name);
    let text = match args.format {
        Format::Table => {
            let width = args.width.map(usize::from).unwrap_or_else(default_width);
            let head = crate::report::table::cut(&title, width);
            format!("{head}\n{}", table.render_text(width))
        }
        Format::Md => format!("## {}\n\n{}", md_escape(&title), table.render_md()),
        Format::Csv => export::csv(&rep.meta, &rep.rows),
        Format::Json => export::json(&rep.meta, &rep.rows),
        Format::Html => html::render(&rep.meta, &table, &data).map_err(anyhow::Error::msg)?,
        Format::Svg => charts::svg(args.chart, &data)?,
        Format::Png => {
            let Some(out) = &args.out else {
                bail!("--format png writes a file: give --out FILE.png");
            };
            charts::png(args.chart, &data, out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            return Ok(());
        }
    };
    match &args.out {
        Some(path) => crate::fsutil::write_atomic(path, &text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
    }
    Ok(())
}
