//! The worker side: one process opening its share of the connections with `tether-client`,
//! recording what happens, and talking to the coordinating process through JSON lines
//! (progress, barriers, the final [`Part`]) on stdout and `go` lines on stdin.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tether_client::{Client, Config, Event, Events, Observer, TlsConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::report::{Hist, Part};

/// Microseconds since the Unix epoch: one clock for all processes on this machine.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A line a worker writes on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Once a second: connections up now, the scenario's operations so far, and the main
    /// latency's samples since the previous line.
    Progress {
        t_us: u64,
        connections: i64,
        ops: u64,
        hist: Option<String>,
    },
    /// Waiting for the coordinator's `go` before the next phase; `part` carries a step's
    /// results when the coordinator needs them to decide (`--find-max`).
    Barrier { name: String, part: Option<Part> },
    /// Everything this worker counted.
    Done { part: Part },
}

/// What a worker records into; shared by all its connection tasks.
pub struct Rec {
    inner: Mutex<Inner>,
    /// Connections logged in and not lost, now.
    pub up: AtomicI64,
    /// The scenario's operations so far (heartbeats, logins, deliveries, round trips).
    pub ops: AtomicU64,
    /// Heartbeat round trips are recorded (off once a hold is over and clients close).
    pub heartbeats: AtomicBool,
    main: &'static str,
}

#[derive(Default)]
struct Inner {
    counters: BTreeMap<&'static str, u64>,
    failures: BTreeMap<String, u64>,
    hists: BTreeMap<&'static str, Hist>,
    first: BTreeMap<&'static str, u64>,
    last: BTreeMap<&'static str, u64>,
    window: Hist,
}

