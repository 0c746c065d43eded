//! `serve`'s metrics over HTTP, on `[hub] listen` (optional): `GET /metrics` answers the
//! Prometheus text format (0.0.4) from [`super::serve::Metrics`]; anything else is a 404
//! (other paths), 405 (other methods) or 400 (not HTTP), and the connection closes.
//!
//! What it exposes (`outpost_hub_` names; counters since this process started):
//! - `records_stored_total`, `checkpoints_stored_total`, `batches_total{outcome}`
//!   (`stored`, `duplicate`, `ahead`, `parked`): the ingest rate is `rate()` of them;
//! - `batches_refused_total{reason}` (every reason, 0 included) and `alerts_total{kind}`;
//! - `messages_received_total`, `messages_shed_total`, `messages_limited_total` (over a
//!   device's rate limit or its share of the hub; per device in
//!   `device_messages_limited_total{device}`, only for devices that were limited),
//!   `queued_bytes`, `acks_sent_total`,
//!   `acks_unsent_total`, `store_errors_total`, `broker_disconnects_total`;
//! - `store_transaction_seconds` (histogram): each ingest transaction, begin to commit;
//! - per device, from the store (refreshed every [`super::serve::LAG_POLL`] by the ingest
//!   thread, so it is the store's view, the same on every hub): `device_acked_seq{device}`
//!   and `device_audit_lag{device}`, the records its last telemetry said it had written
//!   minus those the hub stored (absent until it reports one).
//!
//! Choice: the text is written here rather than through the `prometheus` crate (which the
//! agent uses): every value already lives in `serve::Metrics`' atomics, and mirroring them
//! into a second registry on each scrape would count them twice over. The HTTP side is this
//! small reader (no HTTP crate in `sync`): one request per connection, its head capped at
//! [`MAX_REQUEST`] bytes and [`READ_TIMEOUT`].

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::ingest::{AlertKind, Refusal};
use super::serve::{LATENCY_BUCKETS, Metrics};

/// Largest request head read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers `/metrics` on `listener` until `shutdown`.
pub async fn run(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "Metrics on /metrics.");
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &metrics).await {
                            debug!(peer = %peer, error = %e, "Metrics request failed.");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "Accepting a metrics connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    let (status, body) = match read {
        Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) => respond(&head, metrics),
    };
    let content_type = if status == "200 OK" {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// The status line and body for a request head.
fn respond(head: &[u8], metrics: &Metrics) -> (&'static str, String) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line)
        .unwrap_or("")
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", "bad request\n".into());
    };
    if !version.starts_with("HTTP/1.") || !head.ends_with(b"\r\n\r\n") {
        return ("400 Bad Request", "bad request\n".into());
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", render(metrics)),
        (_, "/metrics") => ("405 Method Not Allowed", "only GET\n".into()),
        _ => ("404 Not Found", "not found (try /metrics)\n".into()),
    }
}

