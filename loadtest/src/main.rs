//! `tether-loadtest`: drives a Tether gateway with connection floods, fan-out, round trips
//! and resume storms, built on the client SDK (`tether-client`).
//!
//! One coordinating process starts worker processes (re-running this binary), as many as
//! the connections need at [`plan::MAX_CONNECTIONS_PER_WORKER`] each (a process may hold
//! 20,000 open files here), joins their phases with barriers, merges their results
//! (histograms merged, not averaged), shows live progress, reads the gateway's /proc
//! figures and `/metrics`, and prints a summary (plus `--json` and `--plot` files).
//! Connections rotate over `--sources` so that no source address runs out of ephemeral
//! ports. Every run is bounded (`--max-secs`) and targets loopback unless
//! `--allow-remote`.

mod plan;
mod plot;
mod report;
mod scenario;
mod sys;
mod worker;

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use report::{Hist, Part, Report, Second};
use worker::Msg;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "Load generator for the Tether gateway")]
pub struct Cli {
    /// Gateway address (host:port).
    #[arg(long, default_value = "127.0.0.1:14000", global = true)]
    addr: String,
    /// Allow a gateway address outside 127.0.0.0/8 and ::1.
    #[arg(long, global = true)]
    allow_remote: bool,
    /// HMAC secret to mint login tokens with (empty: the gateway runs --dev-auth).
    #[arg(long, default_value = "", env = "TETHER_AUTH_SECRET", global = true)]
    secret: String,
    /// Source addresses, round robin over connections: a comma-separated list of
    /// addresses and inclusive ranges (127.0.0.1-127.0.0.40). About 60,000 connections
    /// fit on one source address per gateway address.
    #[arg(long, default_value = "127.0.0.1", global = true)]
    sources: String,
    /// Prefix of the user ids (`<prefix><n>`), to run several load generators at once.
    #[arg(long, default_value = "lt", global = true)]
    prefix: String,
    /// Speak TLS, trusting this PEM certificate (the gateway's or its CA's).
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,
    /// The name the gateway's TLS certificate must be valid for.
    #[arg(long, default_value = "localhost", global = true)]
    tls_server_name: String,
    /// Gateway process ids (with their child processes) whose RSS and CPU to read.
    #[arg(long, value_delimiter = ',', global = true)]
    gateway_pid: Vec<u32>,
    /// Gateway admin addresses whose /metrics to read (summed).
    #[arg(long, value_delimiter = ',', global = true)]
    admin: Vec<SocketAddr>,
    /// A file holding the gateway's admin token, sent with each /metrics read; without it,
    /// the environment variable TETHER_ADMIN_TOKEN if set (gateway/ADMIN.md).
    #[arg(long, global = true)]
    admin_token_file: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Write a chart of connections, rate and p99 over time here (SVG).
    #[arg(long, global = true)]
    plot: Option<PathBuf>,
    /// Hard bound on the whole run, seconds: workers still running then are killed.
    #[arg(long, default_value_t = 1_800, global = true)]
    max_secs: u64,
    /// Most connections per worker process.
    #[arg(long, default_value_t = plan::MAX_CONNECTIONS_PER_WORKER, global = true)]
    per_worker: usize,
    /// Worker processes (0: as many as --per-worker asks for, and at least one per core, so
    /// that the client side can use the whole machine as the peers' load generator does).
    #[arg(long, default_value_t = 0, global = true)]
    workers: usize,
    /// No live progress bar (a line every 10 s instead).
    #[arg(long, global = true)]
    no_progress: bool,
    /// Seconds a connect + login may take.
    #[arg(long, default_value_t = 30, global = true)]
    connect_timeout: u64,
    /// Run as worker INDEX of COUNT (set by the coordinator).
    #[arg(long, hide = true, num_args = 2, value_names = ["INDEX", "COUNT"], global = true)]
    worker: Option<Vec<usize>>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand, serde::Serialize)]
