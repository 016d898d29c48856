//! `csflow serve`: a trained model behind HTTP, for inspection stations that post an image and read back a
//! verdict.
//!
//! - `GET /`: a page for people: drop a photo, see its verdict, its score against the threshold and the
//!   heatmap.
//! - `GET /health`: `{"status": "ok"}` (the model is loaded before the port opens).
//! - `GET /info`: the model file, backbone, input size, thresholds, map mode, precision, csflow's version.
//! - `GET /metrics`: Prometheus / OpenMetrics text: requests by status, verdicts by label, scoring time,
//!   queue wait, batch size and requests abandoned by their clients (skipped if still waiting).
//! - `POST /predict`: the body is one image file's bytes (PNG, JPEG, BMP, TIFF, WebP, as `predict` reads);
//!   query `threshold`, `heatmap=true`, `mask=true`, `mask_threshold`. Answers the verdict `predict` prints
//!   (`score`, `normalized_score`, `label`, `threshold`), the image's `width` and `height`, the time taken
//!   (`milliseconds`, `queue_milliseconds`), how many images were scored together (`batch_size`), and the
//!   heatmap overlay and mask as base64 PNG (`heatmap_png`, `mask_png`) when asked for.
//!
//! Errors answer `{"error": "..."}`: 400 for an image that cannot be read, has more than `--max-pixels`, or a
//! bad query, 408 for a body slower than `--read-timeout`, 413 for a body over
//! `--max-body-bytes`, 415 for a multipart form, 503 when `--max-queue` requests are already held, 500
//! otherwise. One thread scores: the next request together with up to `--max-batch-size` - 1 others that
//! wait, in one batch through the flow (its weights read once for all), each image on every core. A full
//! queue is refused at once so that a client can retry or fall back instead of timing out.
//!
//! A client has `--read-timeout` seconds to send a request's headers, then as long for its body (408), and a
//! connection waiting idle for its next request is closed after as long: stalled clients cannot hold every
//! connection. A body declared larger than `--max-body-bytes` is refused before it is sent.

mod metrics;
mod scoring;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use csflow::detector::Detector;
use csflow::score::MapMode;
use csflow::Precision;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};

use metrics::Metrics;
use scoring::{score_jobs, Job, Model, Prediction};

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
    #[arg(long, env = "CSFLOW_THRESHOLD", value_parser = csflow::threshold::parse_finite::<f64>)]
    pub threshold: Option<f64>,
    /// Anomaly-map value from which a pixel is marked defective in masks (default: the highest value seen
    /// on good images at training); a request's `mask_threshold` overrides it.
    #[arg(long, env = "CSFLOW_MASK_THRESHOLD", value_parser = csflow::threshold::parse_finite::<f32>)]
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
    /// Requests held at once besides one being scored (waiting, or scored with it in a batch); further ones
    /// get 503 at once.
    #[arg(long, env = "CSFLOW_MAX_QUEUE", default_value_t = 32)]
    pub max_queue: usize,
    /// Pixels an uploaded image may have (refused with 400 from its header): an image's decoding and its
    /// full-size heatmap take some 20 bytes a pixel, and a 16384 x 16384 PNG of one colour compresses to
    /// under 1 MB. The default is 4096 x 4096.
    #[arg(long, env = "CSFLOW_MAX_PIXELS", default_value_t = 1 << 24,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..=csflow::io::MAX_PIXELS))]
    pub max_pixels: u64,
    /// Seconds a client may take to send a request's headers, and then its body (408), and a connection may
    /// wait idle for its next request: slower ones are closed, so that stalled clients cannot hold every
    /// connection.
    #[arg(long, env = "CSFLOW_READ_TIMEOUT", default_value_t = 30,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    pub read_timeout: u64,
    /// Seconds to let requests in flight finish after Ctrl-C or SIGTERM; then the server stops anyway (a
    /// client that never finishes sending its request would hold it forever). A second signal stops it at
    /// once.
    #[arg(long, env = "CSFLOW_SHUTDOWN_TIMEOUT", default_value_t = 10)]
    pub shutdown_timeout: u64,
    /// Waiting requests scored together at most: a batch reads the flow's weights once for all its images
    /// (CPU size: the flow 8.7 ms for one image, 4.6 ms per image in fours); 1 scores one at a time.
    #[arg(long, env = "CSFLOW_MAX_BATCH_SIZE", default_value_t = 8,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_batch_size: usize,
}

