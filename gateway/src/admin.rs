//! The admin and metrics HTTP server (loopback by default; `admin_listen`), on its own
//! thread with a small tokio runtime, away from the workers. Every endpoint, its
//! authentication, bodies, status codes and a `curl` line: [`gateway/ADMIN.md`](../ADMIN.md).
//!
//! | method and path | auth | what |
//! |---|---|---|
//! | `GET /healthz`, `GET /readyz` | none | liveness; readiness (503 while draining) |
//! | `GET /metrics` | token, unless `admin_metrics_public` or no token is configured | Prometheus text |
//! | `GET /online`, `GET /users/{user}/sessions`, `GET /rooms/{room}/members` | token | queries |
//! | `POST /push`, `POST /kick`, `POST /drain` | token | actions |
//!
//! The token (`Authorization: Bearer <token>`, at least [`MIN_ADMIN_TOKEN_LEN`] bytes) comes
//! from the file `admin_token_file` or the environment variable [`ADMIN_TOKEN_ENV`], never
//! from a flag. Without one, only the open endpoints and `/metrics` are served, and only on
//! a loopback address; the others answer 403. Each connection has `admin_header_timeout_ms`
//! to send a request's headers (an idle keep-alive connection too) and
//! `admin_body_timeout_ms` for its body; at most `admin_max_connections` are open at once.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prost::Message as _;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tether_protocol::chat::{chat_message, ChatMessage, Text};
use tether_protocol::pb::KickReason;

use crate::config::{split_port, Config};
use crate::node::{hex, Node, Push, Target};
use crate::worker::is_resource_error;

/// Largest admin request body: 1 MiB.
pub const MAX_ADMIN_BODY: usize = 1 << 20;

/// Shortest admin token accepted, bytes (after trimming whitespace).
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// The environment variable holding the admin token when `admin_token_file` is not set.
/// Read from the environment only: a token on a command line is visible to every local
/// user (`ps`, `/proc/<pid>/cmdline`).
pub const ADMIN_TOKEN_ENV: &str = "TETHER_ADMIN_TOKEN";

/// First pause of the accept loop after EMFILE, ENFILE, ENOBUFS or ENOMEM; it doubles up to
/// `accept_backoff_max_ms`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// Shortest interval between two log lines about refused or failed admin connections.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The admin bearer token, held only as its SHA-256 digest.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

impl AdminToken {
    /// A token from its text, trimmed of whitespace; `what` names where it came from, for
    /// the error.
    pub fn new(text: &str, what: &str) -> Result<AdminToken, String> {
        let t = text.trim();
        if t.len() < MIN_ADMIN_TOKEN_LEN {
            return Err(format!(
                "admin token from {what} is {} bytes; it must be at least {MIN_ADMIN_TOKEN_LEN} \
                 (e.g. `head -c 24 /dev/urandom | base64`)",
                t.len()
            ));
        }
        Ok(AdminToken(sha256(t.as_bytes())))
    }

    /// Whether `presented` is the token, in time independent of where they differ (the
    /// digests of both are compared, so their lengths do not matter either).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let d = sha256(presented);
        let diff = d.iter().zip(&self.0).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

/// The admin token `config` names: the trimmed content of `admin_token_file` if set, else
/// [`ADMIN_TOKEN_ENV`] if set; `None` when neither is. An unreadable file, or a token shorter
/// than [`MIN_ADMIN_TOKEN_LEN`], is an error.
pub fn load_token(config: &Config) -> Result<Option<AdminToken>, String> {
    if !config.admin_token_file.is_empty() {
        let text = std::fs::read_to_string(&config.admin_token_file)
            .map_err(|e| format!("admin_token_file {}: {e}", config.admin_token_file))?;
        let what = format!("admin_token_file {}", config.admin_token_file);
        return AdminToken::new(&text, &what).map(Some);
    }
    match std::env::var(ADMIN_TOKEN_ENV) {
        Ok(t) => AdminToken::new(&t, ADMIN_TOKEN_ENV).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(format!("{ADMIN_TOKEN_ENV}: {e}")),
    }
}

/// Whether `addr` (`host:port`) is a loopback address: 127.0.0.0/8, `::1` (also as
/// `::ffff:127.x.x.x`) or `localhost`. Anything else, names included, is not.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return is_loopback_ip(a.ip());
    }
    split_port(addr).is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

