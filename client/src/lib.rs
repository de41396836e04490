//! The Tether client SDK: one long-lived connection to a Tether gateway, with login,
//! heartbeats, acked sends, cumulative downlink acks, resume and reconnect
//! (`protocol/PROTOCOL.md` §6).
//!
//! [`Client::connect`] opens the connection, logs in and spawns a background task (on the
//! current tokio runtime) that owns the connection from then on. It returns a cheap,
//! cloneable [`Client`] handle for sending and an [`Events`] stream for what arrives:
//!
//! ```no_run
//! use bytes::Bytes;
//! use tether_client::{Client, Config, Event};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::new("127.0.0.1:14000", "alice", "phone-1", "<token>");
//! let (client, mut events) = Client::connect(config).await?;
//!
//! // Resolves once the gateway's UPLINK_ACK says the upstream accepted the message.
//! let msg_id = client.send(0, Bytes::from_static(b"<a ChatMessage>")).await?;
//! println!("sent {msg_id}");
//!
//! while let Some(event) = events.next().await {
//!     match event {
//!         Event::Message { seq, body_type, body } => {
//!             println!("#{seq} (type {body_type}): {} bytes", body.len());
//!         }
//!         Event::Kicked { .. } | Event::Closed { .. } => break,
//!         other => println!("{other:?}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # What the background task does
//!
//! - **Login** first, listing gzip when [`Config::accept_gzip`]; on reconnects with
//!   `resume { session_id, last_seq }`. When the gateway answers `resumed = false` the
//!   downlink numbering restarts (`last_seq` goes back to 0), rooms joined through this
//!   client are joined again automatically, and unacked uplinks are still resent.
//! - **Heartbeat**: PING when nothing was sent for the LOGIN_RESULT's
//!   `heartbeat_interval_ms`; the connection is taken as dead when nothing arrived for one
//!   interval plus 10 s after a PING.
//! - **Downlinks** are delivered to [`Events`] in seq order, each seq once across
//!   reconnects (duplicates are dropped but still acked); gzip bodies are inflated within
//!   [`Config::limits`]; BATCH frames are unpacked and handled as if their frames had come
//!   one by one. A downlink counts as *processed* once it is handed to the [`Events`]
//!   channel, and only then is it acked: DOWNLINK_ACK(`last_seq`) after
//!   [`Config::ack_delay`], after [`Config::ack_every`] downlinks, and before a PING.
//! - **Backpressure**: [`Events`] is a bounded channel of [`EVENT_CHANNEL_CAPACITY`]
//!   events. When it is full the task stops reading the socket (it still sends acks, pings
//!   and uplinks), so the gateway sees a slow consumer rather than the client buffering
//!   without bound. If [`Events`] is dropped, events are discarded and downlinks count as
//!   processed (they are acked).
//! - **Uplinks** ([`Client::send`]) are kept until their UPLINK_ACK and resent with the same
//!   `msg_id` after [`Config::uplink_timeout`] and after every reconnect, in `msg_id` order
//!   and before new ones. The SDK never resends after an error ack: a
//!   [`SendError::Nack`] is returned and the application decides (PROTOCOL.md §6.4).
//! - **Reconnect** after any loss with exponential backoff and full jitter
//!   ([`Config::backoff_initial`] ..= [`Config::backoff_max`]); after a GOAWAY at its
//!   `reconnect_delay_ms` plus up to half of it; after `SERVER_BUSY` / `RATE_LIMITED` /
//!   `DRAINING` at `retry_after_ms` plus up to half of it. `AUTH_FAILED`, `TOKEN_EXPIRED`
//!   and KICK are terminal.
//!
//! # Unknown codes
//!
//! Codes arrive as raw numbers; one this crate does not know is reported (in [`Event`],
//! [`Error`], [`SendError`], [`RoomError`]) and acted on as a known code of its hundreds
//! group (PROTOCOL.md §2.3, §7): 1xx as `MALFORMED_FRAME`, 2xx as `AUTH_FAILED` (so it is
//! terminal: "do not retry blindly"), 3xx as `SERVER_BUSY`, 4xx as
//! `UPSTREAM_UNAVAILABLE`, anything else as `INTERNAL`. An unknown `KickReason` is
//! `KICK_REASON_UNSPECIFIED`.
//!
//! All clones of a [`Client`] share one connection. Dropping every clone closes the client
//! as [`Client::close`] does.

mod driver;
pub mod machine;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tether_codec::{Frame, Header, Limits};
use tokio::sync::{mpsc, oneshot};