/// What every request shares: the model, the server's defaults and the way to the scoring thread.
pub struct AppState {
    model: Arc<Model>,
    path: PathBuf,
    threshold: Option<f64>,
    mask_threshold: Option<f32>,
    precision: Precision,
    max_body_bytes: usize,
    read_timeout: std::time::Duration,
    /// Requests admitted, being scored or waiting: `--max-queue` + 1. Each job holds its permit until it has
    /// been answered, also when its client has gone away (the job is still in the queue then).
    admitted: Arc<Semaphore>,
    jobs: mpsc::UnboundedSender<Job>,
    metrics: Metrics,
}

impl AppState {
    /// Loads the model `args` name (errors name the file) and starts the thread that scores the requests.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Self> {
        let detector = Detector::load_in(&args.model, args.precision)?;
        let model = Arc::new(Model { detector, mode: args.map_mode, max_pixels: args.max_pixels });
        let (jobs, queue) = mpsc::unbounded_channel();
        let (scorer, max_batch) = (model.clone(), args.max_batch_size);
        let metrics = Metrics::new();
        let abandoned = metrics.abandoned.clone();
        std::thread::Builder::new()
            .name("csflow-scoring".into())
            .spawn(move || score_jobs(&scorer, queue, max_batch, abandoned))
            .context("starting the scoring thread")?;
        Ok(AppState {
            model,
            path: args.model.clone(),
            threshold: args.threshold,
            mask_threshold: args.mask_threshold,
            precision: args.precision,
            max_body_bytes: args.max_body_bytes,
            read_timeout: std::time::Duration::from_secs(args.read_timeout),
            admitted: Arc::new(Semaphore::new(args.max_queue.saturating_add(1).min(Semaphore::MAX_PERMITS))),
            jobs,
            metrics,
        })
    }
}

const ROUTES: &str =
    "the routes are GET / (a page to check a photo), GET /health, GET /info, GET /metrics and POST /predict \
     (the image file as the body)";

/// The page at `/`: drop a photo, see the verdict, the score against the threshold and the heatmap (for a
/// person at the line, with nothing to install).
const PAGE: &str = include_str!("index.html");

/// The routes (`POST /predict` reads its body within the state's `max_body_bytes` and `read_timeout`).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/predict", post(predict))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, ROUTES) })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, ROUTES) })
        .with_state(state)
}

/// Loads the model, listens, and serves until Ctrl-C or SIGTERM: requests in flight are finished within
/// `--shutdown-timeout` seconds, or until a second signal.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let state = Arc::new(AppState::load(&args)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the server's runtime")?;
    let result = runtime.block_on(async {
        let listener = TcpListener::bind((args.hostname.as_str(), args.port))
            .await
            .with_context(|| format!("listening on {}:{}", args.hostname, args.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        // The address ends the line, for scripts (and the tests) that read it.
        tracing::info!("{}: {} threads, listening on http://{addr}", args.model.display(), csflow::threads::threads());
        let grace = std::time::Duration::from_secs(args.shutdown_timeout);
        let read_timeout = state.read_timeout;
        let app = router(state);
        let connections = hyper_util::server::graceful::GracefulShutdown::new();
        let mut signal = std::pin::pin!(shutdown_signal());
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        // Out of file descriptors, say: the connection is refused, the server goes on.
                        Err(e) => {
                            tracing::warn!("accepting a connection: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    // Headers (of a connection's first request and of each next one, so also an idle
                    // connection's wait) within the read timeout; the body's limit is the handler's.
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(read_timeout)
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(stream),
                            hyper_util::service::TowerToHyperService::new(app.clone()),
                        );
                    let connection = connections.watch(connection);
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                }
                _ = &mut signal => break,
            }
        }
        drop(listener);
        tracing::info!("stopping: finishing the requests in flight (at most {} s)", grace.as_secs());
        tokio::select! {
            _ = connections.shutdown() => tracing::info!("stopped"),
            _ = tokio::time::sleep(grace) => {
                tracing::warn!("stopped after the shutdown timeout, with connections still open")
            }
            _ = shutdown_signal() => tracing::warn!("stopped on a second signal, with connections still open"),
        }
        Ok::<_, anyhow::Error>(())
    });
    // Connections still open are dropped here, not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    result
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
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut answer = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // A full queue drains within about a second (32 images at some 30 ms each on two cores).
            answer.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        answer
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
    let meta = &s.model.detector.meta;
    Json(Info {
        model: s.path.display().to_string(),
        backbone: meta.backbone.as_ref().map(|b| b.name.clone()),
        input_size: meta.backbone.as_ref().map(|b| b.input_size),
        threshold: s.threshold.or(meta.threshold),
        model_threshold: meta.threshold,
        mask_threshold: s.model.detector.mask_threshold(s.model.mode, s.mask_threshold),
        map_mode: s.model.mode,
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

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &s.metrics.registry) {
        Ok(()) => {
            ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
        }
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}")).into_response(),
    }
}

