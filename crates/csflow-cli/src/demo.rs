use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use csflow::data::toy::toy_features;
use csflow::io::save_features;

#[derive(Args)]
pub struct DemoArgs {
    /// Folder to write train.safetensors and test.safetensors into.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 64)]
    train: usize,
    #[arg(long, default_value_t = 40)]
    test: usize,
    #[arg(long, default_value_t = 32)]
    channels: usize,
    /// Size of the finest feature map (a multiple of 4).
    #[arg(long, default_value_t = 16)]
    map: usize,
    #[arg(long, default_value_t = 0)]
    seed: u32,
}

pub fn run(a: DemoArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (train, test) = toy_features(a.train, a.test, a.channels, a.map, a.seed)?;
    save_features(&a.out.join("train.safetensors"), &train)?;
    save_features(&a.out.join("test.safetensors"), &test)?;
    eprintln!("wrote {} training and {} test samples to {}", a.train, a.test, a.out.display());
    Ok(())
}