impl Rec {
    /// `main` names the latency shown live and charted.
    pub fn new(main: &'static str) -> Arc<Rec> {
        Arc::new(Rec {
            inner: Mutex::new(Inner::default()),
            up: AtomicI64::new(0),
            ops: AtomicU64::new(0),
            heartbeats: AtomicBool::new(true),
            main,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn count(&self, name: &'static str, n: u64) {
        self.with(|i| *i.counters.entry(name).or_default() += n);
    }

    pub fn fail(&self, reason: String) {
        self.with(|i| *i.failures.entry(reason).or_default() += 1);
    }

    pub fn latency(&self, name: &'static str, us: u64) {
        let main = self.main;
        self.with(|i| {
            i.hists.entry(name).or_default().record(us);
            if name == main {
                i.window.record(us);
            }
        });
    }

    /// A counter's value so far.
    pub fn counter(&self, name: &str) -> u64 {
        self.with(|i| i.counters.get(name).copied().unwrap_or(0))
    }

    /// Files what histogram `from` holds so far under `to` and starts `from` afresh (the
    /// heartbeats of a connect phase apart from those of the hold).
    pub fn rename_hist(&self, from: &'static str, to: &'static str) {
        self.with(|i| {
            if let Some(h) = i.hists.remove(from) {
                i.hists.insert(to, h);
            }
        });
    }

    pub fn first(&self, name: &'static str, us: u64) {
        self.with(|i| {
            let e = i.first.entry(name).or_insert(us);
            *e = (*e).min(us);
        });
    }

    pub fn last(&self, name: &'static str, us: u64) {
        self.with(|i| {
            let e = i.last.entry(name).or_insert(us);
            *e = (*e).max(us);
        });
    }

    fn take_window(&self) -> Option<String> {
        self.with(|i| {
            if i.window.is_empty() {
                return None;
            }
            let s = i.window.to_b64();
            i.window.reset();
            Some(s)
        })
    }

    /// What was recorded so far; with `reset`, starts afresh (a `--find-max` step).
    pub fn part(&self, reset: bool) -> Part {
        self.with(|i| {
            let mut p = Part::default();
            for (k, v) in &i.counters {
                p.count(k, *v);
            }
            for (k, v) in &i.failures {
                p.fail(k, *v);
            }
            for (k, h) in &i.hists {
                p.put_hist(k, h);
            }
            for (k, v) in &i.first {
                p.first(k, *v);
            }
            for (k, v) in &i.last {
                p.last(k, *v);
            }
            if reset {
                let window = std::mem::take(&mut i.window);
                *i = Inner {
                    window,
                    ..Inner::default()
                };
            }
            p
        })
    }
}

/// Heartbeat round trips go to the `heartbeat` histogram.
struct HeartbeatObserver(Arc<Rec>);

impl Observer for HeartbeatObserver {
    fn heartbeat_rtt(&self, rtt: Duration) {
        if !self.0.heartbeats.load(Ordering::Relaxed) {
            return;
        }
        self.0.latency("heartbeat", rtt.as_micros() as u64);
        self.0.ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// This worker's link to the coordinator.
pub struct Ctl {
    lines: tokio::io::Lines<BufReader<tokio::io::Stdin>>,
}

impl Ctl {
    pub fn new() -> Ctl {
        Ctl {
            lines: BufReader::new(tokio::io::stdin()).lines(),
        }
    }

    pub fn send(msg: &Msg) {
        use std::io::Write as _;
        let line = serde_json::to_string(msg).expect("serializable");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// Waits at barrier `name` until the coordinator answers; returns the word after `go`
    /// (`None` for a bare `go`), or `Err` when told to stop or when the coordinator is gone.
    pub async fn barrier(&mut self, name: &str, part: Option<Part>) -> Result<Option<String>, ()> {
        Ctl::send(&Msg::Barrier {
            name: name.to_string(),
            part,
        });
        match self.lines.next_line().await {
            Ok(Some(line)) => {
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("go") => Ok(words.next().map(str::to_string)),
                    _ => Err(()),
                }
            }
            _ => Err(()),
        }
    }

    /// Reports progress once a second until the returned guard is dropped.
    pub fn progress(rec: Arc<Rec>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                Ctl::send(&Msg::Progress {
                    t_us: now_us(),
                    connections: rec.up.load(Ordering::Relaxed),
                    ops: rec.ops.load(Ordering::Relaxed),
                    hist: rec.take_window(),
                });
            }
        })
    }
}

/// How this worker reaches the gateway.
#[derive(Clone)]
pub struct Net {
    pub addr: String,
    pub sources: Arc<Vec<IpAddr>>,
    pub prefix: String,
    pub secret: String,
    pub tls: Option<TlsConfig>,
    pub connect_timeout: Duration,
    pub heartbeat: Option<Duration>,
    pub backoff: Duration,
}

impl Net {
    pub fn user(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    /// The client configuration of connection `i` (user `{prefix}{i}`, device `d`).
    pub fn config(&self, i: usize, reconnect: bool, rec: Option<&Arc<Rec>>) -> Config {
        let user = self.user(i);
        let token = if self.secret.is_empty() {
            "dev".to_string()
        } else {
            let exp = now_us() / 1_000_000 + 24 * 3600;
            tether_gateway::auth::mint_token(self.secret.as_bytes(), &user, "d", exp)
        };
        let mut c = Config::new(self.addr.clone(), user, "d", token);
        c.tls = self.tls.clone();
        c.local_addr = Some(crate::plan::source_for(&self.sources, i));
        c.connect_timeout = self.connect_timeout;
        c.heartbeat_interval = self.heartbeat;
        c.reconnect = reconnect;
        c.backoff_initial = self.backoff;
        c.backoff_max = self.backoff * 4;
        c.client_version = "tether-loadtest".into();
        c.observer = rec.map(|r| Arc::new(HeartbeatObserver(r.clone())) as Arc<dyn Observer>);
        c
    }
}

/// A failure's reason as counted in reports.
pub fn reason(e: &tether_client::Error) -> String {
    use tether_client::Error as E;
    match e {
        E::Io(io) => format!("io:{:?}", io.kind()),
        E::Tls(_) => "tls".into(),
        E::Timeout => "timeout".into(),
        E::Login { code, .. } => format!("login:{}", code.as_str_name()),
        E::Protocol { code, .. } => format!("protocol:{}", code.as_str_name()),
        other => format!("{other:?}").chars().take(40).collect(),
    }
}

/// How connections are opened: by [`open`], and by the scenarios' flood of them.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    /// Connects per second over the whole run (0: as fast as `inflight` allows).
    pub rate: f64,
    /// Connects in flight over the whole run.
    pub inflight: usize,
    /// Clients reconnect (and resume) after a loss.
    pub reconnect: bool,
    /// Attempts after a failed connect.
    pub retries: u32,
    /// The histogram of connect-to-LOGIN_RESULT times.
    pub latency: &'static str,
    /// Time heartbeats (into `heartbeat`).
    pub observe: bool,
}

impl Flood {
    /// Logins for a scenario that is about something else: unpaced, three retries.
    pub fn logins(inflight: usize, reconnect: bool) -> Flood {
        Flood {
            rate: 0.0,
            inflight,
            reconnect,
            retries: 3,
            latency: "login",
            observe: false,
        }
    }
}

/// Connects `i` with up to `how.retries` more attempts (each failure counted by reason).
/// Logs the connect-to-LOGIN_RESULT latency of the attempt that worked under `how.latency`.
pub async fn open(net: &Net, i: usize, rec: &Arc<Rec>, how: &Flood) -> Option<(Client, Events)> {
    for attempt in 0..=how.retries {
        let cfg = net.config(i, how.reconnect, how.observe.then_some(rec));
        let t0 = std::time::Instant::now();
        match Client::connect(cfg).await {
            Ok(c) => {
                rec.latency(how.latency, t0.elapsed().as_micros() as u64);
                rec.up.fetch_add(1, Ordering::Relaxed);
                if attempt > 0 {
                    rec.count("retried", 1);
                }
                return Some(c);
            }
            Err(e) => {
                rec.fail(reason(&e));
                if attempt < how.retries {
                    tokio::time::sleep(Duration::from_millis(50 << attempt.min(5))).await;
                }
            }
        }
    }
    rec.count("gave_up", 1);
    None
}

/// A failed send's reason as counted in reports, e.g. `publish:RATE_LIMITED`.
pub fn send_reason(what: &str, e: &tether_client::SendError) -> String {
    match e {
        tether_client::SendError::Nack { code, .. } => format!("{what}:{}", code.as_str_name()),
        tether_client::SendError::Closed => format!("{what}:closed"),
    }
}

/// What a load-test message carries in its first 48 characters of text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The sending connection's index.
    pub sender: u64,
    /// The message's number at that sender.
    pub n: u64,
    /// When the schedule wanted it sent (unix µs): open-loop latencies count from here.
    pub due_us: u64,
    /// When it was actually handed to the client (unix µs).
    pub sent_us: u64,
}

/// The body of a chat message carrying a [`Stamp`] as 48 hex digits at the start of its
/// text; the rest is padding up to `size` bytes of body.
pub fn chat_body(to: Option<Target>, stamp: Stamp, size: usize) -> bytes::Bytes {
    use prost::Message as _;
    use tether_protocol::chat::{chat_message, ChatMessage, Text};
    let Stamp {
        sender,
        n,
        due_us,
        sent_us,
    } = stamp;
    let mut text = format!("{sender:08x}{n:08x}{due_us:016x}{sent_us:016x}");
    while text.len() + 8 < size {
        text.push('.');
    }
    ChatMessage {
        target: to.map(|t| match t {
            Target::User(u) => chat_message::Target::ToUser(u),
            Target::Room(r) => chat_message::Target::ToRoom(r),
        }),
        content: Some(chat_message::Content::Text(Text { text })),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

pub enum Target {
    User(String),
    Room(String),
}

/// The [`Stamp`] of a [`chat_body`].
pub fn parse_body(body: &[u8]) -> Option<Stamp> {
    use prost::Message as _;
    use tether_protocol::chat::{chat_message, ChatMessage};
    let t = match ChatMessage::decode(body).ok()?.content? {
        chat_message::Content::Text(t) => t.text,
        _ => return None,
    };
    let hex = |r: Range<usize>| u64::from_str_radix(t.get(r)?, 16).ok();
    Some(Stamp {
        sender: hex(0..8)?,
        n: hex(8..16)?,
        due_us: hex(16..32)?,
        sent_us: hex(32..48)?,
    })
}

/// Which message numbers arrived, to count each once and spot duplicates.
#[derive(Default)]
pub struct Seen(Vec<u64>);

impl Seen {
    /// Marks `n`; false when it was seen before.
    pub fn insert(&mut self, n: u64) -> bool {
        let (w, b) = ((n / 64) as usize, n % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let fresh = self.0[w] & (1 << b) == 0;
        self.0[w] |= 1 << b;
        fresh
    }
}

/// Waits for `cond` to hold, checking every 20 ms, for at most `limit`. True if it held.
pub async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Closes every client (politely, bounded in time) and waits for their tasks.
pub async fn close_all(clients: Vec<Client>, tasks: Vec<tokio::task::JoinHandle<()>>) {
    let closing: Vec<_> = clients
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(crate::plan::CLOSE_TIMEOUT, c.close()).await;
            })
        })
        .collect();
    for c in closing {
        let _ = c.await;
    }
    for t in tasks {
        t.abort();
    }
}