pub enum Scenario {
    /// Open N connections, log in, heartbeat, hold; then report who stayed up.
    Hold {
        #[arg(long, default_value_t = 18_000)]
        n: usize,
        /// Connects per second (0: as fast as --inflight allows).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 512)]
        inflight: usize,
        /// Seconds to hold once all are up.
        #[arg(long, default_value_t = 60)]
        hold: u64,
        /// Heartbeat every this many seconds instead of the gateway's interval.
        #[arg(long)]
        heartbeat: Option<f64>,
        /// Attempts after a failed connect (each failure counted by reason).
        #[arg(long, default_value_t = 3)]
        retries: u32,
    },
    /// Connect + login as fast as possible with --inflight at once; no retries.
    Storm {
        #[arg(long, default_value_t = 18_000)]
        n: usize,
        #[arg(long, default_value_t = 512)]
        inflight: usize,
    },
    /// M members join one room; a publisher sends messages to it.
    Fanout {
        #[arg(long, default_value_t = 10_000)]
        members: usize,
        #[arg(long, default_value_t = 1_000)]
        messages: u64,
        /// Body bytes of each message.
        #[arg(long, default_value_t = 128)]
        size: usize,
        /// Messages per second (0: as fast as --window unacked uplinks allow).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 64)]
        window: usize,
        #[arg(long, default_value_t = 512)]
        inflight: usize,
        /// Seconds to wait for the last deliveries after the last publish.
        #[arg(long, default_value_t = 30)]
        drain: u64,
    },
    /// C clients send echo uplinks at a fixed total rate (open loop): uplink -> ack and
    /// uplink -> echoed downlink.
    Rtt {
        #[arg(long, default_value_t = 1_000)]
        clients: usize,
        /// Messages per second over all clients.
        #[arg(long, default_value_t = 20_000.0)]
        rate: f64,
        /// Seconds per rate (per step with --find-max).
        #[arg(long, default_value_t = 30)]
        secs: u64,
        #[arg(long, default_value_t = 128)]
        size: usize,
        /// Double the rate each step while nothing is lost, senders keep their schedule
        /// (>= 97 % sent on time) and p99 stays within --p99-limit-ms.
        #[arg(long)]
        find_max: bool,
        #[arg(long, default_value_t = 50.0)]
        p99_limit_ms: f64,
        /// A send this many ms after its intended time counts as late.
        #[arg(long, default_value_t = plan::LATE_SEND_MS)]
        late_ms: u64,
        #[arg(long, default_value_t = 1_000_000.0)]
        max_rate: f64,
        #[arg(long, default_value_t = 512)]
        inflight: usize,
    },
    /// N clients exchange direct messages while every connection is cut (at once or in
    /// waves); all reconnect and resume; nothing may be lost or duplicated.
    ResumeStorm {
        #[arg(long, default_value_t = 18_000)]
        n: usize,
        /// Messages each client sends to the next.
        #[arg(long, default_value_t = 10)]
        messages: u64,
        /// Seconds over which each client's messages are spread.
        #[arg(long, default_value_t = 4.0)]
        send_secs: f64,
        /// When the first cut comes, ms after sending starts.
        #[arg(long, default_value_t = 2_000)]
        cut_at_ms: u64,
        #[arg(long, default_value_t = 1)]
        waves: usize,
        #[arg(long, default_value_t = 500)]
        wave_gap_ms: u64,
        /// Seconds allowed until every message is in.
        #[arg(long, default_value_t = 60)]
        recover: u64,
        /// Reconnect backoff ceiling of the clients, ms (their reconnects spread over it).
        #[arg(long, default_value_t = 1_000)]
        backoff_ms: u64,
        #[arg(long, default_value_t = 512)]
        inflight: usize,
    },
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Hold { .. } => "hold",
            Scenario::Storm { .. } => "storm",
            Scenario::Fanout { .. } => "fanout",
            Scenario::Rtt { .. } => "rtt",
            Scenario::ResumeStorm { .. } => "resume-storm",
        }
    }

    /// Connections the scenario opens (spread over workers; fan-out's publisher comes on
    /// top, in worker 0).
    fn connections(&self) -> usize {
        match self {
            Scenario::Hold { n, .. } | Scenario::Storm { n, .. } => *n,
            Scenario::ResumeStorm { n, .. } => *n,
            Scenario::Fanout { members, .. } => *members,
            Scenario::Rtt { clients, .. } => *clients,
        }
    }

    /// The scenario's flags, for the report.
    fn params(&self) -> BTreeMap<String, serde_json::Value> {
        // Serialized as {"Name": {flag: value, ...}}.
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(outer)) => outer
                .into_iter()
                .next()
                .and_then(|(_, inner)| match inner {
                    serde_json::Value::Object(m) => Some(m.into_iter().collect()),
                    _ => None,
                })
                .unwrap_or_default(),
            _ => BTreeMap::new(),
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if let Some(w) = cli.worker.clone() {
        return rt.block_on(run_worker(cli, w[0], w[1]));
    }
    match rt.block_on(coordinate(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-loadtest: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn net_of(cli: &Cli) -> Result<worker::Net, String> {
    let sources = plan::parse_sources(&cli.sources)?;
    let tls = match &cli.tls_ca {
        None => None,
        Some(p) => {
            let pem = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            Some(
                tether_client::TlsConfig::with_root_pem(&cli.tls_server_name, &pem)
                    .map_err(|e| format!("{e:?}"))?,
            )
        }
    };
    let (heartbeat, backoff) = match &cli.scenario {
        Scenario::Hold { heartbeat, .. } => (heartbeat.map(Duration::from_secs_f64), 1_000),
        Scenario::ResumeStorm { backoff_ms, .. } => (None, *backoff_ms),
        _ => (None, 1_000),
    };
    Ok(worker::Net {
        addr: cli.addr.clone(),
        sources: std::sync::Arc::new(sources),
        prefix: cli.prefix.clone(),
        secret: cli.secret.clone(),
        tls,
        connect_timeout: Duration::from_secs(cli.connect_timeout),
        heartbeat,
        backoff: Duration::from_millis(backoff.max(1)),
    })
}

async fn run_worker(cli: Cli, index: usize, count: usize) -> std::process::ExitCode {
    let net = match net_of(&cli) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("tether-loadtest worker {index}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let total = cli.scenario.connections();
    let range = plan::split(total, count)
        .get(index)
        .cloned()
        .unwrap_or(0..0);
    let share = scenario::Share {
        index,
        range,
        total,
    };
    let mut ctl = worker::Ctl::new();
    let mut part = scenario::run(&cli.scenario, net, share, &mut ctl).await;
    let own = sys::proc_stats(&[std::process::id()]);
    part.count("client_cpu_ms", (own.cpu_secs * 1e3) as u64);
    part.count("client_rss_bytes", own.rss_bytes);
    worker::Ctl::send(&Msg::Done { part });
    std::process::ExitCode::SUCCESS
}

/// Is `addr` (host:port) on this machine's loopback?
fn is_loopback(addr: &str) -> bool {
    use std::net::ToSocketAddrs as _;
    addr.to_socket_addrs()
        .map(|mut a| a.all(|a| a.ip().is_loopback()))
        .unwrap_or(false)
}

/// What the coordinator reads of the gateway at one moment.
#[derive(Clone, Debug, Default)]
struct ServerSnap {
    at: Option<Instant>,
    proc: sys::ProcStats,
    slab: u64,
    metrics: BTreeMap<String, f64>,
    clients: sys::ProcStats,
    machine: sys::MachineCpu,
}

/// The admin token to read /metrics with: `--admin-token-file`'s content, else
/// `TETHER_ADMIN_TOKEN`, trimmed; `None` when neither is given (the gateway then serves
/// /metrics without one, on loopback, or with `--admin-metrics-public`).
fn admin_token(cli: &Cli) -> Result<Option<String>, String> {
    let text = match &cli.admin_token_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| format!("--admin-token-file {}: {e}", p.display()))?,
        None => match std::env::var(tether_gateway::admin::ADMIN_TOKEN_ENV) {
            Ok(t) => t,
            Err(_) => return Ok(None),
        },
    };
    let t = text.trim();
    Ok((!t.is_empty()).then(|| t.to_string()))
}

async fn server_snap(cli: &Cli, token: Option<&str>, worker_pids: &[u32]) -> ServerSnap {
    let pids: Vec<u32> = cli
        .gateway_pid
        .iter()
        .flat_map(|p| sys::descendants(*p))
        .collect();
    let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
    for a in &cli.admin {
        match sys::scrape_metrics(*a, token).await {
            Ok(m) => {
                for (k, v) in m {
                    *metrics.entry(k).or_default() += v;
                }
            }
            // A 401 here most likely wants --admin-token-file.
            Err(e) => eprintln!("tether-loadtest: warning: {e}"),
        }
    }
    ServerSnap {
        at: Some(Instant::now()),
        proc: sys::proc_stats(&pids),
        slab: sys::slab_bytes(),
        metrics,
        clients: sys::proc_stats(worker_pids),
        machine: sys::machine_cpu(),
    }
}

struct Live {
    bar: indicatif::ProgressBar,
    plain: bool,
    last_plain: Instant,
    started: Instant,
}

impl Live {
    fn new(cli: &Cli, total: u64) -> Live {
        let plain = cli.no_progress || !std::io::stderr().is_terminal();
        let bar = if plain {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} conn  {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b
        };
        Live {
            bar,
            plain,
            last_plain: Instant::now(),
            started: Instant::now(),
        }
    }

    fn show(&mut self, phase: &str, conns: u64, rate: u64, p99_ms: f64, failed: u64) {
        let msg = format!("{phase}  {rate}/s  p99 {p99_ms:.2} ms  failed {failed}");
        if self.plain {
            if self.last_plain.elapsed() >= plan::PLAIN_PROGRESS_EVERY {
                self.last_plain = Instant::now();
                eprintln!(
                    "[{:>5.0}s] {conns} conn  {msg}",
                    self.started.elapsed().as_secs_f64()
                );
            }
        } else {
            self.bar.set_position(conns);
            self.bar.set_message(msg);
        }
    }
}

async fn coordinate(cli: Cli) -> Result<(), String> {
    if !cli.allow_remote && !is_loopback(&cli.addr) {
        return Err(format!(
            "{} is not a loopback address (pass --allow-remote to load another machine)",
            cli.addr
        ));
    }
    let net = net_of(&cli)?;
    let total = cli.scenario.connections();
    let ports = plan::ports_per_source(plan::local_port_range());
    let need = plan::sources_needed(total, ports);
    if net.sources.len() < need {
        eprintln!(
            "tether-loadtest: warning: {total} connections over {} source address(es): past \
             {ports} per address connecting slows down (ip_local_port_range); pass e.g. \
             --sources 127.0.0.1-127.0.0.{need}",
            net.sources.len()
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = if cli.workers > 0 {
        cli.workers
    } else {
        plan::workers_for(total, cli.per_worker).max(cores.min(total.max(1)))
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let started_unix_ms = worker::now_us() / 1_000;
    let token = admin_token(&cli)?;
    let token = token.as_deref();
    let started = Instant::now();
    let mut snaps: BTreeMap<String, ServerSnap> = BTreeMap::new();
    snaps.insert("start".into(), server_snap(&cli, token, &[]).await);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Option<Msg>)>();
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    let mut pids = Vec::new();
    for w in 0..workers {
        let mut child = tokio::process::Command::new(&exe)
            .arg("--worker")
            .arg(w.to_string())
            .arg(workers.to_string())
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting worker {w}: {e}"))?;
        pids.push(child.id().unwrap_or(0));
        stdins.push(child.stdin.take());
        let stdout = child.stdout.take().expect("piped");
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Msg>(&line) {
                    Ok(m) => {
                        let _ = tx.send((w, Some(m)));
                    }
                    Err(_) => eprintln!("worker {w}: {line}"),
                }
            }
            let _ = tx.send((w, None));
        });
        children.push(child);
    }
    drop(tx);

    let mut live = Live::new(&cli, total as u64);
    let mut seconds: BTreeMap<u64, Second> = BTreeMap::new();
    let mut last_ops: BTreeMap<usize, u64> = BTreeMap::new();
    let mut conns: BTreeMap<usize, i64> = BTreeMap::new();
    let mut at_barrier: BTreeMap<usize, (String, Option<Part>)> = BTreeMap::new();
    let mut merged = Part::default();
    let mut done = 0usize;
    let mut gone = 0usize;
    let mut reported = std::collections::BTreeSet::new();
    let mut steps: Vec<BTreeMap<String, serde_json::Value>> = Vec::new();
    let mut phase = "connecting".to_string();
    let mut step_rate = match &cli.scenario {
        Scenario::Rtt { rate, .. } => *rate,
        _ => 0.0,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cli.max_secs);
    let mut timed_out = false;
    while done + gone < workers {
        let (w, msg) = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => break },
            () = tokio::time::sleep_until(deadline) => { timed_out = true; break; }
        };
        match msg {
            // The end of a worker's output; lost unless its report came first.
            None => {
                if !reported.contains(&w) {
                    gone += 1;
                }
            }
            Some(Msg::Progress {
                t_us,
                connections,
                ops,
                hist,
            }) => {
                let t = t_us.saturating_sub(started_unix_ms * 1_000) / 1_000_000;
                let s = seconds.entry(t).or_default();
                s.connections.insert(w, connections.max(0) as u64);
                let prev = last_ops.insert(w, ops).unwrap_or(0);
                s.ops += ops.saturating_sub(prev);
                if let Some(h) = hist.as_deref().and_then(|h| Hist::from_b64(h).ok()) {
                    s.hist.merge(&h);
                }
                conns.insert(w, connections);
                let up: i64 = conns.values().sum();
                let (rate, p99) = seconds
                    .range(..t)
                    .next_back()
                    .map(|(_, s)| (s.ops, s.hist.quantile(0.99) as f64 / 1e3))
                    .unwrap_or((0, 0.0));
                live.show(&phase, up.max(0) as u64, rate, p99, merged.failed());
            }
            Some(Msg::Barrier { name, part }) => {
                at_barrier.insert(w, (name, part));
            }
            Some(Msg::Done { part }) => {
                merged.merge(&part)?;
                reported.insert(w);
                done += 1;
            }
        }
        // Every worker still running waits at the barrier (checked after any message, so a
        // worker that dies does not leave the others waiting for it).
        if !at_barrier.is_empty() && at_barrier.len() + done + gone == workers {
            let name = at_barrier
                .values()
                .next()
                .map(|(n, _)| n.clone())
                .unwrap_or_default();
            snaps.insert(name.clone(), server_snap(&cli, token, &pids).await);
            let answer = if name == "step" {
                let mut p = Part::default();
                for (_, sp) in at_barrier.values() {
                    if let Some(sp) = sp {
                        p.merge(sp)?;
                    }
                }
                let (row, held) = rtt_step(&cli, step_rate, &p);
                steps.push(row);
                let next = match &cli.scenario {
                    Scenario::Rtt {
                        find_max: true,
                        max_rate,
                        ..
                    } => plan::next_step(step_rate, held, *max_rate),
                    _ => None,
                };
                match next {
                    Some(r) => {
                        step_rate = r;
                        format!("go {r}")
                    }
                    None => "stop".to_string(),
                }
            } else {
                "go".to_string()
            };
            phase = format!("after {name}");
            for s in stdins.iter_mut().flatten() {
                let _ = s.write_all(format!("{answer}\n").as_bytes()).await;
                let _ = s.flush().await;
            }
            at_barrier.clear();
        }
    }
    live.bar.finish_and_clear();
    if timed_out {
        for c in &mut children {
            let _ = c.start_kill();
        }
        eprintln!(
            "tether-loadtest: --max-secs {} passed; workers killed",
            cli.max_secs
        );
    }
    for c in &mut children {
        let _ = tokio::time::timeout(plan::WORKER_EXIT_TIMEOUT, c.wait()).await;
    }
    snaps.insert("end".into(), server_snap(&cli, token, &[]).await);
    let mut r = Report {
        scenario: cli.scenario.name().into(),
        started_unix_ms,
        wall_secs: started.elapsed().as_secs_f64(),
        workers,
        params: cli.scenario.params(),
        counters: merged.counters.clone(),
        failures: merged.failures.clone(),
        steps,
        series: report::series(&seconds),
        ..Default::default()
    };
    for (k, _) in merged.hists.iter() {
        r.latencies.insert(k.clone(), merged.hist(k).summary());
    }
    if gone > 0 || timed_out {
        r.figure("workers lost", (gone + usize::from(timed_out)) as u64);
    }
    summarize(&cli, &merged, &snaps, &mut r);
    r.figure(
        "load tester CPU (s, all workers)",
        merged.counter("client_cpu_ms") as f64 / 1e3,
    );
    r.figure(
        "load tester RSS (bytes, all workers)",
        merged.counter("client_rss_bytes"),
    );
    println!("{}", r.table());
    if let Some(p) = &cli.json {
        let text = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if let Some(p) = &cli.plot {
        let rate_label = match &cli.scenario {
            Scenario::Hold { .. } => "heartbeats/s",
            Scenario::Storm { .. } => "logins/s",
            Scenario::Fanout { .. } => "deliveries/s",
            Scenario::Rtt { .. } => "echoes/s",
            Scenario::ResumeStorm { .. } => "deliveries/s",
        };
        plot::plot(
            p,
            &format!("tether-loadtest {}", r.scenario),
            rate_label,
            &r.series,
        )?;
    }
    if gone > 0 || timed_out {
        return Err(format!("{gone} worker(s) ended without a report"));
    }
    Ok(())
}

