//! Readings of the machine and of the gateway under test.
//!
//! Everything here reads Linux `/proc` directly (no libc, no extra crates) or
//! scrapes the gateway's Prometheus endpoint over plain HTTP/1.1. Nothing
//! panics on missing or malformed files: readings that cannot be taken come
//! back as zeros (or an `Err` for the scrape), so a load test keeps running
//! on a machine without `/proc` or against a gateway that has gone away.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

/// CPU and memory of a set of processes, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProcStats {
    /// Resident set size (`VmRSS`), summed over the live processes, in bytes.
    pub rss_bytes: u64,
    /// Private resident memory (`RssAnon`), summed: unlike `VmRSS` it does not count the
    /// binary's pages, which processes of one binary share, once per process.
    #[serde(default)]
    pub anon_bytes: u64,
    /// The largest `RssFile` (mapped files: the binary) of one process.
    #[serde(default)]
    pub file_bytes_max: u64,
    /// User plus system CPU time (`utime + stime`), summed, in seconds.
    pub cpu_secs: f64,
    /// How many of the pids were alive (readable and not zombies).
    pub processes: u32,
}

/// Machine-wide CPU seconds from /proc/stat's "cpu " line.
///
/// All fields are cumulative since boot; take differences between two
/// readings to get utilisation over an interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MachineCpu {
    /// `user + nice + system + irq + softirq`, in seconds.
    pub busy_secs: f64,
    /// Time stolen by the hypervisor, in seconds.
    pub steal_secs: f64,
    /// `user + nice + system + idle + iowait + irq + softirq + steal`, in
    /// seconds (guest time is already counted in user/nice, so it is not added
    /// again).
    pub total_secs: f64,
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), read without libc from
/// the `AT_CLKTCK` entry of `/proc/self/auxv`; 100 if that cannot be read.
fn clock_ticks_per_sec() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|auxv| auxv_clktck(&auxv))
            .filter(|&t| t > 0 && t <= 1_000_000)
            .map_or(100.0, |t| t as f64)
    })
}

/// Finds `AT_CLKTCK` (17) in a native-endian, native-word auxiliary vector.
fn auxv_clktck(auxv: &[u8]) -> Option<u64> {
    const AT_NULL: u64 = 0;
    const AT_CLKTCK: u64 = 17;
    let word = std::mem::size_of::<usize>();
    let read = |b: &[u8]| -> u64 {
        if word == 8 {
            u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]))
        } else {
            u64::from(u32::from_ne_bytes(b.try_into().unwrap_or([0; 4])))
        }
    };
    for pair in auxv.chunks_exact(2 * word) {
        let (key, value) = (read(&pair[..word]), read(&pair[word..]));
        match key {
            AT_NULL => return None,
            AT_CLKTCK => return Some(value),
            _ => {}
        }
    }
    None
}

/// The fields of `/proc/<pid>/stat` that the load tester needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StatFields {
    /// Field 3, e.g. `R`, `S`, `Z`.
    state: char,
    /// Field 4.
    ppid: u32,
    /// Field 14, in clock ticks.
    utime: u64,
    /// Field 15, in clock ticks.
    stime: u64,
}

/// Parses a `/proc/<pid>/stat` line. The comm field (2) is in parentheses and
/// may itself contain spaces and `)`, so the remaining fields are taken after
/// the *last* `)`.
fn parse_stat(text: &str) -> Option<StatFields> {
    let rest = &text[text.rfind(')')? + 1..];
    // `rest` starts at field 3, so field N is at index N - 3.
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    Some(StatFields {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

/// Finds a `Key:   <n> kB` line in a `/proc` status-like file and returns it
/// in bytes (a value without a unit is returned as is).
fn parse_kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut parts = value.split_ascii_whitespace();
        let n: u64 = parts.next()?.parse().ok()?;
        Some(match parts.next() {
            Some(unit) if unit.eq_ignore_ascii_case("kb") => n.saturating_mul(1024),
            _ => n,
        })
    })
}

