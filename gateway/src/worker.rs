//! One worker thread: an epoll loop (mio) over its own SO_REUSEPORT listeners and a slab of
//! compact connection records.
//!
//! Nothing here wakes up for an idle connection: no task, no timer and no buffer per
//! connection. A connection is a slab entry of about 64 bytes (the socket, the 16-byte
//! [`Conn`], its session, and three optional boxes that exist only while there is something
//! in them: a partial inbound frame, unwritten outbound bytes, TLS state). Reads go through
//! one buffer per worker; frames split off it keep their bodies zero-copy. Deadlines live in
//! the worker's [`TimerWheel`]. Whatever is queued for a connection during one turn of the
//! loop (answers, acks, downlinks) is written with one `write` at the end of the turn.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tether_codec::{Decoder, Frame, Header};
use tether_protocol::pb::{self, ErrorCode, KickReason, Platform};

use crate::conn::{Action, Conn, ConnConfig};
use crate::handoff::ClaimJob;
use crate::metrics::Metrics;
use crate::node::{Cmd, ConnRef, Node, Session, SessionId};
use crate::timer::{Tick, TimerWheel};
use crate::transport::{self, Got, Tls, Transport, Wrote};
use crate::upstream::{LoginRequest, Names, Outcome, Reply, Uplink};

/// Bytes read from a socket per `read` call (one buffer per worker).
pub const READ_CHUNK: usize = 64 * 1024;

/// Events taken per `epoll_wait`.
pub const EVENTS_PER_POLL: usize = 1024;

pub(crate) const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX - 1024;

const DIRTY: u8 = 1;
const FILL: u8 = 2;
const GOAWAY_SENT: u8 = 4;
/// In `Worker::unfinished`: to be read again next turn.
const UNFINISHED: u8 = 8;

/// A listener of this worker.
pub(crate) struct Listener {
    pub sock: TcpListener,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

struct Entry {
    stream: TcpStream,
    conn: Conn,
    gen: u32,
    /// The tick of this connection's one live entry in the timer wheel; an entry for this
    /// slot due earlier is stale (left by an earlier deadline or an earlier connection in
    /// the slot) and is dropped when it comes up.
    timer_at: Tick,
    flags: u8,
    session: Option<Arc<Session>>,
    /// The start of a frame that has not fully arrived.
    partial: Option<Box<BytesMut>>,
    /// Bytes not yet written to the socket.
    out: Option<Box<BytesMut>>,
    tls: Tls,
}

impl Entry {
    /// Its transport and its unwritten bytes, borrowed together.
    fn parts(&mut self) -> (Transport<'_>, Option<&mut BytesMut>) {
        let t = Transport {
            stream: &mut self.stream,
            tls: &mut self.tls,
        };
        (t, self.out.as_deref_mut())
    }
}

/// The session a LOGIN asks to resume, if it names one.
fn resume_id(login: &pb::Login) -> Option<SessionId> {
    let r = login.resume.as_ref()?;
    SessionId::try_from(r.session_id.as_ref()).ok()
}

pub(crate) struct Worker {
    id: u16,
    node: Arc<Node>,
    poll: Poll,
    listeners: Vec<Listener>,
    rx: Receiver<Cmd>,
    conns: Slab<Entry>,
    next_gen: u32,
    wheel: TimerWheel,
    /// Detached sessions by the end of their grace period (FIFO: the grace period is fixed,
    /// so the queue is in deadline order).
    expiring: VecDeque<(Tick, Arc<Session>, u32)>,
    decoder: Decoder,
    /// [`crate::server::Options::housekeeping`], and the second it last ran in.
    housekeeping: Option<(fn(), Tick)>,
    /// Frames before login: no larger than `max_prelogin_bytes`.
    prelogin_decoder: Decoder,
    /// Connections awaiting login, by slot: their key with the node's pre-login counts.
    prelogin: std::collections::HashMap<usize, u32>,
    /// Connections that used up their read budget last turn, with data left: read again this
    /// turn (edge-triggered: no new event would say so).
    unfinished: Vec<(usize, u32)>,
    conn_config: ConnConfig,
    rbuf: BytesMut,
    scratch: Box<[u8]>,
    actions: Vec<Action>,
    dirty: Vec<usize>,
    accept_paused_until: Option<Instant>,
    accept_backoff: Duration,
    drain: Option<Drain>,
    stop: bool,
    last_accept_error_log: Option<Instant>,
}

/// A login the upstream has not answered yet: what binding it needs, kept out of the
/// connection's record (which stays small) until the answer comes.
#[derive(Debug)]
pub(crate) struct PendingLogin {
    pub(crate) conn: ConnRef,
    pub(crate) id: Names,
    logins: crate::node::Logins,
    login: Box<pb::Login>,
    body: Bytes,
    peer: Option<SocketAddr>,
}

/// Where a login's verdict stands, between the worker that asked and whoever answers.
enum LoginWait {
    /// The upstream's `login` is still running on this worker.
    Calling(Box<PendingLogin>),
    /// Answered during the call.
    Answered(Box<PendingLogin>, Outcome),
    /// The call returned unanswered: the answer goes to the worker as a command.
    Later(Box<PendingLogin>),
    Done,
}

struct Drain {
    start: Instant,
    order: Vec<(usize, u32)>,
    next: usize,
    rng: u64,
}

fn errno_label(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(24) => "EMFILE",
        Some(23) => "ENFILE",
        Some(105) => "ENOBUFS",
        Some(12) => "ENOMEM",
        Some(103) => "ECONNABORTED",
        Some(1) => "EPERM",
        _ => "other",
    }
}