/// One `rtt` step's row, and whether it held: nothing lost, >= 97 % of the due messages
/// sent no later than 10 ms after their time, p99 (uplink -> echo) within the limit.
fn rtt_step(cli: &Cli, rate: f64, p: &Part) -> (BTreeMap<String, serde_json::Value>, bool) {
    let limit = match &cli.scenario {
        Scenario::Rtt { p99_limit_ms, .. } => *p99_limit_ms,
        _ => f64::INFINITY,
    };
    let echo = p.hist("echo").summary();
    let ack = p.hist("ack").summary();
    let (sent, late, lost) = (
        p.counter("sent"),
        p.counter("late_sends"),
        p.counter("lost"),
    );
    let on_time = if sent == 0 {
        0.0
    } else {
        (sent - late.min(sent)) as f64 / sent as f64
    };
    let held = lost == 0
        && p.counter("duplicates") == 0
        && on_time >= 0.97
        && (echo.p99_us as f64) / 1e3 <= limit
        && sent > 0;
    let mut row = BTreeMap::new();
    row.insert("rate".into(), json!(rate));
    row.insert("sent".into(), json!(sent));
    row.insert("on_time".into(), json!(on_time));
    row.insert("late_sends".into(), json!(late));
    row.insert("lost".into(), json!(lost));
    row.insert("dup".into(), json!(p.counter("duplicates")));
    row.insert("ack_p50_ms".into(), json!(ack.p50_us as f64 / 1e3));
    row.insert("ack_p99_ms".into(), json!(ack.p99_us as f64 / 1e3));
    row.insert("echo_p50_ms".into(), json!(echo.p50_us as f64 / 1e3));
    row.insert("echo_p99_ms".into(), json!(echo.p99_us as f64 / 1e3));
    row.insert("echo_p999_ms".into(), json!(echo.p999_us as f64 / 1e3));
    let from_send = p.hist("echo from send").summary();
    row.insert(
        "echo_from_send_p99_ms".into(),
        json!(from_send.p99_us as f64 / 1e3),
    );
    row.insert("held".into(), json!(held));
    (row, held)
}

