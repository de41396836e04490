//! The admin port as an operator meets it (gateway/ADMIN.md): every endpoint with the token;
//! without it or with a wrong one, 401 (403 when no token is configured) and nothing done;
//! the open probes; where it may listen; its deadlines, connection cap and accept backoff;
//! and the secrets `--print-config` must not show.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tether_codec::{Frame, Header};
use tether_gateway::admin::ADMIN_TOKEN_ENV;
use tether_gateway::config::Config;
use tether_gateway::{Gateway, Options};
use tether_protocol::pb;

const WRONG_TOKEN: &str = "not-the-admin-token-at-all";

/// Every endpoint that needs the token: (method, path, body).
const PROTECTED: &[(&str, &str, &str)] = &[
    ("GET", "/online", ""),
    ("GET", "/users/alice/sessions", ""),
    ("GET", "/rooms/lobby/members", ""),
    (
        "POST",
        "/push",
        r#"{"target":{"user":"alice"},"text":"forged"}"#,
    ),
    ("POST", "/push", r#"{"target":"all","text":"forged"}"#),
    ("POST", "/kick", r#"{"user":"alice"}"#),
    ("POST", "/drain", ""),
];

/// The tests that run without a token need none in the environment either.
fn no_token_in_env() {
    assert!(
        std::env::var_os(ADMIN_TOKEN_ENV).is_none(),
        "run these tests without {ADMIN_TOKEN_ENV} in the environment"
    );
}

fn with_token() -> Gateway {
    start(|c| c.admin_token_file = admin_token_file())
}

/// alice, logged in and in room "lobby".
fn alice(g: &Gateway) -> Raw {
    let mut c = Raw::connect(g.addrs()[0]);
    assert_eq!(
        c.login("alice", "phone", None).code,
        pb::ErrorCode::Ok as i32
    );
    c.send(&Frame::new(Header::RoomJoin(Box::new(pb::RoomJoin {
        request_id: 1,
        room_id: "lobby".into(),
    }))));
    let Header::RoomResult(r) = c.recv().header else {
        panic!("expected ROOM_RESULT")
    };
    assert_eq!(r.code, pb::ErrorCode::Ok as i32);
    c
}

/// Nothing that a refused request would have done was done: alice is still logged in, got
/// no push (the first downlink she sees is one pushed now, by the gateway itself), and the
/// gateway is not draining.
fn nothing_happened(g: &Gateway, alice: &mut Raw) {
    assert_eq!(g.node().user_sessions("alice").len(), 1, "alice not kicked");
    assert!(!g.node().is_draining(), "not draining");
    let admin = g.admin_addr().unwrap();
    assert_eq!(http(admin, "GET", "/readyz", None, "").status, 200);
    let target = tether_gateway::node::Target::User("alice".into());
    g.node()
        .push(&target, &tether_gateway::node::Push::new(0, "marker"));
    let (_, body) = alice.downlink();
    assert_eq!(&body[..], b"marker", "no forged push came first");
}

#[test]
fn every_endpoint_works_with_the_token() {
    let g = with_token();
    let admin = g.admin_addr().unwrap();
    let mut a = alice(&g);
    let t = Some(ADMIN_TOKEN);

    let r = http(admin, "GET", "/healthz", t, "");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = http(admin, "GET", "/readyz", t, "");
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    let r = http(admin, "GET", "/metrics", t, "");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("tether_connections 1"), "{}", r.body);
    let r = http(admin, "GET", "/online", t, "");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, r#"{"connections":1,"sessions":1}"#)
    );
    let r = http(admin, "GET", "/users/alice/sessions", t, "");
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v[0]["device"], "phone", "{v}");
    assert_eq!(v[0]["rooms"], serde_json::json!(["lobby"]), "{v}");
    let r = http(admin, "GET", "/rooms/lobby/members", t, "");
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v[0]["user"], "alice", "{v}");

    let r = http(
        admin,
        "POST",
        "/push",
        t,
        r#"{"target":{"user":"alice"},"text":"from ops"}"#,
    );
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            200,
            r#"{"delivered":1,"held":0,"refused":0,"refused_full":0,"sent":1}"#
        )
    );
    assert_eq!(text_of(&a.downlink().1), "from ops");
    let r = http(admin, "POST", "/push", t, r#"{"target":{"nobody":1}}"#);
    assert_eq!(r.status, 400, "{}", r.body);

    let r = http(admin, "POST", "/kick", t, r#"{"user":"alice"}"#);
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"kicked":1}"#));
    let Header::Kick(k) = a.recv().header else {
        panic!("expected KICK")
    };
    assert_eq!(k.reason, pb::KickReason::Admin as i32);
    eventually(|| g.node().user_sessions("alice").is_empty());

    assert_eq!(http(admin, "GET", "/nowhere", t, "").status, 404);
    let r = http(admin, "POST", "/drain", t, "");
    assert_eq!((r.status, r.body.as_str()), (202, r#"{"draining":true}"#));
    assert_eq!(http(admin, "GET", "/readyz", None, "").status, 503);
}

#[test]
fn without_the_token_or_with_a_wrong_one_every_protected_endpoint_is_401_and_does_nothing() {
    let g = with_token();
    let admin = g.admin_addr().unwrap();
    let mut a = alice(&g);
    let auths = [
        String::new(),
        format!("authorization: Bearer {WRONG_TOKEN}\r\n"),
        // The right token, a prefix of it, or in the wrong scheme.
        format!("authorization: Bearer {}\r\n", &ADMIN_TOKEN[..20]),
        format!("authorization: Basic {ADMIN_TOKEN}\r\n"),
        format!("authorization: {ADMIN_TOKEN}\r\n"),
        "authorization: Bearer\r\n".to_string(),
    ];
    let metrics = ("GET", "/metrics", "");
    for &(method, path, body) in PROTECTED.iter().chain([&metrics]) {
        for auth in &auths {
            let r = http_raw(
                admin,
                &format!(
                    "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                ),
            );
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {r:?}");
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|h| h.starts_with("Bearer")),
                "{r:?}"
            );
            assert!(r.body.contains("\"error\""), "{r:?}");
        }
    }
    nothing_happened(&g, &mut a);
    // The probes need nothing.
    assert_eq!(http(admin, "GET", "/healthz", None, "").status, 200);
    assert_eq!(
        http(admin, "GET", "/readyz", Some(WRONG_TOKEN), "").status,
        200
    );
}

#[test]
fn without_a_configured_token_only_the_probes_and_metrics_are_served() {
    no_token_in_env();
    let g = start(|_| {});
    let admin = g.admin_addr().unwrap();
    let mut a = alice(&g);
    assert_eq!(http(admin, "GET", "/healthz", None, "").status, 200);
    assert_eq!(http(admin, "GET", "/readyz", None, "").status, 200);
    let r = http(admin, "GET", "/metrics", None, "");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("tether_connections 1"), "{}", r.body);
    for &(method, path, body) in PROTECTED {
        for token in [None, Some(ADMIN_TOKEN)] {
            let r = http(admin, method, path, token, body);
            assert_eq!(r.status, 403, "{method} {path}: {r:?}");
            assert!(
                r.body.contains("admin token") && r.body.contains(ADMIN_TOKEN_ENV),
                "the error says what to configure: {}",
                r.body
            );
        }
    }
    nothing_happened(&g, &mut a);
}

