//! What `GET /metrics` counts, in the Prometheus / OpenMetrics text format (prometheus-client).

use axum::http::StatusCode;
use axum::Json;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::scoring::Prediction;
use crate::ApiError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    label: &'static str,
}

/// What `GET /metrics` reports (Prometheus / OpenMetrics text): requests by status, verdicts by label (a
/// line's defect rate over time), and distributions of scoring time, queue wait and batch size.
pub(crate) struct Metrics {
    pub registry: Registry,
    /// Requests whose client went away before the answer (counted by the scoring thread, which skips those
    /// still waiting).
    pub abandoned: Counter,
    requests: Family<StatusLabel, Counter>,
    verdicts: Family<VerdictLabel, Counter>,
    scoring: Histogram,
    queue: Histogram,
    batch: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let (requests, verdicts) = (Family::default(), Family::default());
        registry.register("csflow_requests", "POST /predict requests by HTTP status", requests.clone());
        registry.register(
            "csflow_verdicts",
            "Images scored, by label (good, defect, none without threshold)",
            verdicts.clone(),
        );
        let scoring = Histogram::new(exponential_buckets(0.002, 2.0, 12));
        registry.register(
            "csflow_scoring_seconds",
            "Decoding to pictures, per image (its batch's time)",
            scoring.clone(),
        );
        let queue = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "csflow_queue_seconds",
            "Wait from admission to the start of the image's batch",
            queue.clone(),
        );
        let batch = Histogram::new(linear_buckets(1.0, 1.0, 16));
        registry.register("csflow_batch_size", "Images scored together", batch.clone());
        let abandoned = Counter::default();
        registry.register(
            "csflow_abandoned_requests",
            "POST /predict requests whose client went away before the answer (not scored if still waiting)",
            abandoned.clone(),
        );
        Metrics { registry, abandoned, requests, verdicts, scoring, queue, batch }
    }

    pub fn record(&self, result: &Result<Json<Prediction>, ApiError>) {
        let status = match result {
            Ok(Json(p)) => {
                self.verdicts.get_or_create(&VerdictLabel { label: p.verdict.label.unwrap_or("none") }).inc();
                self.scoring.observe(p.milliseconds / 1e3);
                self.queue.observe(p.queue_milliseconds / 1e3);
                self.batch.observe(p.batch_size as f64);
                StatusCode::OK
            }
            Err(e) => e.status,
        };
        self.requests.get_or_create(&StatusLabel { status: status.as_u16() }).inc();
    }
}
