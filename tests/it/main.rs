//! The integration tests, one binary: each module was once its own `tests/*.rs` target, and
//! linking candle, tokenizers and rusqlite into one executable instead of seven is most of the
//! build time of `cargo test`. All modules run in one process on the harness's threads, so a
//! test must not change process-wide state (environment variables, the current directory,
//! fixed temp paths): child processes get their environment through `Command::env`, and every
//! test works in its own `tempfile::tempdir()`.

mod common;

mod cli;
mod daemon;
mod engine;
mod hf_fixtures;
mod orchestrator;
mod quickstart;
mod train_cli;
mod ui;
