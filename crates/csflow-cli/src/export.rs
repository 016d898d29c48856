use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use csflow::export::export_onnx;
use csflow::io::{atomic_write, load_model};

#[derive(Args)]
pub struct ExportArgs {
    /// Model file written by `csflow fit --data` (it holds its backbone).
    #[arg(long)]
    model: PathBuf,
    /// ONNX file to write.
    #[arg(short, long)]
    output: PathBuf,
}

/// Writes the model (backbone, flow, scores) as one ONNX graph.
pub fn run(a: ExportArgs) -> Result<()> {
    crate::outputs::check_not_an_input(&a.output, &[("--model", Some(&a.model))])?;
    let model = load_model(&a.model)?;
    let bytes = export_onnx(&model).map_err(|e| e.at(&a.model))?;
    atomic_write(&a.output, &bytes)?;
    let [h, w] = model.meta.backbone.as_ref().map_or([0, 0], |b| b.input_size);
    eprintln!(
        "wrote {} ({:.1} MB): input `image` [N, 3, {h}, {w}] (normalised RGB), outputs `score` [N] and \
         `map_scale0`..`map_scale2` [N, 1, h, w]",
        a.output.display(),
        bytes.len() as f64 / 1e6
    );
    Ok(())
}
