//! `/metrics`: the daemon's counters and gauges, kept by the `prometheus` crate (atomic,
//! race-free) and rendered in the Prometheus text exposition format (0.0.4).
//!
//! Every label value comes from a bounded set: routes are the router's own patterns (or
//! `unmatched`), methods one of seven (or `other`), statuses what the daemon answers,
//! finish reasons and denial reasons fixed words. Hostile traffic cannot grow the series.

use std::time::Duration;

use outpost_engine::Generation;
use outpost_engine::generate::FinishReason;
use prometheus::{
    Counter, Encoder as _, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    generations: IntCounterVec,
    prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    prefill_tps: Gauge,
    decode_tps: Gauge,
    generation_seconds: Counter,
    model_load_seconds: Gauge,
    audit_records: IntCounter,
    audit_unqueued: IntCounter,
    denials: IntCounterVec,
    rejected_busy: IntCounter,
    queue_depth: IntGauge,
    rss: IntGauge,
    model_loaded: IntGaugeVec,
}

/// Registers `metric` in `registry`; names are fixed and distinct, so this cannot fail
/// unless two metrics below share a name (caught by the unit test).
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "A metric could not be registered.");
    }
    metric
}

/// Builds a metric from fixed options (its construction fails only on an invalid name).
macro_rules! metric {
    ($registry:expr, $ty:ty, $name:expr, $help:expr) => {
        register(
            $registry,
            <$ty>::new($name, $help).unwrap_or_else(|e| panic!("metric {}: {e}", $name)),
        )
    };
    ($registry:expr, $ty:ty, $name:expr, $help:expr, $labels:expr) => {
        register(
            $registry,
            <$ty>::new(Opts::new($name, $help), $labels)
                .unwrap_or_else(|e| panic!("metric {}: {e}", $name)),
        )
    };
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        Self {
            requests: metric!(
                &r,
                IntCounterVec,
                "outpost_http_requests_total",
                "HTTP requests answered, by route, method and status.",
                &["route", "method", "status"]
            ),
            generations: metric!(
                &r,
                IntCounterVec,
                "outpost_generations_total",
                "Generations finished, by reason.",
                &["reason"]
            ),
            prompt_tokens: metric!(
                &r,
                IntCounter,
                "outpost_prompt_tokens_total",
                "Prompt tokens prefilled."
            ),
            generated_tokens: metric!(
                &r,
                IntCounter,
                "outpost_generated_tokens_total",
                "Tokens generated."
            ),
            prefill_tps: metric!(
                &r,
                Gauge,
                "outpost_prefill_tokens_per_second",
                "Prefill speed of the last generation."
            ),
            decode_tps: metric!(
                &r,
                Gauge,
                "outpost_decode_tokens_per_second",
                "Decode speed of the last generation."
            ),
            generation_seconds: metric!(
                &r,
                Counter,
                "outpost_generation_seconds_total",
                "Time spent generating."
            ),
            model_load_seconds: metric!(
                &r,
                Gauge,
                "outpost_model_load_seconds",
                "How long the last model load took."
            ),
            audit_records: metric!(
                &r,
                IntCounter,
                "outpost_audit_records_total",
                "Audit records this process wrote or queued for writing."
            ),
            audit_unqueued: metric!(
                &r,
                IntCounter,
                "outpost_audit_records_unqueued_total",
                "Audit records that could not be queued for writing (the writer was full or gone)."
            ),
            denials: metric!(
                &r,
                IntCounterVec,
                "outpost_auth_denials_total",
                "Requests refused: unauthenticated (401) or forbidden (403).",
                &["reason"]
            ),
            rejected_busy: metric!(
                &r,
                IntCounter,
                "outpost_queue_rejections_total",
                "Inference requests refused with 503 because the queue was full."
            ),
            queue_depth: metric!(
                &r,
                IntGauge,
                "outpost_queue_depth",
                "Inference requests waiting for the engine."
            ),
            rss: metric!(
                &r,
                IntGauge,
                "outpost_process_resident_memory_bytes",
                "Resident set size of the daemon."
            ),
            model_loaded: metric!(
                &r,
                IntGaugeVec,
                "outpost_model_loaded",
                "The model serving the alias default (1), labelled.",
                &["model"]
            ),
            registry: r,
        }
    }
}

impl Metrics {
    /// `method` must come from a bounded set (see `http::metric_method`).
    pub fn record_request(&self, route: &str, method: &'static str, status: u16) {
        self.requests
            .with_label_values(&[route, method, &status.to_string()])
            .inc();
    }