/// The Prometheus text of `metrics`.
pub fn render(metrics: &Metrics) -> String {
    let s = metrics.snapshot();
    let mut out = String::with_capacity(4096);
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP outpost_hub_{name} {help}\n# TYPE outpost_hub_{name} counter\n\
             outpost_hub_{name} {value}"
        );
    };
    counter(
        "messages_received_total",
        "Messages taken from the broker.",
        s.received,
    );
    counter(
        "messages_shed_total",
        "Messages dropped unacked over the byte budget (devices send them again).",
        s.shed,
    );
    counter(
        "messages_limited_total",
        "Messages dropped unacked over their device's rate limit or share of the hub (devices send audit again).",
        s.limited,
    );
    counter(
        "records_stored_total",
        "Audit records stored.",
        s.records_stored,
    );
    counter(
        "checkpoints_stored_total",
        "Signed checkpoints verified and stored.",
        s.checkpoints_stored,
    );
    counter("acks_sent_total", "Audit acks published.", s.acks_sent);
    counter(
        "acks_unsent_total",
        "Audit acks the link could not take (tried again).",
        s.acks_unsent,
    );
    counter(
        "store_errors_total",
        "Messages or transactions the store failed.",
        s.store_errors,
    );
    counter(
        "broker_disconnects_total",
        "Connections to the broker lost.",
        s.disconnects,
    );
    let _ = writeln!(
        out,
        "# HELP outpost_hub_queued_bytes Bytes held from the broker link.\n\
         # TYPE outpost_hub_queued_bytes gauge\noutpost_hub_queued_bytes {}",
        s.queued_bytes
    );
    let outcomes = [
        ("stored", s.batches_stored),
        ("duplicate", s.batches_duplicate),
        ("ahead", s.batches_ahead),
        ("parked", s.batches_parked),
    ];
    labelled_counter(
        &mut out,
        ("batches_total", "Audit batches by what became of them."),
        "outcome",
        outcomes.iter().map(|(k, _)| *k),
        &outcomes,
    );
    labelled_counter(
        &mut out,
        ("batches_refused_total", "Audit batches refused, by reason."),
        "reason",
        Refusal::ALL.iter().map(|r| r.as_str()),
        &s.batches_refused,
    );
    labelled_counter(
        &mut out,
        ("alerts_total", "Audit chain alerts, by kind."),
        "kind",
        AlertKind::ALL.iter().map(|k| k.as_str()),
        &s.alerts,
    );
    let latency = metrics.latency();
    let _ = writeln!(
        out,
        "# HELP outpost_hub_store_transaction_seconds Ingest transactions, begin to commit.\n\
         # TYPE outpost_hub_store_transaction_seconds histogram"
    );
    let mut cumulative = 0;
    for (bound, n) in LATENCY_BUCKETS.iter().zip(&latency.buckets) {
        cumulative += n;
        let _ = writeln!(
            out,
            "outpost_hub_store_transaction_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "outpost_hub_store_transaction_seconds_bucket{{le=\"+Inf\"}} {}\n\
         outpost_hub_store_transaction_seconds_sum {}\n\
         outpost_hub_store_transaction_seconds_count {}",
        latency.count,
        latency.sum_micros as f64 / 1e6,
        latency.count
    );
    let devices = metrics.devices();
    let _ = writeln!(
        out,
        "# HELP outpost_hub_device_acked_seq The highest audit seq stored for the device.\n\
         # TYPE outpost_hub_device_acked_seq gauge"
    );
    for d in &devices {
        if let Some(acked) = d.acked_seq {
            let _ = writeln!(
                out,
                "outpost_hub_device_acked_seq{{device=\"{}\"}} {acked}",
                d.id
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP outpost_hub_device_audit_lag Records the device has written (its last \
         telemetry) that the hub has not stored.\n# TYPE outpost_hub_device_audit_lag gauge"
    );
    for d in &devices {
        if let Some(lag) = d.audit_lag {
            let _ = writeln!(
                out,
                "outpost_hub_device_audit_lag{{device=\"{}\"}} {lag}",
                d.id
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP outpost_hub_device_messages_limited_total Messages of the device dropped \
         unacked over its rate limit or its share of the hub (only devices that were limited).\n\
         # TYPE outpost_hub_device_messages_limited_total counter"
    );
    for (id, n) in metrics.limited_devices() {
        let _ = writeln!(
            out,
            "outpost_hub_device_messages_limited_total{{device=\"{id}\"}} {n}"
        );
    }
    out
}

/// A counter with one label: a line for every value of `labels` (0 for those `counts`
/// lacks).
fn labelled_counter<'a>(
    out: &mut String,
    (name, help): (&str, &str),
    label: &str,
    labels: impl Iterator<Item = &'a str>,
    counts: &[(&str, u64)],
) {
    let _ = writeln!(
        out,
        "# HELP outpost_hub_{name} {help}\n# TYPE outpost_hub_{name} counter"
    );
    for l in labels {
        let n = counts.iter().find(|(k, _)| *k == l).map_or(0, |(_, n)| *n);
        let _ = writeln!(out, "outpost_hub_{name}{{{label}=\"{l}\"}} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(request: &[u8], expect_status: &str, expect_body: &str) {
        let metrics = Metrics::default();
        let (status, body) = respond(request, &metrics);
        assert_eq!(status, expect_status);
        assert!(body.contains(expect_body), "{body}");
    }

    #[test]
    fn requests_are_answered_or_refused() {
        check(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            "200 OK",
            "outpost_hub_batches_refused_total{reason=\"malformed\"} 0",
        );
        check(
            b"GET /metrics?x=1 HTTP/1.0\r\n\r\n",
            "200 OK",
            "outpost_hub_records_stored_total 0",
        );
        check(
            b"POST /metrics HTTP/1.1\r\n\r\n",
            "405 Method Not Allowed",
            "only GET",
        );
        check(b"GET / HTTP/1.1\r\n\r\n", "404 Not Found", "not found");
        check(b"GET /metrics\r\n\r\n", "400 Bad Request", "bad request");
        check(
            b"GET /metrics HTTP/1.1\r\n",
            "400 Bad Request",
            "bad request",
        );
        check(
            b"\xff\xfe / HTTP/1.1\r\n\r\n",
            "400 Bad Request",
            "bad request",
        );
        check(&[b'A'; MAX_REQUEST], "400 Bad Request", "bad request");
    }
}
