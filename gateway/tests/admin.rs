//! The admin port as an operator meets it (gateway/ADMIN.md): every endpoint with the token;
//! without it or with a wrong one, 401 (403 when no token is configured) and nothing done;
//! the open probes; where it may listen; and the secrets `--print-config` must not show.

mod common;

use std::net::SocketAddr;
use std::process::Command;

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
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"delivered":1}"#));
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
