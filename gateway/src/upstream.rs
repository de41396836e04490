//! The back end behind the gateway: what the gateway tells it, and what it asks of the
//! gateway, as plain values.
//!
//! The back end never holds the gateway's objects. It is told about sessions as
//! [`SessionInfo`] values (copies: id, user, device, platform, peer, attached), and it asks the
//! gateway for pushes, kicks, room membership and lookups through the small [`Hub`] trait,
//! which names sessions by id. This is the interface a back end in another process or language
//! implements a second time (the remote upstream, PROTOCOL.md §9): every request the gateway
//! makes of it is answered through a [`Reply`], which may come from any thread and any time
//! later, and which the gateway answers itself when it does not come in time
//! (`UPSTREAM_TIMEOUT`) or is dropped (`INTERNAL`). Nothing the back end does can block a
//! worker, and a panic inside it is caught at the call (counted, logged; its reply answers
//! `INTERNAL`), never unwinding a worker.
//!
//! Events, in the order a session sees them: [`Upstream::login`] (admit or refuse, later if
//! need be), [`session_opened`](Upstream::session_opened) (fresh) or
//! [`session_attached`](Upstream::session_attached) (resumed on a new connection), uplinks,
//! room requests and delivery receipts, [`session_detached`](Upstream::session_detached) when
//! its connection goes, then attached again or [`session_ended`](Upstream::session_ended) with
//! everything it accepted and never delivered.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tether_codec::Limits;
use tether_protocol::pb::{ErrorCode, KickReason, Platform};

pub use crate::session::core::{Delivery, Refusal};
pub use crate::session::downlink::Downlink;

/// 128 random bits (PROTOCOL.md §4.2).
pub type SessionId = [u8; 16];

/// A session as the back end sees it: values copied out of the gateway, to keep or send on.
/// The user and device ids share one reference-counted string with the session's own copy
/// (so an event costs no allocation): [`user`](Self::user), [`device`](Self::device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: SessionId,
    pub names: Names,
    /// The platform of the latest login or resume.
    pub platform: Platform,
    /// The address of the connection that logged in or resumed: given with the events that
    /// come with a connection ([`Upstream::login`], `session_opened`, `session_attached`),
    /// `None` on the others (the gateway does not keep it per session; a back end that needs
    /// it later keeps it from those events).
    pub peer: Option<SocketAddr>,
    /// Whether a connection is attached (false: detached, waiting for a resume).
    pub attached: bool,
}

impl SessionInfo {
    pub fn user(&self) -> &str {
        self.names.user()
    }

    pub fn device(&self) -> &str {
        self.names.device()
    }
}

/// Longest user + device ids [`Names::new`] joins on the stack (longer ones: on the heap).
const NAMES_ON_STACK: usize = 128;

/// A user id and a device id in one shared allocation.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Names {
    both: Arc<str>,
    user_len: u32,
}

impl Names {
    /// Both ids (a frame bounds their length: far below `u32::MAX`).
    pub fn new(user: &str, device: &str) -> Names {
        // One allocation, the Arc's: short names are joined on the stack first (a joined
        // String would be a second, short-lived allocation per login, and those leave holes
        // between the sessions' long-lived ones).
        let mut buf = [0u8; NAMES_ON_STACK];
        let n = user.len() + device.len();
        let both: Arc<str> = match buf.get_mut(..n) {
            Some(b) => {
                b[..user.len()].copy_from_slice(user.as_bytes());
                b[user.len()..].copy_from_slice(device.as_bytes());
                Arc::from(std::str::from_utf8(b).expect("two strs joined are UTF-8"))
            }
            None => Arc::from([user, device].concat()),
        };
        Names {
            both,
            user_len: user.len() as u32,
        }
    }

    pub fn user(&self) -> &str {
        &self.both[..self.user_len as usize]
    }

    pub fn device(&self) -> &str {
        &self.both[self.user_len as usize..]
    }
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.user(), self.device())
    }
}

/// A LOGIN the authenticator accepted, for the back end to admit or refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    /// The user and device ids ([`user`](Self::user), [`device`](Self::device)), shared
    /// with the session the login makes.
    pub names: Names,
    pub platform: Platform,
    pub peer: Option<SocketAddr>,
    /// The session the client asks to resume, if it asks (the gateway decides whether it can).
    pub resume: Option<SessionId>,
    /// The LOGIN frame's body as the client sent it (often empty).
    pub body: Bytes,
}

