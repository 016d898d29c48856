//! Training the flow (SPEC 1.3): PyTorch's Adam with L2 weight decay, global gradient-norm clipping and
//! a loop over shuffled batches of pre-extracted features.

mod optimizer;
mod training;

pub use optimizer::{Adam, AdamConfig};
pub use training::{Event, TrainConfig, Trainer};
