//! Data sets the flow trains and is tested on.

pub mod dataset;
pub mod toy;

pub use dataset::{load_mask, validation_split, Dataset, Sample, GOOD};