impl LoginRequest {
    pub fn user(&self) -> &str {
        self.names.user()
    }

    pub fn device(&self) -> &str {
        self.names.device()
    }
}

/// Who a push goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Session(SessionId),
    User(String),
    Users(Vec<String>),
    Room(String),
    All,
}

/// A downlink to push.
#[derive(Debug, Clone)]
pub struct Push {
    pub body_type: u32,
    /// The plain body; the gateway compresses it (once) for clients that take gzip.
    pub body: Bytes,
    /// The body already compressed (gzip), if the pusher has it: the gateway uses it for the
    /// sessions that take gzip instead of compressing again.
    pub gzip: Option<Bytes>,
    /// Seq 0: not buffered, not acked, only to attached sessions (typing, presence).
    pub transient: bool,
    /// Non-zero: reported back to the upstream when the client acks it.
    pub receipt: u64,
}

impl Push {
    pub fn new(body_type: u32, body: impl Into<Bytes>) -> Push {
        Push {
            body_type,
            body: body.into(),
            gzip: None,
            transient: false,
            receipt: 0,
        }
    }
}

/// What became of a push, counted over the sessions it reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Queued to attached connections.
    pub sent: usize,
    /// Held for the resume of detached sessions.
    pub held: usize,
    /// Refused by sessions whose buffer is full (retriable once they ack): these sessions.
    pub full: Vec<SessionId>,
    /// Refused for another reason (too large, a transient push to a detached session).
    pub refused: usize,
}

impl PushReport {
    /// Sessions that took it (sent or held).
    pub fn accepted(&self) -> usize {
        self.sent + self.held
    }

    pub(crate) fn add(&mut self, id: &SessionId, d: Delivery) {
        match d {
            Delivery::Sent => self.sent += 1,
            Delivery::Held => self.held += 1,
            Delivery::Refused(Refusal::Full) => self.full.push(*id),
            Delivery::Refused(Refusal::Ended) => {}
            Delivery::Refused(_) => self.refused += 1,
        }
    }
}

/// What the back end asks of the gateway. Sessions are named by id; nothing here hands out
/// the gateway's own objects. Calls return at once (no I/O): a remote back end's client
/// library implements the same calls as messages to the gateway.
pub trait Hub: Send + Sync {
    /// Pushes a downlink to every session `target` names, except those `skip` says to leave
    /// out (asked once per session, before it is pushed to).
    fn push_except(
        &self,
        target: &Target,
        push: &Push,
        skip: &mut dyn FnMut(&SessionId) -> bool,
    ) -> PushReport;
    /// Pushes a downlink to every session `target` names.
    fn push(&self, target: &Target, push: &Push) -> PushReport {
        self.push_except(target, push, &mut |_| false)
    }
    /// Pushes a downlink to one session: what became of it (`Refused(Ended)` if there is no
    /// such session).
    fn deliver(&self, session: &SessionId, push: &Push) -> Delivery;
    /// Whether a session would take a downlink of `len` body bytes now (false if it has
    /// ended); a pusher that must deliver to all of some sessions or none asks first.
    fn has_room(&self, session: &SessionId, len: usize) -> bool;
    /// Ends every session `target` names with a KICK of `reason`. Returns how many.
    fn kick(&self, target: &Target, reason: KickReason) -> usize;
    /// Puts a session in a room. False if it has ended or is in as many rooms as it may be.
    fn room_add(&self, session: &SessionId, room: &str) -> bool;
    /// Takes a session out of a room. False if it was not in it.
    fn room_remove(&self, session: &SessionId, room: &str) -> bool;
    /// A live session.
    fn session(&self, id: &SessionId) -> Option<SessionInfo>;
    /// The live sessions of a user.
    fn user_sessions(&self, user: &str) -> Vec<SessionInfo>;
    /// The sessions in a room.
    fn room_members(&self, room: &str) -> Vec<SessionId>;
    fn room_size(&self, room: &str) -> usize;
    fn in_room(&self, session: &SessionId, room: &str) -> bool;
    /// The frame limits (for inflating a client's gzip body within them).
    fn limits(&self) -> &Limits;
    /// Whether a DOWNLINK with a body of `len` bytes fits a frame.
    fn fits_a_frame(&self, len: usize) -> bool;
    /// The gzip form of a body, if it is worth compressing by the gateway's settings.
    fn compressed(&self, body: &Bytes) -> Option<Bytes>;
    /// The gateway's wall clock, Unix milliseconds.
    fn unix_ms(&self) -> u64;
}

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
    /// It moved to a sibling process of this gateway (`--processes`), which resumes it: its
    /// unacked downlinks went with it (`undelivered` is empty), and the back end hears of
    /// it again as `session_attached` from there.
    Moved,
}