fn is_loopback_ip(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Checks the admin settings; called by [`Config::validate`].
pub fn validate(config: &Config) -> Result<(), String> {
    if config.admin_listen.is_empty() {
        return Ok(());
    }
    let token = load_token(config)?;
    if token.is_none() && !is_loopback(&config.admin_listen) {
        return Err(format!(
            "admin_listen {} is not a loopback address and no admin token is configured: \
             set admin_token_file or {ADMIN_TOKEN_ENV} (see gateway/ADMIN.md), or listen on \
             127.0.0.1",
            config.admin_listen
        ));
    }
    if config.admin_header_timeout_ms == 0 || config.admin_body_timeout_ms == 0 {
        return Err("admin_header_timeout_ms and admin_body_timeout_ms must be positive".into());
    }
    if config.admin_max_connections == 0 {
        return Err("admin_max_connections must be positive".into());
    }
    Ok(())
}

/// The accept loop's pause after running out of something: [`ACCEPT_BACKOFF_MIN`], doubling
/// up to `max`, back to the start after a successful accept.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: ACCEPT_BACKOFF_MIN,
            max: max.max(ACCEPT_BACKOFF_MIN),
        }
    }

    fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn succeeded(&mut self) {
        self.next = ACCEPT_BACKOFF_MIN;
    }
}