/// Accept errors that mean "out of resources": back off instead of spinning (the admin
/// server's accept loop asks the same).
pub(crate) fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn conn_ref(worker: u16, slot: usize, gen: u32) -> ConnRef {
    ConnRef {
        worker,
        slot: slot as u32,
        gen,
    }
}

fn error_frame(code: ErrorCode, message: &str, retry_after_ms: u32) -> Frame {
    Frame::new(Header::Error(Box::new(pb::Error {
        code: code as i32,
        message: message.into(),
        retry_after_ms,
        ..Default::default()
    })))
}

fn close_label(code: Option<ErrorCode>) -> &'static str {
    match code {
        None => "peer_or_replaced",
        Some(ErrorCode::HeartbeatTimeout) => "heartbeat_timeout",
        Some(ErrorCode::LoginTimeout) => "login_timeout",
        Some(ErrorCode::SlowConsumer) => "slow_consumer",
        Some(ErrorCode::AuthFailed | ErrorCode::TokenExpired) => "auth_failed",
        Some(ErrorCode::Draining) => "draining",
        Some(c) if (c as i32) >= 100 && (c as i32) < 200 => "protocol_error",
        Some(_) => "other",
    }
}

impl Worker {
    pub(crate) fn new(
        id: u16,
        node: Arc<Node>,
        poll: Poll,
        mut listeners: Vec<Listener>,
        rx: Receiver<Cmd>,
        slots: usize,
        housekeeping: Option<fn()>,
    ) -> io::Result<Worker> {
        for (i, l) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(&mut l.sock, Token(LISTENER_BASE + i), Interest::READABLE)?;
        }
        let now = node.clock.now();
        Ok(Worker {
            id,
            wheel: TimerWheel::new(node.config.timer_wheel_slots, now),
            decoder: Decoder::new(node.limits),
            housekeeping: housekeeping.map(|f| (f, now)),
            prelogin_decoder: Decoder::new(node.config.prelogin_limits()),
            prelogin: Default::default(),
            unfinished: Vec::new(),
            conn_config: node.config.conn(),
            node,
            poll,
            listeners,
            rx,
            // Reserved, not touched: pages are only backed as slots are used, and the slab never
            // grows by copying (which would leave the old copy's pages behind).
            conns: Slab::with_capacity(slots),
            next_gen: 0,
            expiring: VecDeque::new(),
            rbuf: BytesMut::new(),
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            actions: Vec::new(),
            dirty: Vec::new(),
            accept_paused_until: None,
            accept_backoff: Duration::from_millis(10),
            drain: None,
            stop: false,
            last_accept_error_log: None,
        })
    }

    fn me(&self, slot: usize, gen: u32) -> ConnRef {
        conn_ref(self.id, slot, gen)
    }

    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        while !self.stop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(worker = self.id, "epoll failed: {e}");
                    break;
                }
            }
            // Deadlines fire on whole seconds passed (`now`); what starts a deadline (an
            // accept, a frame, a detach) is stamped with the time rounded up (`at`), so no
            // deadline ever fires before its configured time (it may be up to 1 s late).
            let now = self.node.clock.now();
            let at = self.node.clock.now_ceil();
            // Last turn's unfinished connections: their flag is cleared here, so one whose
            // event this turn uses its budget again is seen as such below.
            let mut unfinished = std::mem::take(&mut self.unfinished);
            for &(slot, gen) in &unfinished {
                if let Some(e) = self.conns.get_mut(slot).filter(|e| e.gen == gen) {
                    e.flags &= !UNFINISHED;
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    Token(t) if t >= LISTENER_BASE => self.accept(t - LISTENER_BASE, at),
                    Token(slot) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            let short_ok = !ev.is_read_closed() && !ev.is_error();
                            self.on_readable(slot, at, short_ok);
                        }
                        if ev.is_writable() {
                            self.mark_dirty(slot, 0);
                        }
                    }
                }
            }
            // After every connection with an event had its turn (unless an event gave it one
            // already: then it is flagged for next turn again).
            for &(slot, gen) in &unfinished {
                let carried = self
                    .conns
                    .get(slot)
                    .is_some_and(|e| e.gen == gen && e.flags & UNFINISHED == 0);
                if carried {
                    self.on_readable(slot, at, false);
                }
            }
            unfinished.clear();
            if self.unfinished.is_empty() {
                self.unfinished = unfinished;
            }
            // Commands are stamped like events (a login answered later starts a heartbeat
            // deadline).
            self.commands(at);
            self.timers(now);
            if self
                .accept_paused_until
                .is_some_and(|t| Instant::now() >= t)
            {
                self.resume_accepting(at);
            }
            self.drain_step();
            self.flush_dirty();
        }
        self.shutdown();
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let mut t: Option<Duration> = None;
        let mut min = |d: Duration| t = Some(t.map_or(d, |t| t.min(d)));
        if let Some(at) = self.accept_paused_until {
            min(at.saturating_duration_since(Instant::now()));
        }
        if self.drain.is_some() {
            min(Duration::from_millis(20));
        }
        if !self.dirty.is_empty() || !self.unfinished.is_empty() {
            min(Duration::ZERO);
        }
        if !self.node.clock.is_manual() {
            // At least once a second: upstream timeouts are checked in the timer step.
            min(Duration::from_secs(1));
            let due = [
                self.wheel.next_due(),
                self.expiring.front().map(|(t, _, _)| *t),
            ]
            .into_iter()
            .flatten()
            .min();
            if let Some(due) = due {
                let due_ms = due as u64 * 1000;
                let ms = due_ms.saturating_sub(self.node.clock.elapsed_ms());
                min(Duration::from_millis(ms.min(60_000)));
            }
        }
        t
    }

    // ---- accepting ----

    fn accept(&mut self, i: usize, now: Tick) {
        if self.accept_paused_until.is_some() || self.drain.is_some() {
            return;
        }
        loop {
            let Some(l) = self.listeners.get(i) else {
                return;
            };
            match l.sock.accept() {
                Ok((stream, peer)) => {
                    self.accept_backoff = Duration::from_millis(10);
                    let tls = l.tls.clone();
                    self.admit(stream, peer, tls, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let label = errno_label(&e);
                    Metrics::inc(&self.node.metrics.accept_errors, "errno", label);
                    let log = self
                        .last_accept_error_log
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                    if log {
                        self.last_accept_error_log = Some(Instant::now());
                        tracing::warn!(worker = self.id, "accept failed: {e} ({label})");
                    }
                    if is_resource_error(&e) {
                        // Out of descriptors or memory: pause, retry after the backoff or as
                        // soon as one of our connections closes.
                        self.accept_paused_until = Some(Instant::now() + self.accept_backoff);
                        let max =
                            Duration::from_millis(self.node.config.accept_backoff_max_ms as u64);
                        self.accept_backoff = (self.accept_backoff * 2).min(max);
                        return;
                    }
                }
            }
        }
    }

    fn resume_accepting(&mut self, now: Tick) {
        self.accept_paused_until = None;
        for i in 0..self.listeners.len() {
            self.accept(i, now);
        }
    }

    fn admit(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        now: Tick,
    ) {
        let node = &self.node;
        let max = node.config.max_connections;
        let busy = |stream: &mut TcpStream, message: &str| {
            node.metrics.refused_busy.inc();
            if tls.is_none() {
                // A fresh socket's send buffer is empty: this small write does not block.
                let f = error_frame(
                    ErrorCode::ServerBusy,
                    message,
                    node.config.busy_retry_after_ms,
                );
                if let Ok(b) = f.to_bytes(&node.limits) {
                    let _ = stream.write(&b);
                }
            }
        };
        let admitted = node
            .connections
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                (c < max).then_some(c + 1)
            })
            .is_ok();
        if !admitted {
            return busy(&mut stream, "connection limit reached");
        }
        let key = match node.prelogin_enter(peer.ip()) {
            Ok(key) => key,
            Err(limit) => {
                node.connections.fetch_sub(1, Ordering::SeqCst);
                Metrics::inc(&node.metrics.prelogin_refused, "limit", limit.label());
                return busy(&mut stream, limit.message());
            }
        };
        let undo = |node: &Node| {
            node.prelogin_leave(key);
            node.connections.fetch_sub(1, Ordering::SeqCst);
            node.metrics.connections.dec();
        };
        node.metrics.accepted.inc();
        node.metrics.connections.inc();
        let sock = socket2::SockRef::from(&stream);
        let _ = sock.set_tcp_nodelay(true);
        if node.config.tcp_keepalive_secs > 0 {
            let secs = Duration::from_secs(node.config.tcp_keepalive_secs as u64);
            let ka = socket2::TcpKeepalive::new()
                .with_time(secs)
                .with_interval(Duration::from_secs(30))
                .with_retries(4);
            let _ = sock.set_tcp_keepalive(&ka);
        }
        if node.config.tcp_user_timeout_ms > 0 {
            let t = Duration::from_millis(node.config.tcp_user_timeout_ms as u64);
            let _ = sock.set_tcp_user_timeout(Some(t));
        }
        let tls = match tls.map(rustls::ServerConnection::new) {
            None => None,
            Some(Ok(c)) => Some(Box::new(c)),
            Some(Err(e)) => {
                tracing::warn!("TLS session setup failed: {e}");
                node.metrics.tls_handshake_failures.inc();
                return undo(node);
            }
        };
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        if slot >= LISTENER_BASE {
            return undo(node);
        }
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!("epoll register failed: {e}");
            return undo(node);
        }
        let conn = Conn::new(now);
        let mut deadline = conn.deadline(&self.conn_config).unwrap_or(now);
        if tls.is_some() {
            deadline = deadline.min(now.saturating_add(node.config.tls_handshake_timeout_secs));
        }
        entry.insert(Entry {
            stream,
            conn,
            gen,
            timer_at: deadline,
            flags: 0,
            session: None,
            partial: None,
            out: None,
            tls,
        });
        self.wheel.insert(slot as u32, deadline);
        self.prelogin.insert(slot, key);
        // Data may already be waiting (edge-triggered: no event for what arrived before).
        self.on_readable(slot, now, false);
    }

    // ---- reading ----

    /// `may_stop_short`: the event did not report the peer's FIN, so a short read means the
    /// socket is empty (a FIN already queued would have come with the event).
    fn on_readable(&mut self, slot: usize, now: Tick, may_stop_short: bool) {
        let Some(e) = self.conns.get_mut(slot) else {
            return;
        };
        if e.conn.is_closed() {
            return;
        }
        let gen = e.gen;
        let mut logged_in = e.conn.is_logged_in();
        // A partial frame is read into on its own buffer and kept in it: appended to, never
        // copied again (a frame trickled in byte by byte costs linear, not quadratic, work).
        let from_partial = e.partial.is_some();
        let mut buf = match e.partial.take() {
            Some(b) => *b,
            None => std::mem::take(&mut self.rbuf),
        };
        let mut eof = false;
        // A read shorter than the buffer emptied the socket's receive queue: data or a FIN
        // arriving later makes a new readiness edge, so the read that would only say EAGAIN
        // is saved (one syscall less per wakeup).
        let mut drained = false;
        let mut failed: Option<tether_codec::Error> = None;
        let mut frames = 0u64;
        let mut bytes = 0u64;
        let mut tls_failed = false;
        let mut tls_to_write = false;
        'read: while let Some(e) = self.conns.get_mut(slot) {
            let n = match e.parts().0.read(&mut self.scratch, &mut buf) {
                Got::Data { n, full } => {
                    drained = may_stop_short && !full;
                    n
                }
                Got::WouldBlock => break,
                Got::Eof => {
                    eof = true;
                    0
                }
                Got::Failed => {
                    tls_failed = true;
                    break 'read;
                }
            };
            // Handshake answers to send: written at the end of the turn.
            tls_to_write |= transport::wants_write(&e.tls);
            bytes += n as u64;
            // Take every complete frame off the buffer.
            loop {
                let decoded = if logged_in {
                    self.decoder.decode(&mut buf)
                } else {
                    self.prelogin_decoder.decode(&mut buf)
                };
                match decoded {
                    Ok(Some(frame)) => {
                        frames += 1;
                        let Some(e) = self.conns.get_mut(slot) else {
                            break 'read;
                        };
                        e.conn.handle_frame(now, frame, &mut self.actions);
                        self.run_actions(slot, now);
                        // A LOGIN bound here lifts the pre-login frame limit.
                        match self.conns.get(slot) {
                            Some(e) => logged_in = e.conn.is_logged_in(),
                            None => break 'read,
                        }
                    }
                    Ok(None) => break,
                    Err(err) => {
                        failed = Some(err);
                        break 'read;
                    }
                }
            }
            if eof || drained {
                break;
            }
            if bytes as usize >= self.node.config.read_budget_bytes {
                // Fair shares: the others on this worker go first; the rest is read next turn.
                if let Some(e) = self.conns.get_mut(slot) {
                    if e.flags & UNFINISHED == 0 {
                        e.flags |= UNFINISHED;
                        self.unfinished.push((slot, gen));
                    }
                }
                break;
            }
        }
        if tls_to_write {
            self.mark_dirty(slot, 0);
        }
        if failed.is_none() && !tls_failed && eof {
            // The peer closed in the middle of a frame: that is an error the client hears of
            // (§3.2), not a quiet close.
            failed = self.decoder.at_end(&buf);
        }
        let m = &self.node.metrics;
        m.frames_in.inc_by(frames);
        m.bytes_in.inc_by(bytes);
        if let Some(err) = failed {
            Metrics::inc(&m.decode_errors, "error", err.name());
            if let Some(e) = self.conns.get_mut(slot) {
                e.conn.handle_decode_error(&err, &mut self.actions);
                self.run_actions(slot, now);
            }
        } else if tls_failed {
            m.tls_handshake_failures.inc();
            self.close(slot, None, "tls_error");
        } else if eof {
            self.close(slot, None, "peer_closed");
        } else if let Some(e) = self.conns.get_mut(slot) {
            if !buf.is_empty() {
                if from_partial {
                    e.partial = Some(Box::new(buf));
                    return;
                }
                // The start of a frame, out of the shared buffer: copied once.
                e.partial = Some(Box::new(BytesMut::from(&buf[..])));
            }
        }
        if from_partial {
            // The shared buffer was not used.
            return;
        }
        buf.clear();
        if buf.capacity() < READ_CHUNK {
            buf = BytesMut::with_capacity(READ_CHUNK);
        }
        self.rbuf = buf;
    }

    /// Carries out what a [`Conn`] asked for.
    fn run_actions(&mut self, slot: usize, now: Tick) {
        let mut actions = std::mem::take(&mut self.actions);
        for a in actions.drain(..) {
            let Some(e) = self.conns.get(slot) else {
                break;
            };
            let a = match a {
                Action::Send(f) => {
                    self.queue(slot, &f);
                    continue;
                }
                Action::Close(code) => {
                    self.close(slot, Some(code), close_label(Some(code)));
                    continue;
                }
                Action::Login { login, body } => {
                    self.login(slot, login, body, now);
                    continue;
                }
                a => a,
            };
            // The rest belong to the session (`Conn` asks for them only once logged in).
            let Some(s) = e.session.clone() else {
                continue;
            };
            match a {
                Action::Uplink {
                    msg_id,
                    body_type,
                    gzip,
                    body,
                } => {
                    let up = Uplink {
                        msg_id,
                        body_type,
                        gzip,
                        body,
                    };
                    if let Some(ack) = self.node.uplink(&s, up) {
                        self.queue(slot, &ack);
                    }
                }
                Action::DownlinkAck(seq) => self.node.downlink_ack(&s, seq),
                Action::RoomJoin {
                    request_id,
                    room_id,
                    body,
                } => self.room_request(slot, &s, true, request_id, room_id, body),
                Action::RoomLeave {
                    request_id,
                    room_id,
                } => self.room_request(slot, &s, false, request_id, room_id, Bytes::new()),
                Action::Send(_) | Action::Close(_) | Action::Login { .. } => {}
            }
        }
        self.actions = actions;
    }

    /// A ROOM_JOIN (`join`) or ROOM_LEAVE: to the upstream, or refused at once (the answer
    /// queued here).
    fn room_request(
        &mut self,
        slot: usize,
        s: &Arc<Session>,
        join: bool,
        request_id: u64,
        room_id: String,
        body: Bytes,
    ) {
        if let Some(f) = self.node.room_request(s, join, request_id, room_id, body) {
            self.queue(slot, &f);
        }
    }

    /// Answers a LOGIN with a failure and closes.
    fn refuse_login(
        &mut self,
        slot: usize,
        code: ErrorCode,
        message: &str,
        reason: &'static str,
        retry_after_ms: u32,
    ) {
        let node = &self.node;
        Metrics::inc(&node.metrics.logins, "result", reason);
        let f = Frame::new(Header::LoginResult(Box::new(pb::LoginResult {
            code: code as i32,
            message: message.into(),
            server_id: node.config.server_id.clone(),
            server_time_ms: node.clock.unix_ms(),
            retry_after_ms,
            ..Default::default()
        })));
        self.queue(slot, &f);
        self.close(slot, None, close_label(Some(code)));
    }

    fn refuse_draining(&mut self, slot: usize) {
        let retry = self.node.config.drain_reconnect_delay_ms;
        let msg = "this gateway is draining";
        self.refuse_login(slot, ErrorCode::Draining, msg, "draining", retry);
    }

    /// A LOGIN: authenticated here, then admitted by the upstream, then bound to a session.
    /// The upstream may answer later (a remote back end): the connection waits, the worker
    /// goes on, and the answer comes back as [`Cmd::LoginVerdict`].
    fn login(&mut self, slot: usize, login: Box<pb::Login>, body: Bytes, now: Tick) {
        let node = self.node.clone();
        if node.is_draining() {
            return self.refuse_draining(slot);
        }
        let id = match node.authenticate(&login) {
            Ok(id) => Names::new(&id.user_id, &id.device_id),
            Err(e) => return self.refuse_login(slot, e.code, &e.message, e.reason, 0),
        };
        let logins = match node.take_login(&id) {
            Ok(l) => l,
            Err(retry) => {
                let msg = "too many logins for this device or user";
                let reason = "rate_limited";
                return self.refuse_login(slot, ErrorCode::RateLimited, msg, reason, retry);
            }
        };
        let Some(e) = self.conns.get(slot) else {
            return;
        };
        let conn = self.me(slot, e.gen);
        let peer = e.stream.peer_addr().ok();
        let platform = Platform::try_from(login.platform).unwrap_or(Platform::Unspecified);
        let request = LoginRequest {
            names: id.clone(),
            platform,
            peer,
            resume: resume_id(&login),
            body: body.clone(),
        };
        let pending = Box::new(PendingLogin {
            conn,
            id,
            logins,
            login,
            body,
            peer,
        });
        // Answered during the call (the usual, in-process case): finished right here, with
        // no trip through the command channel. Answered later: sent to this worker.
        let wait = Arc::new(parking_lot::Mutex::new(LoginWait::Calling(pending)));
        let reply = {
            let wait = wait.clone();
            let node = node.clone();
            let worker = self.id;
            Reply::new(move |o: Outcome| {
                let mut w = wait.lock();
                match std::mem::replace(&mut *w, LoginWait::Done) {
                    LoginWait::Calling(p) => *w = LoginWait::Answered(p, o),
                    LoginWait::Later(p) => {
                        drop(w);
                        node.send(worker, Cmd::LoginVerdict(p, o));
                    }
                    other => *w = other,
                }
            })
        };
        node.admit(&request, reply);
        let answered = {
            let mut w = wait.lock();
            match std::mem::replace(&mut *w, LoginWait::Done) {
                LoginWait::Answered(p, o) => Some((p, o)),
                LoginWait::Calling(p) => {
                    *w = LoginWait::Later(p);
                    None
                }
                other => {
                    *w = other;
                    None
                }
            }
        };
        if let Some((p, o)) = answered {
            self.finish_login(slot, *p, o, now);
        }
    }

    /// The upstream's verdict on a login: refused, or bound to a session and answered.
    fn finish_login(&mut self, slot: usize, p: PendingLogin, o: Outcome, now: Tick) {
        let node = self.node.clone();
        let o = node.answer_that_fits(o);
        if o.code != ErrorCode::Ok {
            let reason = match o.code {
                ErrorCode::UpstreamTimeout => "upstream_timeout",
                ErrorCode::Internal => "upstream_failed",
                _ => "refused",
            };
            return self.refuse_login(slot, o.code, &o.message, reason, o.retry_after_ms);
        }
        if node.is_draining() {
            return self.refuse_draining(slot);
        }
        // A resume of a session a sibling process made (`--processes`): claimed from it
        // first, by the handoff thread; the answer comes back as `Cmd::Claimed`.
        if let Some(h) = node.handoff.get() {
            let sid = resume_id(&p.login).filter(|sid| node.session(sid).is_none());
            if let Some((sid, owner)) = sid.and_then(|sid| Some((sid, h.siblings.owner(&sid)?))) {
                h.claim(ClaimJob {
                    owner,
                    worker: self.id,
                    session_id: sid,
                    pending: Box::new(p),
                });
                return;
            }
        }
        self.bind_login(slot, p, now);
    }

    /// What a sibling answered for a claimed session: taken in (even if the connection that
    /// claimed it has gone meanwhile: it then waits for a resume like any detached session),
    /// then the login goes on.
    fn claimed(
        &mut self,
        p: PendingLogin,
        snapshot: Option<Box<crate::session::core::Snapshot>>,
        now: Tick,
    ) {
        let node = self.node.clone();
        if let Some(snapshot) = snapshot {
            if let Some(sid) = resume_id(&p.login) {
                if let Some(epoch) = node.adopt(sid, &p.id, *snapshot, now) {
                    if let Some(s) = node.session(&sid) {
                        let at = node
                            .clock
                            .now_ceil()
                            .saturating_add(node.config.resume_grace_secs);
                        self.expiring.push_back((at, s, epoch));
                    }
                }
            }
        }
        if let Some(slot) = self.lookup(p.conn) {
            self.bind_login(slot, p, now);
        }
    }

    /// Binds an admitted login to its session and answers LOGIN_RESULT.
    fn bind_login(&mut self, slot: usize, p: PendingLogin, now: Tick) {
        let node = self.node.clone();
        let PendingLogin {
            conn,
            id,
            logins,
            login,
            body,
            peer,
        } = p;
        let bound = node.bind(id, logins, &login, &body, conn, peer, now);
        Metrics::inc(&node.metrics.logins, "result", "ok");
        if let Some(key) = self.prelogin.remove(&slot) {
            node.prelogin_leave(key);
        }
        let platform = Platform::try_from(login.platform).unwrap_or(Platform::Unspecified);
        let interval = node.heartbeat_ms(platform);
        let (gap_from, gap_to) = bound.gap.unwrap_or((0, 0));
        let result = Frame::new(Header::LoginResult(Box::new(pb::LoginResult {
            code: ErrorCode::Ok as i32,
            session_id: bytes::Bytes::copy_from_slice(&bound.session.id),
            heartbeat_interval_ms: interval,
            server_id: node.config.server_id.clone(),
            server_time_ms: node.clock.unix_ms(),
            resumed: bound.resumed,
            gap_from,
            gap_to,
            ..Default::default()
        })));
        let Some(e) = self.conns.get_mut(slot) else {
            return;
        };
        e.conn.login_accepted(now, interval);
        e.session = Some(bound.session);
        // The login-deadline entry re-arms itself at the heartbeat deadline when it comes
        // up; only a heartbeat deadline before it needs an entry of its own.
        if let Some(d) = e.conn.deadline(&self.conn_config) {
            if d < e.timer_at {
                e.timer_at = d;
                self.wheel.insert(slot as u32, d);
            }
        }
        self.queue(slot, &result);
        // The replay (or the offline messages the upstream pushed on login) goes right
        // after LOGIN_RESULT.
        self.mark_dirty(slot, FILL);
    }

    // ---- writing ----

    fn mark_dirty(&mut self, slot: usize, extra: u8) {
        if let Some(e) = self.conns.get_mut(slot) {
            e.flags |= extra;
            if e.flags & DIRTY == 0 {
                e.flags |= DIRTY;
                self.dirty.push(slot);
            }
        }
    }

    /// Appends a frame to a connection's outbound bytes (written at the end of the turn).
    fn queue(&mut self, slot: usize, f: &Frame) {
        let limits = self.node.limits;
        if let Some(e) = self.conns.get_mut(slot) {
            let out = e.out.get_or_insert_with(Default::default);
            if let Err(err) = f.encode(out, &limits) {
                // Never silence: a frame the client is owed that cannot be written closes the
                // connection with INTERNAL (the session stays for a resume).
                tracing::error!("cannot encode a {} frame: {err}", f.kind());
                let kind = f.kind().name();
                Metrics::inc(&self.node.metrics.encode_failures, "kind", kind);
                self.close(slot, Some(ErrorCode::Internal), "encode_failed");
                return;
            }
            self.node.metrics.frames_out.inc();
        }
        self.mark_dirty(slot, 0);
    }

    /// Copies what the session has for this connection (a replay, new downlinks, transient
    /// ones) into the outbound bytes.
    fn fill(&mut self, slot: usize) {
        let Some(e) = self.conns.get_mut(slot) else {
            return;
        };
        let Some(s) = e.session.clone() else {
            return;
        };
        let me = conn_ref(self.id, slot, e.gen);
        let out = e.out.get_or_insert_with(Default::default);
        let config = &self.node.config;
        let frames = s.state.lock().poll_transmit(
            me,
            out,
            &self.node.limits,
            &config.compress(),
            config.replay_batch_min,
        );
        self.node.metrics.frames_out.inc_by(frames.unwrap_or(0));
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            let Some(e) = self.conns.get_mut(slot) else {
                continue;
            };
            let fill = e.flags & FILL != 0;
            e.flags &= !(DIRTY | FILL);
            if fill {
                self.fill(slot);
            }
            self.write(slot);
        }
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    /// Writes what is queued; keeps the rest for the next writable event. Closes a connection
    /// whose unwritten bytes pass `max_outbound_bytes` (a slow consumer).
    fn write(&mut self, slot: usize) -> bool {
        let max_out = self.node.config.max_outbound_bytes;
        let Some(e) = self.conns.get_mut(slot) else {
            return false;
        };
        let (mut t, out) = e.parts();
        let wrote = match out {
            Some(out) => t.write(out),
            // Handshake records and alerts, when there is no plaintext to send.
            None if transport::wants_write(t.tls) => t.write(&mut BytesMut::new()),
            None => Wrote::default(),
        };
        let (written, broken) = (wrote.taken, wrote.broken);
        self.node.metrics.bytes_out.inc_by(written);
        let pending =
            e.out.as_ref().map_or(0, |o| o.len()) + transport::wants_write(&e.tls) as usize;
        if e.out.as_ref().is_some_and(|o| o.is_empty()) {
            e.out = None;
        }
        if broken {
            self.close(slot, None, "write_error");
            return false;
        }
        if pending > max_out {
            self.node.metrics.slow_consumers.inc();
            self.close(slot, Some(ErrorCode::SlowConsumer), "slow_consumer");
            return false;
        }
        true
    }

    /// Closes a connection: writes what can be written (the ERROR for `code` first, if any),
    /// detaches its session (kept for resume), frees the slot.
    fn close(&mut self, slot: usize, code: Option<ErrorCode>, label: &'static str) {
        if let Some(code) = code {
            let queued_error = self.conns.get(slot).is_some_and(|e| e.conn.is_closed());
            // Conn::close already queued the ERROR; codes from elsewhere get one here.
            if !queued_error {
                if let Some(e) = self.conns.get_mut(slot) {
                    let f = error_frame(code, label, 0);
                    let out = e.out.get_or_insert_with(Default::default);
                    let _ = f.encode(out, &self.node.limits);
                }
            }
        }
        let Some(mut e) = self.conns.try_remove(slot) else {
            return;
        };
        if let Some(key) = self.prelogin.remove(&slot) {
            self.node.prelogin_leave(key);
        }
        // One last write attempt (the ERROR or KICK), bounded: never wait for a slow peer.
        let (mut t, out) = e.parts();
        t.close(out, &mut self.scratch);
        let _ = self.poll.registry().deregister(&mut e.stream);
        let m = &self.node.metrics;
        Metrics::inc(&m.closes, "reason", label);
        match code {
            Some(ErrorCode::HeartbeatTimeout) => {
                m.heartbeat_timeouts.inc();
            }
            Some(ErrorCode::LoginTimeout) => {
                m.login_timeouts.inc();
            }
            _ => {}
        }
        m.connections.dec();
        self.node.connections.fetch_sub(1, Ordering::SeqCst);
        if let Some(s) = e.session.take() {
            if let Some(epoch) = self.node.detach(&s, conn_ref(self.id, slot, e.gen)) {
                let at = self
                    .node
                    .clock
                    .now_ceil()
                    .saturating_add(self.node.config.resume_grace_secs);
                self.expiring.push_back((at, s, epoch));
            }
        }
        if self.accept_paused_until.is_some() {
            // A descriptor is free again.
            self.accept_paused_until = Some(Instant::now());
        }
    }

    // ---- commands and timers ----

    fn lookup(&self, c: ConnRef) -> Option<usize> {
        let slot = c.slot as usize;
        self.conns
            .get(slot)
            .filter(|e| e.gen == c.gen)
            .map(|_| slot)
    }

    fn commands(&mut self, now: Tick) {
        self.node.clear_woken(self.id);
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Flush(c) => {
                    if let Some(slot) = self.lookup(c) {
                        self.mark_dirty(slot, FILL);
                    }
                }
                Cmd::Send(c, f) => {
                    if let Some(slot) = self.lookup(c) {
                        self.queue(slot, &f);
                    }
                }
                Cmd::Kick(c, reason, message) => {
                    if let Some(slot) = self.lookup(c) {
                        let label = match reason {
                            KickReason::LoggedInElsewhere => "logged_in_elsewhere",
                            KickReason::SessionLimit => "session_limit",
                            KickReason::Admin => "admin",
                            KickReason::ResumedElsewhere => "resumed_elsewhere",
                            _ => "other",
                        };
                        Metrics::inc(&self.node.metrics.kicks, "reason", label);
                        let f = Frame::new(Header::Kick(Box::new(pb::Kick {
                            reason: reason as i32,
                            message,
                        })));
                        self.queue(slot, &f);
                        self.close(slot, None, "kicked");
                    }
                }
                Cmd::Close(c, code) => {
                    if let Some(slot) = self.lookup(c) {
                        if code == Some(ErrorCode::SlowConsumer) {
                            self.node.metrics.slow_consumers.inc();
                        }
                        let label = if code.is_none() {
                            "replaced"
                        } else {
                            close_label(code)
                        };
                        self.close(slot, code, label);
                    }
                }
                Cmd::LoginVerdict(p, o) => {
                    if let Some(slot) = self.lookup(p.conn) {
                        self.finish_login(slot, *p, o, now);
                    }
                }
                Cmd::Claimed(p, snapshot) => self.claimed(*p, snapshot, now),
                Cmd::Drain => self.start_drain(),
                Cmd::Stop => self.stop = true,
                Cmd::Tick => {}
            }
        }
    }

    fn timers(&mut self, now: Tick) {
        self.node.expire_requests();
        if let Some((f, at)) = &mut self.housekeeping {
            if *at != now {
                *at = now;
                f();
            }
        }
        let mut due = Vec::new();
        self.wheel.advance(now, |_, id| due.push(id));
        for id in due {
            let slot = id as usize;
            let Some(e) = self.conns.get_mut(slot) else {
                continue;
            };
            if e.timer_at > now {
                // Stale: this connection's live entry is due later.
                continue;
            }
            if transport::is_handshaking(&e.tls) {
                // The handshake has its own deadline.
                let limit = self.node.config.tls_handshake_timeout_secs;
                if now >= e.conn.opened().saturating_add(limit) {
                    self.node.metrics.tls_handshake_failures.inc();
                    self.close(slot, None, "tls_handshake_timeout");
                    continue;
                }
            }
            match e
                .conn
                .handle_timeout(now, &self.conn_config, &mut self.actions)
            {
                Some(d) => {
                    e.timer_at = d;
                    self.wheel.insert(id, d);
                }
                None => self.run_actions(slot, now),
            }
        }
        while self.expiring.front().is_some_and(|(t, _, _)| *t <= now) {
            if let Some((_, s, epoch)) = self.expiring.pop_front() {
                self.node.expire(&s, epoch);
            }
        }
    }

    // ---- drain ----

    fn start_drain(&mut self) {
        if self.drain.is_some() {
            return;
        }
        for l in &mut self.listeners {
            let _ = self.poll.registry().deregister(&mut l.sock);
        }
        self.listeners.clear();
        let order = self.conns.iter().map(|(k, e)| (k, e.gen)).collect();
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        self.drain = Some(Drain {
            start: Instant::now(),
            order,
            next: 0,
            rng: u64::from_le_bytes(seed) | 1,
        });
    }

    fn drain_step(&mut self) {
        let Some(d) = &mut self.drain else {
            return;
        };
        let window = Duration::from_millis(self.node.config.drain_window_ms as u64);
        let linger = Duration::from_millis(self.node.config.drain_linger_ms as u64);
        let elapsed = d.start.elapsed();
        let n = d.order.len();
        let upto = if window.is_zero() || elapsed >= window {
            n
        } else {
            ((n as u128 * elapsed.as_millis()) / window.as_millis()) as usize
        };
        let base = self.node.config.drain_reconnect_delay_ms;
        let mut goaways = Vec::new();
        while d.next < upto.min(n) {
            let (slot, gen) = d.order[d.next];
            d.next += 1;
            // xorshift: each client its own share of the delay, so they come back spread out.
            d.rng ^= d.rng << 13;
            d.rng ^= d.rng >> 7;
            d.rng ^= d.rng << 17;
            let jitter = if base == 0 {
                0
            } else {
                (d.rng % base as u64) as u32
            };
            goaways.push((slot, gen, base.saturating_add(jitter)));
        }
        let all_sent = d.next >= n;
        let done = elapsed >= window + linger;
        for (slot, gen, delay) in goaways {
            if self.conns.get(slot).is_some_and(|e| e.gen == gen) {
                let f = Frame::new(Header::GoAway(Box::new(pb::GoAway {
                    reconnect_delay_ms: delay,
                    reason: "draining".into(),
                    alternatives: Vec::new(),
                })));
                self.queue(slot, &f);
                if let Some(e) = self.conns.get_mut(slot) {
                    e.flags |= GOAWAY_SENT;
                }
            }
        }
        // Done after the linger, or as soon as every client has gone.
        if done || (all_sent && self.conns.is_empty()) {
            self.stop = true;
        }
    }

    fn shutdown(&mut self) {
        self.flush_dirty();
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            self.close(slot, None, "shutdown");
        }
        let stopped = self.node.stopped_workers.fetch_add(1, Ordering::SeqCst) + 1;
        if stopped as usize == self.node.worker_count() {
            self.node.end_all();
        }
    }
}

#[cfg(test)]
mod tests {
    /// An idle connection's memory is mostly these two records (BENCHMARKS.md, W1): keep
    /// them from growing unnoticed.
    #[test]
    fn idle_records_stay_small() {
        // mio's socket carries a registry id in debug builds only.
        let entry_max = if cfg!(debug_assertions) { 80 } else { 72 };
        assert!(std::mem::size_of::<super::Entry>() <= entry_max);
        // With its Arc header at most 192 bytes: mimalloc's 192-byte size class.
        assert!(std::mem::size_of::<crate::node::Session>() <= 176);
        assert_eq!(std::mem::size_of::<crate::conn::Conn>(), 16);
    }
}
