//! Results: latency histograms that merge exactly across worker processes, the counters a
//! worker reports, and the final report (summary table and JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency recorded, microseconds (one hour); larger values are clamped.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Significant digits kept by the histograms.
pub const SIGFIG: u8 = 3;

/// A latency histogram in microseconds.
#[derive(Clone, Debug)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Hist {
        Hist(Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGFIG).expect("valid bounds"))
    }
}

impl Hist {
    /// Records one latency (clamped to `1..=MAX_LATENCY_US`).
    pub fn record(&mut self, us: u64) {
        let _ = self.0.record(us.clamp(1, MAX_LATENCY_US));
    }

    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds every sample of `other`: the merged histogram is the one a single recorder of
    /// both streams would have built (percentiles of a merge are not averages of
    /// percentiles).
    pub fn merge(&mut self, other: &Hist) {
        let _ = self.0.add(&other.0);
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }

    /// The value at quantile `q` (0..=1), 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_quantile(q)
        }
    }

    pub fn summary(&self) -> Summary {
        Summary {
            count: self.0.len(),
            min_us: if self.0.is_empty() { 0 } else { self.0.min() },
            mean_us: if self.0.is_empty() {
                0.0
            } else {
                self.0.mean()
            },
            p50_us: self.quantile(0.50),
            p90_us: self.quantile(0.90),
            p99_us: self.quantile(0.99),
            p999_us: self.quantile(0.999),
            max_us: if self.0.is_empty() { 0 } else { self.0.max() },
        }
    }

    /// Compact text form (HdrHistogram V2 + deflate, base64) for passing between processes.
    pub fn to_b64(&self) -> String {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&self.0, &mut bytes)
            .expect("serializing to memory");
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    pub fn from_b64(s: &str) -> Result<Hist, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("histogram: {e}"))?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| format!("histogram: {e:?}"))?;
        let mut out = Hist::default();
        out.0.add(&h).map_err(|e| format!("histogram: {e:?}"))?;
        Ok(out)
    }
}

/// Percentiles of one latency histogram, microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// What one worker (or several, merged) counted: counters and failures are summed,
/// histograms merged, first times take the minimum and last times the maximum (unix
/// microseconds; all workers run on one machine, one clock).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Part {
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    /// Failures by reason (e.g. `login:SERVER_BUSY`, `io:ConnectionRefused`, `timeout`).
    #[serde(default)]
    pub failures: BTreeMap<String, u64>,
    /// Histograms in their [`Hist::to_b64`] form.
    #[serde(default)]
    pub hists: BTreeMap<String, String>,
    #[serde(default)]
    pub first_us: BTreeMap<String, u64>,
    #[serde(default)]
    pub last_us: BTreeMap<String, u64>,
}

impl Part {
    pub fn count(&mut self, name: &str, n: u64) {
        *self.counters.entry(name.to_string()).or_default() += n;
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    pub fn fail(&mut self, reason: &str, n: u64) {
        *self.failures.entry(reason.to_string()).or_default() += n;
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub fn first(&mut self, name: &str, us: u64) {
        let e = self.first_us.entry(name.to_string()).or_insert(us);
        *e = (*e).min(us);
    }

    pub fn last(&mut self, name: &str, us: u64) {
        let e = self.last_us.entry(name.to_string()).or_insert(us);
        *e = (*e).max(us);
    }

    pub fn put_hist(&mut self, name: &str, h: &Hist) {
        self.hists.insert(name.to_string(), h.to_b64());
    }

    pub fn hist(&self, name: &str) -> Hist {
        self.hists
            .get(name)
            .and_then(|s| Hist::from_b64(s).ok())
            .unwrap_or_default()
    }

    /// Seconds from `first_us[from]` to `last_us[to]`, when both are known and ordered.
    pub fn span_secs(&self, from: &str, to: &str) -> Option<f64> {
        let (a, b) = (self.first_us.get(from)?, self.last_us.get(to)?);
        (b > a).then(|| (b - a) as f64 / 1e6)
    }

    pub fn merge(&mut self, other: &Part) -> Result<(), String> {
        for (k, v) in &other.counters {
            self.count(k, *v);
        }
        for (k, v) in &other.failures {
            self.fail(k, *v);
        }
        for (k, v) in &other.first_us {
            self.first(k, *v);
        }
        for (k, v) in &other.last_us {
            self.last(k, *v);
        }
        for (k, v) in &other.hists {
            let theirs = Hist::from_b64(v)?;
            let mut mine = match self.hists.get(k) {
                Some(s) => Hist::from_b64(s)?,
                None => Hist::default(),
            };
            mine.merge(&theirs);
            self.hists.insert(k.clone(), mine.to_b64());
        }
        Ok(())
    }
}

/// The final report of a run: what `--json` writes and the summary table shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub started_unix_ms: u64,
    pub wall_secs: f64,
    pub workers: usize,
    pub params: BTreeMap<String, serde_json::Value>,
    /// Headline figures of the scenario (rates, counts, ratios), in table order.
    pub figures: Vec<(String, serde_json::Value)>,
    pub counters: BTreeMap<String, u64>,
    pub failures: BTreeMap<String, u64>,
    pub latencies: BTreeMap<String, Summary>,
    /// The gateway's side, when it runs on this machine (`--gateway-pid`) or answers on
    /// `--admin`.
    pub server: BTreeMap<String, serde_json::Value>,
    /// Steps of a `--find-max` search.
    pub steps: Vec<BTreeMap<String, serde_json::Value>>,
    pub series: Vec<crate::plot::Point>,
}

impl Report {
    pub fn figure(&mut self, name: &str, v: impl Into<serde_json::Value>) {
        self.figures.push((name.to_string(), v.into()));
    }