/// At most one log line per [`LOG_INTERVAL`].
#[derive(Debug, Default)]
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self.0.is_some_and(|t| now.duration_since(t) < LOG_INTERVAL) {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

/// A running admin server.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What every request of the admin server sees.
struct State {
    node: Arc<Node>,
    token: Option<AdminToken>,
    metrics_public: bool,
    body_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PushTarget {
    User(String),
    Users(Vec<String>),
    Room(String),
    Session(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetSpec {
    All(String),
    One(PushTarget),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRequest {
    target: TargetSpec,
    #[serde(default)]
    body_type: u32,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    body_base64: Option<String>,
    #[serde(default)]
    transient: bool,
}

#[derive(Debug, Deserialize)]
struct KickRequest {
    user: String,
}

/// The endpoints, and who may call them.
enum Route {
    Metrics,
    Healthz,
    Readyz,
    Online,
    UserSessions(String),
    RoomMembers(String),
    Push,
    Kick,
    Drain,
}

impl Route {
    fn of(method: &Method, path: &str) -> Option<Route> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        Some(match (method, parts.as_slice()) {
            (&Method::GET, ["metrics"]) => Route::Metrics,
            (&Method::GET, ["healthz"]) => Route::Healthz,
            (&Method::GET, ["readyz"]) => Route::Readyz,
            (&Method::GET, ["online"]) => Route::Online,
            (&Method::GET, ["users", user, "sessions"]) => Route::UserSessions((*user).into()),
            (&Method::GET, ["rooms", room, "members"]) => Route::RoomMembers((*room).into()),
            (&Method::POST, ["push"]) => Route::Push,
            (&Method::POST, ["kick"]) => Route::Kick,
            (&Method::POST, ["drain"]) => Route::Drain,
            _ => return None,
        })
    }

    /// Whether the route is served without the token: the probes always, `/metrics` when
    /// `admin_metrics_public` says so or when no token is configured (then the server is on
    /// loopback, `validate`).
    fn is_open(&self, state: &State) -> bool {
        match self {
            Route::Healthz | Route::Readyz => true,
            Route::Metrics => state.metrics_public || state.token.is_none(),
            _ => false,
        }
    }
}

/// The request's bearer token, if it has an `Authorization: Bearer <token>` header.
fn bearer(req: &Request<Incoming>) -> Option<&[u8]> {
    let v = req.headers().get(hyper::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

/// `None` when the request may use a route that needs the token; else the 403 (no token
/// configured) or 401 (missing or wrong token) to answer.
fn refusal(state: &State, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let Some(token) = &state.token else {
        return Some(json_reply(
            StatusCode::FORBIDDEN,
            json!({ "error": format!(
                "no admin token is configured: set admin_token_file or {ADMIN_TOKEN_ENV} \
                 (at least {MIN_ADMIN_TOKEN_LEN} bytes) to use this endpoint; see gateway/ADMIN.md"
            ) }),
        ));
    };
    match bearer(req) {
        Some(t) if token.matches(t) => None,
        given => {
            let mut r = json_reply(
                StatusCode::UNAUTHORIZED,
                json!({ "error": if given.is_some() {
                    "wrong admin token"
                } else {
                    "this endpoint needs the header `Authorization: Bearer <admin token>`"
                } }),
            );
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer realm=\"tether-admin\""),
            );
            Some(r)
        }
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>, ctype: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json_reply(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, v.to_string(), "application/json")
}

fn bad(msg: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json_reply(StatusCode::BAD_REQUEST, json!({ "error": msg.to_string() }))
}

fn parse_target(t: TargetSpec) -> Result<Target, String> {
    Ok(match t {
        TargetSpec::All(s) if s == "all" => Target::All,
        TargetSpec::All(s) => return Err(format!("unknown target {s:?}")),
        TargetSpec::One(PushTarget::User(u)) => Target::User(u),
        TargetSpec::One(PushTarget::Users(u)) => Target::Users(u),
        TargetSpec::One(PushTarget::Room(r)) => Target::Room(r),
        TargetSpec::One(PushTarget::Session(h)) => {
            let bytes: Vec<u8> = (0..h.len())
                .step_by(2)
                .map(|i| h.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
                .collect::<Option<_>>()
                .ok_or("session: not hex")?;
            Target::Session(bytes.try_into().map_err(|_| "session: not 16 bytes")?)
        }
    })
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Some(route) = Route::of(req.method(), req.uri().path()) else {
        return Ok(json_reply(
            StatusCode::NOT_FOUND,
            json!({ "error": "no such endpoint (see gateway/ADMIN.md)" }),
        ));
    };
    if !route.is_open(&state) {
        if let Some(r) = refusal(&state, &req) {
            return Ok(r);
        }
    }
    // The whole body within the deadline: a client that sends its headers and then trickles
    // (or withholds) the body does not hold the connection longer than that.
    let collect = Limited::new(req.into_body(), MAX_ADMIN_BODY).collect();
    let body = match tokio::time::timeout(state.body_timeout, collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Ok(closing(json_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "error": format!("body over {MAX_ADMIN_BODY} bytes") }),
            )))
        }
        Ok(Err(e)) => return Ok(bad(format!("body: {e}"))),
        Err(_) => {
            return Ok(closing(json_reply(
                StatusCode::REQUEST_TIMEOUT,
                json!({ "error": format!("body not received within {:?}", state.body_timeout) }),
            )))
        }
    };
    let node = &state.node;
    let r = match route {
        Route::Metrics => reply(
            StatusCode::OK,
            node.metrics.encode(),
            "text/plain; version=0.0.4",
        ),
        Route::Healthz => reply(StatusCode::OK, "ok\n", "text/plain"),
        Route::Readyz if node.is_draining() => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "draining\n", "text/plain")
        }
        Route::Readyz => reply(StatusCode::OK, "ready\n", "text/plain"),
        Route::Online => json_reply(
            StatusCode::OK,
            json!({ "connections": node.connections(), "sessions": node.session_count() }),
        ),
        Route::UserSessions(user) => {
            let list: Vec<_> = node
                .user_sessions(&user)
                .iter()
                .map(|s| {
                    let (unacked, unacked_bytes, last_seq) = s.downlink_state();
                    json!({
                        "session_id": hex(&s.id),
                        "device": s.device(),
                        "platform": s.platform().as_str_name(),
                        "attached": s.is_attached(),
                        "rooms": s.rooms().iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                        "unacked": unacked,
                        "unacked_bytes": unacked_bytes,
                        "last_seq": last_seq,
                    })
                })
                .collect();
            json_reply(StatusCode::OK, json!(list))
        }
        Route::RoomMembers(room) => {
            let list: Vec<_> = node
                .room_members(&room)
                .iter()
                .map(
                    |s| json!({ "session_id": hex(&s.id), "user": s.user(), "device": s.device() }),
                )
                .collect();
            json_reply(StatusCode::OK, json!(list))
        }
        Route::Push => match serde_json::from_slice::<PushRequest>(&body) {
            Err(e) => bad(e),
            Ok(p) => match parse_target(p.target) {
                Err(e) => bad(e),
                Ok(target) => {
                    let body = match (p.text, p.body_base64) {
                        (Some(text), None) => ChatMessage {
                            sender: "admin".into(),
                            sent_at_ms: node.clock.unix_ms(),
                            content: Some(chat_message::Content::Text(Text { text })),
                            ..Default::default()
                        }
                        .encode_to_vec()
                        .into(),
                        (None, Some(b)) => {
                            match base64::engine::general_purpose::STANDARD.decode(b) {
                                Ok(b) => Bytes::from(b),
                                Err(e) => return Ok(bad(format!("body_base64: {e}"))),
                            }
                        }
                        _ => return Ok(bad("give exactly one of text and body_base64")),
                    };
                    let push = Push {
                        body_type: p.body_type,
                        body,
                        gzip: None,
                        transient: p.transient,
                        receipt: 0,
                    };
                    let n = node.push(&target, &push);
                    json_reply(
                        StatusCode::OK,
                        json!({
                            "delivered": n.accepted(),
                            "sent": n.sent,
                            "held": n.held,
                            "refused_full": n.full.len(),
                            "refused": n.refused,
                        }),
                    )
                }
            },
        },
        Route::Kick => match serde_json::from_slice::<KickRequest>(&body) {
            Err(e) => bad(e),
            Ok(k) => json_reply(
                StatusCode::OK,
                json!({ "kicked": node.kick_user(&k.user, KickReason::Admin) }),
            ),
        },
        Route::Drain => {
            node.drain();
            json_reply(StatusCode::ACCEPTED, json!({ "draining": true }))
        }
    };
    Ok(r)
}

