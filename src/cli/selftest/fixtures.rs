//! `lorascope selftest engine --fixtures DIR [--cases LIST]`: every transformers + PEFT
//! fixture case on one device, one line per case and variant.

use std::io::Write;
use std::path::Path;

use crate::engine::selftest::fixtures::{
    Check, Fixture, Variant, check_resolved, list_cases, run_case,
};

/// Runs the fixture comparison on `device` over the cases under `dir` (all, or the
/// comma-separated `cases`); prints one line per case and variant and returns the exit status
/// (0: every line PASS; 1: a FAIL or an error).
pub fn selftest_fixtures(device: &str, dir: &Path, cases: Option<&str>) -> i32 {
    match run(device, dir, cases) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            let msg = e.to_string();
            let _ = writeln!(
                std::io::stderr(),
                "lorascope selftest: error: {}",
                msg.lines().next().unwrap_or("unknown error")
            );
            1
        }
    }
}

fn run(device: &str, dir: &Path, cases: Option<&str>) -> Result<bool, crate::engine::EngineError> {
    use crate::engine::EngineError;
    let dev = crate::engine::train::parse_device(device)?;
    let all = list_cases(dir)?;
    let chosen: Vec<String> = match cases {
        None => all,
        Some(list) => {
            let mut v = Vec::new();
            for c in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                if !all.iter().any(|a| a == c) {
                    return Err(EngineError::Invalid(format!(
                        "--cases {c}: no such case under {} (cases: {})",
                        dir.display(),
                        all.join(", ")
                    )));
                }
                v.push(c.to_string());
            }
            if v.is_empty() {
                return Err(EngineError::Invalid(
                    "--cases is empty; expected case names such as qwen2,phi3".into(),
                ));
            }
            v
        }
    };
    let t0 = std::time::Instant::now();
    let variants = Variant::all();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<26} {:<15} {:>10}  {:<12} {:<13} measures (relative error / tolerance)",
        "case", "variant", "max rel", "of", "against"
    );
    let (mut ok, mut lines) = (true, 0usize);
    for name in &chosen {
        let fx = Fixture::load(dir, name)?;
        let mut checks = vec![check_resolved(&fx)?];
        checks.extend(run_case(&fx, &dev, &variants)?);
        for c in &checks {
            ok &= c.pass();
            lines += 1;
            let _ = writeln!(out, "{}", line(c));
        }
    }
    let _ = writeln!(
        out,
        "{} ({lines} lines, {} cases on {device}) in {:.1} s",
        if ok { "all PASS" } else { "FAILED" },
        chosen.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(ok)
}

/// One printed line: case, variant, the worst error (relative to its tolerance) and what it
/// measured, what it was compared with, every measure, PASS or FAIL.
fn line(c: &Check) -> String {
    let (rel, what) = c.worst().map_or((0.0, ""), |m| (m.rel, m.what));
    let all: Vec<String> = c
        .measures
        .iter()
        .map(|m| format!("{} {:.1e}/{:.0e}", m.what, m.rel, m.tol))
        .collect();
    format!(
        "{:<26} {:<15} {:>10.2e}  {:<12} {:<13} {}  {}",
        c.case,
        c.variant,
        rel,
        what,
        c.against,
        all.join("  "),
        if c.pass() { "PASS" } else { "FAIL" }
    )
}
