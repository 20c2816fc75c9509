use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// lorascope: profile LoRA/QLoRA fine-tuning (tokens/s, peak VRAM, J/token).
#[derive(Debug, Parser)]
#[command(name = "lorascope", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    #[command(flatten)]
    Sweep(lorascope::cli::SweepCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Sweep(cmd) => lorascope::cli::execute(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