    /// The readable summary printed at the end of a run.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let show = |v: &serde_json::Value| match v {
            serde_json::Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() => format_float(f),
                _ => n.to_string(),
            },
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        rows.push(("scenario".into(), self.scenario.clone()));
        rows.push(("wall".into(), format!("{:.1} s", self.wall_secs)));
        rows.push(("worker processes".into(), self.workers.to_string()));
        for (k, v) in &self.figures {
            rows.push((k.clone(), show(v)));
        }
        for (k, s) in &self.latencies {
            rows.push((
                format!("{k} latency (n={})", s.count),
                format!(
                    "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                    us(s.p50_us),
                    us(s.p90_us),
                    us(s.p99_us),
                    us(s.p999_us),
                    us(s.max_us)
                ),
            ));
        }
        for (k, v) in &self.failures {
            rows.push((format!("failed: {k}"), v.to_string()));
        }
        for (k, v) in &self.server {
            rows.push((k.clone(), show(v)));
        }
        for (i, step) in self.steps.iter().enumerate() {
            let line = step
                .iter()
                .map(|(k, v)| format!("{k}={}", show(v)))
                .collect::<Vec<_>>()
                .join(" ");
            rows.push((format!("step {}", i + 1), line));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<width$}  {v}");
        }
        out
    }
}

fn format_float(f: f64) -> String {
    if f.abs() >= 100.0 {
        format!("{f:.0}")
    } else if f.abs() >= 1.0 {
        format!("{f:.2}")
    } else {
        format!("{f:.4}")
    }
}

/// Microseconds, readably.
pub fn us(v: u64) -> String {
    if v >= 1_000_000 {
        format!("{:.2} s", v as f64 / 1e6)
    } else if v >= 1_000 {
        format!("{:.2} ms", v as f64 / 1e3)
    } else {
        format!("{v} µs")
    }
}

/// One second of a run, summed over the workers' progress lines of that second.
#[derive(Clone, Debug, Default)]
pub struct Second {
    /// Connections up, per worker (the latest reading of the second).
    pub connections: BTreeMap<usize, u64>,
    pub ops: u64,
    pub hist: Hist,
}