impl EndReason {
    pub fn label(&self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Replaced(_) => "replaced",
            EndReason::Kicked(_) => "kicked",
            EndReason::Shutdown => "shutdown",
            EndReason::Moved => "moved",
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
        self.answer_with(|| outcome)
    }

    /// Answers with what `outcome` makes, if nobody has yet (nothing is made otherwise).
    fn answer_with(&self, outcome: impl FnOnce() -> Outcome) {
        let done = self.done.lock().take();
        if let Some(done) = done {
            done(outcome())
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
        self.inner
            .answer_with(|| Outcome::err(ErrorCode::Internal, "the upstream dropped the request"))
    }
}

/// The back end. Every method is called on a gateway worker thread and must return quickly:
/// what takes longer answers its [`Reply`] later, from any thread.
pub trait Upstream: Send + Sync + 'static {
    /// A LOGIN passed the authenticator: admit it (`reply.ok()`, the default) or refuse it
    /// with a code (the client gets LOGIN_RESULT with it, and the close). The connection
    /// waits for the answer (up to the upstream timeout, then `UPSTREAM_TIMEOUT`); the worker
    /// does not.
    fn login(&self, _hub: &dyn Hub, _login: &LoginRequest, reply: Reply) {
        reply.ok()
    }
    /// A fresh session logged in (attached to its first connection); `login_body` is the
    /// LOGIN frame's body as the client sent it (often empty).
    fn session_opened(&self, hub: &dyn Hub, session: &SessionInfo, login_body: &Bytes);
    /// An existing session resumed on a new connection (PROTOCOL.md §6.6).
    fn session_attached(&self, _hub: &dyn Hub, _session: &SessionInfo, _login_body: &Bytes) {}
    /// A session's connection went; it waits `resume_grace_secs` for a resume, holding what
    /// it accepted (pushes to it are answered `held`).
    fn session_detached(&self, _hub: &dyn Hub, _session: &SessionInfo) {}
    /// A session ended for good. `undelivered`: every downlink it had accepted and the client
    /// never acked, oldest first (their `receipt`s, bodies as pushed): the back end keeps
    /// them for the user (offline) or reports them undelivered; the gateway holds nothing of
    /// the session any more.
    fn session_ended(
        &self,
        hub: &dyn Hub,
        session: &SessionInfo,
        reason: EndReason,
        undelivered: &[Downlink],
    );
    /// An UPLINK to accept (store) or refuse: answer `reply` once.
    fn uplink(&self, hub: &dyn Hub, session: &SessionInfo, uplink: Uplink, reply: Reply);
    /// ROOM_JOIN: answer OK to let the session in (the gateway then adds it), or a code.
    fn room_join(
        &self,
        hub: &dyn Hub,
        session: &SessionInfo,
        room: &str,
        body: Bytes,
        reply: Reply,
    );
    /// ROOM_LEAVE: answer OK to take the session out.
    fn room_leave(&self, hub: &dyn Hub, session: &SessionInfo, room: &str, reply: Reply);
    /// The client acked downlinks pushed with these non-zero receipt ids (delivery receipts).
    fn delivered(&self, hub: &dyn Hub, session: &SessionInfo, receipts: &[u64]);
    /// The gateway is draining: it stops taking connections and will exit.
    fn draining(&self, _hub: &dyn Hub) {}
}

#[cfg(test)]
mod tests {
    use super::Names;

    #[test]
    fn names_split_where_the_user_id_ends() {
        let n = Names::new("alice", "phone-ü");
        assert_eq!((n.user(), n.device()), ("alice", "phone-ü"));
        let n = Names::new("", "d");
        assert_eq!((n.user(), n.device()), ("", "d"));
        assert_ne!(Names::new("ab", "c"), Names::new("a", "bc"));
        // Longer than the stack buffer: joined on the heap.
        let (u, d) = ("u".repeat(100), "d".repeat(100));
        let n = Names::new(&u, &d);
        assert_eq!((n.user(), n.device()), (&*u, &*d));
    }
}
