//! Prometheus metrics (`/metrics` on the admin port). Counters are atomics shared by the
//! workers; the hot paths add once per socket read or write, not once per frame.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// One label; an array, so that looking a counter up allocates nothing.
type Labels = [(&'static str, &'static str); 1];

/// Every metric of a gateway.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub sessions: Gauge,
    pub accepted: Counter,
    pub refused_busy: Counter,
    pub accept_errors: Family<Labels, Counter>,
    pub tls_handshake_failures: Counter,
    pub logins: Family<Labels, Counter>,
    pub closes: Family<Labels, Counter>,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub uplinks: Counter,
    pub uplink_acks: Family<Labels, Counter>,
    pub uplink_duplicates: Counter,
    pub downlinks: Counter,
    pub downlink_acks: Counter,
    pub resumes: Family<Labels, Counter>,
    pub kicks: Family<Labels, Counter>,
    pub heartbeat_timeouts: Counter,
    pub login_timeouts: Counter,
    pub slow_consumers: Counter,
    pub pushes_refused: Family<Labels, Counter>,
    pub undelivered: Family<Labels, Counter>,
    /// Kept in `buffered`, copied into the gauge when the metrics are encoded.
    buffered_bytes: Gauge,
    /// Body bytes of accepted, unacked downlinks: moved on every push and ack.
    pub buffered: Striped,
    pub sessions_ended: Family<Labels, Counter>,
    pub decode_errors: Family<Labels, Counter>,
    pub upstream_latency: StripedHistogram,
    pub upstream_panics: Family<Labels, Counter>,
    pub awaiting_login: Gauge,
    pub handoffs: Family<Labels, Counter>,
    pub answers_too_large: Family<Labels, Counter>,
    pub encode_failures: Family<Labels, Counter>,
    pub prelogin_refused: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("tether");
        macro_rules! reg {
            ($name:literal, $help:literal, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
        }
        Metrics {
            connections: reg!("connections", "Open client connections", Gauge::default()),
            sessions: reg!(
                "sessions",
                "Live sessions (attached or in their grace period)",
                Gauge::default()
            ),
            accepted: reg!("accepted", "Connections accepted", Counter::default()),
            refused_busy: reg!(
                "refused_busy",
                "Connections refused at max_connections",
                Counter::default()
            ),
            accept_errors: reg!(
                "accept_errors",
                "accept() failures by errno",
                Family::default()
            ),
            tls_handshake_failures: reg!(
                "tls_handshake_failures",
                "TLS handshakes failed or timed out",
                Counter::default()
            ),
            logins: reg!("logins", "LOGIN outcomes by result", Family::default()),
            closes: reg!("closes", "Connections closed, by reason", Family::default()),
            frames_in: reg!("frames_in", "Frames received", Counter::default()),
            frames_out: reg!("frames_out", "Frames sent", Counter::default()),
            bytes_in: reg!("bytes_in", "Bytes received (after TLS)", Counter::default()),
            bytes_out: reg!("bytes_out", "Bytes sent (before TLS)", Counter::default()),
            uplinks: reg!(
                "uplinks",
                "UPLINKs forwarded to the upstream",
                Counter::default()
            ),
            uplink_acks: reg!("uplink_acks", "UPLINK_ACKs by code", Family::default()),
            uplink_duplicates: reg!(
                "uplink_duplicates",
                "Resent UPLINKs not forwarded again",
                Counter::default()
            ),
            downlinks: reg!(
                "downlinks",
                "Downlinks queued to sessions",
                Counter::default()
            ),
            downlink_acks: reg!(
                "downlink_acks",
                "DOWNLINK_ACKs received",
                Counter::default()
            ),
            resumes: reg!(
                "resumes",
                "Logins asking to resume, by outcome",
                Family::default()
            ),
            kicks: reg!("kicks", "KICKs sent, by reason", Family::default()),
            heartbeat_timeouts: reg!(
                "heartbeat_timeouts",
                "Connections closed for silence",
                Counter::default()
            ),
            login_timeouts: reg!(
                "login_timeouts",
                "Connections closed for no LOGIN in time",
                Counter::default()
            ),
            slow_consumers: reg!(
                "slow_consumers",
                "Connections closed as slow consumers",
                Counter::default()
            ),
            pushes_refused: reg!(
                "pushes_refused",
                "Downlinks a session refused, by reason (full: retriable once it acks)",
                Family::default()
            ),
            undelivered: reg!(
                "undelivered",
                "Accepted downlinks handed back to the upstream undelivered, by why the session ended",
                Family::default()
            ),
            buffered_bytes: reg!(
                "downlink_buffered_bytes",
                "Body bytes of accepted, unacked downlinks held by live sessions",
                Gauge::default()
            ),
            sessions_ended: reg!(
                "sessions_ended",
                "Sessions ended, by reason",
                Family::default()
            ),
            decode_errors: reg!(
                "decode_errors",
                "Undecodable input from clients, by error",
                Family::default()
            ),
            upstream_latency: reg!(
                "upstream_latency_seconds",
                "Time from forwarding an UPLINK to the upstream's answer",
                StripedHistogram::new(exponential_buckets(0.00001, 4.0, 12))
            ),
            upstream_panics: reg!(
                "upstream_panics",
                "Panics caught in calls to the upstream, by call",
                Family::default()
            ),
            answers_too_large: reg!(
                "answers_too_large",
                "Upstream answers too large for a frame, answered INTERNAL instead",
                Family::default()
            ),
            encode_failures: reg!(
                "encode_failures",
                "Frames to a client that did not encode, by kind (the connection is closed INTERNAL)",
                Family::default()
            ),
            handoffs: reg!(
                "handoffs",
                "Sessions moved between sibling processes (--processes), by side: taken, given, failed (a claim no sibling answered); and answers to uplinks in flight in a moved session: relayed (to the sibling), relay_failed, relay_received",
                Family::default()
            ),
            awaiting_login: reg!(
                "connections_awaiting_login",
                "Connections accepted and not yet logged in",
                Gauge::default()
            ),
            prelogin_refused: reg!(
                "prelogin_refused",
                "Connections refused SERVER_BUSY at accept for the pre-login limits, by limit (total, per_ip)",
                Family::default()
            ),
            buffered: Striped::new(),
            registry: r,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.buffered_bytes.set(self.buffered.sum());
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }

    pub fn inc(family: &Family<Labels, Counter>, key: &'static str, value: &'static str) {
        family.get_or_create(&[(key, value)]).inc();
    }
}