    pub fn record_generation(&self, prompt_tokens: usize, g: &Generation, took: Duration) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.generated_tokens.inc_by(g.tokens.len() as u64);
        self.prefill_tps.set(g.timings.prefill_tokens_per_s);
        if !g.tokens.is_empty() {
            self.decode_tps.set(g.timings.decode_tokens_per_s);
        }
        self.generation_seconds.inc_by(took.as_secs_f64());
        let reason = match g.finish_reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Cancelled => "cancelled",
        };
        self.generations.with_label_values(&[reason]).inc();
    }

    pub fn model_loaded(&self, took: Duration) {
        self.model_load_seconds.set(took.as_secs_f64());
    }

    pub fn audit_record(&self) {
        self.audit_records.inc();
    }

    /// A record that could not be queued (logged by the caller).
    pub fn audit_unqueued(&self) {
        self.audit_unqueued.inc();
    }

    pub fn unauthenticated(&self) {
        self.denials.with_label_values(&["unauthenticated"]).inc();
    }

    pub fn forbidden(&self) {
        self.denials.with_label_values(&["forbidden"]).inc();
    }

    pub fn rejected_busy(&self) {
        self.rejected_busy.inc();
    }

    /// The exposition text. `model`: the label of the model loaded, if any, and its queue.
    pub fn render(&self, model: Option<(&str, usize)>) -> String {
        self.queue_depth
            .set(model.map_or(0, |(_, d)| i64::try_from(d).unwrap_or(i64::MAX)));
        self.rss
            .set(rss_bytes().map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
        self.model_loaded.reset();
        if let Some((label, _)) = model {
            self.model_loaded.with_label_values(&[label]).set(1);
        }
        let mut out = Vec::with_capacity(4096);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "Metrics could not be rendered.");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The sync loop's figures (registered only when `[sync]` is configured), set from its
/// [`SyncStats`](outpost_sync::device::SyncStats) when `/metrics` is read.
#[derive(Debug)]
pub struct SyncMetrics {
    connected: IntGauge,
    reconnects: IntCounter,
    pending: IntGauge,
    acked_seq: IntGauge,
    batches: IntCounter,
    records: IntCounter,
    bytes: IntCounter,
    resends: IntCounter,
    telemetry_queued: IntGauge,
    telemetry_dropped: IntCounter,
}

impl SyncMetrics {
    /// Moves each counter up to `to` (the loop's totals only grow).
    fn advance(c: &IntCounter, to: u64) {
        c.inc_by(to.saturating_sub(c.get()));
    }

    pub fn update(&self, s: &outpost_sync::device::StatsSnapshot) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.connected.set(i64::from(s.connected));
        self.pending.set(gauge(s.pending_records));
        self.acked_seq.set(gauge(s.last_acked_seq));
        self.telemetry_queued.set(gauge(s.telemetry_queued_bytes));
        Self::advance(&self.reconnects, s.reconnects);
        Self::advance(&self.batches, s.batches_sent);
        Self::advance(&self.records, s.records_sent);
        Self::advance(&self.bytes, s.bytes_sent);
        Self::advance(&self.resends, s.resends);
        Self::advance(&self.telemetry_dropped, s.telemetry_dropped);
    }
}

impl Metrics {
    /// Registers the sync metrics (once, when the daemon starts its sync loop).
    pub fn register_sync(&self) -> SyncMetrics {
        let r = &self.registry;
        SyncMetrics {
            connected: metric!(
                r,
                IntGauge,
                "outpost_sync_connected",
                "Whether the link to the broker is up (1) or not (0)."
            ),
            reconnects: metric!(
                r,
                IntCounter,
                "outpost_sync_reconnects_total",
                "Connections to the broker established after the first."
            ),
            pending: metric!(
                r,
                IntGauge,
                "outpost_sync_pending_records",
                "Audit records the hub has not acknowledged yet."
            ),
            acked_seq: metric!(
                r,
                IntGauge,
                "outpost_sync_acked_seq",
                "The highest audit seq the hub has acknowledged (stored durably)."
            ),
            batches: metric!(
                r,
                IntCounter,
                "outpost_sync_audit_batches_sent_total",
                "Audit batches handed to the broker (resends included)."
            ),
            records: metric!(
                r,
                IntCounter,
                "outpost_sync_audit_records_sent_total",
                "Audit records handed to the broker (resends included)."
            ),
            bytes: metric!(
                r,
                IntCounter,
                "outpost_sync_sent_bytes_total",
                "Payload bytes handed to the broker."
            ),
            resends: metric!(
                r,
                IntCounter,
                "outpost_sync_resends_total",
                "Times the records above the cursor were sent again because no ack came."
            ),
            telemetry_queued: metric!(
                r,
                IntGauge,
                "outpost_sync_telemetry_queued_bytes",
                "Telemetry bytes waiting in the outbox."
            ),
            telemetry_dropped: metric!(
                r,
                IntCounter,
                "outpost_sync_telemetry_dropped_total",
                "Telemetry snapshots dropped by the quota (oldest first)."
            ),
        }
    }
}

/// The resident set size, from `/proc/self/status`.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_one_type_line_per_family_and_escapes_labels() {
        let m = Metrics::default();
        m.record_request("/v1/models", "GET", 200);
        m.record_request("/v1/models", "GET", 200);
        m.record_request("/weird\"route", "GET", 404);
        m.unauthenticated();
        let text = m.render(Some(("m:1", 3)));
        assert!(
            text.contains(
                "outpost_http_requests_total{method=\"GET\",route=\"/v1/models\",status=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("route=\"/weird\\\"route\""), "{text}");
        assert!(text.contains("outpost_auth_denials_total{reason=\"unauthenticated\"} 1"));
        assert!(text.contains("outpost_queue_depth 3"));
        assert!(text.contains("outpost_model_loaded{model=\"m:1\"} 1"));
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let mut unique = types.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(types.len(), unique.len(), "{text}");
        // Every family registered (a duplicate name would have been refused); only the
        // generations, none finished yet, have no series to show.
        assert_eq!(types.len(), 14, "{text}");
        assert!(rss_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn counts_from_many_threads_are_not_lost() {
        let m = std::sync::Arc::new(Metrics::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        m.audit_record();
                        m.record_request("/v1/models", "GET", 200);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = m.render(None);
        assert!(text.contains("outpost_audit_records_total 80000"), "{text}");
        assert!(text.contains(
            "outpost_http_requests_total{method=\"GET\",route=\"/v1/models\",status=\"200\"} 80000"
        ));
    }
}
