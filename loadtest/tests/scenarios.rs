//! Every scenario at small scale against a real gateway (in this process), through the real
//! binary and its worker processes: the report's counts must be exactly what was sent, with
//! nothing lost or duplicated. Small `--per-worker` values make each run spread over
//! several worker processes, so the merging of their results is checked too.

use std::process::Command;

use serde_json::Value;
use tether_gateway::config::Config;
use tether_gateway::{Gateway, Options};

/// At least the gateway's `MIN_AUTH_SECRET_LEN` (32) bytes.
const SECRET: &str = "loadtest-secret-of-at-least-32-bytes";

/// The gateway's admin token, which the load tester reads /metrics with
/// (`--admin-token-file`).
const ADMIN_TOKEN: &str = "loadtest-admin-token-0123456789";

/// A file holding [`ADMIN_TOKEN`].
fn admin_token_file() -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!(
        "tether-loadtest-admin-token-{}-{n}",
        std::process::id()
    ));
    std::fs::write(&path, format!("{ADMIN_TOKEN}\n")).unwrap();
    path.to_string_lossy().into()
}

fn gateway() -> Gateway {
    Gateway::start(
        Config {
            listen: vec!["127.0.0.1:0".into()],
            admin_listen: "127.0.0.1:0".into(),
            workers: 2,
            auth_secret: SECRET.into(),
            admin_token_file: admin_token_file(),
            uplink_rate: 0,
            ..Config::default()
        },
        Options::default(),
    )
    .expect("gateway starts")
}