/// Sums resident memory and CPU time over `pids`.
///
/// A pid counts as alive when its `/proc/<pid>/stat` is readable and it is
/// not a zombie; dead pids contribute nothing. Duplicate pids are counted
/// once. RSS comes from `VmRSS` in `/proc/<pid>/status` (absent for zombies
/// and kernel threads, then 0); CPU from stat fields 14 and 15 divided by the
/// clock tick rate.
pub fn proc_stats(pids: &[u32]) -> ProcStats {
    let mut seen = HashSet::with_capacity(pids.len());
    let mut out = ProcStats::default();
    let ticks = clock_ticks_per_sec();
    for &pid in pids {
        if !seen.insert(pid) {
            continue;
        }
        let Some(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        else {
            continue;
        };
        if matches!(stat.state, 'Z' | 'X' | 'x') {
            continue;
        }
        out.processes += 1;
        out.cpu_secs += stat.utime.saturating_add(stat.stime) as f64 / ticks;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        out.rss_bytes += parse_kb_field(&status, "VmRSS").unwrap_or(0);
        out.anon_bytes += parse_kb_field(&status, "RssAnon").unwrap_or(0);
        out.file_bytes_max = out
            .file_bytes_max
            .max(parse_kb_field(&status, "RssFile").unwrap_or(0));
    }
    out
}

/// Parses the whitespace-separated pids of a `/proc/<pid>/task/<tid>/children`
/// file.
fn parse_pid_list(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.split_ascii_whitespace().filter_map(|p| p.parse().ok())
}

/// Direct children of `pid` from `/proc/<pid>/task/*/children`, or `None`
/// when the kernel does not provide those files (no `CONFIG_PROC_CHILDREN`)
/// or the process is gone.
fn children_of(pid: u32) -> Option<Vec<u32>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut kids = Vec::new();
    let mut any = false;
    for task in tasks.flatten() {
        let mut path = task.path();
        path.push("children");
        if let Ok(text) = std::fs::read_to_string(&path) {
            any = true;
            kids.extend(parse_pid_list(&text));
        }
    }
    any.then_some(kids)
}

/// Parent → children map built by scanning every `/proc/<pid>/stat`; the
/// fallback when `children` files are unavailable.
fn children_map_by_scan() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return map;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            map.entry(stat.ppid).or_default().push(pid);
        }
    }
    map
}

/// The pid itself plus all its descendants (children, grandchildren, …),
/// `pid` first, then breadth-first.
///
/// Uses `/proc/<pid>/task/*/children` recursively; if the kernel lacks those
/// files it falls back to scanning the parent pid of every process. `pid` is
/// always in the result even if it no longer exists (`proc_stats` will then
/// not count it).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut seen: HashSet<u32> = HashSet::from([pid]);
    let mut queue = VecDeque::from([pid]);
    let mut scanned: Option<HashMap<u32, Vec<u32>>> = None;
    while let Some(p) = queue.pop_front() {
        let kids = match children_of(p) {
            Some(kids) => kids,
            None if std::path::Path::new(&format!("/proc/{p}")).exists() => scanned
                .get_or_insert_with(children_map_by_scan)
                .get(&p)
                .cloned()
                .unwrap_or_default(),
            None => Vec::new(),
        };
        for kid in kids {
            if seen.insert(kid) {
                out.push(kid);
                queue.push_back(kid);
            }
        }
    }
    out
}

/// Kernel slab memory (`Slab:` in `/proc/meminfo`, which covers socket
/// buffers' bookkeeping, dentries, …) in bytes; 0 if unreadable.
pub fn slab_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| parse_kb_field(&s, "Slab"))
        .unwrap_or(0)
}

/// Parses the aggregate `cpu ` line of `/proc/stat` (values in ticks).
fn parse_proc_stat_cpu(text: &str, ticks: f64) -> MachineCpu {
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return MachineCpu::default();
    };
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let f = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal guest guest_nice; sum
    // in ticks, then convert, so the fields stay exact.
    let busy = f(0) + f(1) + f(2) + f(5) + f(6);
    let steal = f(7);
    MachineCpu {
        busy_secs: busy as f64 / ticks,
        steal_secs: steal as f64 / ticks,
        total_secs: (busy + f(3) + f(4) + steal) as f64 / ticks,
    }
}

/// Machine-wide CPU seconds since boot from `/proc/stat`; zeros if unreadable.
pub fn machine_cpu() -> MachineCpu {
    std::fs::read_to_string("/proc/stat")
        .map(|s| parse_proc_stat_cpu(&s, clock_ticks_per_sec()))
        .unwrap_or_default()
}

/// Total time allowed for one scrape: connect, request and response.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Responses larger than this are refused rather than buffered.
const MAX_RESPONSE: usize = 64 << 20;

/// `GET http://<admin>/metrics` (hyper's HTTP/1 client, [`SCRAPE_TIMEOUT`] for the whole
/// exchange, at most [`MAX_RESPONSE`] bytes), with `Authorization: Bearer <token>` when a
/// `token` is given (the gateway's admin token, gateway/ADMIN.md), and parse the Prometheus
/// text format with [`parse_prometheus`].
///
/// # Errors
///
/// A status other than 200, a malformed response, a timeout or a connection
/// error gives an `Err` with a short description naming the address.
pub async fn scrape_metrics(
    admin: SocketAddr,
    token: Option<&str>,
) -> Result<BTreeMap<String, f64>, String> {
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, fetch_metrics(admin, token))
        .await
        .map_err(|_| format!("GET http://{admin}/metrics: timed out after {SCRAPE_TIMEOUT:?}"))??;
    Ok(parse_prometheus(&String::from_utf8_lossy(&body)))
}