async fn predict(
    state: State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<PredictQuery>, QueryRejection>,
    body: Body,
) -> Result<Json<Prediction>, ApiError> {
    let s = state.0.clone();
    let result = predict_one(state, headers, query, body).await;
    s.metrics.record(&result);
    match &result {
        Ok(Json(p)) => {
            let label = p.verdict.label.unwrap_or("-");
            tracing::info!(score = p.verdict.score, label, ms = p.milliseconds, batch = p.batch_size, "predict")
        }
        Err(e) => tracing::warn!(status = %e.status, "predict: {}", e.message),
    }
    result
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than --max-body-bytes ({limit} bytes)"))
}

/// The request's body: at most `limit` bytes (else 413), all of it within `timeout` (else 408).
async fn read_body(body: Body, limit: usize, timeout: std::time::Duration) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let read = tokio::time::timeout(timeout, http_body_util::Limited::new(body, limit).collect()).await;
    match read {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within --read-timeout ({} s)", timeout.as_secs()),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large(limit)),
        Ok(Err(e)) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("reading the body: {e}"))),
    }
}

async fn predict_one(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<PredictQuery>, QueryRejection>,
    body: Body,
) -> Result<Json<Prediction>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let form = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/"));
    if form {
        let msg = "send the image file's bytes as the body (curl --data-binary @part.png), not a multipart form";
        return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, msg));
    }
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let body = match declared {
        // Refused before any of it is read.
        Some(n) if n > s.max_body_bytes as u64 => Err(too_large(s.max_body_bytes)),
        _ => read_body(body, s.max_body_bytes, s.read_timeout).await,
    }?;
    if body.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty body: send the image file's bytes"));
    }
    if !q.threshold.is_none_or(f64::is_finite) || !q.mask_threshold.is_none_or(f32::is_finite) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "threshold and mask_threshold must be finite numbers"));
    }
    let mask_threshold = if q.mask {
        let t = s.model.detector.mask_threshold(s.model.mode, q.mask_threshold.or(s.mask_threshold));
        Some(t.ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, "the model records no good-image map range: give mask_threshold")
        })?)
    } else {
        None
    };
    let Ok(permit) = s.admitted.clone().try_acquire_owned() else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy: the queue is full, try again"));
    };
    let (reply, answer) = oneshot::channel();
    let job = Job {
        bytes: body,
        threshold: q.threshold.or(s.threshold),
        heatmap: q.heatmap,
        mask_threshold,
        admitted: Instant::now(),
        reply,
        _permit: permit,
    };
    let stopped = || ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the scoring thread has stopped");
    s.jobs.send(job).map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())?.map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_says_when_to_retry() {
        let busy = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
        assert_eq!(busy.headers().get(axum::http::header::RETRY_AFTER).map(|v| v.as_bytes()), Some(&b"1"[..]));
        let bad = ApiError::new(StatusCode::BAD_REQUEST, "bad").into_response();
        assert!(bad.headers().get(axum::http::header::RETRY_AFTER).is_none());
    }
}