pub use tether_codec;
pub use tether_protocol::pb;

use driver::Command;

/// Capacity of the [`Events`] channel. When the application lets this many events pile
/// up, the client stops reading from the gateway until it catches up.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// The message of a [`RoomError`] that means "the client is closed" (with code
/// [`pb::ErrorCode::Internal`]), not an answer of the gateway.
pub const ROOM_CLOSED_MESSAGE: &str = "the client is closed";

/// How to reach and log in to a gateway, and the client's timers. Build it with
/// [`Config::new`] and change the fields you need.
#[derive(Clone)]
pub struct Config {
    /// `host:port` of the gateway, e.g. `"127.0.0.1:14000"`.
    pub addr: String,
    /// TLS over the TCP connection when set.
    pub tls: Option<TlsConfig>,
    /// LOGIN `user_id`.
    pub user_id: String,
    /// LOGIN `device_id`, stable per installation.
    pub device_id: String,
    /// LOGIN `token`.
    pub token: String,
    /// LOGIN `platform`. Default [`pb::Platform::Android`].
    pub platform: pb::Platform,
    /// LOGIN `client_version`. Default `rust-sdk/<crate version>`.
    pub client_version: String,
    /// List `COMPRESSION_GZIP` in LOGIN (default `true`). Gzip bodies are inflated either way.
    pub accept_gzip: bool,
    /// Reconnect (with resume) after a lost connection (default `true`). When `false`, a
    /// loss ends the client: [`Event::Offline`] then [`Event::Closed`].
    pub reconnect: bool,
    /// First reconnect backoff ceiling (default 1 s); doubles per failed attempt.
    pub backoff_initial: Duration,
    /// Largest reconnect backoff ceiling (default 60 s).
    pub backoff_max: Duration,
    /// Bound on TCP connect + TLS handshake + LOGIN_RESULT (default 10 s).
    pub connect_timeout: Duration,
    /// Resend an UPLINK (same `msg_id`) that got no UPLINK_ACK for this long (default 15 s).
    pub uplink_timeout: Duration,
    /// Send DOWNLINK_ACK at most this long after a downlink was processed (default 200 ms).
    pub ack_delay: Duration,
    /// ... or as soon as this many downlinks are unacked (default 32).
    pub ack_every: u32,
    /// Frame and decompression limits for what the gateway sends (and what we send).
    pub limits: Limits,
    /// Local address to connect from (port chosen by the OS), e.g. one of several
    /// 127.0.0.x addresses when a load generator needs more ephemeral ports than one
    /// address has. Default `None`: the OS picks.
    pub local_addr: Option<std::net::IpAddr>,
    /// PING after this much silence instead of the LOGIN_RESULT's `heartbeat_interval_ms`
    /// (clamped to 10 ms ..= 1 h). Default `None`: the gateway's interval.
    pub heartbeat_interval: Option<Duration>,
    /// Told about connection-quality figures as they happen (default `None`).
    pub observer: Option<Arc<dyn Observer>>,
}

/// Hooks for connection-quality figures the application cannot see from [`Event`]s (a
/// status indicator, metrics, a load generator's histograms). Called on the client's
/// background task: return quickly.
pub trait Observer: Send + Sync {
    /// A PONG arrived `rtt` after the PING it answers (the first PONG after a PING; a PING
    /// sent while one is unanswered is not timed).
    fn heartbeat_rtt(&self, rtt: Duration) {
        let _ = rtt;
    }
}

impl Config {
    /// A configuration with the defaults listed on each field.
    pub fn new(
        addr: impl Into<String>,
        user_id: impl Into<String>,
        device_id: impl Into<String>,
        token: impl Into<String>,
    ) -> Config {
        Config {
            addr: addr.into(),
            tls: None,
            user_id: user_id.into(),
            device_id: device_id.into(),
            token: token.into(),
            platform: pb::Platform::Android,
            client_version: concat!("rust-sdk/", env!("CARGO_PKG_VERSION")).to_string(),
            accept_gzip: true,
            reconnect: true,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            uplink_timeout: Duration::from_secs(15),
            ack_delay: Duration::from_millis(200),
            ack_every: 32,
            limits: Limits::default(),
            local_addr: None,
            heartbeat_interval: None,
            observer: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("token", &"<redacted>")
            .field("platform", &self.platform)
            .field("client_version", &self.client_version)
            .field("accept_gzip", &self.accept_gzip)
            .field("reconnect", &self.reconnect)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("uplink_timeout", &self.uplink_timeout)
            .field("ack_delay", &self.ack_delay)
            .field("ack_every", &self.ack_every)
            .field("limits", &self.limits)
            .field("local_addr", &self.local_addr)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("observer", &self.observer.as_ref().map(|_| "<observer>"))
            .finish()
    }
}

/// TLS settings: the name to verify the gateway's certificate against, and a rustls
/// client configuration.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// DNS name (or IP address) the certificate must be valid for.
    pub server_name: String,
    /// The rustls configuration (roots, protocol versions, ...).
    pub config: Arc<rustls::ClientConfig>,
}

