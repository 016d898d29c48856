//! The CS-Flow normalizing flow (SPEC 1.2): fixed channel permutations and parallel coupling layers whose
//! subnets mix three scales with cross convolutions.

mod config;
mod coupling;
mod model;
pub mod permutation;
mod subnet;

pub use config::FlowConfig;
pub(crate) use coupling::OUTPUT_LIMIT;
pub use coupling::{soft_clamp, Coupling};
pub use model::{flatten_z, CsFlow, FlowOutput, ParamMap};
pub(crate) use subnet::LEAKY_SLOPE;
pub use subnet::{Conv2d, ConvWeight, CrossConvolutions};
