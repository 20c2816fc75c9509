//! The report's charts, drawn with `plotters` (SVG, or PNG through its bitmap backend; text
//! in DejaVu Sans embedded in the binary, so no system font is needed):
//!
//! - **Pareto**: tokens/s against peak memory of the ok points; colour = precision, marker
//!   shape = optimizer, a vertical line at the `vram_limit` (else the GPU's memory), the
//!   Pareto front (no other point is both faster and smaller) joined by a line. In SVG every
//!   point's mark is one `<g class="mark" data-id=ID>` (the HTML test counts them).
//! - **bars**: J/token and seconds per 10,000 tokens per ok point.
//! - **curves**: loss, tokens/s, power and memory against the step, one line per run (the
//!   latest ok run of each point); a telemetry sample is placed at the step in progress when
//!   it was taken (linear in time between step ends).

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::axes::Axes;
use super::rows::PointRow;
use crate::spec::wire::StepRecord;
use crate::spec::{Optimizer, Precision};
use crate::telemetry::TelemetrySample;

/// Which chart `report --format svg|png --chart` draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChartKind {
    /// tokens/s against peak memory, the Pareto front joined.
    Pareto,
    /// J/token per point (bars).
    Jtoken,
    /// Seconds per 10,000 tokens per point (bars).
    S10k,
    /// Loss, tokens/s, power and memory against the step, one line per run.
    Curves,
}

/// One run's series for [`ChartKind::Curves`].
#[derive(Debug, Clone, PartialEq)]
pub struct RunCurves {
    /// The point's name (its varying axes).
    pub name: String,
    /// Its step records.
    pub steps: Vec<StepRecord>,
    /// Its telemetry samples.
    pub samples: Vec<TelemetrySample>,
    /// Bytes its `--vram-limit` reservation held (subtracted from the VRAM samples, as the
    /// table's peaks are), 0 without one.
    pub reserved_bytes: u64,
}

/// What the charts draw from.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartData<'a> {
    /// The points (rows without metrics are left out of every chart).
    pub rows: &'a [PointRow],
    /// Names the points.
    pub axes: &'a Axes,
    /// The vertical line of the Pareto chart: `vram_limit` (else the GPU's memory), bytes.
    pub limit: Option<(u64, &'static str)>,
    /// One entry per run for the curves.
    pub curves: &'a [RunCurves],
}

/// Chart errors as one line (a backend failure, an unwritable `--out`).
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the {chart} chart: {msg}")]
pub struct ChartError {
    chart: &'static str,
    msg: String,
}

fn err<E: std::fmt::Display>(chart: &'static str) -> impl Fn(E) -> ChartError {
    move |e| ChartError {
        chart,
        msg: e.to_string(),
    }
}

const FONT: &str = "sans-serif";

/// Registers the embedded DejaVu Sans as `sans-serif` (once per process).
fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font ships in the `dejavu` crate: registering it cannot fail at run time.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

fn precision_color(p: Precision) -> RGBColor {
    match p {
        Precision::Fp32 => RGBColor(31, 119, 180),
        Precision::Fp16 => RGBColor(255, 127, 14),
        Precision::Bf16 => RGBColor(44, 160, 44),
    }
}

/// A marker shape per optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Circle,
    Triangle,
    Square,
    Cross,
}

fn optimizer_shape(o: Optimizer) -> Shape {
    match o {
        Optimizer::AdamW => Shape::Circle,
        Optimizer::AdamW8bit => Shape::Triangle,
        Optimizer::PagedAdamW => Shape::Square,
        Optimizer::PagedAdamW8bit => Shape::Cross,
    }
}

/// A mark placed in pixel coordinates.
struct Mark {
    at: (i32, i32),
    shape: Shape,
    color: RGBColor,
    id: String,
    title: String,
    name: String,
}

fn draw_shape<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    shape: Shape,
    style: ShapeStyle,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (x, y) = at;
    match shape {
        Shape::Circle => root.draw(&Circle::new(at, 6, style)),
        Shape::Triangle => root.draw(&TriangleMarker::new(at, 8, style)),
        Shape::Square => root.draw(&Rectangle::new([(x - 5, y - 5), (x + 5, y + 5)], style)),
        Shape::Cross => root.draw(&Cross::new(at, 6, style.stroke_width(3))),
    }
}