impl TlsConfig {
    /// Trusts exactly the certificates in `pem` (CA certificates, or a self-signed server
    /// certificate), with rustls' safe defaults (TLS 1.3 and 1.2) and the `ring` provider.
    pub fn with_root_pem(server_name: &str, pem: &[u8]) -> Result<TlsConfig, Error> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;

        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::Tls(format!("bad PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("bad root certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::Tls("no certificate in the PEM input".into()));
        }
        rustls_pki_types::ServerName::try_from(server_name)
            .map_err(|e| Error::Tls(format!("bad server name {server_name:?}: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsConfig {
            server_name: server_name.to_string(),
            config: Arc::new(config),
        })
    }
}

/// Why [`Client::connect`] (or [`TlsConfig::with_root_pem`]) failed.
#[derive(Debug)]
pub enum Error {
    /// Connecting, reading or writing failed (the gateway closing the connection before
    /// LOGIN_RESULT is `UnexpectedEof`).
    Io(std::io::Error),
    /// TLS configuration or handshake failure.
    Tls(String),
    /// [`Config::connect_timeout`] passed before LOGIN_RESULT arrived.
    Timeout,
    /// The gateway refused the login: LOGIN_RESULT with an error code, or an ERROR frame
    /// (e.g. `SERVER_BUSY`) before LOGIN_RESULT. An unknown code is reported as a known
    /// code of its hundreds group (see "Unknown codes" in the crate docs).
    Login {
        code: pb::ErrorCode,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The gateway broke the protocol (an undecodable frame, an unexpected kind, a bad
    /// session id); `code` is what an ERROR frame for it carries.
    Protocol {
        code: pb::ErrorCode,
        message: String,
    },
    /// The client is closed.
    Closed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "i/o error: {e}"),
            Error::Tls(e) => write!(f, "tls error: {e}"),
            Error::Timeout => f.write_str("timed out connecting and logging in"),
            Error::Login {
                code,
                message,
                retry_after,
            } => {
                write!(f, "login failed: {}", code.as_str_name())?;
                if !message.is_empty() {
                    write!(f, " ({message})")?;
                }
                if let Some(d) = retry_after {
                    write!(f, ", retry after {d:?}")?;
                }
                Ok(())
            }
            Error::Protocol { code, message } => {
                write!(f, "protocol error {}: {message}", code.as_str_name())
            }
            Error::Closed => f.write_str("the client is closed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

/// Why [`Client::send`] failed.
#[derive(Debug, Clone, PartialEq)]
pub enum SendError {
    /// The gateway answered the UPLINK with an error code (`REJECTED`, `RATE_LIMITED`,
    /// `UPSTREAM_UNAVAILABLE`, ...). The SDK does not resend it; a retry with
    /// [`Client::send_with_id`] and the same `msg_id` is safe. A body too large for one
    /// frame fails here too, without being sent, with code `FRAME_TOO_LARGE`.
    Nack {
        code: pb::ErrorCode,
        retry_after: Option<Duration>,
        message: String,
    },
    /// The client was closed or kicked before the UPLINK_ACK arrived.
    Closed,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Nack {
                code,
                retry_after,
                message,
            } => {
                write!(f, "uplink refused: {}", code.as_str_name())?;
                if !message.is_empty() {
                    write!(f, " ({message})")?;
                }
                if let Some(d) = retry_after {
                    write!(f, ", retry after {d:?}")?;
                }
                Ok(())
            }
            SendError::Closed => f.write_str("the client is closed"),
        }
    }
}

impl std::error::Error for SendError {}

/// Why [`Client::join_room`] / [`Client::leave_room`] failed: the ROOM_RESULT's code and
/// message. When the client is closed or kicked before the answer, `code` is
/// [`pb::ErrorCode::Internal`] and `message` is [`ROOM_CLOSED_MESSAGE`]
/// ([`RoomError::is_closed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RoomError {
    pub code: pb::ErrorCode,
    pub message: String,
}