/// Gateway and machine figures between snapshots: memory growth per connection from
/// `base` to `held`, CPU from `held` to `end` (and the load tester's own beside them).
fn server_between(
    r: &mut Report,
    snaps: &BTreeMap<String, ServerSnap>,
    base: &str,
    held: &str,
    end: &str,
    conns: u64,
) {
    let (Some(a), Some(b), Some(c)) = (snaps.get(base), snaps.get(held), snaps.get(end)) else {
        return;
    };
    let secs =
        c.at.zip(b.at)
            .map_or(0.0, |(c, b)| c.duration_since(b).as_secs_f64());
    let per_conn = |bytes: u64| json!((bytes as f64 / conns.max(1) as f64).round());
    let mut put = |k: &str, v: serde_json::Value| {
        r.server.insert(k.to_string(), v);
    };
    if b.proc.processes > 0 {
        put("gateway processes", json!(b.proc.processes));
        put("gateway rss_bytes", json!(b.proc.rss_bytes));
        put(
            "gateway rss growth per connection (B)",
            per_conn(b.proc.rss_bytes.saturating_sub(a.proc.rss_bytes)),
        );
        // Everything the gateway processes hold, their start-up memory included: the
        // private memory of each plus one copy of the binary's shared pages.
        put(
            "gateway memory per connection, all in (B)",
            per_conn(b.proc.anon_bytes + b.proc.file_bytes_max),
        );
        let cpu = c.proc.cpu_secs - b.proc.cpu_secs;
        put(&format!("gateway cpu_secs {held}->{end}"), json!(cpu));
        if secs > 0.0 {
            put("gateway cores busy", json!(cpu / secs));
        }
    }
    put(
        "kernel slab growth per connection (B)",
        per_conn(b.slab.saturating_sub(a.slab)),
    );
    if c.clients.processes > 0 && b.clients.processes > 0 {
        let cpu = c.clients.cpu_secs - b.clients.cpu_secs;
        put(&format!("load tester cpu_secs {held}->{end}"), json!(cpu));
        if secs > 0.0 {
            put("load tester cores busy", json!(cpu / secs));
        }
        put("load tester rss_bytes", json!(b.clients.rss_bytes));
    }
    if !b.metrics.is_empty() {
        put(
            "gateway /metrics tether_connections",
            json!(sys::metric_sum(&b.metrics, "tether_connections")),
        );
    }
    put(
        &format!("machine busy_secs {held}->{end}"),
        json!(c.machine.busy_secs - b.machine.busy_secs),
    );
    put(
        &format!("machine steal_secs {held}->{end}"),
        json!(c.machine.steal_secs - b.machine.steal_secs),
    );
}

