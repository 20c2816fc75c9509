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
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Commands::Train(args) => lorascope::worker::run(&args),
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