impl RoomError {
    pub(crate) fn closed() -> RoomError {
        RoomError {
            code: pb::ErrorCode::Internal,
            message: ROOM_CLOSED_MESSAGE.to_string(),
        }
    }

    /// True when this is the "client closed" error rather than a gateway answer.
    pub fn is_closed(&self) -> bool {
        self.code == pb::ErrorCode::Internal && self.message == ROOM_CLOSED_MESSAGE
    }
}

impl fmt::Display for RoomError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "room request failed: {}", self.code.as_str_name())?;
        if !self.message.is_empty() {
            write!(f, " ({})", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for RoomError {}

/// What happened on the connection, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A DOWNLINK, body already inflated if it was gzip, in seq order, each seq delivered
    /// exactly once across reconnects (a seq `<= last_seq` is dropped but still acked).
    /// `seq` 0 is a transient downlink (never acked, never replayed).
    Message {
        seq: u64,
        body_type: u32,
        body: Bytes,
    },
    /// Logged in (the first time, and after each reconnect): whether the session was
    /// resumed, and the seqs the gateway announced as lost (`gap_from..=gap_to`).
    Online {
        session_id: [u8; 16],
        resumed: bool,
        gap: Option<(u64, u64)>,
    },
    /// The connection was lost or closed by the gateway, with the code of its ERROR frame
    /// if one came. A reconnect follows unless a terminal event comes next.
    Offline { code: Option<pb::ErrorCode> },
    /// The gateway is draining: the client reconnects (with resume) after
    /// `reconnect_delay` plus a random jitter of up to half of it.
    GoAway { reconnect_delay: Duration },
    /// Terminal: the gateway ended the session. No reconnect; pending sends fail.
    Kicked {
        reason: pb::KickReason,
        message: String,
    },
    /// Terminal: [`Client::close`] (code `None`), a login refusal that must not be retried
    /// (`AUTH_FAILED`, `TOKEN_EXPIRED`), or a loss with reconnect disabled (the loss's code).
    Closed { code: Option<pb::ErrorCode> },
}

/// The stream of [`Event`]s of one client. After a terminal event ([`Event::Kicked`],
/// [`Event::Closed`]) [`Events::next`] returns `None`.
#[derive(Debug)]
pub struct Events {
    /// Boxed: a channel allocates room for 32 messages up front, and an idle client
    /// should not hold 32 events' worth of memory.
    rx: mpsc::Receiver<Box<Event>>,
}

impl Events {
    /// The next event, or `None` once the client has ended and every event was taken.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await.map(|e| *e)
    }

    /// The next event if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok().map(|e| *e)
    }
}

/// State the handles read and the background task writes.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) session_id: Mutex<Option<[u8; 16]>>,
    pub(crate) last_seq: AtomicU64,
    pub(crate) online: AtomicBool,
    pub(crate) next_msg_id: AtomicU64,
    pub(crate) next_request_id: AtomicU64,
    pub(crate) limits: Limits,
}

/// A handle to the background task that owns the connection. Cheap to clone; all clones
/// share the connection. Dropping the last clone closes the client.
#[derive(Clone, Debug)]
pub struct Client {
    /// Boxed for the same reason as [`Events`]' channel.
    cmd: mpsc::UnboundedSender<Box<Command>>,
    shared: Arc<Shared>,
}

