//! Training the flow (SPEC 1.3): PyTorch's Adam with L2 weight decay, global gradient-norm clipping and
//! a loop over shuffled batches of pre-extracted features; then calibration of scores and threshold.

mod calibrate;
mod optimizer;
mod training;

pub use calibrate::calibrate;
pub use optimizer::{Adam, AdamConfig};
pub use training::{Event, TrainConfig, Trainer};
