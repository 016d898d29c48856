//! The scoring thread: requests waiting in the queue are scored together, in one batch through the flow.

use std::path::Path;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::StatusCode;
use base64::Engine;
use csflow::detector::{Detection, Detector};
use csflow::io::decode_rgb_within;
use csflow::overlay::encode_png;
use csflow::score::MapMode;
use csflow::threshold::Verdict;
use rayon::prelude::*;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use crate::ApiError;

/// The model, shared by the handlers and the scoring thread.
pub(crate) struct Model {
    pub detector: Detector,
    pub mode: MapMode,
    /// Pixels an uploaded image may have (`--max-pixels`).
    pub max_pixels: u64,
}

/// The answer to `POST /predict`: the verdict `predict` prints, the image's size, times, pictures.
#[derive(Serialize)]
pub(crate) struct Prediction {
    #[serde(flatten)]
    pub verdict: Verdict,
    pub width: u32,
    pub height: u32,
    /// Time from the start of decoding to this image's pictures, not counting the wait in the queue.
    pub milliseconds: f64,
    /// Time from the request's admission to the start of its batch.
    pub queue_milliseconds: f64,
    /// Images scored together with this one (waiting requests are scored in one batch).
    pub batch_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_png: Option<String>,
}

/// One admitted request, waiting to be scored.
pub(crate) struct Job {
    pub bytes: Bytes,
    pub threshold: Option<f64>,
    pub heatmap: bool,
    pub mask_threshold: Option<f32>,
    pub admitted: Instant,
    pub reply: oneshot::Sender<Result<Prediction, ApiError>>,
    /// Released when the job is dropped, after its answer.
    pub _permit: OwnedSemaphorePermit,
}

/// The scoring thread: takes the next request with up to `max_batch - 1` others that wait, scores their
/// images in one batch (the flow reads its weights once for all of them), answers each, until the server
/// is gone.
/// Jobs whose client has gone away are dropped unscored (and counted in `abandoned`).
pub(crate) fn score_jobs(
    model: &Model,
    mut queue: mpsc::UnboundedReceiver<Job>,
    max_batch: usize,
    abandoned: prometheus_client::metrics::counter::Counter,
) {
    let live = |job: Job| {
        if job.reply.is_closed() {
            abandoned.inc();
            None
        } else {
            Some(job)
        }
    };
    while let Some(first) = queue.blocking_recv() {
        let mut batch: Vec<Job> = live(first).into_iter().collect();
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => batch.extend(live(job)),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let start = Instant::now();
        let n = batch.len();
        // A panic fails this batch's requests with 500, not the thread: later requests are still served.
        let answers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let detections = model.detector.detect_decoded(
                &batch,
                |job| {
                    decode_rgb_within(&job.bytes, Path::new("the uploaded image"), model.max_pixels)
                        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
                },
                |_, e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            );
            // Pictures drawn and encoded in parallel, as `predict` does.
            batch.par_iter().zip(detections).map(|(job, d)| d.and_then(|d| answer(model, job, &d, start, n))).collect()
        }))
        .unwrap_or_else(|_| {
            tracing::error!("scoring a batch of {n} panicked");
            (0..n).map(|_| Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "scoring failed"))).collect::<Vec<_>>()
        });
        for (job, answer) in batch.into_iter().zip(answers) {
            // A client that has gone away meanwhile needs no answer.
            if job.reply.send(answer).is_err() {
                abandoned.inc();
            }
        }
    }
}

/// The answer to `job` from its detection `d`, scored in a batch of `batch_size` that started at `start`.
fn answer(model: &Model, job: &Job, d: &Detection, start: Instant, batch_size: usize) -> Result<Prediction, ApiError> {
    let internal = |e: csflow::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let pictures = model.detector.pictures(d, model.mode, job.heatmap, job.mask_threshold).map_err(internal)?;
    let png = |bytes: csflow::Result<Vec<u8>>| bytes.map(|b| base64::engine::general_purpose::STANDARD.encode(b));
    Ok(Prediction {
        verdict: model.detector.verdict(d.score as f64, job.threshold),
        width: d.image.width(),
        height: d.image.height(),
        heatmap_png: pictures.heatmap.map(|p| png(encode_png(&p))).transpose().map_err(internal)?,
        mask_png: pictures.mask.map(|p| png(encode_png(&p))).transpose().map_err(internal)?,
        milliseconds: start.elapsed().as_secs_f64() * 1e3,
        queue_milliseconds: start.saturating_duration_since(job.admitted).as_secs_f64() * 1e3,
        batch_size,
    })
}
