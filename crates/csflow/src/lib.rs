//! csflow: CS-Flow image defect detection (Rudolph et al., WACV 2022) in Rust.
//!
//! The library holds all logic: the flow ([`flow`]), its training ([`train`]), scores and anomaly maps
//! ([`score`]) and the files csflow reads and writes ([`io`]). Binaries only parse arguments and print.

pub mod backbone;
pub mod data;
pub mod detector;
pub mod error;
pub mod evaluate;
pub mod export;
pub mod extract;
pub mod flow;
pub mod io;
pub mod memory;
pub mod metrics;
pub mod overlay;
pub mod report;
pub mod score;
pub mod synth;
pub mod threads;
pub mod threshold;
pub mod train;

pub use csflow_kernels::Precision;
pub use error::{Error, Result};