#[test]
fn metrics_are_open_with_admin_metrics_public_and_nothing_else_is() {
    let g = start(|c| {
        c.admin_token_file = admin_token_file();
        c.admin_metrics_public = true;
    });
    let admin = g.admin_addr().unwrap();
    let r = http(admin, "GET", "/metrics", None, "");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("tether_connections"), "{}", r.body);
    assert_eq!(http(admin, "GET", "/online", None, "").status, 401);
    assert_eq!(
        http(admin, "GET", "/online", Some(ADMIN_TOKEN), "").status,
        200
    );
}

fn start_err(f: impl FnOnce(&mut Config)) -> String {
    let mut c = config();
    f(&mut c);
    Gateway::start(c, Options::default())
        .expect_err("the gateway must refuse to start")
        .to_string()
}

#[test]
fn an_admin_port_beyond_loopback_needs_a_token() {
    no_token_in_env();
    for addr in [
        "0.0.0.0:0",
        "[::]:0",
        "192.0.2.1:14080",
        "admin.example:14080",
    ] {
        let e = start_err(|c| c.admin_listen = addr.into());
        assert!(
            e.contains("not a loopback address") && e.contains("admin_token_file"),
            "{addr}: {e}"
        );
    }
    // With a token it starts (and warns that the token travels in plain HTTP).
    let g = start(|c| {
        c.admin_listen = "0.0.0.0:0".into();
        c.admin_token_file = admin_token_file();
    });
    let port = g.admin_addr().unwrap().port();
    let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(http(local, "GET", "/online", None, "").status, 401);
    assert_eq!(
        http(local, "GET", "/online", Some(ADMIN_TOKEN), "").status,
        200
    );
    // Loopback in any spelling needs none.
    for addr in ["127.0.0.1:0", "127.0.0.2:0", "localhost:0", "[::1]:0"] {
        let mut c = config();
        c.admin_listen = addr.into();
        c.validate().unwrap_or_else(|e| panic!("{addr}: {e}"));
    }
}

