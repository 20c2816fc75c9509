//! `lorascope report --format html|svg|png` on a sweep stored through the store API (a GPU
//! sweep's shape: power, energy, VRAM telemetry, an OOM point), and the HTML opened in
//! headless Chromium: no console message, the sort script ran, one Pareto mark per ok point.
//!
//! The Chromium part needs Debian's `chromium` (`.ci/run` installs it); without it the test
//! says `CHROMIUM TEST SKIPPED: <why>` on stderr and checks the HTML file alone.

use std::path::{Path, PathBuf};
use std::process::Command;

use lorascope::grid::expand_profile;
use lorascope::profile::parse_str;
use lorascope::spec::wire::StepRecord;
use lorascope::store::{FinishedRun, Store};
use lorascope::summary::{RunStatus, RunSummary};
use lorascope::telemetry::TelemetrySample;

const BIN: &str = env!("CARGO_BIN_EXE_lorascope");

/// A stored sweep of eight points (optimizer x quant x precision), one of them OOM, one
/// predicted-oom; returns the database and the number of ok points.
fn stored_sweep(dir: &Path) -> (PathBuf, usize) {
    let src = "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = 6\n\
               warmup_steps = 1\nvram_limit = \"8GiB\"\ndevices = [\"cuda:0\"]\n[grid]\n\
               batch_size = [2]\nseq_len = [512]\noptimizer = [\"adamw\", \"paged_adamw8bit\"]\n\
               precision = [\"fp16\", \"bf16\"]\nquant = [\"none\", \"nf4\"]\n";
    let p = parse_str(src, "gpu.toml").unwrap();
    let specs = expand_profile(&p, Path::new("."));
    let db = dir.join("r.db");
    let mut st = Store::open(&db).unwrap();
    let sw = st.create_sweep("gpu-grid", "/gpu.toml", src).unwrap();
    st.set_sweep_meta(
        sw,
        &[
            ("gpu".into(), "NVIDIA H100 80GB HBM3".into()),
            ("gpu_driver".into(), "580.159.04".into()),
            ("gpu_memory_bytes".into(), (80u64 << 30).to_string()),
        ],
    )
    .unwrap();
    let mut ok = 0;
    for (i, spec) in specs.iter().enumerate() {
        let run = st.start_run(sw, spec, 0, "cuda:0", &[]).unwrap();
        let status = match i {
            3 => RunStatus::Oom,
            6 => RunStatus::PredictedOom,
            _ => RunStatus::Ok,
        };
        let tps = 2000.0 + 300.0 * i as f64;
        let mem = (3u64 << 30) + (i as u64) * (700 << 20);
        let okr = status == RunStatus::Ok;
        ok += usize::from(okr);
        let steps: Vec<StepRecord> = (1..=6)
            .map(|s| StepRecord {
                step: s,
                tokens: 1024,
                padded_tokens: Some(1024),
                target_tokens: None,
                step_seconds: 1024.0 / tps,
                loss: Some(6.0 - 0.1 * s as f64 - 0.01 * i as f64),
                lr: None,
                grad_norm: None,
                loss_scale: None,
                skipped: false,
                mem_bytes: None,
                t: 2.0 + s as f64 * 1024.0 / tps,
            })
            .collect();
        let samples: Vec<TelemetrySample> = (0..12)
            .map(|k| TelemetrySample {
                t: k as f64 * 0.5,
                gpu: Some(0),
                power_w: Some(150.0 + 20.0 * k as f64 + i as f64),
                proc_mem_bytes: Some(mem / 12 * (k + 1)),
                power_limit_w: Some(700.0),
                ..Default::default()
            })
            .collect();
        let summary = RunSummary {
            status: Some(status),
            cause: (!okr).then(|| match status {
                RunStatus::Oom => "CUDA out of memory: tried to allocate 2.00 GiB".to_string(),
                _ => "predicted 9.1 GiB > vram_limit 8.00 GiB".to_string(),
            }),
            tokens_per_s: okr.then_some(tps),
            s_per_10k_tokens: okr.then_some(10_000.0 / tps),
            peak_mem_bytes: okr.then_some(mem),
            peak_mem_kind: okr.then(|| "vram_process".into()),
            mean_w: okr.then_some(250.0 + i as f64),
            j_per_token: okr.then_some((250.0 + i as f64) / tps),
            final_loss: okr.then_some(5.4 - 0.01 * i as f64),
            predicted_peak_bytes: Some(mem + (100 << 20)),
            ..Default::default()
        };
        st.finish_run(
            run,
            &FinishedRun {
                summary: &summary,
                header: None,
                worker_summary: None,
                steps: if okr { &steps } else { &[] },
                samples: if okr { &samples } else { &[] },
            },
        )
        .unwrap();
    }
    st.finish_sweep(sw).unwrap();
    (db, ok)
}

