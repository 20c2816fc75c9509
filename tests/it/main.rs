//! The integration tests, one binary with one module per concern: linking candle, tokenizers
//! and rusqlite is most of the build time of `cargo test`, so it is done once. All modules run in one process on the harness's threads, so a
//! test must not change process-wide state (environment variables, the current directory,
//! fixed temp paths): child processes get their environment through `Command::env`, and every
//! test works in its own `tempfile::tempdir()`.

mod common;

mod chat;
mod cli;
mod daemon;
mod engine;
mod families;
mod faults;
mod hf_fixtures;
mod layout;
mod leak;
mod memory;
mod orchestrator;
mod quickstart;
mod report;
mod requeue;
mod slurm;
mod train_cli;
mod ui;
mod ui_views;
