//! `csflow serve`: a trained model behind HTTP, for inspection stations that post an image and read back a
//! verdict.
//!
//! - `GET /health`: `{"status": "ok"}` (the model is loaded before the port opens).
//! - `GET /info`: the model file, backbone, input size, thresholds, map mode, precision, csflow's version.
//! - `POST /predict`: the body is one image file's bytes (PNG, JPEG, BMP, TIFF, WebP, as `predict` reads);
//!   query `threshold`, `heatmap=true`, `mask=true`, `mask_threshold`. Answers the verdict `predict` prints
//!   (`score`, `normalized_score`, `label`, `threshold`), the image's `width` and `height`, the time taken,
//!   and the heatmap overlay and mask as base64 PNG (`heatmap_png`, `mask_png`) when asked for.
//!
//! Errors answer `{"error": "..."}`: 400 for an image that cannot be read or a bad query, 413 for a body over
//! `--max-body-bytes`, 503 when `--max-queue` requests are already waiting, 500 otherwise. Images are scored
//! one at a time, each on every core; a full queue is refused at once so that a client can retry or fall
//! back instead of timing out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use csflow::detector::Detector;
use csflow::io::decode_rgb;
use csflow::overlay::encode_png;
use csflow::score::MapMode;
use csflow::threshold::Verdict;
use csflow::Precision;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};

/// The server's settings: each flag also reads the environment variable it names.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model file written by `csflow fit --data` (it holds its backbone).
    #[arg(long, env = "CSFLOW_MODEL")]
    pub model: PathBuf,
    /// Address to listen on: 127.0.0.1 for this machine only, 0.0.0.0 for every interface.
    #[arg(long, env = "CSFLOW_HOSTNAME", default_value = "127.0.0.1")]
    pub hostname: String,
    /// Port to listen on; 0 takes any free port (the address is logged).
    #[arg(long, env = "CSFLOW_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Decision threshold on the score (default: the model's); a request's `threshold` overrides it.
    #[arg(long, env = "CSFLOW_THRESHOLD")]
    pub threshold: Option<f64>,
    /// Anomaly-map value from which a pixel is marked defective in masks (default: the highest value seen
    /// on good images at training); a request's `mask_threshold` overrides it.
    #[arg(long, env = "CSFLOW_MASK_THRESHOLD")]
    pub mask_threshold: Option<f32>,
    /// How the per-scale maps become one map: scale0 (the authors') or product (anomalib's).
    #[arg(long, env = "CSFLOW_MAP_MODE", default_value = "scale0",
          value_parser = PossibleValuesParser::new(["scale0", "product"])
              .map(|s| if s == "product" { MapMode::Product } else { MapMode::Scale0 }))]
    pub map_mode: MapMode,
    /// Arithmetic of the flow's largest products: f32, or bf16 (faster on CPUs with AVX512_BF16, scores
    /// within about 1e-3 of f32's; see `csflow predict --help`).
    #[arg(long, env = "CSFLOW_PRECISION", default_value = "f32",
          value_parser = PossibleValuesParser::new(["f32", "bf16"])
              .map(|s| if s == "bf16" { Precision::Bf16 } else { Precision::F32 }))]
    pub precision: Precision,
    /// Largest request body in bytes (an image file); larger ones get 413.
    #[arg(long, env = "CSFLOW_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// Requests that may wait while one is scored; further ones get 503 at once.
    #[arg(long, env = "CSFLOW_MAX_QUEUE", default_value_t = 32)]
    pub max_queue: usize,
}

/// What every request shares: the model and the server's defaults.
pub struct AppState {
    detector: Detector,
    model: PathBuf,
    threshold: Option<f64>,
    mask_threshold: Option<f32>,
    mode: MapMode,
    precision: Precision,
    max_body_bytes: usize,
    /// Requests admitted: the one being scored and those waiting.
    admitted: Semaphore,
    /// Held while an image is scored (each one uses every core).
    scoring: Mutex<()>,
}

impl AppState {
    /// Loads the model `args` name; errors name the file.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Self> {
        let detector = Detector::load_in(&args.model, args.precision)?;
        Ok(AppState {
            detector,
            model: args.model.clone(),
            threshold: args.threshold,
            mask_threshold: args.mask_threshold,
            mode: args.map_mode,
            precision: args.precision,
            max_body_bytes: args.max_body_bytes,
            admitted: Semaphore::new(args.max_queue.saturating_add(1).min(Semaphore::MAX_PERMITS)),
            scoring: Mutex::new(()),
        })
    }
}

const ROUTES: &str = "the routes are GET /health, GET /info and POST /predict (the image file as the body)";

