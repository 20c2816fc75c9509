//! The `lorascope` command line: `run` (sweep a profile), `report`, `profile check`, and
//! `train` (one run; the worker the orchestrator launches).

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
    /// Check the engine on a device against the CPU f32 path (tiny preset): logits and
    /// adapter gradients in fp16/bf16, dense and NF4, with and without checkpointing.
    #[command(hide = true)]
    Selftest {
        /// Device under test (cuda:N, or cpu for the CPU half-precision paths).
        #[arg(long, default_value = "cuda:0")]
        device: String,
    },
    #[command(flatten)]
    Sweep(lorascope::cli::SweepCommand),
}

fn selftest(device: &str) -> i32 {
    use lorascope::engine::selftest;
    match selftest::run(device) {
        Ok(cases) => {
            println!(
                "{:<18} {:>12} {:>10} {:>12}  (tolerances: logits {}, gradients {})",
                "case",
                "logits rel",
                "|dloss|",
                "grads rel",
                selftest::LOGITS_TOL,
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

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Commands::Train(args) => lorascope::worker::run(&args),
        Commands::Selftest { device } => selftest(&device),
        Commands::Sweep(cmd) => match lorascope::cli::execute(cmd) {
            Ok(()) => 0,
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
