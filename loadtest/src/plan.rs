//! The pure arithmetic of a run: which source address a connection uses, how connections
//! are split over worker processes, and when an open-loop sender is due.

use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::time::Duration;

/// Most connections one worker process opens. The process limit here is 20,000 open files;
/// the rest is left for the runtime, stdio and the odd retry.
pub const MAX_CONNECTIONS_PER_WORKER: usize = 19_000;

/// A round-trip message not back this long after its step ended counts as lost (as in the
/// peers' flood).
pub const LOSS_AFTER: Duration = Duration::from_secs(10);
/// Default of `rtt --late-ms`: a send issued this many ms after its intended time counts as
/// late (`--find-max`: a step holds only while >= 97 % are on time).
pub const LATE_SEND_MS: u64 = 10;
/// How long a ROOM_JOIN may take before it counts as failed.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing one client politely may take at the end of a run.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the coordinator waits for a worker process to exit after its report.
pub const WORKER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Without a terminal, a progress line this often.
pub const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Connections one source address takes to one gateway address before connecting gets
/// slow: Linux gives `connect` the even half of `ip_local_port_range` first and scans the
/// whole range for each connection once that half is full (measured: 100,000 connections
/// over two sources connected at ~1,200/s, over four at ~20,000/s). `range` is the
/// (low, high) of `ip_local_port_range`.
pub fn ports_per_source(range: (usize, usize)) -> usize {
    range.1.saturating_sub(range.0).div_ceil(2) * 9 / 10
}