/// Stripes of a [`Striped`] counter or histogram (and of the node's upstream deadlines).
pub const STRIPES: usize = 16;

/// This thread's stripe: threads take stripes in turn as they first ask, so the workers (the
/// first threads to move anything) each have their own.
pub fn stripe() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

/// A counter that every thread moves on a hot path (a push, an ack): one cache line per
/// stripe, each thread on its own, summed when read. A single atomic here bounced its cache
/// line between the pushing and the acking worker on every delivery (perf, W3).
#[derive(Debug)]
pub struct Striped {
    stripes: Box<[crossbeam_utils::CachePadded<std::sync::atomic::AtomicI64>]>,
}

impl Striped {
    pub fn new() -> Striped {
        Striped {
            stripes: (0..STRIPES).map(|_| Default::default()).collect(),
        }
    }

    pub fn add(&self, v: i64) {
        self.stripes[stripe()].fetch_add(v, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn sum(&self) -> i64 {
        self.stripes
            .iter()
            .map(|s| s.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}

impl Default for Striped {
    fn default() -> Self {
        Striped::new()
    }
}

/// A histogram every worker observes on a hot path (one per uplink answered): counts in
/// per-thread stripes of atomics, summed when encoded. prometheus-client's `Histogram` takes
/// one mutex per observation, shared by every worker.
/// Clones share the counts.
#[derive(Debug, Clone)]
pub struct StripedHistogram {
    bounds: std::sync::Arc<[f64]>,
    /// Per stripe: one count per bound, one for above the last, then the sum (f64 bits).
    stripes: std::sync::Arc<[crossbeam_utils::CachePadded<Box<[AtomicU64]>>]>,
}

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

impl StripedHistogram {
    pub fn new(bounds: impl Iterator<Item = f64>) -> StripedHistogram {
        let bounds: std::sync::Arc<[f64]> = bounds.collect();
        let n = bounds.len() + 2;
        StripedHistogram {
            stripes: (0..STRIPES)
                .map(|_| {
                    crossbeam_utils::CachePadded::new((0..n).map(|_| AtomicU64::new(0)).collect())
                })
                .collect(),
            bounds,
        }
    }

    pub fn observe(&self, v: f64) {
        let s = &self.stripes[stripe()];
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        s[i].fetch_add(1, AtomicOrdering::Relaxed);
        // Usually only this thread adds to its stripe (past 16 threads they share): a
        // compare-and-swap that does not loop then.
        let sum = &s[self.bounds.len() + 1];
        let add = |b: u64| Some((f64::from_bits(b) + v).to_bits());
        let _ = sum.fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, add);
    }

    /// (sum, count, per-bucket counts with their upper bounds; the last is +Inf).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let n = self.bounds.len();
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .map(|b| (b, 0))
            .collect();
        let mut sum = 0.0;
        for s in self.stripes.iter() {
            for (i, b) in buckets.iter_mut().enumerate() {
                b.1 += s[i].load(AtomicOrdering::Relaxed);
            }
            sum += f64::from_bits(s[n + 1].load(AtomicOrdering::Relaxed));
        }
        let count = buckets.iter().map(|b| b.1).sum();
        (sum, count, buckets)
    }
}

impl prometheus_client::encoding::EncodeMetric for StripedHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_striped_histogram_sums_its_stripes_in_the_exposition() {
        let m = Metrics::new();
        let h = m.upstream_latency.clone();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        h.observe(0.000_005); // first bucket (le 1e-5)
                        h.observe(1_000.0); // past the last bound: +Inf only
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 8000);
        assert_eq!(buckets[0].1, 4000);
        assert_eq!(buckets.last().unwrap().1, 4000);
        assert!((sum - 4_000.0 * 1_000.000_005).abs() < 1e-3, "{sum}");
        let text = m.encode();
        assert!(
            text.contains("tether_upstream_latency_seconds_count 8000"),
            "{text}"
        );
        assert!(
            text.contains("tether_upstream_latency_seconds_bucket{le=\"+Inf\"} 8000"),
            "{text}"
        );
        assert!(
            text.contains("tether_upstream_latency_seconds_bucket{le=\"0.00001\"} 4000"),
            "{text}"
        );
    }
}