/// Runs the load tester against `gw` with `args`; returns its JSON report.
fn run(gw: &Gateway, args: &[&str]) -> Value {
    let dir = std::env::temp_dir().join(format!(
        "tether-loadtest-{}-{}",
        std::process::id(),
        args[0]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");
    let svg = dir.join("chart.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_tether-loadtest"))
        .args(args)
        .args(["--addr", &gw.addrs()[0].to_string()])
        .args(["--admin", &gw.admin_addr().unwrap().to_string()])
        .args(["--admin-token-file", &gw.node().config.admin_token_file])
        .env_remove(tether_gateway::admin::ADMIN_TOKEN_ENV)
        .args(["--secret", SECRET, "--no-progress", "--max-secs", "120"])
        .args(["--sources", "127.0.0.1-127.0.0.3"])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .expect("the load tester runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.contains("<svg"), "the chart is an SVG");
    assert!(
        stdout.contains("scenario"),
        "the summary table is printed: {stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    report
}

/// A headline figure of the report, by name.
fn fig(r: &Value, name: &str) -> Value {
    r["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f[0] == name)
        .unwrap_or_else(|| panic!("no figure {name:?} in {:#}", r["figures"]))[1]
        .clone()
}

fn count(r: &Value, name: &str) -> u64 {
    fig(r, name)
        .as_u64()
        .unwrap_or_else(|| panic!("{name} is not a count"))
}

fn latency_count(r: &Value, name: &str) -> u64 {
    r["latencies"][name]["count"].as_u64().unwrap_or(0)
}

#[test]
fn hold_keeps_every_connection_up_and_times_heartbeats() {
    let gw = gateway();
    let r = run(
        &gw,
        &[
            "hold",
            "--n",
            "300",
            "--hold",
            "2",
            "--heartbeat",
            "0.5",
            "--per-worker",
            "100",
        ],
    );
    assert_eq!(r["workers"], 3);
    assert_eq!(count(&r, "connections up"), 300);
    assert_eq!(count(&r, "held at end"), 300);
    assert_eq!(count(&r, "unexpected disconnects"), 0);
    assert_eq!(count(&r, "failed attempts"), 0);
    assert_eq!(latency_count(&r, "login"), 300);
    // Every connection pings at least twice in 2 s at a 0.5 s interval.
    assert!(
        latency_count(&r, "heartbeat") >= 600,
        "{:#}",
        r["latencies"]
    );
    // The gateway's own count, read from /metrics while held.
    assert_eq!(r["server"]["gateway /metrics tether_connections"], 300.0);
    assert!(!r["series"].as_array().unwrap().is_empty());
}

#[test]
fn storm_logs_everyone_in_once() {
    let gw = gateway();
    let r = run(
        &gw,
        &[
            "storm",
            "--n",
            "300",
            "--inflight",
            "64",
            "--per-worker",
            "150",
        ],
    );
    assert_eq!(r["workers"], 2);
    assert_eq!(r["params"]["n"], 300);
    assert_eq!(r["params"]["inflight"], 64);
    assert_eq!(count(&r, "connections up"), 300);
    assert_eq!(count(&r, "failed"), 0);
    assert_eq!(latency_count(&r, "connect"), 300);
    assert!(fig(&r, "connections/s").as_f64().unwrap() > 0.0);
}

#[test]
fn fanout_delivers_every_message_to_every_member_once() {
    let gw = gateway();
    let r = run(
        &gw,
        &[
            "fanout",
            "--members",
            "200",
            "--messages",
            "50",
            "--per-worker",
            "100",
            "--drain",
            "20",
        ],
    );
    assert_eq!(r["workers"], 2);
    assert_eq!(count(&r, "members joined"), 200);
    assert_eq!(count(&r, "messages published"), 50);
    assert_eq!(count(&r, "deliveries expected"), 10_000);
    assert_eq!(count(&r, "delivered"), 10_000);
    assert_eq!(count(&r, "lost"), 0);
    assert_eq!(count(&r, "duplicated"), 0);
    assert_eq!(latency_count(&r, "delivery"), 10_000);
}

#[test]
fn rtt_sends_on_schedule_and_gets_every_echo() {
    let gw = gateway();
    // 50 clients at 500 msg/s in all for 2 s: 20 each, 1,000 in all; then doubled once.
    let r = run(
        &gw,
        &[
            "rtt",
            "--clients",
            "50",
            "--rate",
            "500",
            "--secs",
            "2",
            "--find-max",
            "--max-rate",
            "1000",
            // Whether a step holds must not hang on this machine's load: only loss decides.
            "--p99-limit-ms",
            "60000",
            "--late-ms",
            "60000",
            "--per-worker",
            "25",
        ],
    );
    assert_eq!(r["workers"], 2);
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{steps:#?}");
    assert_eq!(steps[0]["sent"], 1_000);
    assert_eq!(steps[1]["sent"], 2_000);
    assert_eq!(count(&r, "sent"), 3_000);
    assert_eq!(count(&r, "acked"), 3_000);
    assert_eq!(count(&r, "echoed"), 3_000);
    assert_eq!(count(&r, "lost"), 0);
    assert_eq!(count(&r, "duplicated"), 0);
    assert_eq!(latency_count(&r, "ack"), 3_000);
    assert_eq!(latency_count(&r, "echo"), 3_000);
}

#[test]
fn resume_storm_loses_and_duplicates_nothing() {
    let gw = gateway();
    // Two workers, so half the messages cross from one worker's clients to the other's;
    // the cut comes in two waves while messages are in flight.
    let r = run(
        &gw,
        &[
            "resume-storm",
            "--n",
            "200",
            "--messages",
            "5",
            "--send-secs",
            "2",
            "--cut-at-ms",
            "1000",
            "--waves",
            "2",
            "--wave-gap-ms",
            "300",
            "--backoff-ms",
            "300",
            "--per-worker",
            "100",
            "--recover",
            "30",
        ],
    );
    assert_eq!(r["workers"], 2);
    assert_eq!(count(&r, "connections up"), 200);
    assert_eq!(count(&r, "cut"), 200);
    assert_eq!(count(&r, "resumed"), 200);
    assert_eq!(count(&r, "not resumed"), 0);
    assert_eq!(count(&r, "messages expected"), 1_000);
    assert_eq!(count(&r, "received"), 1_000);
    assert_eq!(count(&r, "uplinks acked"), 1_000);
    assert_eq!(count(&r, "lost"), 0);
    assert_eq!(count(&r, "duplicated"), 0);
    assert_eq!(count(&r, "recovery timeouts"), 0);
}

#[test]
fn refuses_a_remote_gateway_without_allow_remote() {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-loadtest"))
        .args(["--addr", "192.0.2.1:14000", "storm", "--n", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}
