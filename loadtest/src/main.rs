//! `tether-loadtest`: drives a Tether gateway with the workloads `../shared/peers` runs
//! against mosquitto, nats-server and rumqttd, and prints one `key=value` line per run.
//!
//! - `idle` (W1): N connections log in and PING every `--heartbeat` seconds for `--hold`
//!   seconds; the gateway's RSS per connection and CPU during the hold.
//! - `connect` (W2): N connect + login with `--inflight` at once: connections/s, latency.
//! - `fanout` (W3): N members join one room; one sender posts M messages of `--size` bytes;
//!   deliveries/s and publish-to-receive latency.
//! - `rtt` (W4): C clients send echo uplinks at `--rate` msg/s in all; UPLINK -> UPLINK_ACK
//!   and UPLINK -> echoed DOWNLINK round trips.
//!
//! Every loop is bounded in count and time. Connections are spread over `--sources`
//! (several 127.0.0.x addresses) so that ephemeral ports do not run out. Pass the gateway's
//! `--pid` to have its memory and CPU read from /proc. The gateway must run with
//! `--dev-auth`, or give `--secret` to mint tokens.
//!
//! This speaks the protocol with the codec directly, one small task per connection, so that
//! the load generator stays cheap next to the gateway on a 2-core machine; the client SDK
//! (`tether-client`) is what applications use.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use prost::Message as _;
use tether_codec::{Frame, Header, TetherCodec};
use tether_protocol::chat::{chat_message, ChatMessage, Text};
use tether_protocol::pb::{self, ErrorCode};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;

/// A plain or TLS connection.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
type Conn = Framed<Box<dyn Io>, TetherCodec>;
type Hist = Arc<std::sync::Mutex<Histogram<u64>>>;

#[derive(Debug, Parser)]
#[command(about = "Load generator for the Tether gateway")]
struct Cli {
    /// Gateway address.
    #[arg(long, default_value = "127.0.0.1:14000")]
    addr: SocketAddr,
    /// The gateway's process id, to read its RSS and CPU from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// HMAC secret to mint tokens with (empty: the gateway runs --dev-auth).
    #[arg(long, default_value = "")]
    secret: String,
    /// Source addresses to spread connections over, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Connects in flight at once.
    #[arg(long, default_value_t = 512)]
    inflight: usize,
    /// Prefix of the user ids (to run several load generators against one gateway).
    #[arg(long, default_value = "lt")]
    prefix: String,
    /// Speak TLS, trusting this PEM certificate (the gateway's self-signed one, or its CA).
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// The name to check the gateway's TLS certificate against.
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
    /// Upper bound on any phase, seconds.
    #[arg(long, default_value_t = 120)]
    phase_timeout: u64,
    #[command(subcommand)]
    cmd: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// W1: N idle logged-in connections heartbeating.
    Idle {
        #[arg(long, default_value_t = 18_000)]
        n: usize,
        #[arg(long, default_value_t = 60)]
        hold: u64,
        #[arg(long, default_value_t = 5)]
        heartbeat: u64,
    },
    /// W2: connect + login rate.
    Connect {
        #[arg(long, default_value_t = 18_000)]
        n: usize,
    },
    /// W3: room fan-out.
    Fanout {
        #[arg(long, default_value_t = 10_000)]
        members: usize,
        #[arg(long, default_value_t = 1_000)]
        messages: usize,
        #[arg(long, default_value_t = 128)]
        size: usize,
    },
    /// W4: uplink round trips at a fixed rate.
    Rtt {
        #[arg(long, default_value_t = 1_000)]
        clients: usize,
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
        #[arg(long, default_value_t = 30)]
        secs: u64,
    },
}