#[test]
fn a_short_or_unreadable_admin_token_is_refused_at_start() {
    let short = write_temp("short-token", "fifteen-bytes!!\n");
    let e = start_err(|c| c.admin_token_file = short);
    assert!(e.contains("15 bytes") && e.contains("at least 16"), "{e}");
    let e = start_err(|c| c.admin_token_file = "/nonexistent/tether-token".into());
    assert!(e.contains("/nonexistent/tether-token"), "{e}");
}

#[test]
fn a_short_auth_secret_is_refused() {
    let e = start_err(|c| c.auth_secret = "x".into());
    assert!(
        e.contains("auth_secret") && e.contains("at least 32"),
        "{e}"
    );
    let e = start_err(|c| c.auth_secret = "a".repeat(31));
    assert!(e.contains("31 bytes"), "{e}");
    let mut c = config();
    c.auth_secret = "a".repeat(32);
    c.validate().unwrap();
    // Development mode may leave it empty.
    c.auth_secret = String::new();
    c.dev_auth = true;
    c.validate().unwrap();
    // The binary says so and exits 2.
    let out = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .args(["--auth-secret", "short", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", ""])
        .env_remove(ADMIN_TOKEN_ENV)
        .env("TETHER_LOG", "error")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth_secret is 5 bytes"), "{err}");
}

#[test]
fn print_config_shows_no_secret() {
    let secret = "a-long-and-secret-hmac-key-0123456789";
    let admin_token = "an-admin-token-from-the-environment";
    let run = |args: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether-gateway"));
        cmd.args(args)
            .arg("--print-config")
            .env_remove(ADMIN_TOKEN_ENV);
        if let Some(t) = token {
            cmd.env(ADMIN_TOKEN_ENV, t);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let out = run(&["--auth-secret", secret], Some(admin_token));
    assert!(!out.contains(secret), "{out}");
    assert!(!out.contains(admin_token), "{out}");
    assert!(out.contains("auth_secret: \"<redacted>\""), "{out}");
    assert!(out.contains("admin token: <redacted>"), "{out}");
    // Given through the environment, the same.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether-gateway"));
    let out = cmd
        .arg("--print-config")
        .env("TETHER_AUTH_SECRET", secret)
        .env_remove(ADMIN_TOKEN_ENV)
        .output()
        .unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(!out.contains(secret) && out.contains("<redacted>"), "{out}");
    // Nothing set: said so.
    let out = run(&["--dev-auth"], None);
    assert!(out.contains("auth_secret: \"<unset>\""), "{out}");
    assert!(out.contains("admin token: <unset>"), "{out}");
}

/// Reads until the server closes the connection, within `limit`; how long that took, or
/// `None` if it was still open then. What came before the close is returned too.
fn until_closed(s: &mut TcpStream, limit: Duration) -> (Option<Duration>, Vec<u8>) {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (Some(start.elapsed()), got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return (Some(start.elapsed()), got)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (None, got)
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn a_request_whose_headers_do_not_arrive_in_time_is_closed() {
    let g = start(|c| c.admin_header_timeout_ms = 200);
    let admin = g.admin_addr().unwrap();
    let start = Instant::now();
    // Half a request, then nothing.
    let mut half = TcpStream::connect(admin).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-and-then")
        .unwrap();
    // And a connection that never says anything.
    let mut silent = TcpStream::connect(admin).unwrap();
    for s in [&mut half, &mut silent] {
        let (closed, _) = until_closed(s, Duration::from_secs(8));
        assert!(
            closed.is_some(),
            "closed by the server within 8 s, not left open"
        );
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "not before the timeout"
        );
    }
    // The next one is served.
    assert_eq!(http(admin, "GET", "/healthz", None, "").status, 200);
}

#[test]
fn a_body_that_does_not_arrive_in_time_gets_408() {
    let g = start(|c| {
        c.admin_token_file = admin_token_file();
        c.admin_body_timeout_ms = 200;
    });
    let admin = g.admin_addr().unwrap();
    let mut s = TcpStream::connect(admin).unwrap();
    write!(
        s,
        "POST /push HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-length: 100\r\n\r\n{{\"target\""
    )
    .unwrap();
    let (closed, got) = until_closed(&mut s, Duration::from_secs(8));
    assert!(closed.is_some(), "closed within 8 s");
    let r = parse_http(&String::from_utf8_lossy(&got));
    assert_eq!(r.status, 408, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"));
}

/// Reads one whole `/healthz` answer from a kept-alive connection.
fn healthz_answer(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"ok\n") {
        let n = s.read(&mut buf).expect("an answer within the guard");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn connections_past_the_cap_are_closed_at_once() {
    const CAP: usize = 4;
    let g = start(|c| {
        c.admin_max_connections = CAP;
        // Long enough never to end a held connection during the test.
        c.admin_header_timeout_ms = 60_000;
    });
    let admin = g.admin_addr().unwrap();
    let keep_alive = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    // CAP connections, each answered once (so each surely holds a slot) and kept open.
    let mut held: Vec<TcpStream> = (0..CAP)
        .map(|_| {
            let mut s = TcpStream::connect(admin).unwrap();
            s.set_read_timeout(Some(GUARD)).unwrap();
            s.write_all(keep_alive).unwrap();
            assert!(healthz_answer(&mut s).starts_with("HTTP/1.1 200"));
            s
        })
        .collect();
    // Past the cap: closed without an answer, well before any timeout.
    for _ in 0..3 {
        let mut s = TcpStream::connect(admin).unwrap();
        let _ = s.write_all(keep_alive);
        let (closed, got) = until_closed(&mut s, Duration::from_secs(20));
        assert!(closed.is_some(), "closed by the server");
        assert!(
            got.is_empty(),
            "no answer: {}",
            String::from_utf8_lossy(&got)
        );
    }
    // The held ones are still served.
    for s in &mut held {
        s.write_all(keep_alive).unwrap();
        assert!(healthz_answer(s).starts_with("HTTP/1.1 200"));
    }
    // Once they are gone, a new connection is served (the server frees a slot when it has
    // seen the close: retried until then).
    drop(held);
    let start = Instant::now();
    loop {
        let mut s = TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        if resp.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(start.elapsed() < GUARD, "no slot freed within the guard");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// CPU seconds (user + system) the process has used, from /proc.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat(5); 12 and 13 after the comm.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    ticks / 100.0
}

#[test]
fn out_of_descriptors_the_admin_accept_loop_backs_off_instead_of_spinning() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = std::env::temp_dir().join(format!("tether-admin-emfile-{}.log", std::process::id()));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 64 && exec {} --dev-auth --workers 1 --listen 127.0.0.1:0 --admin-listen {admin} --admin-max-connections 1000 --admin-header-timeout-ms 60000",
            env!("CARGO_BIN_EXE_tether-gateway")
        ))
        .env_remove(ADMIN_TOKEN_ENV)
        .env("TETHER_LOG", "warn")
        // The log goes to standard output.
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    eventually(|| {
        assert!(child.try_wait().unwrap().is_none(), "the gateway exited");
        TcpStream::connect(admin).is_ok()
    });
    let child = Kill(child);
    // More connections than the process has descriptors: the kernel completes them all,
    // the gateway can accept only some.
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(admin).unwrap())
        .collect();
    // Out of descriptors now (the last connections wait in the backlog): a spinning accept
    // loop would burn a core; a backing-off one almost nothing.
    std::thread::sleep(Duration::from_millis(300));
    let (t0, c0) = (Instant::now(), cpu_secs(pid));
    std::thread::sleep(Duration::from_secs(2));
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_secs(pid) - c0);
    assert!(
        cpu < 0.15 * wall,
        "the gateway used {cpu:.2} s of CPU in {wall:.2} s while out of descriptors"
    );
    // It said so, at most once a second.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.matches("admin accept failed").count();
    assert!(
        (1..=4).contains(&lines),
        "{lines} log lines in ~2.3 s:\n{text}"
    );
    // Descriptors back: it accepts again.
    drop(idle);
    let start = Instant::now();
    loop {
        let ok = TcpStream::connect(admin).is_ok_and(|mut s| {
            s.set_read_timeout(Some(GUARD)).unwrap();
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            let mut resp = Vec::new();
            let _ = s.read_to_end(&mut resp);
            resp.starts_with(b"HTTP/1.1 200")
        });
        if ok {
            break;
        }
        assert!(
            start.elapsed() < GUARD,
            "not accepting again within the guard"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(child);
}