fn draw_mark<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    m: &Mark,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    draw_shape(root, m.at, m.shape, m.color.filled())?;
    root.draw(&Text::new(
        m.name.clone(),
        (m.at.0 + 9, m.at.1 - 16),
        (FONT, 12).into_font().color(&RGBColor(60, 60, 60)),
    ))
}

/// The ok points as (peak GiB, tokens/s, row).
fn pareto_points(rows: &[PointRow]) -> Vec<(f64, f64, &PointRow)> {
    rows.iter()
        .filter(|r| r.is_ok())
        .filter_map(|r| {
            let y = r.tokens_per_s?.median;
            let x = r.peak_mem_bytes? as f64 / (1u64 << 30) as f64;
            Some((x, y, r))
        })
        .collect()
}

/// The points no other point beats on both axes (faster and no larger, or smaller and no
/// slower), by memory.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = points.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for p in v {
        if front.last().is_none_or(|l| p.1 > l.1) {
            front.push(p);
        }
    }
    front
}

fn draw_pareto<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    d: &ChartData,
) -> Result<Vec<Mark>, DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let pts = pareto_points(d.rows);
    let limit_gib = d.limit.map(|(b, _)| b as f64 / (1u64 << 30) as f64);
    let xmax = pts
        .iter()
        .map(|p| p.0)
        .chain(limit_gib)
        .fold(0.0f64, f64::max)
        .max(0.01)
        * 1.15;
    let ymax = pts.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1.0) * 1.15;
    let mem = match d.rows.iter().find_map(|r| r.peak_mem_kind.as_deref()) {
        Some("rss") => "peak RSS (GiB)",
        _ => "peak VRAM (GiB)",
    };
    let mut chart = ChartBuilder::on(root)
        .caption("tokens/s against peak memory", (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc(mem)
        .y_desc("tokens/s")
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()?;
    let front = pareto_front(&pts.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>());
    if front.len() > 1 {
        chart
            .draw_series(LineSeries::new(front, BLACK.stroke_width(2)))?
            .label("Pareto front")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2)));
    }
    if let (Some(x), Some((_, what))) = (limit_gib, d.limit) {
        let red = RGBColor(200, 30, 30);
        chart
            .draw_series(LineSeries::new(
                vec![(x, 0.0), (x, ymax)],
                red.stroke_width(2),
            ))?
            .label(format!("{what} {x:.2} GiB"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], red.stroke_width(2)));
    }
    for p in Precision::ALL {
        if pts
            .iter()
            .any(|q| q.2.point.is_some_and(|pt| pt.precision == p))
        {
            let c = precision_color(p);
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
                .label(p.to_string())
                .legend(move |(x, y)| Circle::new((x + 9, y), 5, c.filled()));
        }
    }
    for o in Optimizer::ALL {
        if pts
            .iter()
            .any(|q| q.2.point.is_some_and(|pt| pt.optimizer == o))
        {
            let shape = optimizer_shape(o);
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
                .label(o.to_string())
                .legend(move |(x, y)| -> DynElement<'static, DB, (i32, i32)> {
                    let s = BLACK.filled();
                    let at = (x + 9, y);
                    match shape {
                        Shape::Circle => Circle::new(at, 5, s).into_dyn(),
                        Shape::Triangle => TriangleMarker::new(at, 7, s).into_dyn(),
                        Shape::Square => {
                            Rectangle::new([(at.0 - 4, y - 4), (at.0 + 4, y + 4)], s).into_dyn()
                        }
                        Shape::Cross => Cross::new(at, 5, s.stroke_width(3)).into_dyn(),
                    }
                });
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    let marks = pts
        .iter()
        .map(|(x, y, r)| {
            let p = r.point;
            Mark {
                at: chart.backend_coord(&(*x, *y)),
                shape: p
                    .map(|p| optimizer_shape(p.optimizer))
                    .unwrap_or(Shape::Circle),
                color: p
                    .map(|p| precision_color(p.precision))
                    .unwrap_or(RGBColor(90, 90, 90)),
                id: r.spec_id.clone(),
                name: d.axes.name(r),
                title: format!("{}: {y:.1} tok/s, {x:.2} GiB", r.label),
            }
        })
        .collect();
    Ok(marks)
}

