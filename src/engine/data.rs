//! Datasets, tokenizer and batching (see issue 2).