/// Performs the request (hyper's HTTP/1 client) and returns the body of a 200 response.
async fn fetch_metrics(admin: SocketAddr, token: Option<&str>) -> Result<Vec<u8>, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    let err =
        |what: &str, e: &dyn std::fmt::Display| format!("GET http://{admin}/metrics: {what}: {e}");
    let tcp = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|e| err("connect", &e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| err("handshake", &e))?;
    // Drives the connection; ends with it (or with this task's runtime).
    tokio::spawn(conn);
    let mut request = hyper::Request::get("/metrics")
        .header(hyper::header::HOST, admin.to_string())
        .header(hyper::header::USER_AGENT, "tether-loadtest");
    if let Some(t) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let request = request
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| err("request", &e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| err("send", &e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| err("body", &e))?
        .to_bytes();
    if status != hyper::StatusCode::OK {
        let text: String = String::from_utf8_lossy(&body)
            .trim()
            .chars()
            .take(200)
            .collect();
        return Err(format!(
            "GET http://{admin}/metrics: HTTP {}: {text}",
            status.as_u16()
        ));
    }
    Ok(body.to_vec())
}

/// The pure parser, for tests.
///
/// Every sample line `name{labels} value [timestamp]` or `name value
/// [timestamp]` becomes an entry keyed by the text before the value, exactly
/// as written (e.g. `tether_connections` or
/// `tether_errors_total{code="SLOW_CONSUMER"}`). Label values may contain
/// spaces, commas, `}` and escaped quotes. Comment lines (`#`, including
/// `# HELP`, `# TYPE` and `# EOF`) and blank lines are skipped, as are lines
/// whose value does not parse. Values are f64; `+Inf`, `-Inf` and `NaN` are
/// accepted. If a key repeats, the last value wins.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, rest)) = split_sample(line) else {
            continue;
        };
        let Some(value) = rest.split_ascii_whitespace().next().and_then(parse_value) else {
            continue;
        };
        out.insert(key.to_owned(), value);
    }
    out
}

/// Splits a sample line into its key (name plus optional `{labels}`) and the
/// text after it.
fn split_sample(line: &str) -> Option<(&str, &str)> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    if name_end == 0 {
        return None;
    }
    if !line[name_end..].starts_with('{') {
        return Some((&line[..name_end], &line[name_end..]));
    }
    // Find the closing brace, skipping quoted label values.
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in line[name_end..].char_indices() {
        let i = name_end + i;
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some((&line[..=i], &line[i + 1..])),
            _ => {}
        }
    }
    None
}