/// The routes, with request bodies limited to the state's `max_body_bytes`.
pub fn router(state: Arc<AppState>) -> Router {
    let max_body_bytes = state.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/predict", post(predict))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, ROUTES) })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, ROUTES) })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Loads the model, listens, and serves until Ctrl-C or SIGTERM (requests in flight are finished).
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let state = Arc::new(AppState::load(&args)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the server's runtime")?;
    runtime.block_on(async {
        let listener = TcpListener::bind((args.hostname.as_str(), args.port))
            .await
            .with_context(|| format!("listening on {}:{}", args.hostname, args.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        tracing::info!("{}: listening on http://{addr}", args.model.display());
        axum::serve(listener, router(state)).with_graceful_shutdown(shutdown_signal()).await.context("serving")?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// An error answer: `{"error": message}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

#[derive(Serialize)]
struct Info {
    model: String,
    backbone: Option<String>,
    /// The network's input [height, width]; images of any size are resized to it.
    input_size: Option<[usize; 2]>,
    /// The threshold requests get by default, and the model's own.
    threshold: Option<f64>,
    model_threshold: Option<f64>,
    mask_threshold: Option<f32>,
    map_mode: MapMode,
    /// The arithmetic in use: bf16 only where asked for and the CPU has AVX512_BF16.
    precision: &'static str,
    csflow_version: &'static str,
}

async fn info(State(s): State<Arc<AppState>>) -> Json<Info> {
    let meta = &s.detector.meta;
    Json(Info {
        model: s.model.display().to_string(),
        backbone: meta.backbone.as_ref().map(|b| b.name.clone()),
        input_size: meta.backbone.as_ref().map(|b| b.input_size),
        threshold: s.threshold.or(meta.threshold),
        model_threshold: meta.threshold,
        mask_threshold: s.detector.mask_threshold(s.mode, s.mask_threshold),
        map_mode: s.mode,
        precision: if s.precision == Precision::Bf16 && s.precision.supported() { "bf16" } else { "f32" },
        csflow_version: env!("CARGO_PKG_VERSION"),
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PredictQuery {
    threshold: Option<f64>,
    #[serde(default)]
    heatmap: bool,
    #[serde(default)]
    mask: bool,
    mask_threshold: Option<f32>,
}

#[derive(Serialize)]
struct Prediction {
    #[serde(flatten)]
    verdict: Verdict,
    width: u32,
    height: u32,
    /// Time from the start of decoding to the pictures, not counting the wait in the queue.
    milliseconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask_png: Option<String>,
}

async fn predict(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<PredictQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Prediction>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let form = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("multipart/"));
    if form {
        let msg = "send the image file's bytes as the body (curl --data-binary @part.png), not a multipart form";
        return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, msg));
    }
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(e.status(), format!("the body is larger than --max-body-bytes ({} bytes)", s.max_body_bytes))
        }
        status => ApiError::new(status, e.body_text()),
    })?;
    if body.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty body: send the image file's bytes"));
    }
    let mask_threshold = if q.mask {
        Some(s.detector.mask_threshold(s.mode, q.mask_threshold.or(s.mask_threshold)).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, "the model records no good-image map range: give mask_threshold")
        })?)
    } else {
        None
    };
    let Ok(_admitted) = s.admitted.try_acquire() else {
        tracing::warn!("queue full: 503");
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy: the queue is full, try again"));
    };
    let _scoring = s.scoring.lock().await;
    let state = s.clone();
    let threshold = q.threshold.or(s.threshold);
    let heatmap = q.heatmap;
    let result = tokio::task::spawn_blocking(move || score(&state, &body, threshold, heatmap, mask_threshold))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("scoring failed: {e}")))?;
    match &result {
        Ok(p) => {
            let label = p.verdict.label.unwrap_or("-");
            tracing::info!(score = p.verdict.score, label, ms = p.milliseconds, "predict")
        }
        Err(e) => tracing::warn!(status = %e.status, "predict: {}", e.message),
    }
    result.map(Json)
}

/// Decodes, scores and draws one upload (a blocking call: it uses every core).
fn score(
    s: &AppState,
    bytes: &[u8],
    threshold: Option<f64>,
    heatmap: bool,
    mask_threshold: Option<f32>,
) -> Result<Prediction, ApiError> {
    let start = Instant::now();
    let image = decode_rgb(bytes, Path::new("the uploaded image"))
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let internal = |e: csflow::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let d = s.detector.detect(image).map_err(internal)?;
    let pictures = s.detector.pictures(&d, s.mode, heatmap, mask_threshold).map_err(internal)?;
    let png = |bytes: csflow::Result<Vec<u8>>| bytes.map(|b| base64::engine::general_purpose::STANDARD.encode(b));
    Ok(Prediction {
        verdict: s.detector.verdict(d.score as f64, threshold),
        width: d.image.width(),
        height: d.image.height(),
        heatmap_png: pictures.heatmap.map(|p| png(encode_png(&p))).transpose().map_err(internal)?,
        mask_png: pictures.mask.map(|p| png(encode_png(&p))).transpose().map_err(internal)?,
        milliseconds: start.elapsed().as_secs_f64() * 1e3,
    })
}