impl Client {
    /// Connects and logs in. Resolves after the first LOGIN_RESULT `OK` (the first event is
    /// then [`Event::Online`]), or fails with the login error; the first connect is never
    /// retried.
    pub async fn connect(config: Config) -> Result<(Client, Events), Error> {
        let config = Arc::new(config);
        let established = driver::establish(config.clone(), None).await?;
        let mut start = [0u8; 8];
        if getrandom::fill(&mut start).is_err() {
            start = driver::fallback_seed().to_le_bytes();
        }
        // A random start below 2^63, so that counting up never wraps to 0.
        let first_id = (u64::from_le_bytes(start) >> 1).max(1);
        let shared = Arc::new(Shared {
            session_id: Mutex::new(None),
            last_seq: AtomicU64::new(0),
            online: AtomicBool::new(false),
            next_msg_id: AtomicU64::new(first_id),
            next_request_id: AtomicU64::new(1),
            limits: config.limits,
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (event_tx, event_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let mut driver = driver::Driver::new(config, shared.clone(), cmd_rx, event_tx);
        // Record the session before returning, so `session_id()` is set at once.
        driver.on_login(&established);
        tokio::spawn(driver.run(established));
        Ok((
            Client {
                cmd: cmd_tx,
                shared,
            },
            Events { rx: event_rx },
        ))
    }

    /// Sends an UPLINK with a fresh `msg_id` and resolves on its UPLINK_ACK: `Ok(msg_id)`
    /// for `OK`, [`SendError::Nack`] for an error code. Until acked, the UPLINK is resent
    /// with the same `msg_id` after [`Config::uplink_timeout`] and after every reconnect.
    /// Dropping the future does not cancel the delivery. Fails with [`SendError::Closed`]
    /// when the client is closed or kicked.
    pub async fn send(&self, body_type: u32, body: Bytes) -> Result<u64, SendError> {
        let msg_id = self.fresh_msg_id();
        self.send_inner(msg_id, body_type, body).await
    }

    /// As [`Client::send`] with a caller-chosen `msg_id` (e.g. a persisted one, or the id of
    /// a send to retry after a retryable [`SendError::Nack`]). While an UPLINK with the same
    /// id is still unacked, this one waits for the same ack instead of sending a copy.
    /// `msg_id` 0 is not valid on the wire: it is replaced by a fresh id.
    pub async fn send_with_id(
        &self,
        msg_id: u64,
        body_type: u32,
        body: Bytes,
    ) -> Result<u64, SendError> {
        let msg_id = if msg_id == 0 {
            self.fresh_msg_id()
        } else {
            msg_id
        };
        self.send_inner(msg_id, body_type, body).await
    }

    fn fresh_msg_id(&self) -> u64 {
        loop {
            let id = self.shared.next_msg_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    async fn send_inner(&self, msg_id: u64, body_type: u32, body: Bytes) -> Result<u64, SendError> {
        let frame = Frame::with_body(Header::Uplink(pb::Uplink { msg_id, body_type }), body)
            .to_bytes(&self.shared.limits)
            .map_err(|e| SendError::Nack {
                code: e.code(),
                retry_after: None,
                message: e.to_string(),
            })?;
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Box::new(Command::Send {
                msg_id,
                frame,
                reply,
            }))
            .map_err(|_| SendError::Closed)?;
        rx.await.unwrap_or(Err(SendError::Closed))
    }

    /// Joins a room (ROOM_JOIN, answered by ROOM_RESULT with the same request id). A
    /// request without an answer when the connection drops is sent again after the
    /// reconnect.
    pub async fn join_room(&self, room_id: &str) -> Result<(), RoomError> {
        self.room(room_id, true).await
    }

    /// Leaves a room (ROOM_LEAVE / ROOM_RESULT).
    pub async fn leave_room(&self, room_id: &str) -> Result<(), RoomError> {
        self.room(room_id, false).await
    }

    async fn room(&self, room_id: &str, join: bool) -> Result<(), RoomError> {
        let (reply, rx) = oneshot::channel();
        let request_id = self.shared.next_request_id.fetch_add(1, Ordering::Relaxed);
        self.cmd
            .send(Box::new(Command::Room {
                request_id,
                room_id: room_id.to_string(),
                join,
                reply,
            }))
            .map_err(|_| RoomError::closed())?;
        rx.await.unwrap_or_else(|_| Err(RoomError::closed()))
    }

    /// The current session's id (from the last successful login).
    pub fn session_id(&self) -> Option<[u8; 16]> {
        *self
            .shared
            .session_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The highest downlink seq processed (handed to [`Events`]) in the current session.
    pub fn last_seq(&self) -> u64 {
        self.shared.last_seq.load(Ordering::Acquire)
    }

    /// True while logged in on a live connection.
    pub fn is_online(&self) -> bool {
        self.shared.online.load(Ordering::Acquire)
    }

    /// Closes gracefully: acks what was processed, closes the connection, fails pending
    /// sends with [`SendError::Closed`], and does not reconnect. [`Events`] yields
    /// [`Event::Closed`] (after any events still queued) and then `None`. Returns once the
    /// connection is closed (bounded: a gateway that does not read is given 1 s).
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.cmd.send(Box::new(Command::Close { done })).is_ok() {
            let _ = rx.await;
        }
    }

    /// Cuts the current connection abruptly (no frame sent), as a network loss would; the
    /// client then reconnects with resume as after any loss. Does nothing while offline.
    /// For tests and chaos tools.
    pub fn drop_connection(&self) {
        let _ = self.cmd.send(Box::new(Command::DropConnection));
    }
}