// ---- /proc readings ----

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn status_kb(pid: u32, key: &str) -> u64 {
    read(&format!("/proc/{pid}/status"))
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| {
            r.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// utime + stime of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let s = read(&format!("/proc/{pid}/stat"));
    let Some(r) = s.rfind(')') else { return 0 };
    let f: Vec<&str> = s[r + 2..].split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

#[derive(Debug, Default, Clone, Copy)]
struct Snap {
    rss_kb: u64,
    anon_kb: u64,
    cpu: u64,
    own_cpu: u64,
    /// Voluntary context switches of all the gateway's threads: how often a thread went to
    /// sleep and had to be woken.
    wakeups: u64,
}

/// Counts the gateway's system calls while it lives: `perf stat -e raw_syscalls:sys_enter`
/// attached to the pid (perf must be installed; without it the count is absent).
struct SyscallCounter {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl SyscallCounter {
    fn start(pid: Option<u32>) -> Option<SyscallCounter> {
        let pid = pid?;
        let out = std::env::temp_dir().join(format!("tether-loadtest-perf-{}", std::process::id()));
        let child = std::process::Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&out)
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        // perf needs a moment to attach.
        std::thread::sleep(Duration::from_millis(300));
        Some(SyscallCounter { child, out })
    }

    fn stop(mut self) -> Option<u64> {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let text = read(&self.out.to_string_lossy());
        let _ = std::fs::remove_file(&self.out);
        text.lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next()?.trim().parse().ok())
    }
}

fn voluntary_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|t| {
            read(&t.path().join("status").to_string_lossy())
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

fn snap(pid: Option<u32>) -> Snap {
    let own = std::process::id();
    match pid {
        Some(p) => Snap {
            rss_kb: status_kb(p, "VmRSS"),
            anon_kb: status_kb(p, "RssAnon"),
            cpu: cpu_ticks(p),
            own_cpu: cpu_ticks(own),
            wakeups: voluntary_switches(p),
        },
        None => Snap {
            own_cpu: cpu_ticks(own),
            ..Snap::default()
        },
    }
}

// ---- connections ----

struct Ctx {
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    addr: SocketAddr,
    secret: String,
    sources: Vec<IpAddr>,
    prefix: String,
}

impl Ctx {
    fn token(&self, user: &str, device: &str) -> String {
        if self.secret.is_empty() {
            return "dev".into();
        }
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 24 * 3600;
        tether_gateway::auth::mint_token(self.secret.as_bytes(), user, device, exp)
    }

    async fn connect(&self, i: usize) -> std::io::Result<Conn> {
        let src = self.sources[i % self.sources.len()];
        let sock = if src.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.bind(SocketAddr::new(src, 0))?;
        let s = sock.connect(self.addr).await?;
        s.set_nodelay(true)?;
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(s),
            Some((connector, name)) => Box::new(connector.connect(name.clone(), s).await?),
        };
        Ok(Framed::new(io, TetherCodec::default()))
    }

    /// Connects and logs in as user `{prefix}{i}`.
    async fn login(&self, i: usize) -> Result<(Conn, pb::LoginResult), String> {
        let user = format!("{}{i}", self.prefix);
        let mut c = self.connect(i).await.map_err(|e| format!("connect: {e}"))?;
        let login = pb::Login {
            token: self.token(&user, "d"),
            user_id: user,
            device_id: "d".into(),
            platform: pb::Platform::Android as i32,
            client_version: "tether-loadtest".into(),
            ..Default::default()
        };
        c.send(Frame::new(Header::Login(Box::new(login))))
            .await
            .map_err(|e| format!("send: {e}"))?;
        match c.next().await {
            Some(Ok(Frame {
                header: Header::LoginResult(r),
                ..
            })) if r.code == ErrorCode::Ok as i32 => Ok((c, *r)),
            Some(Ok(f)) => Err(format!("login refused: {:?}", f.header)),
            Some(Err(e)) => Err(format!("recv: {e}")),
            None => Err("closed before LOGIN_RESULT".into()),
        }
    }
}

fn hist() -> Hist {
    Arc::new(std::sync::Mutex::new(
        Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
    ))
}

fn record(h: &Hist, us: u64) {
    if let Ok(mut h) = h.lock() {
        let _ = h.record(us.max(1));
    }
}

fn pcts(name: &str, h: &Hist) -> String {
    let h = h.lock().expect("histogram lock");
    format!(
        "{name}_n={} {name}_p50_us={} {name}_p99_us={} {name}_p999_us={} {name}_max_us={}",
        h.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    )
}

fn cpu_report(a: Snap, b: Snap, wall: f64) -> String {
    let srv = (b.cpu - a.cpu) as f64 / 100.0;
    let cli = (b.own_cpu - a.own_cpu) as f64 / 100.0;
    format!(
        "wall_s={wall:.2} srv_cpu_s={srv:.2} srv_cpu_pct={:.0} cli_cpu_s={cli:.2}",
        100.0 * srv / wall.max(1e-9)
    )
}

/// Opens `n` logged-in connections with at most `inflight` connects at once; each is then
/// handed to `run`. Returns (ok, failed, connect histogram, wall time of the phase).
async fn flood<F, Fut>(
    ctx: &Arc<Ctx>,
    n: usize,
    inflight: usize,
    deadline: Duration,
    run: F,
) -> (usize, usize, Hist, f64)
where
    F: Fn(usize, Conn, pb::LoginResult) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(inflight.max(1)));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let h = hist();
    let run = Arc::new(run);
    let start = Instant::now();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let (ctx, ok, failed, h, run) = (
            ctx.clone(),
            ok.clone(),
            failed.clone(),
            h.clone(),
            run.clone(),
        );
        tokio::spawn(async move {
            let t = Instant::now();
            match tokio::time::timeout(Duration::from_secs(30), ctx.login(i)).await {
                Ok(Ok((c, r))) => {
                    record(&h, t.elapsed().as_micros() as u64);
                    ok.fetch_add(1, Ordering::SeqCst);
                    drop(permit);
                    run(i, c, r).await;
                }
                Ok(Err(e)) => {
                    if failed.fetch_add(1, Ordering::SeqCst) < 5 {
                        eprintln!("connection {i}: {e}");
                    }
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        if start.elapsed() > deadline {
            break;
        }
    }
    let mut last = Instant::now();
    while ok.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst) < n
        && start.elapsed() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            eprintln!(
                "  connected {} / {n} (failed {})",
                ok.load(Ordering::SeqCst),
                failed.load(Ordering::SeqCst)
            );
        }
    }
    let wall = start.elapsed().as_secs_f64();
    (
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        h,
        wall,
    )
}

