//! The background task that owns the connection: login, the per-connection loop
//! (reads, writes, commands, timers), and reconnecting.
//!
//! One task, one `select!` loop per connection, no locks on the hot path. Everything the
//! gateway sends is bounded: reads stop while the application's event channel is full,
//! writes stop taking commands past a high-water mark, and every wait has a deadline.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tether_codec::{decode_batch, gunzip, Decoder, Frame, Header};
use tether_protocol::pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, warn};

use crate::{Config, Error, Event, RoomError, SendError, Shared};

/// After a PING, the connection is dead when nothing arrived for one interval plus this.
const DEAD_SLACK: Duration = Duration::from_secs(10);
/// After a GOAWAY, close the connection ourselves after at most this long (or at the
/// planned reconnect time if that comes first), if the gateway has not closed it.
const GOAWAY_LINGER: Duration = Duration::from_secs(1);
/// Bound on the last write of a connection (final ack on close, ERROR on a protocol error).
const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// Stop decoding buffered frames while this many events wait for the application.
const OUTBOX_SOFT_LIMIT: usize = 256;
/// Stop taking commands while this many bytes wait to be written.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// Read buffer growth step, and the spare room below which it grows. Small, so that many
/// idle clients in one process (a load tester) stay cheap; the decoder reserves a whole
/// frame's room itself once it has seen the frame's length.
const READ_CHUNK: usize = 2048;
const READ_MIN_SPARE: usize = 512;
/// After a read of fewer bytes than this (a PONG, an ack), the connection is taken as idle
/// and reads into a buffer of this size, so that an idle client does not pin `READ_CHUNK`.
const IDLE_READ_CHUNK: usize = 128;
/// Heartbeat interval when LOGIN_RESULT says 0 (PROTOCOL.md §8 mobile default).
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// What a [`Client`](crate::Client) handle asks of the task.
pub(crate) enum Command {
    Send {
        msg_id: u64,
        /// The encoded UPLINK frame, resent as it is.
        frame: Bytes,
        reply: oneshot::Sender<Result<u64, SendError>>,
    },
    Room {
        request_id: u64,
        room_id: String,
        join: bool,
        reply: oneshot::Sender<Result<(), RoomError>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
    DropConnection,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Send { msg_id, .. } => write!(f, "Send({msg_id})"),
            Command::Room { room_id, join, .. } => write!(f, "Room({room_id}, join={join})"),
            Command::Close { .. } => f.write_str("Close"),
            Command::DropConnection => f.write_str("DropConnection"),
        }
    }
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type BoxIo = Box<dyn Io>;

/// A connection on which LOGIN_RESULT OK arrived.
pub(crate) struct Established {
    io: BoxIo,
    /// Bytes read after the LOGIN_RESULT (the gateway may send a replay right behind it).
    rbuf: BytesMut,
    session_id: [u8; 16],
    resumed: bool,
    gap: Option<(u64, u64)>,
    heartbeat: Duration,
    /// The `last_seq` the LOGIN's resume carried.
    resume_last_seq: Option<u64>,
}

/// The code for a raw enum value; an unknown one by its hundreds group (PROTOCOL.md §2.3,
/// §7): 1xx protocol error, 2xx login problem not to retry blindly, 3xx flow control,
/// 4xx upstream (retry later), anything else internal.
pub(crate) fn code_of(raw: i32) -> pb::ErrorCode {
    pb::ErrorCode::try_from(raw).unwrap_or(match raw.div_euclid(100) {
        1 => pb::ErrorCode::MalformedFrame,
        2 => pb::ErrorCode::AuthFailed,
        3 => pb::ErrorCode::ServerBusy,
        4 => pb::ErrorCode::UpstreamUnavailable,
        _ => pb::ErrorCode::Internal,
    })
}

/// Codes after which the client must not log in again by itself.
pub(crate) fn is_terminal(code: pb::ErrorCode) -> bool {
    matches!(
        code,
        pb::ErrorCode::AuthFailed | pb::ErrorCode::TokenExpired
    )
}

pub(crate) fn millis(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms.into()))
}

fn protocol_error(e: tether_codec::Error) -> Error {
    Error::Protocol {
        code: e.code(),
        message: e.to_string(),
    }
}

fn tls_or_io(e: io::Error) -> Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => Error::Tls(tls.to_string()),
        None => Error::Io(e),
    }
}

/// TCP connect, TLS handshake, LOGIN, and waiting for LOGIN_RESULT, within
/// `connect_timeout`.
pub(crate) async fn establish(
    cfg: Arc<Config>,
    resume: Option<pb::Resume>,
) -> Result<Established, Error> {
    match timeout(cfg.connect_timeout, establish_inner(&cfg, resume)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout),
    }
}

