//! `lorascope selftest engine|optim` (hidden): maintenance checks of the engine and its CUDA
//! kernels against the CPU code, printed as a table; exit status 0 when every case is within
//! tolerance, 1 otherwise.

mod fixtures;

use fixtures::selftest_fixtures;

use std::io::Write;

use super::Selftest;

/// Runs the selftest `what`; returns the exit status.
pub fn run(what: Selftest) -> i32 {
    match what {
        Selftest::Engine {
            device,
            fixtures: Some(dir),
            cases,
        } => selftest_fixtures(&device, &dir, cases.as_deref()),
        Selftest::Engine { device, .. } => selftest_engine(&device),
        Selftest::Optim { device, steps } => selftest_optim(device, steps),
    }
}

#[cfg(not(feature = "cuda"))]
fn selftest_optim(_device: usize, _steps: usize) -> i32 {
    let _ = writeln!(
        std::io::stderr(),
        "lorascope selftest optim: error: this build has no CUDA; build with `cargo build --release --features cuda`"
    );
    1
}

#[cfg(feature = "cuda")]
fn selftest_optim(device: usize, steps: usize) -> i32 {
    use crate::engine::optim::{SELFTEST_TOL, selftest};
    let t0 = std::time::Instant::now();
    let cases = match selftest(device, steps.max(1)) {
        Ok(c) => c,
        Err(e) => {
            let msg = e.to_string();
            eprintln!(
                "lorascope selftest optim: error: {}",
                msg.lines().next().unwrap_or("unknown error")
            );
            return 1;
        }
    };
    println!(
        "{:<10} {:<6} {:>8}  {:<13} {:>10} {:>10}  result (tolerance {SELFTEST_TOL:e}, {steps} steps)",
        "optimizer", "paged", "elems", "state", "max_abs", "max_rel"
    );
    let mut ok = true;
    for c in &cases {
        ok &= c.pass;
        println!(
            "{:<10} {:<6} {:>8}  {:<13} {:>10.3e} {:>10.3e}  {}",
            c.optimizer,
            c.paged,
            c.elems,
            c.placement,
            c.max_abs,
            c.max_rel,
            if c.pass { "ok" } else { "FAIL" }
        );
    }
    println!(
        "{} in {:.1} s",
        if ok { "all ok" } else { "FAILED" },
        t0.elapsed().as_secs_f64()
    );
    if ok { 0 } else { 1 }
}

fn selftest_engine(device: &str) -> i32 {
    use crate::engine::selftest;
    match selftest::run(device) {
        Ok(cases) => {
            println!(
                "{:<18} {:>12} {:>10} {:>12} {:>14}  (vs the CPU path in the same precision; tolerances: fp32 {}, logits {} fp16 / {} bf16, gradients {})",
                "case",
                "logits rel",
                "|dloss|",
                "grads rel",
                "logits vs f32",
                selftest::F32_TOL,
                selftest::LOGITS_TOL,
                selftest::LOGITS_TOL_BF16,
                selftest::GRAD_TOL
            );
            for c in &cases {
                println!(
                    "{:<18} {:>12.2e} {:>10.2e} {:>12.2e} {:>14.2e}  {}",
                    c.name,
                    c.logits_rel,
                    c.loss_abs,
                    c.grad_rel,
                    c.logits_rel_f32,
                    if c.pass { "ok" } else { "FAIL" }
                );
            }
            let mut ok = cases.iter().all(|c| c.pass);
            ok &= nf4_quantize_check(device);
            ok &= elementwise_check(device);
            ok &= lora_a_check(device);
            ok &= synthetic_weights_check(device);
            if ok { 0 } else { 1 }
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "lorascope selftest: error: {e}");
            1
        }
    }
}

