//! The `csflow` command: parses arguments, calls the library, prints.

mod demo;
mod export;
mod extract;
mod fit;
mod outputs;
mod predict;
mod synth;
mod test;

use std::io::IsTerminal;
use std::num::NonZeroUsize;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "csflow", version, about = "CS-Flow image defect detection (WACV 2022), in Rust")]
struct Cli {
    /// Threads to compute on (default: one per core; `RAYON_NUM_THREADS` is read too). Fewer leave cores to
    /// other programs on the machine, such as a camera's.
    #[arg(long, global = true, env = "CSFLOW_THREADS")]
    threads: Option<NonZeroUsize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Turn images into the three-scale features the flow uses (a features file; also the cache).
    Extract(extract::ExtractArgs),
    /// Convert backbone weights from a PyTorch checkpoint to safetensors.
    Import(extract::ImportArgs),
    /// Train a model on good images (or on a features file of good samples).
    Fit(fit::FitArgs),
    /// Measure a model on a labelled test set: metrics.json and report.html.
    Test(test::TestArgs),
    /// Score images with a trained model: one JSON line per image, heatmaps and masks on request.
    Predict(predict::PredictArgs),
    /// Make a labelled test set in the MVTec AD layout from good images, with synthetic defects and masks.
    Synth(synth::SynthArgs),
    /// Serve a trained model over HTTP: POST an image to /predict, get its verdict (and heatmap, mask) as JSON.
    Serve(csflow_serve::ServeArgs),
    /// Write a model (backbone, flow and scores) as one ONNX graph, for ONNX Runtime, OpenVINO or TensorRT.
    Export(export::ExportArgs),
    /// Show a model file's configuration and statistics.
    Info(predict::InfoArgs),
    /// Write a small synthetic features data set (train: good; test: good and defective) for trying csflow.
    DemoFeatures(demo::DemoArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: not into log files and pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    csflow::memory::retain_freed_memory();
    csflow::threads::settle_candle_workers();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        csflow::threads::set_threads(n);
    }
    tracing::debug!(threads = csflow::threads::threads(), "worker pool");
    let result = match cli.command {
        Command::Extract(a) => extract::run(a),
        Command::Import(a) => extract::import(a),
        Command::Fit(a) => fit::run(a),
        Command::Test(a) => test::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Serve(a) => csflow_serve::run(a),
        Command::Export(a) => export::run(a),
        Command::Info(a) => predict::info(a),
        Command::DemoFeatures(a) => demo::run(a),
    };
    if let Err(e) = result {
        // A closed pipe (`csflow predict ... | head`) is the reader's choice, not a failure to report.
        if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
            std::process::exit(0);
        }
        eprintln!("error: {}", message(&e));
        std::process::exit(1);
    }
}

/// An error and its causes, each cause left out where the text before already ends with it: the library's
/// errors name the file and include their cause (`brick.png: No such file or directory`), which `{:#}` would
/// print twice.
pub fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::message;
    use anyhow::Context;

    #[test]
    fn causes_already_in_the_message_are_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::from(csflow::Error::io("brick.png", io));
        assert_eq!(message(&e), "brick.png: No such file or directory");
        let e = Err::<(), _>(e).context("reading the test set").unwrap_err();
        assert_eq!(message(&e), "reading the test set: brick.png: No such file or directory");
        let e = Err::<(), _>(std::io::Error::other("disk full")).context("writing out.png").unwrap_err();
        assert_eq!(message(&e), "writing out.png: disk full");
    }
}