/// Builds the per-second series: `connections` is the sum over workers of each worker's
/// latest reading (carried forward through seconds a worker did not report), `rate` the
/// operations of that second, `p99_ms` from the merged latencies of that second.
pub fn series(seconds: &BTreeMap<u64, Second>) -> Vec<crate::plot::Point> {
    let mut latest: BTreeMap<usize, u64> = BTreeMap::new();
    let mut out = Vec::new();
    let Some((&last, _)) = seconds.last_key_value() else {
        return out;
    };
    for t in 0..=last {
        let (ops, p99) = match seconds.get(&t) {
            Some(s) => {
                latest.extend(s.connections.iter().map(|(k, v)| (*k, *v)));
                let p99 = if s.hist.is_empty() {
                    f64::NAN
                } else {
                    s.hist.quantile(0.99) as f64 / 1e3
                };
                (s.ops, p99)
            }
            None => (0, f64::NAN),
        };
        out.push(crate::plot::Point {
            t_secs: t as f64,
            connections: latest.values().sum(),
            rate: ops as f64,
            p99_ms: p99,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist_of(values: impl IntoIterator<Item = u64>) -> Hist {
        let mut h = Hist::default();
        for v in values {
            h.record(v);
        }
        h
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let h = hist_of(1..=10_000);
        let s = h.summary();
        assert_eq!(s.count, 10_000);
        assert_eq!(s.min_us, 1);
        // Three significant digits: within 0.1 %.
        assert!((4_995..=5_005).contains(&s.p50_us), "{s:?}");
        assert!((9_890..=9_910).contains(&s.p99_us), "{s:?}");
        assert!((9_985..=10_010).contains(&s.p999_us), "{s:?}");
        assert!((9_995..=10_010).contains(&s.max_us), "{s:?}");
        assert_eq!(Hist::default().summary(), Summary::default());
        // Out-of-range values are clamped, not lost.
        let h = hist_of([0, u64::MAX]);
        assert_eq!(h.len(), 2);
        assert_eq!(h.summary().min_us, 1);
    }

    #[test]
    fn merged_percentiles_are_those_of_all_samples() {
        // One fast worker, one slow: the merged p99 is the slow one's, not an average.
        let fast = hist_of(std::iter::repeat_n(100, 9_000));
        let slow = hist_of(std::iter::repeat_n(50_000, 1_000));
        let mut merged = Hist::from_b64(&fast.to_b64()).unwrap();
        merged.merge(&Hist::from_b64(&slow.to_b64()).unwrap());
        assert_eq!(merged.len(), 10_000);
        assert_eq!(merged.quantile(0.5), 100);
        assert!(merged.quantile(0.99) >= 49_950, "{}", merged.quantile(0.99));
        assert!(Hist::from_b64("not base64!").is_err());
    }

    #[test]
    fn parts_merge_sum_min_max() {
        let mut a = Part::default();
        a.count("up", 10);
        a.fail("timeout", 1);
        a.first("start", 1_000);
        a.last("login", 5_000);
        a.put_hist("connect", &hist_of([10, 20]));
        let mut b = Part::default();
        b.count("up", 5);
        b.count("lost", 0);
        b.fail("timeout", 2);
        b.fail("login:SERVER_BUSY", 3);
        b.first("start", 900);
        b.last("login", 4_000);
        b.put_hist("connect", &hist_of([30]));
        b.put_hist("heartbeat", &hist_of([7]));
        // Through JSON, as between processes.
        let b: Part = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.counter("up"), 15);
        assert_eq!(a.counter("lost"), 0);
        assert_eq!(a.failures["timeout"], 3);
        assert_eq!(a.failed(), 6);
        assert_eq!(a.first_us["start"], 900);
        assert_eq!(a.last_us["login"], 5_000);
        assert_eq!(a.span_secs("start", "login"), Some(4_100.0 / 1e6));
        assert_eq!(a.span_secs("start", "nothing"), None);
        assert_eq!(a.hist("connect").len(), 3);
        assert_eq!(a.hist("connect").summary().max_us, 30);
        assert_eq!(a.hist("heartbeat").len(), 1);
        assert_eq!(a.hist("absent").len(), 0);
    }

    #[test]
    fn series_carries_connections_forward_and_sums_workers() {
        let mut secs = BTreeMap::new();
        let mut s0 = Second::default();
        s0.connections.insert(0, 100);
        s0.connections.insert(1, 50);
        s0.ops = 150;
        s0.hist = hist_of([1_000, 2_000]);
        secs.insert(0, s0);
        let mut s2 = Second::default();
        s2.connections.insert(1, 80);
        s2.ops = 30;
        secs.insert(2, s2);
        let pts = series(&secs);
        assert_eq!(pts.len(), 3);
        assert_eq!(pts[0].connections, 150);
        assert_eq!(pts[0].rate, 150.0);
        assert!((pts[0].p99_ms - 2.0).abs() < 0.01);
        assert_eq!(pts[1].connections, 150, "carried forward");
        assert!(pts[1].p99_ms.is_nan());
        assert_eq!(pts[2].connections, 180);
        assert_eq!(pts[2].rate, 30.0);
    }

    #[test]
    fn table_lists_figures_latencies_and_failures() {
        let mut r = Report {
            scenario: "storm".into(),
            wall_secs: 2.0,
            workers: 2,
            ..Default::default()
        };
        r.figure("connections/s", 21_000.5);
        r.figure("up", 18_000u64);
        r.latencies
            .insert("connect".into(), hist_of([1_500]).summary());
        r.failures.insert("timeout".into(), 2);
        let t = r.table();
        assert!(t.contains("connections/s"), "{t}");
        assert!(t.contains("21000") || t.contains("21001"), "{t}");
        assert!(t.contains("18000"), "{t}");
        assert!(t.contains("p99 1.50 ms"), "{t}");
        assert!(t.contains("failed: timeout"), "{t}");
        assert_eq!(us(999), "999 µs");
        assert_eq!(us(2_500_000), "2.50 s");
    }
}
