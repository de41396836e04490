//! The admin and metrics HTTP server (loopback by default; `admin_listen`), on its own
//! thread with a small tokio runtime, away from the workers.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200, or 503 while draining |
//! | `GET /online` | `{"connections": n, "sessions": n}` |
//! | `GET /users/{user}/sessions` | that user's sessions |
//! | `GET /rooms/{room}/members` | a room's sessions |
//! | `POST /push` | `{"target": T, "body_type": 0, "text": "..." \| "body_base64": "...", "transient": false}` → `{"delivered": n}`; T is `"all"`, `{"user": u}`, `{"users": [..]}`, `{"room": r}` or `{"session": hex}`; `text` is sent as a `tether.chat.v1.ChatMessage` from `"admin"` |
//! | `POST /kick` | `{"user": u}` → `{"kicked": n}` |
//! | `POST /drain` | starts a drain → 202 |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prost::Message as _;
use serde::Deserialize;
use serde_json::json;
use tether_protocol::chat::{chat_message, ChatMessage, Text};
use tether_protocol::pb::KickReason;

use crate::node::{hex, Node, Push, Target};

/// Largest admin request body: 1 MiB.
pub const MAX_ADMIN_BODY: usize = 1 << 20;

/// A running admin server.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
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
    node: Arc<Node>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(bad(format!("body: {e}"))),
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let r = match (&method, parts.as_slice()) {
        (&Method::GET, ["metrics"]) => reply(
            StatusCode::OK,
            node.metrics.encode(),
            "text/plain; version=0.0.4",
        ),
        (&Method::GET, ["healthz"]) => reply(StatusCode::OK, "ok\n", "text/plain"),
        (&Method::GET, ["readyz"]) if node.is_draining() => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "draining\n", "text/plain")
        }
        (&Method::GET, ["readyz"]) => reply(StatusCode::OK, "ready\n", "text/plain"),
        (&Method::GET, ["online"]) => json_reply(
            StatusCode::OK,
            json!({ "connections": node.connections(), "sessions": node.session_count() }),
        ),
        (&Method::GET, ["users", user, "sessions"]) => {
            let list: Vec<_> = node
                .user_sessions(user)
                .iter()
                .map(|s| {
                    let (unacked, unacked_bytes, last_seq) = s.downlink_state();
                    json!({
                        "session_id": hex(&s.id),
                        "device": &*s.device,
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
        (&Method::GET, ["rooms", room, "members"]) => {
            let list: Vec<_> = node
                .room_members(room)
                .iter()
                .map(
                    |s| json!({ "session_id": hex(&s.id), "user": &*s.user, "device": &*s.device }),
                )
                .collect();
            json_reply(StatusCode::OK, json!(list))
        }
        (&Method::POST, ["push"]) => match serde_json::from_slice::<PushRequest>(&body) {
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
                            "refused_full": n.full,
                            "refused": n.refused,
                        }),
                    )
                }
            },
        },
        (&Method::POST, ["kick"]) => match serde_json::from_slice::<KickRequest>(&body) {
            Err(e) => bad(e),
            Ok(k) => json_reply(
                StatusCode::OK,
                json!({ "kicked": node.kick_user(&k.user, KickReason::Admin) }),
            ),
        },
        (&Method::POST, ["drain"]) => {
            node.drain();
            json_reply(StatusCode::ACCEPTED, json!({ "draining": true }))
        }
        _ => json_reply(
            StatusCode::NOT_FOUND,
            json!({ "error": "no such endpoint" }),
        ),
    };
    Ok(r)
}

impl AdminServer {
    pub fn start(node: Arc<Node>, addr: &str) -> std::io::Result<AdminServer> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
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
                    loop {
                        tokio::select! {
                            _ = &mut stop_rx => break,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let node = node.clone();
                                tokio::spawn(async move {
                                    let svc = hyper::service::service_fn(move |req| handle(node.clone(), req));
                                    let io = hyper_util::rt::TokioIo::new(stream);
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(io, svc)
                                        .await;
                                });
                            }
                        }
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