/// Parses a Prometheus sample value.
fn parse_value(text: &str) -> Option<f64> {
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    let negative = text.starts_with('-');
    if unsigned.eq_ignore_ascii_case("inf") || unsigned.eq_ignore_ascii_case("infinity") {
        return Some(if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    if unsigned.eq_ignore_ascii_case("nan") {
        return Some(f64::NAN);
    }
    text.parse().ok()
}

/// Sum of every entry whose name (before any '{') equals `name` — e.g. a
/// gauge over several label sets or several scraped processes merged.
///
/// NaN samples are ignored; 0 when there is no such entry.
pub fn metric_sum(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.range::<str, _>((std::ops::Bound::Included(name), std::ops::Bound::Unbounded))
        .take_while(|(k, _)| k.starts_with(name))
        .filter(|(k, v)| {
            !v.is_nan() && {
                let rest = &k[name.len()..];
                rest.is_empty() || rest.starts_with('{')
            }
        })
        .map(|(_, v)| v)
        .sum()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const SAMPLE: &str = r#"# HELP tether_connections Open client connections.
# TYPE tether_connections gauge
tether_connections 1234
# HELP tether_errors_total Errors sent to clients, by code.
# TYPE tether_errors_total counter
tether_errors_total{code="SLOW_CONSUMER"} 7
tether_errors_total{code="BAD_FRAME",detail="a, b} c"} 2
tether_errors_total{code="QUOTE",detail="say \"hi\" {x}"} 1 1700000000000
# HELP tether_latency_seconds Delivery latency.
# TYPE tether_latency_seconds histogram
tether_latency_seconds_bucket{le="0.005"} 10
tether_latency_seconds_bucket{le="+Inf"} 12
tether_latency_seconds_sum 0.0425
tether_latency_seconds_count 12
tether_weird{kind="inf"} +Inf
tether_weird{kind="neginf"} -Inf
tether_weird{kind="nan"} NaN
tether_sci 1.5e3

process_resident_memory_bytes 2.5e+07
garbage line here
# EOF
"#;

    #[test]
    fn parses_prometheus_text() {
        let m = parse_prometheus(SAMPLE);
        assert_eq!(m["tether_connections"], 1234.0);
        assert_eq!(m[r#"tether_errors_total{code="SLOW_CONSUMER"}"#], 7.0);
        assert_eq!(
            m[r#"tether_errors_total{code="BAD_FRAME",detail="a, b} c"}"#],
            2.0
        );
        assert_eq!(
            m[r#"tether_errors_total{code="QUOTE",detail="say \"hi\" {x}"}"#],
            1.0
        );
        assert_eq!(m[r#"tether_latency_seconds_bucket{le="+Inf"}"#], 12.0);
        assert_eq!(m["tether_latency_seconds_sum"], 0.0425);
        assert_eq!(m[r#"tether_weird{kind="inf"}"#], f64::INFINITY);
        assert_eq!(m[r#"tether_weird{kind="neginf"}"#], f64::NEG_INFINITY);
        assert!(m[r#"tether_weird{kind="nan"}"#].is_nan());
        assert_eq!(m["tether_sci"], 1500.0);
        assert_eq!(m["process_resident_memory_bytes"], 25_000_000.0);
        assert!(!m
            .keys()
            .any(|k| k.starts_with('#') || k.starts_with("garbage")));
        assert_eq!(m.len(), 13);
    }

    #[test]
    fn sums_metrics_by_name() {
        let m = parse_prometheus(SAMPLE);
        assert_eq!(metric_sum(&m, "tether_errors_total"), 10.0);
        assert_eq!(metric_sum(&m, "tether_connections"), 1234.0);
        // Other metrics sharing the prefix are not included.
        assert_eq!(metric_sum(&m, "tether_latency_seconds"), 0.0);
        assert_eq!(metric_sum(&m, "tether_latency_seconds_count"), 12.0);
        assert_eq!(metric_sum(&m, "absent"), 0.0);
        let mut merged = BTreeMap::new();
        merged.insert("g{proc=\"1\"}".to_string(), 2.0);
        merged.insert("g{proc=\"2\"}".to_string(), 3.0);
        merged.insert("g".to_string(), 1.0);
        merged.insert("g_other".to_string(), 100.0);
        merged.insert("h".to_string(), 100.0);
        merged.insert("g{proc=\"3\"}".to_string(), f64::NAN);
        assert_eq!(metric_sum(&merged, "g"), 6.0);
    }

    #[test]
    fn parses_stat_with_awkward_comm() {
        let line = "4242 ((tether gw) x)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 8 0 123456 1000000 2500 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(StatFields {
                state: 'S',
                ppid: 1,
                utime: 250,
                stime: 75,
            })
        );
        assert_eq!(parse_stat("4242 (tether"), None);
        assert_eq!(parse_stat("4242 (x) S 1"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn parses_meminfo_and_proc_stat() {
        let meminfo = "MemTotal:       16318412 kB\nSlabby:  1 kB\nSlab:             512000 kB\n";
        assert_eq!(parse_kb_field(meminfo, "Slab"), Some(512_000 * 1024));
        assert_eq!(parse_kb_field(meminfo, "Nope"), None);
        let stat = "cpu  100 20 30 400 50 6 7 8 9 10\ncpu0 1 1 1 1 1 1 1 1 1 1\n";
        let cpu = parse_proc_stat_cpu(stat, 100.0);
        assert_eq!(cpu.busy_secs, (100 + 20 + 30 + 6 + 7) as f64 / 100.0);
        assert_eq!(cpu.steal_secs, 0.08);
        assert_eq!(
            cpu.total_secs,
            (100 + 20 + 30 + 400 + 50 + 6 + 7 + 8) as f64 / 100.0
        );
        assert_eq!(
            parse_proc_stat_cpu("intr 1 2\n", 100.0),
            MachineCpu::default()
        );
    }

    #[test]
    fn reads_clock_ticks() {
        let mut auxv = Vec::new();
        for (k, v) in [(6u64, 4096u64), (17, 250), (0, 0)] {
            if std::mem::size_of::<usize>() == 8 {
                auxv.extend_from_slice(&k.to_ne_bytes());
                auxv.extend_from_slice(&v.to_ne_bytes());
            } else {
                auxv.extend_from_slice(&(k as u32).to_ne_bytes());
                auxv.extend_from_slice(&(v as u32).to_ne_bytes());
            }
        }
        assert_eq!(auxv_clktck(&auxv), Some(250));
        assert_eq!(auxv_clktck(&[]), None);
        let ticks = clock_ticks_per_sec();
        assert!(ticks > 0.0 && ticks.is_finite());
    }

    #[test]
    fn stats_of_this_process() {
        let me = std::process::id();
        let s = proc_stats(&[me, me]);
        assert_eq!(s.processes, 1);
        assert!(s.rss_bytes > 0, "{s:?}");
        assert!(s.anon_bytes > 0 && s.anon_bytes <= s.rss_bytes, "{s:?}");
        assert!(
            s.file_bytes_max > 0 && s.file_bytes_max <= s.rss_bytes,
            "{s:?}"
        );
        assert!(s.cpu_secs >= 0.0 && s.cpu_secs.is_finite());
        assert!(slab_bytes() > 0);
        let cpu = machine_cpu();
        assert!(
            cpu.total_secs > 0.0 && cpu.busy_secs <= cpu.total_secs,
            "{cpu:?}"
        );
    }

    #[test]
    fn stats_of_missing_process() {
        // Above the kernel's pid_max limit (4194304), so it cannot exist.
        assert_eq!(proc_stats(&[u32::MAX - 1]), ProcStats::default());
        assert_eq!(proc_stats(&[]), ProcStats::default());
        assert_eq!(descendants(u32::MAX - 1), vec![u32::MAX - 1]);
    }

    #[test]
    fn descendants_include_self_and_children() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let tree = descendants(me);
        let child_pid = child.id();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(tree[0], me);
        assert!(tree.contains(&child_pid), "{tree:?} lacks {child_pid}");
    }

    /// Reads an HTTP request up to the end of its head.
    async fn read_request_head(sock: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "client closed early");
            req.extend_from_slice(&buf[..n]);
        }
        req
    }

    #[tokio::test]
    async fn scrapes_a_chunked_response() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let req = read_request_head(&mut sock).await;
            let body = SAMPLE.as_bytes();
            let mut resp = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n\
                             transfer-encoding: chunked\r\n\r\n"
                .to_vec();
            for piece in body.chunks(100) {
                resp.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                resp.extend_from_slice(piece);
                resp.extend_from_slice(b"\r\n");
            }
            resp.extend_from_slice(b"0\r\n\r\n");
            // Dribble the response out in small writes to exercise reassembly.
            for part in resp.chunks(37) {
                sock.write_all(part).await.unwrap();
                sock.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Keep the connection open: the client must stop at the final
            // chunk rather than waiting for EOF.
            tokio::time::sleep(Duration::from_secs(3)).await;
            String::from_utf8(req).unwrap()
        });
        let started = std::time::Instant::now();
        let m = scrape_metrics(addr, None).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        let expected = parse_prometheus(SAMPLE);
        assert_eq!(m.len(), expected.len());
        for (k, v) in &expected {
            assert!(m[k] == *v || (m[k].is_nan() && v.is_nan()), "{k}");
        }
        assert_eq!(metric_sum(&m, "tether_errors_total"), 10.0);
        server.abort();
    }

    #[tokio::test]
    async fn scrapes_with_the_admin_token() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (mut sock, _) = listener.accept().await.unwrap();
                let req = read_request_head(&mut sock).await;
                let req = String::from_utf8(req).unwrap().to_ascii_lowercase();
                let resp: &[u8] = if req.contains("\r\nauthorization: bearer the-token\r\n") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\ntether_up 1.0\n\n"
                } else {
                    b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\nno"
                };
                sock.write_all(resp).await.unwrap();
            }
        });
        let m = scrape_metrics(addr, Some("the-token")).await.unwrap();
        assert_eq!(m.get("tether_up"), Some(&1.0));
        let e = scrape_metrics(addr, None).await.unwrap_err();
        assert!(e.contains("HTTP 401"), "{e}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn scrape_reports_errors() {
        // HTTP error status.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = sock.read(&mut buf).await;
            let _ = sock
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found")
                .await;
        });
        let e = scrape_metrics(addr, None).await.unwrap_err();
        assert!(e.contains("HTTP 404"), "{e}");
        server.await.unwrap();

        // A server that accepts and never answers: the 2 s timeout.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(sock);
        });
        let started = std::time::Instant::now();
        let e = scrape_metrics(addr, None).await.unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
        server.abort();

        // Nothing listening.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = scrape_metrics(addr, None).await.unwrap_err();
        assert!(e.contains("connect"), "{e}");
    }
}
