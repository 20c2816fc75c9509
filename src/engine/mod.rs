//! The training engine: a decoder-only transformer with LoRA adapters, trained with candle.
//! It knows nothing of queues or terminals.

pub mod data;
