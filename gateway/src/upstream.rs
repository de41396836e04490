//! The back end behind the gateway: what the gateway tells it and what it asks of the gateway.
//!
//! The gateway calls an [`Upstream`] on its worker threads, so every method must return
//! quickly: an upstream that needs I/O (the remote upstream of a later issue, speaking the
//! reserved kinds 0x80-0xFF over the same frames) sends the request and answers later through
//! the reply object it was given. Replies can be answered from any thread. A reply dropped
//! without an answer answers `INTERNAL` itself, so a client never waits on silence.
//!
//! What the back end asks of the gateway (pushes, kicks, who is online) goes through the
//! [`Hub`] every method receives.

use std::sync::Arc;

use bytes::Bytes;
use tether_protocol::pb::{ErrorCode, KickReason};

use crate::node::{Node, Session};
pub use crate::session::downlink::Downlink;

/// The gateway as the upstream sees it: push, kick, look up.
pub type Hub = Arc<Node>;

/// A session as the upstream sees it.
pub type SessionRef = Arc<Session>;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its grace period passed with no resume.
    Expired,
    /// A newer login replaced it.
    Replaced(KickReason),
    /// Kicked by an admin or the upstream.
    Kicked(KickReason),
    /// The gateway shut down.
    Shutdown,
}

impl EndReason {
    pub fn label(&self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Replaced(_) => "replaced",
            EndReason::Kicked(_) => "kicked",
            EndReason::Shutdown => "shutdown",
        }
    }
}

/// One UPLINK as the client sent it (the body as it came, gzip or not).
#[derive(Debug, Clone)]
pub struct Uplink {
    pub msg_id: u64,
    pub body_type: u32,
    pub gzip: bool,
    pub body: Bytes,
}

/// An upstream's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: ErrorCode,
    pub retry_after_ms: u32,
    pub message: String,
    /// The answer's body, passed to the client as the UPLINK_ACK's or ROOM_RESULT's body
    /// (PROTOCOL.md §4.6, §4.13); usually empty.
    pub body: Bytes,
}

impl Outcome {
    pub fn ok() -> Outcome {
        Outcome::err(ErrorCode::Ok, "")
    }

    pub fn err(code: ErrorCode, message: impl Into<String>) -> Outcome {
        Outcome {
            code,
            retry_after_ms: 0,
            message: message.into(),
            body: Bytes::new(),
        }
    }
}

/// Receives the one answer to a request; answers `INTERNAL` if dropped unanswered, and the
/// gateway answers `UPSTREAM_TIMEOUT` for it if it is not answered within
/// `upstream_timeout_ms` (a late answer is then ignored).
pub struct Reply {
    inner: Arc<ReplyInner>,
}

type Done = Box<dyn FnOnce(Outcome) + Send>;

pub(crate) struct ReplyInner {
    done: parking_lot::Mutex<Option<Done>>,
}

impl ReplyInner {
    /// Answers if nobody has yet.
    pub(crate) fn answer(&self, outcome: Outcome) {
        let done = self.done.lock().take();
        if let Some(done) = done {
            done(outcome)
        }
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("answered", &self.inner.done.lock().is_none())
            .finish()
    }
}

impl Reply {
    pub(crate) fn new(done: impl FnOnce(Outcome) + Send + 'static) -> Reply {
        Reply {
            inner: Arc::new(ReplyInner {
                done: parking_lot::Mutex::new(Some(Box::new(done))),
            }),
        }
    }

    /// For the gateway's timeout sweep.
    pub(crate) fn watch(&self) -> std::sync::Weak<ReplyInner> {
        Arc::downgrade(&self.inner)
    }

    pub fn send(self, outcome: Outcome) {
        self.inner.answer(outcome)
    }

    pub fn ok(self) {
        self.send(Outcome::ok())
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.inner.answer(Outcome::err(
            ErrorCode::Internal,
            "the upstream dropped the request",
        ))
    }
}

/// The back end. Every method is called on a gateway worker thread and must not block.
pub trait Upstream: Send + Sync + 'static {
    /// A session logged in (`resumed`: an existing one re-attached to a new connection);
    /// `login_body` is the LOGIN frame's body as the client sent it (often empty).
    fn session_opened(&self, hub: &Hub, session: &SessionRef, resumed: bool, login_body: &Bytes);
    /// A session ended for good. `undelivered`: every downlink it had accepted and the client
    /// never acked, oldest first (their `receipt`s, bodies as pushed): the back end keeps
    /// them for the user (offline) or reports them undelivered; the gateway holds nothing of
    /// the session any more.
    fn session_ended(
        &self,
        hub: &Hub,
        session: &SessionRef,
        reason: EndReason,
        undelivered: &[Downlink],
    );
    /// An UPLINK to accept (store) or refuse: answer `reply` once.
    fn uplink(&self, hub: &Hub, session: &SessionRef, uplink: Uplink, reply: Reply);
    /// ROOM_JOIN: answer OK to let the session in (the gateway then adds it), or a code.
    fn room_join(&self, hub: &Hub, session: &SessionRef, room: &str, body: Bytes, reply: Reply);
    /// ROOM_LEAVE: answer OK to take the session out.
    fn room_leave(&self, hub: &Hub, session: &SessionRef, room: &str, reply: Reply);
    /// The client acked downlinks pushed with these non-zero receipt ids (delivery receipts).
    fn delivered(&self, hub: &Hub, session: &SessionRef, receipts: &[u64]);
    /// The gateway is draining: it stops taking connections and will exit.
    fn draining(&self, _hub: &Hub) {}
}