/// What [`watch`] makes of one connection's events.
#[derive(Clone)]
pub struct Watch {
    /// Distinct chat messages received: each message number counts once (with the ops and
    /// the latencies); a repeat counts as `duplicates`.
    pub unique: Arc<AtomicU64>,
    /// The histogram of message latencies from the intended send time...
    pub latency: &'static str,
    /// ... and, if named, the one from the actual send.
    pub from_send: Option<&'static str>,
    /// Set while connections are cut on purpose (resume-storm): a disconnect is then
    /// expected, and a login after it marks `recovered`.
    pub cutting: Option<Arc<AtomicBool>>,
}

impl Watch {
    /// For connections expected to carry no chat messages.
    pub fn idle() -> Watch {
        Watch {
            unique: Arc::default(),
            latency: "delivery",
            from_send: None,
            cutting: None,
        }
    }
}

/// Watches one connection's events until cancelled. Chat messages as [`Watch`] says; the
/// first Online is the login itself, each later one a reconnect (`resumed` or
/// `not_resumed`); each Offline is a disconnect, counted with its reason as a failure
/// (`unexpected_disconnects`) unless connections are being cut on purpose.
pub async fn watch(
    mut events: Events,
    rec: Arc<Rec>,
    stop: tokio_util::sync::CancellationToken,
    w: Watch,
) {
    let mut seen = Seen::default();
    let mut logins = 0u32;
    let cutting = || {
        w.cutting
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Event::Message { body, .. }) => {
                    let now = now_us();
                    let Some(st) = parse_body(&body) else { continue };
                    if seen.insert(st.n) {
                        w.unique.fetch_add(1, Ordering::Relaxed);
                        rec.ops.fetch_add(1, Ordering::Relaxed);
                        rec.latency(w.latency, now.saturating_sub(st.due_us));
                        if let Some(name) = w.from_send {
                            rec.latency(name, now.saturating_sub(st.sent_us));
                        }
                        rec.last(w.latency, now);
                    } else {
                        rec.count("duplicates", 1);
                    }
                }
                Some(Event::Online { resumed, .. }) => {
                    logins += 1;
                    if logins > 1 {
                        rec.up.fetch_add(1, Ordering::Relaxed);
                        rec.count("reconnects", 1);
                        rec.count(if resumed { "resumed" } else { "not_resumed" }, 1);
                        if cutting() {
                            rec.last("recovered", now_us());
                        }
                    }
                }
                Some(Event::Offline { code }) => {
                    rec.up.fetch_sub(1, Ordering::Relaxed);
                    rec.count("disconnects", 1);
                    if !cutting() {
                        rec.count("unexpected_disconnects", 1);
                        let code = code.map_or("none", |c| c.as_str_name());
                        rec.fail(format!("disconnect:{code}"));
                    }
                }
                Some(Event::Kicked { .. } | Event::Closed { .. }) | None => {
                    rec.count("ended", 1);
                    rec.up.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                Some(_) => {}
            },
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_bodies_round_trip() {
        let st = Stamp {
            sender: 7,
            n: 300,
            due_us: 1_234_567,
            sent_us: 1_234_999,
        };
        let b = chat_body(Some(Target::Room("r".into())), st, 128);
        assert_eq!(parse_body(&b), Some(st));
        assert!(b.len() >= 120 && b.len() <= 140, "{}", b.len());
        assert_eq!(parse_body(b"garbage"), None);
    }

    #[test]
    fn seen_counts_once() {
        let mut s = Seen::default();
        assert!(s.insert(0));
        assert!(s.insert(200));
        assert!(!s.insert(200));
        assert!(!s.insert(0));
        assert!(s.insert(63));
    }

    #[test]
    fn rec_parts_and_reset() {
        let r = Rec::new("x");
        r.count("a", 2);
        r.latency("x", 10);
        r.latency("y", 20);
        r.fail("timeout".into());
        r.first("s", 5);
        r.first("s", 3);
        let p = r.part(true);
        assert_eq!(p.counter("a"), 2);
        assert_eq!(p.hist("x").len(), 1);
        assert_eq!(p.failures["timeout"], 1);
        assert_eq!(p.first_us["s"], 3);
        assert!(
            r.take_window().is_some(),
            "the live window survives a step reset"
        );
        assert_eq!(r.part(false).counter("a"), 0);
    }
}