/// A (count, last time) pair on its own cache line.
#[derive(Default)]
#[repr(align(128))]
struct Padded(AtomicU64, AtomicU64);

fn chat_body(target: Option<chat_message::Target>, stamp_ns: u64, size: usize) -> Bytes {
    let mut text = format!("{stamp_ns:020}");
    while text.len() < size.saturating_sub(8) {
        text.push('.');
    }
    ChatMessage {
        target,
        content: Some(chat_message::Content::Text(Text { text })),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// The send stamp in a chat body made by [`chat_body`].
fn stamp_of(body: &[u8]) -> Option<u64> {
    match ChatMessage::decode(body).ok()?.content? {
        chat_message::Content::Text(t) => t.text.get(..20)?.parse().ok(),
        _ => None,
    }
}

// ---- workloads ----

async fn idle(cli: &Cli, ctx: Arc<Ctx>, n: usize, hold: u64, heartbeat: u64) {
    let before = snap(cli.pid);
    let stop = Arc::new(tokio::sync::Notify::new());
    let hb = hist();
    let hb_fail = Arc::new(AtomicU64::new(0));
    let (stop2, hb2, hb_fail2) = (stop.clone(), hb.clone(), hb_fail.clone());
    let (ok, failed, _, setup) = flood(&ctx, n, cli.inflight, Duration::from_secs(cli.phase_timeout), move |i, mut c, _| {
        let (stop, hb, hb_fail) = (stop2.clone(), hb2.clone(), hb_fail2.clone());
        async move {
            let stopped = stop.notified();
            tokio::pin!(stopped);
            // Spread the connections' PINGs over the period (logins complete within a second,
            // so intervals started at login would PING in bursts of thousands).
            let period = Duration::from_secs(heartbeat.max(1));
            let phase = period.mul_f64((i.wrapping_mul(7919) % 1000) as f64 / 1000.0);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tick.tick() => {
                        let t = Instant::now();
                        if c.send(Frame::new(Header::Ping(pb::Ping {}))).await.is_err() {
                            hb_fail.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        loop {
                            match tokio::time::timeout(Duration::from_secs(10), c.next()).await {
                                Ok(Some(Ok(Frame { header: Header::Pong(_), .. }))) => {
                                    record(&hb, t.elapsed().as_micros() as u64);
                                    break;
                                }
                                Ok(Some(Ok(_))) => continue,
                                _ => {
                                    hb_fail.fetch_add(1, Ordering::Relaxed);
                                    return;
                                }
                            }
                        }
                    }
                }
            }
        }
    })
    .await;
    // Let the last logins settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = snap(cli.pid);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let end = snap(cli.pid);
    stop.notify_waiters();
    let per = |a: u64, b: u64| (b.saturating_sub(a) * 1024) / ok.max(1) as u64;
    println!(
        "W1 server=tether n={n} ok={ok} fail={failed} setup_s={setup:.1} rss_before_kb={} rss_held_kb={} rss_per_conn_B={} anon_before_kb={} anon_held_kb={} anon_per_conn_B={} hb_fail={} {} {}",
        before.rss_kb,
        held.rss_kb,
        per(before.rss_kb, held.rss_kb),
        before.anon_kb,
        held.anon_kb,
        per(before.anon_kb, held.anon_kb),
        hb_fail.load(Ordering::Relaxed),
        pcts("hb", &hb),
        cpu_report(held, end, t.elapsed().as_secs_f64()),
    );
}

async fn connect_rate(cli: &Cli, ctx: Arc<Ctx>, n: usize) {
    let a = snap(cli.pid);
    let keep = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep2 = keep.clone();
    let (ok, failed, h, wall) = flood(
        &ctx,
        n,
        cli.inflight,
        Duration::from_secs(cli.phase_timeout),
        move |_, c, _| {
            let keep = keep2.clone();
            async move {
                if let Ok(mut k) = keep.lock() {
                    k.push(c);
                }
            }
        },
    )
    .await;
    let b = snap(cli.pid);
    println!(
        "W2 server=tether n={n} inflight={} ok={ok} fail={failed} conn_per_s={:.0} {} {}",
        cli.inflight,
        ok as f64 / wall,
        pcts("connect", &h),
        cpu_report(a, b, wall)
    );
}

async fn fanout(cli: &Cli, ctx: Arc<Ctx>, members: usize, messages: usize, size: usize) {
    let base = Instant::now();
    // Deliveries and the time of the last one, sharded by member so that 10 M counts do
    // not all land on one cache line.
    const SHARDS: usize = 64;
    let received: Arc<Vec<Padded>> = Arc::new((0..SHARDS).map(|_| Padded::default()).collect());
    let total = |r: &[Padded]| r.iter().map(|p| p.0.load(Ordering::Relaxed)).sum::<u64>();
    let lat = hist();
    let joined = Arc::new(AtomicUsize::new(0));
    let (r2, lat2, j2) = (received.clone(), lat.clone(), joined.clone());
    let (ok, failed, _, _) = flood(
        &ctx,
        members,
        cli.inflight,
        Duration::from_secs(cli.phase_timeout),
        move |i, mut c, _| {
            let (received, lat, joined) = (r2.clone(), lat2.clone(), j2.clone());
            async move {
                let join = Frame::new(Header::RoomJoin(Box::new(pb::RoomJoin {
                    request_id: i as u64,
                    room_id: "fanout".into(),
                })));
                if c.send(join).await.is_err() {
                    return;
                }
                let mut since_ack = 0;
                while let Ok(Some(Ok(f))) =
                    tokio::time::timeout(Duration::from_secs(60), c.next()).await
                {
                    match f.header {
                        Header::RoomResult(_) => {
                            joined.fetch_add(1, Ordering::SeqCst);
                        }
                        Header::Downlink(d) => {
                            let now = base.elapsed().as_nanos() as u64;
                            // A sample of the latencies (every 16th seq): decoding and
                            // recording each of 10 M deliveries would make this process,
                            // not the gateway, the bottleneck on 2 cores.
                            if d.seq % 16 == 0 {
                                if let Ok(body) =
                                    f.decompressed_body(&tether_codec::Limits::default())
                                {
                                    if let Some(sent) = stamp_of(&body) {
                                        record(&lat, now.saturating_sub(sent) / 1000);
                                    }
                                }
                            }
                            let shard = &received[i % SHARDS];
                            shard.0.fetch_add(1, Ordering::Relaxed);
                            shard.1.fetch_max(now, Ordering::Relaxed);
                            since_ack += 1;
                            if since_ack >= 32 {
                                since_ack = 0;
                                let _ = c
                                    .send(Frame::new(Header::DownlinkAck(pb::DownlinkAck {
                                        seq: d.seq,
                                    })))
                                    .await;
                            }
                        }
                        _ => {}
                    }
                }
            }
        },
    )
    .await;
    let t = Instant::now();
    while joined.load(Ordering::SeqCst) < ok && t.elapsed() < Duration::from_secs(cli.phase_timeout)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The sender: a member too (only members may post), excluded from its own fan-out.
    let (mut s, _) = match ctx.login(members + 1).await {
        Ok(x) => x,
        Err(e) => return eprintln!("sender: {e}"),
    };
    let join = Frame::new(Header::RoomJoin(Box::new(pb::RoomJoin {
        request_id: 0,
        room_id: "fanout".into(),
    })));
    let _ = s.send(join).await;
    let _ = s.next().await;
    let perf = SyscallCounter::start(cli.pid);
    let a = snap(cli.pid);
    let first = base.elapsed().as_nanos() as u64;
    let (mut tx, mut rx) = s.split();
    let acks = tokio::spawn(async move {
        let mut n = 0;
        while n < messages {
            match tokio::time::timeout(Duration::from_secs(60), rx.next()).await {
                Ok(Some(Ok(Frame {
                    header: Header::UplinkAck(_),
                    ..
                }))) => n += 1,
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        n
    });
    for m in 0..messages {
        let body = chat_body(
            Some(chat_message::Target::ToRoom("fanout".into())),
            base.elapsed().as_nanos() as u64,
            size,
        );
        let f = Frame::with_body(
            Header::Uplink(pb::Uplink {
                msg_id: m as u64 + 1,
                body_type: 0,
            }),
            body,
        );
        if tx.feed(f).await.is_err() {
            break;
        }
    }
    let _ = tx.flush().await;
    let acked = acks.await.unwrap_or(0);
    let expected = (ok * messages) as u64;
    let t = Instant::now();
    while total(&received) < expected && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = snap(cli.pid);
    let syscalls = perf.and_then(SyscallCounter::stop).unwrap_or(0);
    let got = total(&received);
    let last_ns = received
        .iter()
        .map(|p| p.1.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let secs = (last_ns.saturating_sub(first)) as f64 / 1e9;
    println!(
        "W3 server=tether members={members} ok={ok} fail={failed} messages={messages} size={size} acked={acked} expected={expected} received={got} deliveries_per_s={:.0} srv_cpu_per_delivery_us={:.2} srv_syscalls={} srv_syscalls_per_delivery={:.4} srv_wakeups={} srv_wakeups_per_delivery={:.4} {} {}",
        got as f64 / secs.max(1e-9),
        (b.cpu - a.cpu) as f64 * 10_000.0 / got.max(1) as f64,
        syscalls,
        syscalls as f64 / got.max(1) as f64,
        b.wakeups - a.wakeups,
        (b.wakeups - a.wakeups) as f64 / got.max(1) as f64,
        pcts("lat", &lat),
        cpu_report(a, b, secs)
    );
}

async fn rtt(cli: &Cli, ctx: Arc<Ctx>, clients: usize, rate: u64, secs: u64) {
    let base = Instant::now();
    let ack = hist();
    let echo = hist();
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let echoed = Arc::new(AtomicU64::new(0));
    let go = Arc::new(tokio::sync::Notify::new());
    let per_client = Duration::from_secs_f64(clients as f64 / rate.max(1) as f64);
    let (a2, e2, s2, ac2, ec2, go2) = (
        ack.clone(),
        echo.clone(),
        sent.clone(),
        acked.clone(),
        echoed.clone(),
        go.clone(),
    );
    let (ok, failed, _, _) = flood(
        &ctx,
        clients,
        cli.inflight,
        Duration::from_secs(cli.phase_timeout),
        move |i, c, _| {
            let (ack, echo, sent, acked, echoed, go) = (
                a2.clone(),
                e2.clone(),
                s2.clone(),
                ac2.clone(),
                ec2.clone(),
                go2.clone(),
            );
            async move {
                go.notified().await;
                // Spread the clients' ticks evenly over one period, as independent clients
                // would be: started in lockstep they send in bursts of `clients` messages.
                tokio::time::sleep(per_client.mul_f64(i as f64 / clients.max(1) as f64)).await;
                let (mut tx, mut rx) = c.split();
                let pending = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
                    u64,
                    Instant,
                >::new()));
                let p2 = pending.clone();
                let reader = tokio::spawn(async move {
                    while let Ok(Some(Ok(f))) =
                        tokio::time::timeout(Duration::from_secs(secs + 15), rx.next()).await
                    {
                        match f.header {
                            Header::UplinkAck(a) => {
                                if let Some(t) =
                                    p2.lock().ok().and_then(|mut p| p.remove(&a.msg_id))
                                {
                                    record(&ack, t.elapsed().as_micros() as u64);
                                    acked.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Header::Downlink(_) => {
                                if let Some(s) = stamp_of(&f.body) {
                                    record(
                                        &echo,
                                        (base.elapsed().as_nanos() as u64).saturating_sub(s) / 1000,
                                    );
                                }
                                echoed.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                });
                let mut tick = tokio::time::interval(per_client);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let end = Instant::now() + Duration::from_secs(secs);
                let mut id = 0u64;
                while Instant::now() < end {
                    tick.tick().await;
                    id += 1;
                    let body = chat_body(None, base.elapsed().as_nanos() as u64, 64);
                    if let Ok(mut p) = pending.lock() {
                        p.insert(id, Instant::now());
                    }
                    let f = Frame::with_body(
                        Header::Uplink(pb::Uplink {
                            msg_id: id,
                            body_type: 0,
                        }),
                        body,
                    );
                    if tx.send(f).await.is_err() {
                        break;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    // Ack echoes now and then so the session buffer stays small.
                    if id % 16 == 0 {
                        let _ = tx
                            .send(Frame::new(Header::DownlinkAck(pb::DownlinkAck {
                                seq: u64::MAX,
                            })))
                            .await;
                    }
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
                reader.abort();
            }
        },
    )
    .await;
    let a = snap(cli.pid);
    go.notify_waiters();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs + 6)).await;
    let b = snap(cli.pid);
    let s = sent.load(Ordering::Relaxed);
    println!(
        "W4 server=tether clients={clients} ok={ok} fail={failed} rate={rate} secs={secs} sent={s} sent_per_s={:.0} acked={} echoed={} lost={} {} {} {}",
        s as f64 / secs as f64,
        acked.load(Ordering::Relaxed),
        echoed.load(Ordering::Relaxed),
        s.saturating_sub(acked.load(Ordering::Relaxed)),
        pcts("ack_rtt", &ack),
        pcts("echo_rtt", &echo),
        cpu_report(a, b, t.elapsed().as_secs_f64())
    );
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let tls = cli.tls_ca.as_ref().map(|path| {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(path).expect("a PEM file") {
            roots
                .add(cert.expect("a PEM certificate"))
                .expect("a usable certificate");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(cli.tls_server_name.clone())
            .expect("a server name");
        (tokio_rustls::TlsConnector::from(Arc::new(config)), name)
    });
    let ctx = Arc::new(Ctx {
        tls,
        addr: cli.addr,
        secret: cli.secret.clone(),
        sources: if cli.sources.is_empty() {
            vec![IpAddr::from([127, 0, 0, 1])]
        } else {
            cli.sources.clone()
        },
        prefix: cli.prefix.clone(),
    });
    rt.block_on(async {
        match cli.cmd {
            Workload::Idle { n, hold, heartbeat } => idle(&cli, ctx, n, hold, heartbeat).await,
            Workload::Connect { n } => connect_rate(&cli, ctx, n).await,
            Workload::Fanout {
                members,
                messages,
                size,
            } => fanout(&cli, ctx, members, messages, size).await,
            Workload::Rtt {
                clients,
                rate,
                secs,
            } => rtt(&cli, ctx, clients, rate, secs).await,
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
}