fn report(db: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("report")
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .unwrap()
}

/// Chromium's path: `LORASCOPE_CHROMIUM`, else `chromium` / `chromium-browser` on PATH.
fn chromium() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("LORASCOPE_CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(why) = std::env::var("LORASCOPE_CHROMIUM_SKIP_REASON")
        && !why.is_empty()
    {
        return Err(why);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err("no chromium on PATH (apt-get install chromium)".into())
}

/// `(DOM after scripts ran, console lines)` of `file` in headless Chromium.
fn open_headless(chrome: &Path, file: &Path) -> (String, Vec<String>) {
    let o = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
        ])
        .arg(format!("file://{}", file.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let console = stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(String::from)
        .collect();
    (String::from_utf8_lossy(&o.stdout).into_owned(), console)
}

#[test]
fn html_report_opens_in_chromium_with_one_mark_per_ok_point() {
    let dir = tempfile::tempdir().unwrap();
    let (db, ok) = stored_sweep(dir.path());
    let html = dir.path().join("report.html");
    let o = report(&db, &["--format", "html", "--out", html.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&html).unwrap();
    // Self-contained: nothing to fetch.
    for bad in ["src=\"http", "href=\"http", "<link", "@import", "src=\"//"] {
        assert!(!text.contains(bad), "{bad} in the HTML");
    }
    assert_eq!(text.matches("<g class=\"mark\"").count(), ok);
    assert!(text.contains("NVIDIA H100 80GB HBM3") && text.contains("580.159.04"));
    assert!(text.contains("fastest under vram_limit (8.00 GiB): "));
    assert!(text.contains("CUDA out of memory"));
    let chrome = match chromium() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("CHROMIUM TEST SKIPPED: {why}");
            return;
        }
    };
    // The console capture sees an error when there is one (else the check below proves
    // nothing).
    let boom = dir.path().join("boom.html");
    std::fs::write(
        &boom,
        "<html><body><script>throw new Error('boom')</script></body></html>",
    )
    .unwrap();
    let (_, console) = open_headless(&chrome, &boom);
    assert!(
        console.iter().any(|l| l.contains("boom")),
        "chromium did not report a thrown error: {console:?}"
    );
    let (dom, console) = open_headless(&chrome, &html);
    assert!(console.is_empty(), "console messages: {console:?}");
    assert!(
        dom.contains("data-sortable=\"ready\""),
        "the sort script did not run"
    );
    let pareto = dom
        .split("<section id=\"pareto\">")
        .nth(1)
        .and_then(|s| s.split("</section>").next())
        .expect("the Pareto section");
    assert_eq!(pareto.matches("class=\"mark\"").count(), ok, "{pareto}");
}

#[test]
fn single_charts_as_svg_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let (db, ok) = stored_sweep(dir.path());
    for chart in ["pareto", "jtoken", "s10k", "curves"] {
        let o = report(&db, &["--format", "svg", "--chart", chart]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let svg = String::from_utf8(o.stdout).unwrap();
        assert!(svg.starts_with("<svg"), "{chart}");
        if chart == "pareto" {
            assert_eq!(svg.matches("<g class=\"mark\"").count(), ok);
        }
        let png = dir.path().join(format!("{chart}.png"));
        let o = report(
            &db,
            &[
                "--format",
                "png",
                "--chart",
                chart,
                "--out",
                png.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    }
    // PNG needs a file: one line saying so.
    let o = report(&db, &["--format", "png"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--out"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
