//! The `lorascope` command line.

use clap::{Parser, Subcommand};

/// Profile LoRA/QLoRA fine-tuning: tokens/s, peak memory and J/token across a grid.
#[derive(Debug, Parser)]
#[command(name = "lorascope", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one LoRA fine-tuning run (the worker the sweep orchestrator launches).
    Train(Box<lorascope::worker::TrainArgs>),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Train(args) => lorascope::worker::run(&args),
    };
    std::process::exit(code);
}
