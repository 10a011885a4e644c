//! The one integration-test binary (every extra binary re-links FAISS and candle).

#![allow(clippy::unwrap_used)]

mod common;
#[path = "support/mosaic.rs"]
mod mosaic;

mod api;
mod catalogue;
mod cli;
mod compact;
mod concurrency;
mod errors;
mod exact;
mod faults;
mod fuzz_regressions;
mod meta;
mod model;
mod persistence;
mod photos;
mod pretrained;
mod robustness;
mod scorer;
mod serve;
mod training;