/// Horizontal bars of one value per ok point.
fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    d: &ChartData,
    title: &str,
    unit: &str,
    value: fn(&PointRow) -> Option<f64>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let bars: Vec<(String, f64)> = d
        .rows
        .iter()
        .filter(|r| r.is_ok())
        .filter_map(|r| Some((d.axes.name(r), value(r)?)))
        .collect();
    // Fewest at the top, as the dashboard's bars (segment 0 is the bottom one).
    let mut bars = bars;
    bars.sort_by(|a, b| b.1.total_cmp(&a.1));
    let n = bars.len().max(1);
    let xmax = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9) * 1.2;
    let label_w = bars.iter().map(|b| b.0.chars().count()).max().unwrap_or(4) as u32 * 8 + 16;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(label_w.min(360))
        .build_cartesian_2d(0.0..xmax, (0..n).into_segmented())?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc(unit)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()?;
    let color = RGBColor(70, 110, 170);
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        let mut r = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (*v, SegmentValue::Exact(i + 1)),
            ],
            color.filled(),
        );
        r.set_margin(4, 4, 0, 0);
        r
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        Text::new(
            super::sig(*v),
            (*v, SegmentValue::CenterOf(i)),
            (FONT, 12).into_font(),
        )
    }))?;
    Ok(())
}

/// The step (fractional) in progress at time `t`, from the step records' end times.
fn step_at(steps: &[StepRecord], t: f64) -> f64 {
    let mut prev = (0.0f64, 0.0f64);
    for s in steps {
        if t <= s.t {
            let span = (s.t - prev.0).max(1e-9);
            return prev.1 + (s.step as f64 - prev.1) * ((t - prev.0) / span).clamp(0.0, 1.0);
        }
        prev = (s.t, s.step as f64);
    }
    prev.1
}

type Series = Vec<(f64, f64)>;

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    series: &[(String, Series)],
    legend: bool,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let all = series.iter().flat_map(|s| s.1.iter());
    let (mut xmax, mut ymin, mut ymax) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in all {
        xmax = xmax.max(*x);
        ymin = ymin.min(*y);
        ymax = ymax.max(*y);
    }
    if !ymin.is_finite() {
        (ymin, ymax) = (0.0, 1.0);
    }
    let pad = ((ymax - ymin) * 0.1).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 16))
        .margin(10)
        .x_label_area_size(34)
        .y_label_area_size(60)
        .build_cartesian_2d(
            0.0..xmax,
            // Not below 0 for values that are all non-negative (loss, tok/s, W, GiB).
            if ymin >= 0.0 {
                (ymin - pad).max(0.0)
            } else {
                ymin - pad
            }..ymax + pad,
        )?;
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .draw()?;
    if series.iter().all(|s| s.1.is_empty()) {
        area.draw(&Text::new(
            "not recorded",
            (
                area.dim_in_pixel().0 as i32 / 2 - 40,
                area.dim_in_pixel().1 as i32 / 2,
            ),
            (FONT, 14).into_font().color(&RGBColor(120, 120, 120)),
        ))?;
        return Ok(());
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = Palette99::pick(i).to_rgba();
        let s = chart.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?;
        if legend {
            s.label(name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
            });
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

fn draw_curves<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    d: &ChartData,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let per = |f: &dyn Fn(&RunCurves) -> Series| -> Vec<(String, Series)> {
        d.curves.iter().map(|c| (c.name.clone(), f(c))).collect()
    };
    let loss = per(&|c| {
        c.steps
            .iter()
            .filter_map(|s| Some((s.step as f64, s.loss?)))
            .collect()
    });
    let tps = per(&|c| {
        c.steps
            .iter()
            .filter(|s| s.step_seconds > 0.0)
            .map(|s| (s.step as f64, s.tokens as f64 / s.step_seconds))
            .collect()
    });
    let power = per(&|c| {
        c.samples
            .iter()
            .filter_map(|x| Some((step_at(&c.steps, x.t), x.power_w?)))
            .collect()
    });
    let gib = (1u64 << 30) as f64;
    let mem = per(&|c| {
        c.samples
            .iter()
            .filter_map(|x| {
                let b = match x.proc_mem_bytes.or(x.mem_used_bytes) {
                    Some(v) => v.saturating_sub(c.reserved_bytes),
                    None => x.rss_bytes?,
                };
                Some((step_at(&c.steps, x.t), b as f64 / gib))
            })
            .collect()
    });
    let areas = root.split_evenly((2, 2));
    draw_panel(&areas[0], "loss", &loss, true)?;
    draw_panel(&areas[1], "tokens/s", &tps, false)?;
    draw_panel(&areas[2], "board power (W)", &power, false)?;
    draw_panel(&areas[3], "memory (GiB: VRAM, else RSS)", &mem, false)?;
    Ok(())
}