async fn establish_inner(cfg: &Config, resume: Option<pb::Resume>) -> Result<Established, Error> {
    let resume_last_seq = resume.as_ref().map(|r| r.last_seq);
    let login = pb::Login {
        token: cfg.token.clone(),
        user_id: cfg.user_id.clone(),
        device_id: cfg.device_id.clone(),
        platform: cfg.platform as i32,
        client_version: cfg.client_version.clone(),
        compression: if cfg.accept_gzip {
            vec![pb::Compression::Gzip as i32]
        } else {
            Vec::new()
        },
        resume,
    };
    let mut out = BytesMut::new();
    Frame::new(Header::Login(Box::new(login)))
        .encode(&mut out, &cfg.limits)
        .map_err(protocol_error)?;

    let tcp = match cfg.local_addr {
        None => TcpStream::connect(cfg.addr.as_str()).await?,
        Some(local) => connect_from(local, &cfg.addr).await?,
    };
    let _ = tcp.set_nodelay(true);
    let mut io: BoxIo = match &cfg.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let name = rustls_pki_types::ServerName::try_from(tls.server_name.clone())
                .map_err(|e| Error::Tls(format!("bad server name: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                .connect(name, tcp)
                .await
                .map_err(tls_or_io)?;
            Box::new(stream)
        }
    };
    io.write_all(&out).await.map_err(tls_or_io)?;
    io.flush().await.map_err(tls_or_io)?;

    let decoder = Decoder::new(cfg.limits);
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if let Some(frame) = decoder.decode(&mut rbuf).map_err(protocol_error)? {
            return login_answer(frame, io, rbuf, resume_last_seq);
        }
        if rbuf.capacity() - rbuf.len() < READ_MIN_SPARE {
            rbuf.reserve(READ_CHUNK);
        }
        if io.read_buf(&mut rbuf).await.map_err(tls_or_io)? == 0 {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the gateway closed the connection before LOGIN_RESULT",
            )));
        }
    }
}

/// Connects to the first address of `addr` in `local`'s family, from `local`.
async fn connect_from(local: std::net::IpAddr, addr: &str) -> io::Result<TcpStream> {
    let remote = tokio::net::lookup_host(addr)
        .await?
        .find(|a| a.is_ipv4() == local.is_ipv4())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("{addr} has no address of the family of {local}"),
            )
        })?;
    let socket = if local.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    bind_address_no_port(&socket);
    socket.bind(std::net::SocketAddr::new(local, 0))?;
    socket.connect(remote).await
}

/// Defers the choice of the local port from `bind` to `connect` (Linux
/// `IP_BIND_ADDRESS_NO_PORT`), where the kernel knows the whole 4-tuple: a bind to port 0
/// must otherwise find a port free for *any* destination, which gets slow as the port range
/// fills (measured: 100,000 connections over two source addresses connected at ~400/s and
/// burnt seconds of kernel time) and caps one source address at one port range for all
/// destinations together. Best effort: without it the bind still works.
fn bind_address_no_port(socket: &tokio::net::TcpSocket) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: a valid socket descriptor, a pointer to a c_int living across the call,
        // and its exact length.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

fn login_answer(
    frame: Frame,
    io: BoxIo,
    rbuf: BytesMut,
    resume_last_seq: Option<u64>,
) -> Result<Established, Error> {
    match frame.header {
        Header::LoginResult(r) => {
            if r.code != pb::ErrorCode::Ok as i32 {
                return Err(Error::Login {
                    code: code_of(r.code),
                    message: r.message,
                    retry_after: millis(r.retry_after_ms),
                });
            }
            let session_id: [u8; 16] =
                r.session_id
                    .as_ref()
                    .try_into()
                    .map_err(|_| Error::Protocol {
                        code: pb::ErrorCode::MalformedHeader,
                        message: format!(
                            "LOGIN_RESULT session_id has {} bytes, not 16",
                            r.session_id.len()
                        ),
                    })?;
            let heartbeat = match r.heartbeat_interval_ms {
                0 => DEFAULT_HEARTBEAT,
                ms => Duration::from_millis(ms.into()).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT),
            };
            Ok(Established {
                io,
                rbuf,
                session_id,
                resumed: r.resumed,
                gap: (r.gap_from != 0 || r.gap_to != 0).then_some((r.gap_from, r.gap_to)),
                heartbeat,
                resume_last_seq,
            })
        }
        Header::Error(e) => Err(Error::Login {
            code: code_of(e.code),
            message: e.message,
            retry_after: millis(e.retry_after_ms),
        }),
        other => Err(Error::Protocol {
            code: pb::ErrorCode::UnexpectedKind,
            message: format!("{} before LOGIN_RESULT", other.kind()),
        }),
    }
}

/// A seed when the OS random source fails (it practically never does).
pub(crate) fn fallback_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    let local = 0u8;
    t ^ (&local as *const u8 as u64).rotate_left(32)
}