/// The elementwise kernels on `device` against the CPU in f32
/// ([`crate::engine::selftest::elementwise_check`]); one line per case, true when all are
/// within [`crate::engine::selftest::ELEMENTWISE_TOL`].
fn elementwise_check(device: &str) -> bool {
    use crate::engine::selftest::{ELEMENTWISE_TOL, elementwise_check};
    let cases = crate::engine::train::parse_device(device)
        .map_err(|e| e.to_string())
        .and_then(|d| elementwise_check(&d).map_err(|e| e.to_string()));
    match cases {
        Ok(cases) => cases.iter().fold(true, |ok, (name, e)| {
            let pass = *e <= ELEMENTWISE_TOL;
            println!(
                "{name:<40} max rel error {e:.1e}  {}",
                if pass { "ok" } else { "FAIL" }
            );
            ok && pass
        }),
        Err(e) => {
            println!("elementwise kernels: error: {e}  FAIL");
            false
        }
    }
}

/// The fused LoRA `d(x) A^T` kernel on `device` against the dropout kernel and cuBLAS
/// ([`crate::engine::selftest::lora_a_check`]); one line per case (none where the kernel does
/// not apply), true when all are within [`crate::engine::selftest::LORA_A_TOL`].
fn lora_a_check(device: &str) -> bool {
    use crate::engine::selftest::{LORA_A_TOL, lora_a_check};
    let cases = crate::engine::train::parse_device(device)
        .map_err(|e| e.to_string())
        .and_then(|d| lora_a_check(&d).map_err(|e| e.to_string()));
    match cases {
        Ok(cases) => cases.iter().fold(true, |ok, (name, e)| {
            let pass = *e <= LORA_A_TOL;
            println!(
                "{name:<40} max rel error {e:.1e}  {}",
                if pass { "ok" } else { "FAIL" }
            );
            ok && pass
        }),
        Err(e) => {
            println!("fused lora A kernel: error: {e}  FAIL");
            false
        }
    }
}

/// The synthetic weights `device` draws: mean and standard deviation against N(0, std0)
/// ([`crate::engine::selftest::synthetic_weights_check`]); one line, true when both are within
/// 3e-3 (about six standard errors of 4 Mi draws).
fn synthetic_weights_check(device: &str) -> bool {
    let r = crate::engine::train::parse_device(device)
        .map_err(|e| e.to_string())
        .and_then(|d| {
            crate::engine::selftest::synthetic_weights_check(&d).map_err(|e| e.to_string())
        });
    match r {
        Ok((mean, std)) => {
            let pass = mean <= 3e-3 && std <= 3e-3;
            println!(
                "synthetic weights bf16, 4 Mi draws      |mean| / std0 {mean:.1e}, |std / std0 - 1| {std:.1e}  {}",
                if pass { "ok" } else { "FAIL" }
            );
            pass
        }
        Err(e) => {
            println!("synthetic weights: error: {e}  FAIL");
            false
        }
    }
}

/// NF4 dequantisation and quantisation on `device` against the host arithmetic, value for
/// value and byte for byte, in f32, f16 and bf16 (on the CPU both are the host loops; on CUDA
/// the kernels). Prints two lines per dtype; true when nothing differs.
fn nf4_quantize_check(device: &str) -> bool {
    use crate::engine::nf4::quantize::device_matches_host;
    let dev = match crate::engine::train::parse_device(device) {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "lorascope selftest: error: {e}");
            return false;
        }
    };
    let mut ok = true;
    for dt in [
        candle_core::DType::F32,
        candle_core::DType::F16,
        candle_core::DType::BF16,
    ] {
        match crate::engine::nf4::dequant_device_matches_host(&dev, dt) {
            Ok(n) => {
                ok &= n == 0;
                println!(
                    "{:<18} {n} values differ from the host  {}",
                    format!("nf4 dequantize {dt:?}"),
                    if n == 0 { "ok" } else { "FAIL" }
                );
            }
            Err(e) => {
                ok = false;
                println!("{:<18} error: {e}  FAIL", format!("nf4 dequantize {dt:?}"));
            }
        }
        match device_matches_host(&dev, dt) {
            Ok((bytes, absmax)) => {
                let pass = bytes == 0 && absmax == 0;
                ok &= pass;
                println!(
                    "{:<18} {bytes} packed bytes and {absmax} block absmax values differ from the host  {}",
                    format!("nf4 quantize {dt:?}"),
                    if pass { "ok" } else { "FAIL" }
                );
            }
            Err(e) => {
                ok = false;
                println!("{:<18} error: {e}  FAIL", format!("nf4 quantize {dt:?}"));
            }
        }
    }
    ok
}