/// The pixel size a chart is drawn at.
pub fn size(kind: ChartKind, d: &ChartData) -> (u32, u32) {
    let bars = d.rows.iter().filter(|r| r.is_ok()).count() as u32;
    match kind {
        ChartKind::Pareto => (900, 560),
        ChartKind::Jtoken | ChartKind::S10k => (900, 110 + 30 * bars.max(1)),
        ChartKind::Curves => (1100, 720),
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    kind: ChartKind,
    d: &ChartData,
) -> Result<Vec<Mark>, DrawingAreaErrorKind<DB::ErrorType>> {
    match kind {
        ChartKind::Pareto => draw_pareto(root, d),
        ChartKind::Jtoken => {
            draw_bars(root, d, "energy per token", "J/token", |r| {
                r.j_per_token.map(|s| s.median)
            })?;
            Ok(vec![])
        }
        ChartKind::S10k => {
            draw_bars(root, d, "seconds per 10,000 tokens", "s/10k tok", |r| {
                r.s_per_10k_tokens.map(|s| s.median)
            })?;
            Ok(vec![])
        }
        ChartKind::Curves => {
            draw_curves(root, d)?;
            Ok(vec![])
        }
    }
}

fn name(kind: ChartKind) -> &'static str {
    match kind {
        ChartKind::Pareto => "pareto",
        ChartKind::Jtoken => "jtoken",
        ChartKind::S10k => "s10k",
        ChartKind::Curves => "curves",
    }
}

/// The elements inside a plotters SVG document (without the `<svg>` element itself).
fn svg_inner(doc: &str) -> &str {
    let start = doc.find('>').map(|i| i + 1).unwrap_or(0);
    let end = doc.rfind("</svg>").unwrap_or(doc.len());
    &doc[start..end.max(start)]
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The chart as an SVG document. In the Pareto chart each point's mark is a
/// `<g class="mark" data-id="ID">` with a `<title>` (its label, tokens/s and GiB).
pub fn svg(kind: ChartKind, d: &ChartData) -> Result<String, ChartError> {
    fonts();
    let (w, h) = size(kind, d);
    let mut doc = String::new();
    let marks = {
        let root = SVGBackend::with_string(&mut doc, (w, h)).into_drawing_area();
        let marks = draw(&root, kind, d).map_err(err(name(kind)))?;
        root.present().map_err(err(name(kind)))?;
        marks
    };
    let mut groups = String::new();
    for m in &marks {
        let mut frag = String::new();
        {
            let root = SVGBackend::with_string(&mut frag, (w, h)).into_drawing_area();
            draw_mark(&root, m).map_err(err(name(kind)))?;
            root.present().map_err(err(name(kind)))?;
        }
        groups.push_str(&format!(
            "<g class=\"mark\" data-id=\"{}\"><title>{}</title>{}</g>\n",
            xml_escape(&m.id),
            xml_escape(&m.title),
            svg_inner(&frag)
        ));
    }
    if let Some(end) = doc.rfind("</svg>") {
        doc.insert_str(end, &groups);
    }
    Ok(doc)
}

/// Writes the chart as a PNG file at `path`.
pub fn png(kind: ChartKind, d: &ChartData, path: &Path) -> Result<(), ChartError> {
    fonts();
    let (w, h) = size(kind, d);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    let marks = draw(&root, kind, d).map_err(err(name(kind)))?;
    for m in &marks {
        draw_mark(&root, m).map_err(err(name(kind)))?;
    }
    root.present().map_err(err(name(kind)))?;
    Ok(())
}
