//! The `lorascope` command line: `run` (sweep a profile, or `--detach` it to the daemon),
//! `report`, `profile check`, the daemon and its clients (`daemon`, `attach`, `status`,
//! `queue`, `wait`), and `train` (one run; the worker the orchestrator launches).

use std::io::Write;

use clap::{Parser, Subcommand};

/// Profile LoRA/QLoRA fine-tuning: tokens/s, peak memory and J/token across a grid.
#[derive(Debug, Parser)]
#[command(name = "lorascope", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run one LoRA fine-tuning run (the worker the sweep orchestrator launches).
    Train(Box<lorascope::worker::TrainArgs>),
    #[command(flatten)]
    Sweep(lorascope::cli::SweepCommand),
    /// Maintenance checks of the engine and its CUDA kernels (hidden).
    #[command(hide = true)]
    Selftest {
        #[command(subcommand)]
        what: Selftest,
    },
}

/// `lorascope selftest ...`.
#[derive(Debug, Subcommand)]
enum Selftest {
    /// The engine on a device against the CPU path on the tiny preset: logits and adapter
    /// gradients in fp16/bf16, dense and NF4, with and without checkpointing.
    Engine {
        /// Device under test (cuda:N, or cpu for the CPU half-precision paths).
        #[arg(long, default_value = "cuda:0")]
        device: String,
    },
    /// Fused optimizer kernels (unpaged and paged) and the gradient norm against the CPU
    /// code: prints the largest error per case and exits 1 if any case is beyond tolerance or
    /// its state is placed wrongly. CUDA builds only.
    Optim {
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Updates per case.
        #[arg(long, default_value_t = 20)]
        steps: usize,
    },
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
    use lorascope::engine::optim::{SELFTEST_TOL, selftest};
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
    use lorascope::engine::selftest;
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
            if cases.iter().all(|c| c.pass) { 0 } else { 1 }
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "lorascope selftest: error: {e}");
            1
        }
    }
}

/// Whether an error comes from writing to a closed pipe (directly, or through serde_json).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(BrokenPipe))
    })
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Commands::Train(args) => lorascope::worker::run(&args),
        Commands::Selftest {
            what: Selftest::Engine { device },
        } => selftest_engine(&device),
        Commands::Selftest {
            what: Selftest::Optim { device, steps },
        } => selftest_optim(device, steps),
        Commands::Sweep(cmd) => match lorascope::cli::execute(cmd) {
            Ok(()) => 0,
            // The reader went away (`lorascope report | head`): nothing left to tell anyone.
            Err(e) if is_broken_pipe(&e) => 0,
            Err(e) => {
                // One line for people: the context chain joined, no backtrace.
                let msg = format!("{e:#}");
                // Not eprintln!: stderr may be a terminal that hung up.
                let _ = writeln!(
                    std::io::stderr(),
                    "error: {}",
                    msg.lines().next().unwrap_or("unknown error")
                );
                1
            }
        },
    };
    std::process::exit(code);
}