/// `/proc/sys/net/ipv4/ip_local_port_range`, or Linux's default.
pub fn local_port_range() -> (usize, usize) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// Parses `--sources`: comma-separated addresses and inclusive IPv4 ranges,
/// e.g. `127.0.0.1,127.0.0.10-127.0.0.40`. Duplicates are kept out; order is kept.
pub fn parse_sources(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut out: Vec<IpAddr> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut push = |a: IpAddr| {
            if !out.contains(&a) {
                out.push(a);
            }
        };
        match part.split_once('-') {
            None => push(
                part.parse()
                    .map_err(|e| format!("bad source address {part:?}: {e}"))?,
            ),
            Some((a, b)) => {
                let a: Ipv4Addr = a
                    .trim()
                    .parse()
                    .map_err(|e| format!("bad range start in {part:?}: {e}"))?;
                let b: Ipv4Addr = b
                    .trim()
                    .parse()
                    .map_err(|e| format!("bad range end in {part:?}: {e}"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if a > b || b - a >= 65_536 {
                    return Err(format!("bad source range {part:?}"));
                }
                for x in a..=b {
                    push(IpAddr::V4(Ipv4Addr::from(x)));
                }
            }
        }
    }
    if out.is_empty() {
        return Err("no source address".into());
    }
    Ok(out)
}

/// The source address of connection `i` (counted over the whole run, all workers): round
/// robin, so every address carries `n / len` connections give or take one.
pub fn source_for(sources: &[IpAddr], i: usize) -> IpAddr {
    sources[i % sources.len()]
}

/// How many source addresses `n` connections to one gateway address need when each has
/// `ports` ephemeral ports.
pub fn sources_needed(n: usize, ports: usize) -> usize {
    n.div_ceil(ports.max(1)).max(1)
}

/// Splits `0..n` into `workers` contiguous ranges whose sizes differ by at most one.
pub fn split(n: usize, workers: usize) -> Vec<Range<usize>> {
    let workers = workers.max(1);
    let (base, extra) = (n / workers, n % workers);
    let mut start = 0;
    (0..workers)
        .map(|w| {
            let len = base + usize::from(w < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Worker processes for `n` connections at most `per_worker` each (at least one).
pub fn workers_for(n: usize, per_worker: usize) -> usize {
    n.div_ceil(per_worker.max(1)).max(1)
}

/// `total` scaled to a worker's share `part / whole`, never below `min` (rates, in-flight
/// limits).
pub fn share(total: f64, part: usize, whole: usize, min: f64) -> f64 {
    if whole == 0 {
        return min;
    }
    (total * part as f64 / whole as f64).max(min)
}

/// Open-loop schedule: event `k` is due at `offset + k / rate`. A sender that falls behind
/// still stamps each message with its due time, so a stall shows up as latency instead of
/// being hidden (no coordinated omission).
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    interval: Duration,
    offset: Duration,
}

impl Pacer {
    /// `rate` events per second (> 0), the first at `offset`.
    pub fn new(rate: f64, offset: Duration) -> Pacer {
        let interval = if rate > 0.0 && rate.is_finite() {
            Duration::from_secs_f64(1.0 / rate)
        } else {
            Duration::ZERO
        };
        Pacer { interval, offset }
    }

    /// When event `k` is due, from the start of the schedule.
    pub fn due(&self, k: u64) -> Duration {
        self.offset
            + self
                .interval
                .saturating_mul(u32::try_from(k).unwrap_or(u32::MAX))
    }

    /// Events due in `0..=elapsed` (how many a sender on schedule has sent by then).
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        if elapsed < self.offset {
            return 0;
        }
        if self.interval.is_zero() {
            return u64::MAX;
        }
        ((elapsed - self.offset).as_nanos() / self.interval.as_nanos()) as u64 + 1
    }
}

/// Offsets spreading `n` senders evenly over one `period` (sender `i` starts at
/// `i * period / n`), so that periodic work does not arrive in bursts.
pub fn spread(i: usize, n: usize, period: Duration) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos((period.as_nanos() * i as u128 / n as u128) as u64)
}

/// The next step of a `--find-max` search: double the rate while the last step held (no
/// loss, on schedule, p99 within the limit), stop at `max_rate` or at the first step that
/// broke.
pub fn next_step(rate: f64, held: bool, max_rate: f64) -> Option<f64> {
    if !held {
        return None;
    }
    let next = rate * 2.0;
    (next <= max_rate).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_lists_and_ranges() {
        let s = parse_sources("127.0.0.1, 127.0.0.10-127.0.0.12,127.0.0.11,::1").unwrap();
        let want: Vec<IpAddr> = ["127.0.0.1", "127.0.0.10", "127.0.0.11", "127.0.0.12", "::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(s, want);
        // Ranges cross octets.
        let s = parse_sources("127.0.0.254-127.0.1.1").unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[3], "127.0.1.1".parse::<IpAddr>().unwrap());
        assert!(parse_sources("").is_err());
        assert!(parse_sources("127.0.0.5-127.0.0.1").is_err());
        assert!(parse_sources("127.0.0.x").is_err());
        assert!(
            parse_sources("10.0.0.0-10.255.255.255").is_err(),
            "too large"
        );
    }

    #[test]
    fn sources_rotate_evenly() {
        let s = parse_sources("127.0.0.1-127.0.0.3").unwrap();
        let mut count = [0usize; 3];
        for i in 0..1_000 {
            let a = source_for(&s, i);
            count[s.iter().position(|x| *x == a).unwrap()] += 1;
        }
        assert_eq!(count, [334, 333, 333]);
        assert_eq!(source_for(&s, 4), s[1]);
        assert_eq!(sources_needed(1_000_000, 60_000), 17);
        assert_eq!(ports_per_source((1024, 65535)), 29_030);
        assert_eq!(ports_per_source((32_768, 60_999)), 12_704);
        let (lo, hi) = local_port_range();
        assert!(lo <= hi);
        assert_eq!(sources_needed(10, 60_000), 1);
        assert_eq!(sources_needed(0, 60_000), 1);
    }

    #[test]
    fn split_covers_everything_once_and_evenly() {
        for (n, w) in [(0, 1), (1, 3), (10, 3), (1_000_000, 53), (18_000, 1)] {
            let parts = split(n, w);
            assert_eq!(parts.len(), w);
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts.last().unwrap().end, n);
            for pair in parts.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
            }
            let (min, max) = (
                parts.iter().map(|r| r.len()).min().unwrap(),
                parts.iter().map(|r| r.len()).max().unwrap(),
            );
            assert!(max - min <= 1, "{n} over {w}: {min}..{max}");
        }
        assert_eq!(workers_for(18_000, MAX_CONNECTIONS_PER_WORKER), 1);
        assert_eq!(workers_for(19_001, MAX_CONNECTIONS_PER_WORKER), 2);
        assert_eq!(workers_for(1_000_000, MAX_CONNECTIONS_PER_WORKER), 53);
        assert_eq!(workers_for(0, MAX_CONNECTIONS_PER_WORKER), 1);
        assert!(split(1_000_000, 53)
            .iter()
            .all(|r| r.len() <= MAX_CONNECTIONS_PER_WORKER));
    }

    #[test]
    fn shares_of_rates() {
        assert_eq!(share(20_000.0, 500, 1_000, 1.0), 10_000.0);
        assert_eq!(share(512.0, 1, 1_000, 1.0), 1.0);
        assert_eq!(share(512.0, 1, 0, 1.0), 1.0);
    }

    #[test]
    fn pacer_is_open_loop() {
        let p = Pacer::new(1_000.0, Duration::from_millis(5));
        assert_eq!(p.due(0), Duration::from_millis(5));
        assert_eq!(p.due(10), Duration::from_millis(15));
        assert_eq!(p.due_by(Duration::from_millis(4)), 0);
        assert_eq!(p.due_by(Duration::from_millis(5)), 1);
        assert_eq!(p.due_by(Duration::from_millis(1_004)), 1_000);
        assert_eq!(p.due_by(Duration::from_millis(1_005)), 1_001);
        // A sender that stalled for 100 ms owes the events of those 100 ms at once, each
        // due when it was due.
        let late = Duration::from_millis(105);
        let owed: Vec<u64> = (0..p.due_by(late)).collect();
        assert_eq!(owed.len(), 101);
        assert_eq!(p.due(owed[50]), Duration::from_millis(55));
        assert_eq!(
            Pacer::new(0.0, Duration::ZERO).due_by(Duration::from_secs(1)),
            u64::MAX
        );
    }

    #[test]
    fn spread_offsets() {
        let period = Duration::from_secs(30);
        assert_eq!(spread(0, 3, period), Duration::ZERO);
        assert_eq!(spread(1, 3, period), Duration::from_secs(10));
        assert_eq!(spread(2, 3, period), Duration::from_secs(20));
        assert_eq!(spread(5, 0, period), Duration::ZERO);
    }

    #[test]
    fn find_max_doubles_until_a_step_breaks() {
        assert_eq!(next_step(20_000.0, true, 1e9), Some(40_000.0));
        assert_eq!(next_step(20_000.0, false, 1e9), None);
        assert_eq!(next_step(20_000.0, true, 30_000.0), None);
    }
}
