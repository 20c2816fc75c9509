//! `report --format html`: one self-contained HTML file (inline SVG, inline CSS, a few lines
//! of inline JavaScript that sort the table; nothing is fetched when it is viewed): the
//! sweep's metadata, the comparison table (every column, best values marked, causes), the
//! winner lines and notes, the Pareto chart, the J/token and s/10k bars, the per-run curves
//! and the legend.

use minijinja::value::Serde;
use minijinja::{Environment, Value, context};
use serde::Serialize;

use super::charts::{self, ChartData, ChartKind};
use super::meta::SweepMeta;
use super::table::Table;

const TEMPLATE: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lorascope sweep {{ meta.sweep_id }} ({{ meta.sweep_name }})</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table.cmp { border-collapse: collapse; font-size: 0.9em; }
table.cmp th, table.cmp td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; white-space: nowrap; }
table.cmp th { cursor: pointer; background: #f3f3f3; position: sticky; top: 0; }
table.cmp th[data-dir=asc]::after { content: " \25B2"; }
table.cmp th[data-dir=desc]::after { content: " \25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #e6f4e6; }
tr.notok td { color: #a33; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.1em 1em; font-size: 0.9em; }
dl.meta dt { color: #666; }
dl.meta dd { margin: 0; }
ul.winners { font-size: 1.05em; }
figure { margin: 1.5em 0; }
figure svg { max-width: 100%; height: auto; }
.scroll { overflow-x: auto; }
.legend { font-size: 0.85em; color: #555; }
</style>
</head>
<body>
<h1>lorascope sweep {{ meta.sweep_id }}: {{ meta.sweep_name }}</h1>
<section id="meta">
<dl class="meta">
{% for kv in meta_pairs %}<dt>{{ kv[0] }}</dt><dd>{{ kv[1] }}</dd>
{% endfor %}</dl>
</section>
<section id="winners">
<h2>Answers</h2>
<ul class="winners">
{% for w in winners %}<li>{{ w }}</li>
{% endfor %}</ul>
{% if notes %}<ul class="notes">
{% for n in notes %}<li>note: {{ n }}</li>
{% endfor %}</ul>{% endif %}
</section>
<section id="table">
<h2>Comparison</h2>
{% if header %}<p>{{ header }}</p>{% endif %}
<div class="scroll"><table class="cmp">
<thead><tr>{% for c in columns %}<th>{{ c.title }}</th>{% endfor %}</tr></thead>
<tbody>
{% for r in rows %}<tr{% if not r.ok %} class="notok"{% endif %}>{% for c in r.cells %}<td class="{{ c.class }}"{% if c.value is not none %} data-v="{{ c.value }}"{% endif %}>{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table></div>
<p class="legend">Click a column title to sort.</p>
</section>
<section id="pareto">
<h2>Tokens/s against peak memory</h2>
<figure>{{ pareto | safe }}</figure>
</section>
<section id="bars">
<h2>Energy and time per token</h2>
<figure>{{ jtoken | safe }}</figure>
<figure>{{ s10k | safe }}</figure>
</section>
<section id="curves">
<h2>Per-run curves</h2>
<figure>{{ curves | safe }}</figure>
</section>
<section id="legend">
<h2>Legend</h2>
<ul class="legend">
{% for l in legend %}<li>{{ l }}</li>
{% endfor %}</ul>
<p class="legend">Written by lorascope {{ meta.report_version }}.</p>
</section>
<script>
(function () {
  var table = document.querySelector('table.cmp');
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, i) {
    th.addEventListener('click', function () {
      var asc = th.dataset.dir !== 'asc';
      Array.prototype.forEach.call(heads, function (h) { delete h.dataset.dir; });
      th.dataset.dir = asc ? 'asc' : 'desc';
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[i], y = b.cells[i];
        var vx = x.dataset.v, vy = y.dataset.v;
        var o;
        if (vx !== undefined || vy !== undefined) {
          if (vx === undefined) { return 1; }
          if (vy === undefined) { return -1; }
          o = parseFloat(vx) - parseFloat(vy);
        } else {
          o = x.textContent.localeCompare(y.textContent);
        }
        return asc ? o : -o;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  document.documentElement.dataset.sortable = 'ready';
})();
</script>
</body>
</html>
"#;

#[derive(Serialize)]
struct CellCtx {
    text: String,
    class: &'static str,
    value: Option<f64>,
}

#[derive(Serialize)]
struct RowCtx {
    ok: bool,
    cells: Vec<CellCtx>,
}

/// The HTML report of a sweep.
///
/// Errors: a chart that cannot be drawn, or the template failing (one line each).
pub fn render(meta: &SweepMeta, table: &Table, d: &ChartData) -> Result<String, String> {
    let chart = |k: ChartKind| charts::svg(k, d).map_err(|e| e.to_string());
    let rows: Vec<RowCtx> = table
        .rows
        .iter()
        .map(|r| RowCtx {
            ok: r.ok,
            cells: r
                .cells
                .iter()
                .zip(&table.columns)
                .map(|(c, col)| CellCtx {
                    text: c.text.clone(),
                    class: match (col.right, c.best) {
                        (true, true) => "num best",
                        (true, false) => "num",
                        (false, _) => "text",
                    },
                    value: c.value,
                })
                .collect(),
        })
        .collect();
    let columns: Vec<_> = table
        .columns
        .iter()
        .map(|c| context! { title => c.title.clone() })
        .collect();
    let mut env = Environment::new();
    env.add_template("report.html", TEMPLATE)
        .map_err(|e| format!("HTML template: {e}"))?;
    let tpl = env
        .get_template("report.html")
        .map_err(|e| format!("HTML template: {e}"))?;
    tpl.render(context! {
        meta => Value::from(Serde(meta)),
        meta_pairs => Value::from(Serde(meta.pairs())),
        winners => Value::from(Serde(&table.winners)),
        notes => Value::from(Serde(&table.notes)),
        header => table.axes.header_line(),
        columns => Value::from(Serde(&columns)),
        rows => Value::from(Serde(&rows)),
        legend => Value::from(Serde(table.legend(None))),
        pareto => chart(ChartKind::Pareto)?,
        jtoken => chart(ChartKind::Jtoken)?,
        s10k => chart(ChartKind::S10k)?,
        curves => chart(ChartKind::Curves)?,
    })
    .map_err(|e| format!("HTML template: {e}"))
}
