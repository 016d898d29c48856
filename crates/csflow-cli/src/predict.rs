use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use csflow::io::{load_features, load_model};
use serde_json::json;

use crate::fit::score_all;

#[derive(Args)]
pub struct PredictArgs {
    /// Model file (csflow, or a state_dict exported from the authors' code).
    #[arg(long)]
    model: PathBuf,
    /// Features file of the samples to score.
    #[arg(long)]
    features: PathBuf,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

/// Prints `{"path", "score"}` per sample, plus the file's ground-truth `label` when it has labels.
pub fn run(a: PredictArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let flow = model.flow()?;
    let data = load_features(&a.features)?;
    flow.check_input(&data.scales).with_context(|| format!("{}", a.features.display()))?;
    let scores = score_all(&flow, &data.scales, a.batch_size)?;
    let mut out = std::io::stdout().lock();
    for (i, (path, score)) in data.paths.iter().zip(&scores).enumerate() {
        let mut line = json!({ "path": path, "score": score });
        if let Some(l) = &data.labels {
            line["label"] = json!(l[i]);
        }
        writeln!(out, "{line}")?;
    }
    if let Some(labels) = &data.labels {
        match csflow::metrics::auroc(&scores, labels) {
            Ok(a) => eprintln!("image AUROC {a:.4} over {} samples", scores.len()),
            Err(e) => eprintln!("no AUROC: {e}"),
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct InfoArgs {
    /// Model file.
    model: PathBuf,
}

pub fn info(a: InfoArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let n: usize = model.params.values().map(|t| t.elem_count()).sum();
    println!("{}", serde_json::to_string_pretty(&model.meta)?);
    println!("flow parameters: {n} in {} tensors", model.params.len());
    Ok(())
}
