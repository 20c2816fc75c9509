//! lorascope: profile LoRA/QLoRA fine-tuning of LLMs (tokens/s, peak VRAM, J/token).
//!
//! The crate is a library with a thin binary (`src/main.rs`). Data flows one way:
//! profile -> grid -> orchestrator -> worker (`lorascope train --json`, the [`engine`])
//! -> store -> report / ui. [`spec`] holds the vocabulary they share (devices, precisions,
//! optimizers, LoRA targets, data formats, the worker's JSON-lines records).

pub mod cli;
pub mod daemon;
pub mod engine;
pub mod fsutil;
pub mod grid;
pub mod orchestrator;
pub mod profile;
pub mod report;
pub mod series;
pub mod spec;
pub mod store;
pub mod summary;
pub mod telemetry;
pub mod ui;