/// `r`, telling the client the connection closes after it (its body was not read to the end).
fn closing(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    r
}

impl AdminServer {
    /// Binds `addr` and serves the admin endpoints with `node`'s settings (`admin_*`, the
    /// token from [`load_token`]). Refuses a non-loopback address without a token.
    pub fn start(node: Arc<Node>, addr: &str) -> std::io::Result<AdminServer> {
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let config = &node.config;
        let token = load_token(config).map_err(invalid)?;
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        if !is_loopback_ip(addr.ip()) {
            if token.is_none() {
                return Err(invalid(format!(
                    "admin server on {addr}, not a loopback address, without an admin token \
                     (admin_token_file or {ADMIN_TOKEN_ENV})"
                )));
            }
            tracing::warn!(
                %addr,
                "the admin server listens beyond loopback, in plain HTTP: its token crosses \
                 the network in the clear unless something in front of it speaks TLS"
            );
        }
        if token.is_none() {
            tracing::info!(
                %addr,
                "no admin token: only /healthz, /readyz and /metrics are served (gateway/ADMIN.md)"
            );
        }
        let header_timeout = Duration::from_millis(config.admin_header_timeout_ms.into());
        let max_connections = config.admin_max_connections;
        let mut backoff = Backoff::new(Duration::from_millis(config.accept_backoff_max_ms.into()));
        let state = Arc::new(State {
            token,
            metrics_public: config.admin_metrics_public,
            body_timeout: Duration::from_millis(config.admin_body_timeout_ms.into()),
            node: node.clone(),
        });
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("tether-admin".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        return;
                    };
                    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
                    let mut http = hyper::server::conn::http1::Builder::new();
                    // The header timeout runs from the moment hyper waits for a request: it
                    // also ends an idle (keep-alive or never used) connection.
                    http.timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(header_timeout);
                    let mut full_log = Throttle::default();
                    let mut error_log = Throttle::default();
                    loop {
                        let accepted = tokio::select! {
                            _ = &mut stop_rx => break,
                            accepted = listener.accept() => accepted,
                        };
                        let stream = match accepted {
                            Ok((stream, _)) => {
                                backoff.succeeded();
                                stream
                            }
                            Err(e) if is_resource_error(&e) => {
                                // Retrying at once would fail the same way, as fast as the
                                // loop turns.
                                let pause = backoff.failed();
                                if error_log.ready() {
                                    tracing::warn!("admin accept failed: {e}; pausing {pause:?}");
                                }
                                tokio::select! {
                                    _ = &mut stop_rx => break,
                                    _ = tokio::time::sleep(pause) => continue,
                                }
                            }
                            Err(e) => {
                                // ECONNABORTED and the like: that connection is gone, the next
                                // one may not be.
                                if error_log.ready() {
                                    tracing::debug!("admin accept failed: {e}");
                                }
                                continue;
                            }
                        };
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            if full_log.ready() {
                                tracing::warn!(
                                    max_connections,
                                    "admin connections at the cap: closing new ones"
                                );
                            }
                            drop(stream);
                            continue;
                        };
                        let state = state.clone();
                        let conn = http.serve_connection(
                            hyper_util::rt::TokioIo::new(stream),
                            hyper::service::service_fn(move |req| handle(state.clone(), req)),
                        );
                        tokio::spawn(async move {
                            let _ = conn.await;
                            drop(slot);
                        });
                    }
                })
            })?;
        Ok(AdminServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves() {
        let t = AdminToken::new("  0123456789abcdef\n", "test").unwrap();
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert!(!t.matches(b"0123456789abcde"));
        assert!(!t.matches(b""));
        assert!(AdminToken::new("0123456789abcde", "test")
            .unwrap_err()
            .contains("15 bytes"));
        assert_eq!(format!("{t:?}"), "AdminToken(<redacted>)");
    }

    #[test]
    fn loopback_addresses() {
        for a in [
            "127.0.0.1:1",
            "127.9.9.9:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
            "localhost:1",
        ] {
            assert!(is_loopback(a), "{a}");
        }
        for a in [
            "0.0.0.0:1",
            "[::]:1",
            "10.0.0.1:1",
            "example.com:1",
            "localhost",
            "",
        ] {
            assert!(!is_loopback(a), "{a}");
        }
    }

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(1000));
        let ms: Vec<u128> = (0..9).map(|_| b.failed().as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), ACCEPT_BACKOFF_MIN);
        // A cap below the start is the start.
        assert_eq!(Backoff::new(Duration::ZERO).failed(), ACCEPT_BACKOFF_MIN);
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_resource_error(&emfile));
        assert!(!is_resource_error(&std::io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