/// xorshift64*: jitter only, nothing secret.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new() -> Rng {
        Rng::seeded(getrandom::u64().unwrap_or_else(|_| fallback_seed()))
    }

    /// A fixed sequence (tests on a virtual clock).
    pub(crate) fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..=max`.
    pub(crate) fn jitter(&mut self, max: Duration) -> Duration {
        let n = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        let r = match n.checked_add(1) {
            Some(m) => self.next() % m,
            None => self.next(),
        };
        Duration::from_nanos(r)
    }
}

struct PendingUplink {
    frame: Bytes,
    waiters: Vec<oneshot::Sender<Result<u64, SendError>>>,
    /// When it was last written on the current connection (`None`: not yet).
    sent_at: Option<Instant>,
}

struct PendingRoom {
    room_id: String,
    join: bool,
    /// `None` for the automatic re-join after a new session.
    reply: Option<oneshot::Sender<Result<(), RoomError>>>,
}

impl PendingRoom {
    fn frame(&self, request_id: u64) -> Frame {
        crate::machine::room_frame(request_id, self.room_id.clone(), self.join)
    }
}

/// An event waiting for room in the application's channel; `seq` is `(epoch, seq)` for a
/// sequenced downlink, which counts as processed once handed over.
struct Queued {
    event: Event,
    seq: Option<(u64, u64)>,
}

/// How a connection ended.
enum End {
    Lost {
        code: Option<pb::ErrorCode>,
        retry_after: Option<Duration>,
        /// Set after a GOAWAY: reconnect at this time.
        reconnect_at: Option<Instant>,
    },
    Kicked {
        reason: pb::KickReason,
        message: String,
    },
    Close {
        done: Option<oneshot::Sender<()>>,
    },
}

/// Why reconnecting stopped for good.
enum Stop {
    Close(Option<oneshot::Sender<()>>),
    Refused(pb::ErrorCode),
}

struct GoAwayPlan {
    reconnect_at: Instant,
    close_at: Instant,
}

/// One live, logged-in connection.
struct Conn {
    rd: ReadHalf<BoxIo>,
    wr: WriteHalf<BoxIo>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    need_flush: bool,
    decoder: Decoder,
    heartbeat: Duration,
    last_sent: Instant,
    /// The last read was small: read into an `IDLE_READ_CHUNK` buffer.
    idle_reads: bool,
    /// When the unanswered PING went out (timed for [`crate::Observer::heartbeat_rtt`]).
    ping_at: Option<Instant>,
    /// Set by a PING: dead if nothing arrives by then.
    dead_at: Option<Instant>,
    goaway: Option<GoAwayPlan>,
    /// Write what is buffered (an ERROR, a final ack) before closing.
    flush_on_end: bool,
    limits: tether_codec::Limits,
}

impl Conn {
    /// Room in `rbuf` for the next read: `READ_CHUNK` while data flows, `IDLE_READ_CHUNK`
    /// (and the large buffer given back) once reads are small and nothing is pending.
    fn prepare_read(&mut self) {
        let (min_spare, chunk) = if self.idle_reads {
            if self.rbuf.is_empty() && self.rbuf.capacity() > IDLE_READ_CHUNK {
                self.rbuf = BytesMut::new();
            }
            (1, IDLE_READ_CHUNK)
        } else {
            (READ_MIN_SPARE, READ_CHUNK)
        };
        if self.rbuf.capacity() - self.rbuf.len() < min_spare {
            self.rbuf.reserve(chunk);
        }
    }

    fn write(&mut self, frame: &Frame) {
        match frame.encode(&mut self.wbuf, &self.limits) {
            Ok(()) => self.last_sent = Instant::now(),
            Err(e) => warn!("not sending a {} frame: {e}", frame.kind()),
        }
    }

    fn write_encoded(&mut self, frame: &[u8]) {
        self.wbuf.extend_from_slice(frame);
        self.last_sent = Instant::now();
    }

    fn lost(&self, code: Option<pb::ErrorCode>, retry_after: Option<Duration>) -> End {
        End::Lost {
            code,
            retry_after,
            reconnect_at: self.goaway.as_ref().map(|g| g.reconnect_at),
        }
    }
}

/// One step of writing: a write of the buffer, or a flush once it is empty. Cancel-safe:
/// a cancelled `write_buf` wrote nothing, a cancelled flush is retried.
async fn write_step(
    wr: &mut WriteHalf<BoxIo>,
    wbuf: &mut BytesMut,
    need_flush: &mut bool,
) -> io::Result<()> {
    if wbuf.is_empty() {
        wr.flush().await?;
        *need_flush = false;
        return Ok(());
    }
    if wr.write_buf(wbuf).await? == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    *need_flush = true;
    Ok(())
}

/// Waits for room in the event channel and hands it the first queued event; returns
/// that event's seq for accounting, or `Err` when `Events` was dropped. Cancel-safe: the
/// only await is the reservation.
async fn deliver_one(
    tx: &mpsc::Sender<Box<Event>>,
    outbox: &mut VecDeque<Queued>,
) -> Result<Option<(u64, u64)>, ()> {
    let permit = tx.reserve().await.map_err(|_| ())?;
    Ok(outbox.pop_front().and_then(|q| {
        permit.send(Box::new(q.event));
        q.seq
    }))
}

pub(crate) struct Driver {
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    cmd_rx: mpsc::UnboundedReceiver<Box<Command>>,
    event_tx: mpsc::Sender<Box<Event>>,
    /// Events not yet taken by the channel (it was full), in order.
    outbox: VecDeque<Queued>,
    /// The application dropped `Events`: discard events, count downlinks as processed.
    events_gone: bool,
    uplinks: BTreeMap<u64, PendingUplink>,
    /// (resend due, msg_id) in send order; entries of acked ids are skipped lazily.
    resend_q: VecDeque<(Instant, u64)>,
    rooms: BTreeMap<u64, PendingRoom>,
    /// Rooms joined through this client (re-joined when a new session replaces ours).
    joined: BTreeSet<String>,
    session_id: Option<[u8; 16]>,
    /// Bumped by every new session, so that queued downlinks of an old session do not
    /// count in the new one's numbering.
    epoch: u64,
    /// Highest seq accepted (queued or delivered): the duplicate watermark.
    received_seq: u64,
    /// Highest seq handed to the application: what is acked and resumed from.
    last_seq: u64,
    /// Highest seq the gateway knows we processed.
    acked_seq: u64,
    unacked: u32,
    /// A duplicate arrived: ack again even if `last_seq` did not move.
    force_ack: bool,
    ack_due: Option<Instant>,
    /// The gap the last resume announced (a jump over it is not a gateway bug).
    gap: Option<(u64, u64)>,
    rng: Rng,
}

impl Driver {
    pub(crate) fn new(
        cfg: Arc<Config>,
        shared: Arc<Shared>,
        cmd_rx: mpsc::UnboundedReceiver<Box<Command>>,
        event_tx: mpsc::Sender<Box<Event>>,
    ) -> Driver {
        Driver {
            cfg,
            shared,
            cmd_rx,
            event_tx,
            outbox: VecDeque::new(),
            events_gone: false,
            uplinks: BTreeMap::new(),
            resend_q: VecDeque::new(),
            rooms: BTreeMap::new(),
            joined: BTreeSet::new(),
            session_id: None,
            epoch: 0,
            received_seq: 0,
            last_seq: 0,
            acked_seq: 0,
            unacked: 0,
            force_ack: false,
            ack_due: None,
            gap: None,
            rng: Rng::new(),
        }
    }

    pub(crate) async fn run(mut self, first: Established) {
        let mut est = first;
        loop {
            let end = self.run_connection(est).await;
            self.shared.online.store(false, Ordering::Release);
            let wait_until = match end {
                End::Close { done } => {
                    return Box::pin(self.finish(Event::Closed { code: None }, done)).await;
                }
                End::Kicked { reason, message } => {
                    return Box::pin(self.finish(Event::Kicked { reason, message }, None)).await;
                }
                End::Lost {
                    code,
                    retry_after,
                    reconnect_at,
                } => {
                    self.push(Event::Offline { code }, None);
                    if !self.cfg.reconnect || code.is_some_and(is_terminal) {
                        return Box::pin(self.finish(Event::Closed { code }, None)).await;
                    }
                    reconnect_at.unwrap_or_else(|| {
                        let wait = match retry_after {
                            Some(d) => d + self.rng.jitter(d / 2),
                            None => self.backoff(0),
                        };
                        Instant::now() + wait
                    })
                }
            };
            // Boxed, like the other rare paths, so that an idle client's task holds only
            // the state of `run_connection`.
            match Box::pin(self.reconnect(wait_until)).await {
                Ok(next) => {
                    self.on_login(&next);
                    est = next;
                }
                Err(Stop::Close(done)) => {
                    return Box::pin(self.finish(Event::Closed { code: None }, done)).await;
                }
                Err(Stop::Refused(code)) => {
                    return Box::pin(self.finish(Event::Closed { code: Some(code) }, None)).await;
                }
            }
        }
    }

    /// The backoff before attempt `attempt` (0: the first after a loss): uniform in
    /// `0..=min(max, initial * 2^attempt)` (full jitter).
    fn backoff(&mut self, attempt: u32) -> Duration {
        let ceiling = self
            .cfg
            .backoff_initial
            .saturating_mul(1u32 << attempt.min(31))
            .min(self.cfg.backoff_max);
        self.rng.jitter(ceiling)
    }

    fn uplink_timeout(&self) -> Duration {
        self.cfg.uplink_timeout.max(Duration::from_millis(1))
    }

    async fn reconnect(&mut self, mut until: Instant) -> Result<Established, Stop> {
        let mut attempt = 0u32;
        loop {
            self.offline_wait(sleep_until(until)).await?;
            let resume = self.session_id.map(|id| pb::Resume {
                session_id: Bytes::copy_from_slice(&id),
                last_seq: self.last_seq,
            });
            let result = self
                .offline_wait(establish(self.cfg.clone(), resume))
                .await?;
            attempt = attempt.saturating_add(1);
            let wait = match result {
                Ok(est) => return Ok(est),
                Err(Error::Login {
                    code,
                    message,
                    retry_after,
                }) => {
                    debug!(?code, %message, "login refused");
                    if is_terminal(code) {
                        return Err(Stop::Refused(code));
                    }
                    match retry_after {
                        Some(d) => d + self.rng.jitter(d / 2),
                        None => self.backoff(attempt),
                    }
                }
                Err(e) => {
                    debug!("reconnect attempt {attempt} failed: {e}");
                    self.backoff(attempt)
                }
            };
            until = Instant::now() + wait;
        }
    }

    /// Runs `fut` while offline, meanwhile queueing sends, delivering events and watching
    /// for close.
    async fn offline_wait<F: Future>(&mut self, fut: F) -> Result<F::Output, Stop> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                cmd = self.cmd_rx.recv() => match cmd.map(|c| *c) {
                    None => return Err(Stop::Close(None)),
                    Some(Command::Close { done }) => return Err(Stop::Close(Some(done))),
                    Some(Command::DropConnection) => {}
                    Some(Command::Send { msg_id, frame, reply }) => {
                        self.add_uplink(msg_id, frame, reply);
                    }
                    Some(Command::Room { request_id, room_id, join, reply }) => {
                        self.rooms.insert(request_id, PendingRoom { room_id, join, reply: Some(reply) });
                    }
                },
                r = deliver_one(&self.event_tx, &mut self.outbox), if !self.outbox.is_empty() => {
                    self.after_deliver(r);
                }
            }
        }
    }

    /// Adds an uplink to the pending set; `false` when its id was already pending (the
    /// caller then waits for the same ack, nothing is sent again).
    fn add_uplink(
        &mut self,
        msg_id: u64,
        frame: Bytes,
        reply: oneshot::Sender<Result<u64, SendError>>,
    ) -> bool {
        if let Some(p) = self.uplinks.get_mut(&msg_id) {
            p.waiters.push(reply);
            return false;
        }
        self.uplinks.insert(
            msg_id,
            PendingUplink {
                frame,
                waiters: vec![reply],
                sent_at: None,
            },
        );
        true
    }

    /// Session bookkeeping for a successful login, and the Online event.
    pub(crate) fn on_login(&mut self, est: &Established) {
        let had_session = self.session_id.is_some();
        let resumed = est.resumed && self.session_id == Some(est.session_id);
        if resumed {
            self.acked_seq = self.acked_seq.max(est.resume_last_seq.unwrap_or(0));
            self.gap = est.gap;
        } else {
            self.epoch += 1;
            self.received_seq = 0;
            self.last_seq = 0;
            self.acked_seq = 0;
            self.gap = None;
            if had_session {
                // Memberships ended with the old session: join them again.
                for room_id in std::mem::take(&mut self.joined) {
                    let request_id = self.shared.next_request_id.fetch_add(1, Ordering::Relaxed);
                    self.rooms.insert(
                        request_id,
                        PendingRoom {
                            room_id,
                            join: true,
                            reply: None,
                        },
                    );
                }
            }
        }
        self.unacked = 0;
        self.force_ack = false;
        self.ack_due = (self.last_seq > self.acked_seq).then(Instant::now);
        self.session_id = Some(est.session_id);
        *self
            .shared
            .session_id
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(est.session_id);
        self.shared.last_seq.store(self.last_seq, Ordering::Release);
        self.shared.online.store(true, Ordering::Release);
        self.push(
            Event::Online {
                session_id: est.session_id,
                resumed,
                gap: est.gap,
            },
            None,
        );
    }

    async fn run_connection(&mut self, est: Established) -> End {
        let Established {
            io,
            rbuf,
            heartbeat,
            ..
        } = est;
        let (rd, wr) = tokio::io::split(io);
        let now = Instant::now();
        let heartbeat = self
            .cfg
            .heartbeat_interval
            .map_or(heartbeat, |h| h.clamp(MIN_HEARTBEAT, MAX_HEARTBEAT));
        let mut c = Conn {
            rd,
            wr,
            rbuf,
            wbuf: BytesMut::new(),
            need_flush: false,
            decoder: Decoder::new(self.cfg.limits),
            heartbeat,
            last_sent: now,
            idle_reads: true,
            ping_at: None,
            dead_at: None,
            goaway: None,
            flush_on_end: false,
            limits: self.cfg.limits,
        };
        // What is pending goes first, uplinks in msg_id order.
        self.resend_q.clear();
        let resend_after = self.uplink_timeout();
        for (&msg_id, p) in self.uplinks.iter_mut() {
            c.wbuf.extend_from_slice(&p.frame);
            c.last_sent = now;
            p.sent_at = Some(now);
            self.resend_q.push_back((now + resend_after, msg_id));
        }
        for (&request_id, r) in &self.rooms {
            c.write(&r.frame(request_id));
        }

        loop {
            if self.outbox.len() < OUTBOX_SOFT_LIMIT {
                if let Some(end) = self.process_buffered(&mut c) {
                    return Box::pin(self.end_connection(c, end)).await;
                }
            }
            let can_read = self.outbox.is_empty();
            if !can_read {
                // Not reading (the application is behind): silence proves nothing.
                c.dead_at = None;
            }
            let deadline = self.next_deadline(&c);
            if can_read {
                c.prepare_read();
            }
            let writing = !c.wbuf.is_empty() || c.need_flush;
            let end = tokio::select! {
                r = c.rd.read_buf(&mut c.rbuf), if can_read => match r {
                    Ok(0) => {
                        debug!("the gateway closed the connection");
                        Some(c.lost(None, None))
                    }
                    Ok(n) => {
                        c.dead_at = None;
                        c.idle_reads = n < IDLE_READ_CHUNK;
                        None
                    }
                    Err(e) => {
                        debug!("read failed: {e}");
                        Some(c.lost(None, None))
                    }
                },
                r = write_step(&mut c.wr, &mut c.wbuf, &mut c.need_flush), if writing => match r {
                    Ok(()) => None,
                    Err(e) => {
                        debug!("write failed: {e}");
                        Some(c.lost(None, None))
                    }
                },
                cmd = self.cmd_rx.recv(), if c.wbuf.len() < WRITE_HIGH_WATER => {
                    self.on_command(cmd.map(|c| *c), &mut c)
                }
                r = deliver_one(&self.event_tx, &mut self.outbox), if !self.outbox.is_empty() => {
                    self.after_deliver(r);
                    None
                }
                () = sleep_until(deadline) => self.on_timer(&mut c, Instant::now()),
            };
            if let Some(end) = end {
                return Box::pin(self.end_connection(c, end)).await;
            }
        }
    }

    async fn end_connection(&mut self, mut c: Conn, end: End) -> End {
        if let End::Close { .. } = end {
            self.send_ack(&mut c);
            c.flush_on_end = true;
        }
        if c.flush_on_end {
            let Conn { mut wr, wbuf, .. } = c;
            let _ = timeout(FINAL_FLUSH, async {
                wr.write_all(&wbuf).await?;
                wr.flush().await?;
                wr.shutdown().await
            })
            .await;
        }
        end
    }

    fn next_deadline(&self, c: &Conn) -> Instant {
        let mut d = c.last_sent + c.heartbeat;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                d = d.min(t);
            }
        };
        consider(c.dead_at);
        consider(self.ack_due);
        match &c.goaway {
            Some(g) => consider(Some(g.close_at)),
            None => consider(self.resend_q.front().map(|&(t, _)| t)),
        }
        d
    }

    fn on_timer(&mut self, c: &mut Conn, now: Instant) -> Option<End> {
        if let Some(g) = &c.goaway {
            if now >= g.close_at {
                debug!("closing the drained connection");
                return Some(c.lost(None, None));
            }
        }
        if c.dead_at.is_some_and(|d| now >= d) {
            debug!("no frame from the gateway since the PING: connection dead");
            return Some(c.lost(None, None));
        }
        if self.ack_due.is_some_and(|d| now >= d) {
            self.send_ack(c);
        }
        if now >= c.last_sent + c.heartbeat {
            self.send_ack(c);
            c.write(&Frame::new(Header::Ping(pb::Ping {})));
            c.ping_at.get_or_insert(now);
            if c.dead_at.is_none() {
                c.dead_at = Some(now + c.heartbeat + DEAD_SLACK);
            }
        }
        if c.goaway.is_none() {
            let resend_after = self.uplink_timeout();
            while let Some(&(due, msg_id)) = self.resend_q.front() {
                if due > now {
                    break;
                }
                self.resend_q.pop_front();
                if let Some(p) = self.uplinks.get_mut(&msg_id) {
                    if p.sent_at.is_some_and(|s| s + resend_after <= now) {
                        debug!(msg_id, "no UPLINK_ACK in time: resending");
                        c.write_encoded(&p.frame);
                        p.sent_at = Some(now);
                        self.resend_q.push_back((now + resend_after, msg_id));
                    }
                }
            }
        }
        None
    }

    /// Writes DOWNLINK_ACK(last_seq) if anything is unacked (or a duplicate asks for it).
    fn send_ack(&mut self, c: &mut Conn) {
        if self.last_seq > 0 && (self.last_seq > self.acked_seq || self.force_ack) {
            c.write(&Frame::new(Header::DownlinkAck(pb::DownlinkAck {
                seq: self.last_seq,
            })));
            self.acked_seq = self.last_seq;
        }
        self.unacked = 0;
        self.force_ack = false;
        self.ack_due = None;
    }

    fn on_command(&mut self, cmd: Option<Command>, c: &mut Conn) -> Option<End> {
        match cmd {
            None => Some(End::Close { done: None }),
            Some(Command::Close { done }) => Some(End::Close { done: Some(done) }),
            Some(Command::DropConnection) => {
                debug!("dropping the connection on request");
                Some(c.lost(None, None))
            }
            Some(Command::Send {
                msg_id,
                frame,
                reply,
            }) => {
                let new = self.add_uplink(msg_id, frame, reply);
                // After a GOAWAY nothing new goes out on this connection.
                if new && c.goaway.is_none() {
                    if let Some(p) = self.uplinks.get_mut(&msg_id) {
                        let now = Instant::now();
                        c.write_encoded(&p.frame);
                        p.sent_at = Some(now);
                        self.resend_q.push_back((
                            now + self.cfg.uplink_timeout.max(Duration::from_millis(1)),
                            msg_id,
                        ));
                    }
                }
                None
            }
            Some(Command::Room {
                request_id,
                room_id,
                join,
                reply,
            }) => {
                let room = PendingRoom {
                    room_id,
                    join,
                    reply: Some(reply),
                };
                if c.goaway.is_none() {
                    c.write(&room.frame(request_id));
                }
                self.rooms.insert(request_id, room);
                None
            }
        }
    }

    fn process_buffered(&mut self, c: &mut Conn) -> Option<End> {
        while self.outbox.len() < OUTBOX_SOFT_LIMIT {
            match c.decoder.decode(&mut c.rbuf) {
                Ok(None) => return None,
                Ok(Some(frame)) => {
                    if let Some(end) = self.on_frame(c, frame, false) {
                        return Some(end);
                    }
                }
                Err(e) => return Some(self.broken(c, e.code(), e.to_string())),
            }
        }
        None
    }

    /// The gateway broke the protocol: send ERROR with the code and close (PROTOCOL.md §3.2).
    fn broken(&mut self, c: &mut Conn, code: pb::ErrorCode, message: String) -> End {
        warn!(?code, "protocol error from the gateway: {message}");
        c.write(&Frame::new(Header::Error(Box::new(pb::Error {
            code: code as i32,
            message,
            ..Default::default()
        }))));
        c.flush_on_end = true;
        c.lost(None, None)
    }

    fn on_frame(&mut self, c: &mut Conn, frame: Frame, in_batch: bool) -> Option<End> {
        let Frame { header, gzip, body } = frame;
        match header {
            Header::Pong(_) => {
                if let (Some(at), Some(o)) = (c.ping_at.take(), &self.cfg.observer) {
                    o.heartbeat_rtt(at.elapsed());
                }
                None
            }
            Header::UplinkAck(a) => {
                self.on_uplink_ack(a);
                None
            }
            Header::Downlink(d) => self.on_downlink(c, d.seq, d.body_type, gzip, body),
            Header::RoomResult(r) => {
                self.on_room_result(*r);
                None
            }
            Header::GoAway(g) => {
                self.on_goaway(c, &g);
                None
            }
            Header::Kick(k) => Some(End::Kicked {
                reason: pb::KickReason::try_from(k.reason).unwrap_or_default(),
                message: k.message,
            }),
            Header::Error(e) => {
                let code = code_of(e.code);
                debug!(?code, message = %e.message, "ERROR from the gateway");
                Some(c.lost(Some(code), millis(e.retry_after_ms)))
            }
            Header::Batch(b) if !in_batch => {
                let batch = Frame {
                    header: Header::Batch(b),
                    gzip,
                    body,
                };
                match decode_batch(&batch, &self.cfg.limits) {
                    Err(e) => Some(self.broken(c, e.code(), format!("bad BATCH: {e}"))),
                    Ok(frames) => {
                        for f in frames {
                            if let Some(end) = self.on_frame(c, f, true) {
                                return Some(end);
                            }
                        }
                        None
                    }
                }
            }
            other => Some(self.broken(
                c,
                pb::ErrorCode::UnexpectedKind,
                format!("a gateway must not send {}", other.kind()),
            )),
        }
    }

    fn on_downlink(
        &mut self,
        c: &mut Conn,
        seq: u64,
        body_type: u32,
        gzip: bool,
        body: Bytes,
    ) -> Option<End> {
        if seq != 0 && seq <= self.received_seq {
            // A replay overlapping what we have: drop, but ack again.
            self.force_ack = true;
            if self.ack_due.is_none() {
                self.ack_due = Some(Instant::now() + self.cfg.ack_delay);
            }
            return None;
        }
        let body = if gzip {
            match gunzip(&body, &self.cfg.limits) {
                Ok(b) => Bytes::from(b),
                // Never ack what could not be inflated: a resume replays it.
                Err(e) => return Some(self.broken(c, e.code(), format!("downlink {seq}: {e}"))),
            }
        } else {
            body
        };
        if seq == 0 {
            self.push(
                Event::Message {
                    seq,
                    body_type,
                    body,
                },
                None,
            );
            return None;
        }
        let expected = self.received_seq.saturating_add(1);
        if seq > expected {
            let announced = self
                .gap
                .is_some_and(|(from, to)| from <= expected && seq - 1 <= to);
            if !announced {
                warn!(
                    "downlink seqs {expected}..={} were skipped without an announcement",
                    seq - 1
                );
            }
        }
        self.received_seq = seq;
        let epoch = self.epoch;
        self.push(
            Event::Message {
                seq,
                body_type,
                body,
            },
            Some((epoch, seq)),
        );
        None
    }

    fn on_uplink_ack(&mut self, a: pb::UplinkAck) {
        let Some(p) = self.uplinks.remove(&a.msg_id) else {
            debug!(
                msg_id = a.msg_id,
                "UPLINK_ACK for no pending uplink (a duplicate)"
            );
            return;
        };
        let result = if a.code == pb::ErrorCode::Ok as i32 {
            Ok(a.msg_id)
        } else {
            Err(SendError::Nack {
                code: code_of(a.code),
                retry_after: millis(a.retry_after_ms),
                message: a.message,
            })
        };
        for w in p.waiters {
            let _ = w.send(result.clone());
        }
    }

    fn on_room_result(&mut self, r: pb::RoomResult) {
        let Some(p) = self.rooms.remove(&r.request_id) else {
            debug!(
                request_id = r.request_id,
                "ROOM_RESULT for no pending request"
            );
            return;
        };
        let result = if r.code == pb::ErrorCode::Ok as i32 {
            if p.join {
                self.joined.insert(p.room_id.clone());
            } else {
                self.joined.remove(&p.room_id);
            }
            Ok(())
        } else {
            Err(RoomError {
                code: code_of(r.code),
                message: r.message,
            })
        };
        match p.reply {
            Some(reply) => {
                let _ = reply.send(result);
            }
            None => {
                if let Err(e) = result {
                    warn!(room = %p.room_id, "joining the room again failed: {e}");
                }
            }
        }
    }

    fn on_goaway(&mut self, c: &mut Conn, g: &pb::GoAway) {
        if c.goaway.is_some() {
            return;
        }
        let delay = Duration::from_millis(g.reconnect_delay_ms.into());
        let now = Instant::now();
        let reconnect_at = now + delay + self.rng.jitter(delay / 2);
        debug!(?delay, reason = %g.reason, "GOAWAY");
        c.goaway = Some(GoAwayPlan {
            reconnect_at,
            close_at: reconnect_at.min(now + GOAWAY_LINGER),
        });
        self.push(
            Event::GoAway {
                reconnect_delay: delay,
            },
            None,
        );
    }

    /// Queues an event for the application (in order behind what is queued).
    fn push(&mut self, event: Event, seq: Option<(u64, u64)>) {
        if self.events_gone {
            self.account(seq);
            return;
        }
        self.outbox.push_back(Queued { event, seq });
        self.flush_outbox();
    }

    /// After [`deliver_one`]: count what was delivered and hand over what fits now.
    fn after_deliver(&mut self, r: Result<Option<(u64, u64)>, ()>) {
        match r {
            Ok(seq) => {
                self.account(seq);
                self.flush_outbox();
            }
            Err(()) => self.events_closed(),
        }
    }

    /// Hands queued events to the channel while it has room.
    fn flush_outbox(&mut self) {
        while !self.outbox.is_empty() {
            // Ok(seq): one event handed over; Err(true): channel closed; Err(false): full.
            let step = match self.event_tx.try_reserve() {
                Ok(permit) => match self.outbox.pop_front() {
                    Some(q) => {
                        permit.send(Box::new(q.event));
                        Ok(q.seq)
                    }
                    None => Err(false),
                },
                Err(TrySendError::Full(())) => Err(false),
                Err(TrySendError::Closed(())) => Err(true),
            };
            match step {
                Ok(seq) => self.account(seq),
                Err(true) => {
                    self.events_closed();
                    break;
                }
                Err(false) => break,
            }
        }
    }

    fn events_closed(&mut self) {
        if !self.events_gone {
            debug!("Events was dropped: discarding events");
        }
        self.events_gone = true;
        while let Some(q) = self.outbox.pop_front() {
            self.account(q.seq);
        }
    }

    /// A downlink was handed to the application: it is processed, ack it.
    fn account(&mut self, seq: Option<(u64, u64)>) {
        let Some((epoch, seq)) = seq else { return };
        if epoch != self.epoch || seq <= self.last_seq {
            return;
        }
        self.last_seq = seq;
        self.shared.last_seq.store(seq, Ordering::Release);
        self.unacked = self.unacked.saturating_add(1);
        let now = Instant::now();
        if self.unacked >= self.cfg.ack_every.max(1) {
            self.ack_due = Some(now);
        } else if self.ack_due.is_none() {
            self.ack_due = Some(now + self.cfg.ack_delay);
        }
    }

    /// Terminal: fail what is pending, answer close(), deliver the rest and the last
    /// event, then end (dropping the sender ends `Events`).
    async fn finish(mut self, last: Event, done: Option<oneshot::Sender<()>>) {
        self.shared.online.store(false, Ordering::Release);
        self.cmd_rx.close();
        for (_, p) in std::mem::take(&mut self.uplinks) {
            for w in p.waiters {
                let _ = w.send(Err(SendError::Closed));
            }
        }
        for (_, r) in std::mem::take(&mut self.rooms) {
            if let Some(reply) = r.reply {
                let _ = reply.send(Err(RoomError::closed()));
            }
        }
        while let Ok(cmd) = self.cmd_rx.try_recv() {
            match *cmd {
                Command::Send { reply, .. } => {
                    let _ = reply.send(Err(SendError::Closed));
                }
                Command::Room { reply, .. } => {
                    let _ = reply.send(Err(RoomError::closed()));
                }
                Command::Close { done } => {
                    let _ = done.send(());
                }
                Command::DropConnection => {}
            }
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
        if self.events_gone {
            return;
        }
        self.outbox.push_back(Queued {
            event: last,
            seq: None,
        });
        while let Some(q) = self.outbox.pop_front() {
            if self.event_tx.send(Box::new(q.event)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_codes_are_taken_by_their_group() {
        assert_eq!(code_of(203), pb::ErrorCode::AuthFailed);
        assert_eq!(code_of(199), pb::ErrorCode::MalformedFrame);
        assert_eq!(code_of(250), pb::ErrorCode::AuthFailed);
        assert_eq!(code_of(399), pb::ErrorCode::ServerBusy);
        assert_eq!(code_of(499), pb::ErrorCode::UpstreamUnavailable);
        assert_eq!(code_of(599), pb::ErrorCode::Internal);
        assert_eq!(code_of(-5), pb::ErrorCode::Internal);
        assert!(is_terminal(code_of(299)));
        assert!(!is_terminal(pb::ErrorCode::HeartbeatTimeout));
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_capped_ceiling() {
        let mut cfg = Config::new("x", "u", "d", "t");
        cfg.backoff_initial = Duration::from_millis(100);
        cfg.backoff_max = Duration::from_millis(1000);
        let (_tx, rx) = mpsc::unbounded_channel();
        let (etx, _erx) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            session_id: std::sync::Mutex::new(None),
            last_seq: Default::default(),
            online: Default::default(),
            next_msg_id: Default::default(),
            next_request_id: Default::default(),
            limits: Default::default(),
        });
        let mut d = Driver::new(Arc::new(cfg), shared, rx, etx);
        for attempt in [0u32, 1, 2, 3, 4, 10, 40, u32::MAX] {
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(31))
                .min(Duration::from_millis(1000));
            let mut max_seen = Duration::ZERO;
            for _ in 0..200 {
                let b = d.backoff(attempt);
                assert!(b <= ceiling, "{b:?} > {ceiling:?}");
                max_seen = max_seen.max(b);
            }
            assert!(max_seen > ceiling / 2, "jitter never got near the ceiling");
        }
        assert_eq!(d.rng.jitter(Duration::ZERO), Duration::ZERO);
        let _ = d.rng.jitter(Duration::MAX);
    }
}
