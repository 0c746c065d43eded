//! `/metrics`: counters and gauges in the Prometheus text exposition format (0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outpost_engine::Generation;
use outpost_engine::generate::FinishReason;

/// An `f64` kept in an atomic (its bits).
#[derive(Debug, Default)]
struct Gauge(AtomicU64);

impl Gauge {
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// (route, method, status) → count.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// finish reason → count.
    generations: Mutex<BTreeMap<&'static str, u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    prefill_tps: Gauge,
    decode_tps: Gauge,
    generation_seconds: Gauge,
    model_load_seconds: Gauge,
    audit_records: AtomicU64,
    unauthenticated: AtomicU64,
    forbidden: AtomicU64,
    rejected_busy: AtomicU64,
}

impl Metrics {
    pub fn record_request(&self, route: &str, method: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route.to_string(), method.to_string(), status))
                .or_default() += 1;
        }
    }

    pub fn record_generation(&self, prompt_tokens: usize, g: &Generation, took: Duration) {
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(g.tokens.len() as u64, Ordering::Relaxed);
        self.prefill_tps.set(g.timings.prefill_tokens_per_s);
        if !g.tokens.is_empty() {
            self.decode_tps.set(g.timings.decode_tokens_per_s);
        }
        self.generation_seconds
            .set(self.generation_seconds.get() + took.as_secs_f64());
        let reason = match g.finish_reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Cancelled => "cancelled",
        };
        if let Ok(mut m) = self.generations.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    pub fn model_loaded(&self, took: Duration) {
        self.model_load_seconds.set(took.as_secs_f64());
    }

    pub fn audit_record(&self) {
        self.audit_records.fetch_add(1, Ordering::Relaxed);
    }

    pub fn unauthenticated(&self) {
        self.unauthenticated.fetch_add(1, Ordering::Relaxed);
    }

    pub fn forbidden(&self) {
        self.forbidden.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected_busy(&self) {
        self.rejected_busy.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text. `model`: the label of the model loaded, if any, and its queue.
    pub fn render(&self, model: Option<(&str, usize)>) -> String {
        let mut out = String::with_capacity(4096);
        let mut family = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            "outpost_http_requests_total",
            "counter",
            "HTTP requests answered, by route, method and status.",
        );
        let mut body = String::new();
        if let Ok(m) = self.requests.lock() {
            for ((route, method, status), n) in m.iter() {
                let _ = writeln!(
                    body,
                    "outpost_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {n}",
                    escape(route),
                    escape(method)
                );
            }
        }
        out.push_str(&body);
        let counters = [
            (
                "outpost_prompt_tokens_total",
                "Prompt tokens prefilled.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "outpost_generated_tokens_total",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "outpost_audit_records_total",
                "Audit records this process wrote or queued for writing.",
                self.audit_records.load(Ordering::Relaxed),
            ),
            (
                "outpost_queue_rejections_total",
                "Inference requests refused with 503 because the queue was full.",
                self.rejected_busy.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP outpost_auth_denials_total Requests refused: unauthenticated (401) or forbidden (403).\n\
             # TYPE outpost_auth_denials_total counter\n\
             outpost_auth_denials_total{{reason=\"unauthenticated\"}} {}\n\
             outpost_auth_denials_total{{reason=\"forbidden\"}} {}",
            self.unauthenticated.load(Ordering::Relaxed),
            self.forbidden.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP outpost_generations_total Generations finished, by reason.\n\
             # TYPE outpost_generations_total counter"
        );
        if let Ok(m) = self.generations.lock() {
            for (reason, n) in m.iter() {
                let _ = writeln!(out, "outpost_generations_total{{reason=\"{reason}\"}} {n}");
            }
        }
        let gauges = [
            (
                "outpost_prefill_tokens_per_second",
                "Prefill speed of the last generation.",
                self.prefill_tps.get(),
            ),
            (
                "outpost_decode_tokens_per_second",
                "Decode speed of the last generation.",
                self.decode_tps.get(),
            ),
            (
                "outpost_generation_seconds_total",
                "Time spent generating.",
                self.generation_seconds.get(),
            ),
            (
                "outpost_model_load_seconds",
                "How long the last model load took.",
                self.model_load_seconds.get(),
            ),
            (
                "outpost_queue_depth",
                "Inference requests waiting for the engine.",
                model.map_or(0.0, |(_, d)| d as f64),
            ),
            (
                "outpost_process_resident_memory_bytes",
                "Resident set size of the daemon.",
                rss_bytes().unwrap_or(0) as f64,
            ),
        ];
        for (name, help, v) in gauges {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP outpost_model_loaded The model serving the alias default (1), labelled.\n\
             # TYPE outpost_model_loaded gauge"
        );
        if let Some((label, _)) = model {
            let _ = writeln!(out, "outpost_model_loaded{{model=\"{}\"}} 1", escape(label));
        }
        out
    }
}

/// A label value as the text format wants it.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
        assert!(text.contains(
            "outpost_http_requests_total{route=\"/v1/models\",method=\"GET\",status=\"200\"} 2"
        ));
        assert!(text.contains("route=\"/weird\\\"route\""));
        assert!(text.contains("outpost_auth_denials_total{reason=\"unauthenticated\"} 1"));
        assert!(text.contains("outpost_queue_depth 3"));
        assert!(text.contains("outpost_model_loaded{model=\"m:1\"} 1"));
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let mut unique = types.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(types.len(), unique.len(), "{text}");
        assert!(rss_bytes().is_some_and(|b| b > 0));
    }
}