fn summarize(cli: &Cli, p: &Part, snaps: &BTreeMap<String, ServerSnap>, r: &mut Report) {
    let n = cli.scenario.connections() as u64;
    match &cli.scenario {
        Scenario::Hold { hold, .. } => {
            r.figure("connections asked", n);
            r.figure("connections up", p.counter("up"));
            r.figure("held at end", p.counter("held_at_end"));
            r.figure(
                "failed attempts",
                p.failed() - p.counter("unexpected_disconnects"),
            );
            r.figure("gave up", p.counter("gave_up"));
            r.figure(
                "unexpected disconnects",
                p.counter("unexpected_disconnects"),
            );
            r.figure("reconnects", p.counter("reconnects"));
            if let Some(s) = p.span_secs("start", "login") {
                r.figure("connect rate (conn/s)", p.counter("up") as f64 / s);
            }
            r.figure("hold (s)", *hold);
            server_between(r, snaps, "start", "connected", "held", p.counter("up"));
        }
        Scenario::Storm { .. } => {
            r.figure("connections asked", n);
            r.figure("connections up", p.counter("up"));
            r.figure("failed", p.failed());
            if let Some(s) = p.span_secs("start", "login") {
                r.figure("connections/s", p.counter("up") as f64 / s);
            }
            server_between(r, snaps, "start", "done", "end", p.counter("up"));
        }
        Scenario::Fanout { .. } => {
            r.figure("members joined", p.counter("joined"));
            r.figure("messages published", p.counter("published"));
            r.figure("deliveries expected", p.counter("expected"));
            r.figure("delivered", p.counter("delivered"));
            r.figure("lost", p.counter("lost"));
            r.figure("duplicated", p.counter("duplicates"));
            if let Some(s) = p.span_secs("publish", "delivery") {
                r.figure("deliveries/s", p.counter("delivered") as f64 / s);
            }
            server_between(r, snaps, "start", "joined", "drained", p.counter("joined"));
            if let (Some(a), Some(b)) = (snaps.get("joined"), snaps.get("drained")) {
                let d = p.counter("delivered");
                if d > 0 && b.proc.processes > 0 {
                    r.server.insert(
                        "gateway cpu µs per delivery".into(),
                        json!((b.proc.cpu_secs - a.proc.cpu_secs) * 1e6 / d as f64),
                    );
                }
            }
        }
        Scenario::Rtt { .. } => {
            r.figure("clients", n);
            r.figure("sent", p.counter("sent"));
            r.figure("acked", p.counter("acked"));
            r.figure("echoed", p.counter("echoed"));
            r.figure("lost", p.counter("lost"));
            r.figure("duplicated", p.counter("duplicates"));
            r.figure("late sends", p.counter("late_sends"));
            if let Some(last) = r.steps.iter().rev().find(|s| s["held"] == json!(true)) {
                r.figure("highest rate held (msg/s)", last["rate"].clone());
            }
            server_between(r, snaps, "start", "connected", "end", n);
        }
        Scenario::ResumeStorm { .. } => {
            r.figure("connections up", p.counter("up"));
            r.figure("cut", p.counter("cut"));
            r.figure("resumed", p.counter("resumed"));
            r.figure("not resumed", p.counter("not_resumed"));
            r.figure("messages expected", p.counter("expected"));
            r.figure("received", p.counter("received"));
            r.figure("lost", p.counter("lost"));
            r.figure("duplicated", p.counter("duplicates"));
            r.figure("uplinks acked", p.counter("acked"));
            r.figure("recovery timeouts", p.counter("recovery_timeouts"));
            if let Some(s) = p.span_secs("cut", "recovered") {
                r.figure("all reconnected after (s)", s);
            }
            if let Some(s) = p.span_secs("cut", "all_received") {
                r.figure("all messages in after (s)", s);
            }
            server_between(r, snaps, "start", "connected", "recovered", p.counter("up"));
        }
    }
}
