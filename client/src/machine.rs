//! The client's protocol logic as a sans-IO state machine: no sockets, no timers, no tasks.
//!
//! [`ClientCore`] is told what happened (`handle_*` with the time it happened, and the
//! application's calls: [`ClientCore::send`], [`ClientCore::ack`], [`ClientCore::reconnect_now`])
//! and answers with what to do: bytes to write ([`ClientCore::poll_transmit`]), when to call
//! back ([`ClientCore::poll_timeout`]) and events ([`ClientCore::poll_event`]), among them
//! [`CoreEvent::Connect`] (open a connection now) and [`CoreEvent::Disconnect`] (close it).
//! The same shape as the gateway's session core; a shell (tokio, a C ABI, a load tester)
//! supplies the I/O and the clock.
//!
//! What it owns: login and resume, the heartbeat (the server-given interval, its first PING
//! at a random phase so that clients that logged in together do not PING together),
//! downlink seq / duplicate / gap accounting, the ack policy, uplink resend with the same
//! `msg_id`, room requests (sent again on a new connection; memberships joined again after a
//! fresh session), reconnect backoff with full jitter, GOAWAY and KICK.
//!
//! # Receipts mean "processed"
//!
//! A sequenced [`CoreEvent::Message`] carries a [`Receipt`]. Nothing is acked to the
//! gateway until the application calls [`ClientCore::ack`] with it (cumulative: every
//! message of that session up to it), unless [`CoreConfig::auto_ack`] is set, in which case
//! a message counts as processed when [`ClientCore::poll_event`] hands it over. Messages
//! still queued or held unacked when the process dies were never acked: the next
//! process resumes from [`ClientCore::saved`] and the gateway replays them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tether_codec::{decode_batch, gunzip, Frame, Header, Limits};
use tether_protocol::pb;

use crate::driver::{code_of, is_terminal, millis, Rng};

/// After a PING, the connection is dead when nothing arrived for one interval plus this.
pub const DEAD_SLACK: Duration = Duration::from_secs(10);
/// After a GOAWAY, close the connection after at most this long (or at the planned
/// reconnect time if that comes first), if the gateway has not closed it.
pub const GOAWAY_LINGER: Duration = Duration::from_secs(1);
/// Heartbeat interval when LOGIN_RESULT says 0 (PROTOCOL.md §8 mobile default).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// Bounds on any heartbeat interval, the gateway's or the configured one.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// What the core needs to know; [`CoreConfig::new`] gives the SDK's defaults.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// The LOGIN to send (its `resume` is filled in by the core).
    pub login: pb::Login,
    /// Reconnect after a lost connection (default `true`).
    pub reconnect: bool,
    /// First reconnect backoff ceiling (default 1 s); doubles per failed attempt.
    pub backoff_initial: Duration,
    /// Largest reconnect backoff ceiling (default 60 s).
    pub backoff_max: Duration,
    /// From [`CoreEvent::Connect`] to LOGIN_RESULT (default 10 s).
    pub connect_timeout: Duration,
    /// Resend an UPLINK that got no UPLINK_ACK for this long (default 15 s).
    pub uplink_timeout: Duration,
    /// Send DOWNLINK_ACK at most this long after a downlink was processed (default 200 ms).
    pub ack_delay: Duration,
    /// ... or as soon as this many processed downlinks are unacked (default 32).
    pub ack_every: u32,
    /// A message counts as processed once [`ClientCore::poll_event`] returns it (default
    /// `false`: only [`ClientCore::ack`] acks).
    pub auto_ack: bool,
    /// PING interval instead of the gateway's (clamped to [`MIN_HEARTBEAT`]..=[`MAX_HEARTBEAT`]).
    pub heartbeat_interval: Option<Duration>,
    /// Frame and decompression limits.
    pub limits: Limits,
    /// Seed for the jitter (backoff, GOAWAY delay, heartbeat phase); `None`: the OS's.
    pub seed: Option<u64>,
}

impl CoreConfig {
    pub fn new(login: pb::Login) -> CoreConfig {
        CoreConfig {
            login,
            reconnect: true,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            uplink_timeout: Duration::from_secs(15),
            ack_delay: Duration::from_millis(200),
            ack_every: 32,
            auto_ack: false,
            heartbeat_interval: None,
            limits: Limits::default(),
            seed: None,
        }
    }
}

/// Names one sequenced downlink for [`ClientCore::ack`]: its session (`epoch`, counted by
/// the core: a fresh session is a new epoch) and its seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Receipt {
    pub epoch: u64,
    pub seq: u64,
}

/// What an app persists to resume after a restart: the session and the last processed seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Saved {
    pub session_id: [u8; 16],
    pub last_seq: u64,
}

/// A refused UPLINK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    pub code: pb::ErrorCode,
    pub retry_after: Option<Duration>,
    pub message: String,
}

/// What the shell must do or tell the application.
#[derive(Debug, PartialEq)]
pub enum CoreEvent {
    /// Open a connection now and call [`ClientCore::handle_connected`] (or
    /// [`ClientCore::handle_disconnected`] if that fails).
    Connect,
    /// Close the connection, after writing what [`ClientCore::poll_transmit`] holds (the
    /// final ack of [`ClientCore::close`]; otherwise nothing). The core already counts it
    /// as gone: do not call `handle_disconnected` for it.
    Disconnect,
    Online {
        session_id: [u8; 16],
        resumed: bool,
        gap: Option<(u64, u64)>,
    },
    /// A downlink; `receipt` is `None` for a transient one (seq 0: nothing to ack).
    Message {
        receipt: Option<Receipt>,
        body_type: u32,
        body: Bytes,
    },
    /// The UPLINK with this `msg_id` was answered (once, however often it was resent).
    UplinkAcked {
        msg_id: u64,
        result: Result<(), Nack>,
    },
    /// A ROOM_JOIN or ROOM_LEAVE was answered. `automatic`: the core's own re-join after a
    /// fresh session (the old session's memberships ended with it).
    Room {
        request_id: u64,
        room_id: String,
        join: bool,
        automatic: bool,
        result: Result<(), Nack>,
    },
    GoAway {
        reconnect_delay: Duration,
    },
    /// The connection is gone; the next [`CoreEvent::Connect`] comes after `retry_in`
    /// (`None`: reconnecting is off and the core has stopped).
    Offline {
        code: Option<pb::ErrorCode>,
        retry_in: Option<Duration>,
    },
    /// Terminal: the gateway ended the session; the core has stopped.
    Kicked {
        reason: pb::KickReason,
        message: String,
    },
    /// Terminal: the login was refused (AUTH_FAILED, TOKEN_EXPIRED); the core has stopped.
    Refused {
        code: pb::ErrorCode,
        message: String,
    },
}

struct Link {
    heartbeat: Duration,
    last_sent: Instant,
    /// Set by a PING: dead if nothing arrives by then.
    dead_at: Option<Instant>,
    /// After a GOAWAY: `(reconnect_at, close_at)`.
    goaway: Option<(Instant, Instant)>,
}

enum Phase {
    /// No connection; connect at this time.
    Offline(Instant),
    /// A connection is being opened, or LOGIN is out; given up at this time.
    Connecting {
        deadline: Instant,
        login_sent: bool,
    },
    Online(Link),
    Stopped,
}

struct PendingRoom {
    room_id: String,
    join: bool,
    automatic: bool,
}

impl PendingRoom {
    fn frame(&self, request_id: u64) -> Frame {
        room_frame(request_id, self.room_id.clone(), self.join)
    }
}

/// ROOM_JOIN (`join`) or ROOM_LEAVE.
pub(crate) fn room_frame(request_id: u64, room_id: String, join: bool) -> Frame {
    Frame::new(if join {
        Header::RoomJoin(Box::new(pb::RoomJoin {
            request_id,
            room_id,
        }))
    } else {
        Header::RoomLeave(Box::new(pb::RoomLeave {
            request_id,
            room_id,
        }))
    })
}

struct Pending {
    frame: Bytes,
    /// When it was last written on the current connection (`None`: not on this one).
    sent_at: Option<Instant>,
}

/// The client's protocol state machine. See the module documentation.
pub struct ClientCore {
    cfg: CoreConfig,
    rng: Rng,
    phase: Phase,
    /// Failed connection attempts since the last login.
    attempt: u32,
    session_id: Option<[u8; 16]>,
    epoch: u64,
    /// Highest seq handed to the application (in `events` or beyond).
    received_seq: u64,
    /// Highest seq the application processed.
    processed_seq: u64,
    /// Highest seq acked to the gateway.
    acked_seq: u64,
    /// The `last_seq` the LOGIN's resume carried (what a resumed session counts as acked:
    /// the app may ack more before LOGIN_RESULT comes).
    login_seq: u64,
    /// A duplicate arrived: ack again even if nothing new was processed.
    force_ack: bool,
    ack_due: Option<Instant>,
    gap: Option<(u64, u64)>,
    uplinks: BTreeMap<u64, Pending>,
    /// `(due, msg_id)` in due order (one uplink timeout for all).
    resend_q: VecDeque<(Instant, u64)>,
    /// Room requests not answered yet, by request_id (sent again on a new connection).
    rooms: BTreeMap<u64, PendingRoom>,
    /// Rooms joined in this session (joined again after a fresh one).
    joined: BTreeSet<String>,
    next_request_id: u64,
    out: BytesMut,
    events: VecDeque<CoreEvent>,
}

impl ClientCore {
    /// A core with no session yet; the first [`CoreEvent::Connect`] is due at once.
    pub fn new(cfg: CoreConfig, now: Instant) -> ClientCore {
        ClientCore::build(cfg, None, now)
    }

    /// A core that resumes `saved` (from an earlier process) on its first connection.
    pub fn restore(cfg: CoreConfig, saved: Saved, now: Instant) -> ClientCore {
        ClientCore::build(cfg, Some(saved), now)
    }

    fn build(cfg: CoreConfig, saved: Option<Saved>, now: Instant) -> ClientCore {
        let rng = cfg.seed.map_or_else(Rng::new, Rng::seeded);
        let seq = saved.map_or(0, |s| s.last_seq);
        ClientCore {
            cfg,
            rng,
            phase: Phase::Offline(now),
            attempt: 0,
            session_id: saved.map(|s| s.session_id),
            epoch: 0,
            received_seq: seq,
            processed_seq: seq,
            acked_seq: seq,
            login_seq: seq,
            force_ack: false,
            ack_due: None,
            gap: None,
            uplinks: BTreeMap::new(),
            resend_q: VecDeque::new(),
            rooms: BTreeMap::new(),
            joined: BTreeSet::new(),
            next_request_id: 1,
            out: BytesMut::new(),
            events: VecDeque::new(),
        }
    }

    /// What to persist so that a restarted app resumes (`None` before the first login).
    pub fn saved(&self) -> Option<Saved> {
        self.session_id.map(|session_id| Saved {
            session_id,
            last_seq: self.processed_seq,
        })
    }

    pub fn is_online(&self) -> bool {
        matches!(self.phase, Phase::Online(_))
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    /// Events not taken by [`ClientCore::poll_event`] yet. The core queues whatever frames
    /// it is given: the shell bounds it by not reading while the application is behind.
    pub fn queued_events(&self) -> usize {
        self.events.len()
    }

    /// UPLINKs not answered yet.
    pub fn pending_uplinks(&self) -> usize {
        self.uplinks.len()
    }

    /// Bytes to write on the connection, oldest first (empty when there are none).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    pub fn poll_event(&mut self) -> Option<CoreEvent> {
        let e = self.events.pop_front()?;
        if self.cfg.auto_ack {
            if let CoreEvent::Message {
                receipt: Some(r), ..
            } = &e
            {
                let r = *r;
                // `now` is only needed to schedule the delayed ack: the next timeout does it.
                self.processed(r, None);
            }
        }
        Some(e)
    }

    /// When to call [`ClientCore::handle_timeout`] at the latest.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Offline(at) => Some(*at),
            Phase::Connecting { deadline, .. } => Some(*deadline),
            Phase::Stopped => None,
            Phase::Online(l) => {
                let mut d = l.last_sent + l.heartbeat;
                for t in [l.dead_at, self.ack_due, l.goaway.map(|g| g.1)]
                    .into_iter()
                    .flatten()
                {
                    d = d.min(t);
                }
                if l.goaway.is_none() {
                    if let Some(&(t, _)) = self.resend_q.front() {
                        d = d.min(t);
                    }
                }
                if self.processed_seq > self.acked_seq && self.ack_due.is_none() {
                    // Processed under auto-ack: schedule the ack now.
                    d = d.min(l.last_sent);
                }
                Some(d)
            }
        }
    }

    /// The connection asked for by [`CoreEvent::Connect`] is open: LOGIN goes out.
    pub fn handle_connected(&mut self, _now: Instant) {
        if let Phase::Connecting { login_sent, .. } = &mut self.phase {
            if *login_sent {
                return;
            }
            *login_sent = true;
            let mut login = self.cfg.login.clone();
            self.login_seq = self.processed_seq;
            login.resume = self.session_id.map(|id| pb::Resume {
                session_id: Bytes::copy_from_slice(&id),
                last_seq: self.login_seq,
            });
            self.write(&Frame::new(Header::Login(Box::new(login))));
        }
    }

    /// The connection failed to open, or closed, or broke.
    pub fn handle_disconnected(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Connecting { .. } | Phase::Online(_)) {
            self.lost(now, None, None);
        }
    }

    /// Time passed: heartbeats, acks, resends, deadlines, the next connection attempt.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Offline(at) if *at <= now => {
                self.phase = Phase::Connecting {
                    deadline: now + self.cfg.connect_timeout,
                    login_sent: false,
                };
                self.events.push_back(CoreEvent::Connect);
            }
            Phase::Connecting { deadline, .. } if *deadline <= now => {
                self.disconnect(now, None, None);
            }
            Phase::Online(l) => {
                if let Some((reconnect_at, close_at)) = l.goaway {
                    if close_at <= now {
                        self.send_ack(now);
                        self.events.push_back(CoreEvent::Disconnect);
                        self.offline_until(Some(reconnect_at.max(now)), None, now);
                        return;
                    }
                }
                if l.dead_at.is_some_and(|d| d <= now) {
                    self.disconnect(now, None, None);
                    return;
                }
                let ping = l.last_sent + l.heartbeat <= now;
                let goaway = l.goaway.is_some();
                let heartbeat = l.heartbeat;
                if self.processed_seq > self.acked_seq && self.ack_due.is_none() {
                    self.schedule_ack(now);
                }
                if ping || self.ack_due.is_some_and(|d| d <= now) {
                    self.send_ack(now);
                }
                if ping {
                    self.write(&Frame::new(Header::Ping(pb::Ping {})));
                    if let Phase::Online(l) = &mut self.phase {
                        l.dead_at.get_or_insert(now + heartbeat + DEAD_SLACK);
                        l.last_sent = now;
                    }
                }
                if !goaway {
                    self.resend_due(now);
                }
            }
            _ => {}
        }
    }

    /// A frame arrived on the connection.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) {
        match &mut self.phase {
            Phase::Connecting {
                login_sent: true, ..
            } => self.on_login_answer(now, frame),
            Phase::Online(l) => {
                l.dead_at = None;
                self.on_frame(now, frame, false);
            }
            // Not connected (or the connection was just given up): nothing to do with it.
            _ => {}
        }
    }

    /// Queue an UPLINK (an encoded frame, resent as it is until UPLINK_ACK). `false`: that
    /// `msg_id` is already pending (it goes once; one [`CoreEvent::UplinkAcked`] answers),
    /// or the core has stopped.
    pub fn send(&mut self, now: Instant, msg_id: u64, frame: Bytes) -> bool {
        if self.uplinks.contains_key(&msg_id) || self.is_stopped() {
            return false;
        }
        let mut sent_at = None;
        if let Phase::Online(l) = &mut self.phase {
            if l.goaway.is_none() {
                self.out.extend_from_slice(&frame);
                l.last_sent = now;
                sent_at = Some(now);
                self.resend_q
                    .push_back((now + self.cfg.uplink_timeout, msg_id));
            }
        }
        self.uplinks.insert(msg_id, Pending { frame, sent_at });
        true
    }

    /// Joins (`join`) or leaves a room; answered by a [`CoreEvent::Room`] with the returned
    /// request_id. Sent now if online, else on the next connection.
    pub fn room(&mut self, now: Instant, room_id: &str, join: bool) -> u64 {
        self.room_request(now, room_id.to_owned(), join, false)
    }

    /// Rooms joined in the current session, as far as the gateway has answered.
    pub fn joined(&self) -> impl Iterator<Item = &str> {
        self.joined.iter().map(String::as_str)
    }

    fn room_request(&mut self, now: Instant, room_id: String, join: bool, automatic: bool) -> u64 {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let r = PendingRoom {
            room_id,
            join,
            automatic,
        };
        if let Phase::Online(l) = &mut self.phase {
            if l.goaway.is_none() {
                l.last_sent = now;
                let f = r.frame(request_id);
                self.write(&f);
            }
        }
        self.rooms.insert(request_id, r);
        request_id
    }

    /// The application processed every message of `receipt`'s session up to it.
    pub fn ack(&mut self, now: Instant, receipt: Receipt) {
        self.processed(receipt, Some(now));
    }

    /// The network changed (Wi-Fi ⇄ cellular): drop the connection if there is one and
    /// connect again at once, skipping the backoff.
    pub fn reconnect_now(&mut self, now: Instant) {
        match self.phase {
            Phase::Stopped => {}
            Phase::Offline(_) => {
                self.attempt = 0;
                self.phase = Phase::Offline(now);
            }
            Phase::Connecting { .. } | Phase::Online(_) => {
                self.events.push_back(CoreEvent::Disconnect);
                self.attempt = 0;
                self.unsend();
                self.phase = Phase::Offline(now);
                self.events.push_back(CoreEvent::Offline {
                    code: None,
                    retry_in: Some(Duration::ZERO),
                });
            }
        }
    }

    /// Stop for good: the final ack goes out, then [`CoreEvent::Disconnect`]; what is
    /// pending (uplinks, room requests) is answered as failed.
    pub fn close(&mut self, now: Instant) {
        if let Phase::Online(_) = self.phase {
            self.send_ack(now);
        }
        if matches!(self.phase, Phase::Online(_) | Phase::Connecting { .. }) {
            self.events.push_back(CoreEvent::Disconnect);
        }
        self.phase = Phase::Stopped;
        self.fail_pending();
    }

    /// Resends every UPLINK whose answer is overdue (same bytes, same `msg_id`).
    fn resend_due(&mut self, now: Instant) {
        let Phase::Online(l) = &mut self.phase else {
            return;
        };
        let after = self.cfg.uplink_timeout;
        while let Some(&(due, msg_id)) = self.resend_q.front() {
            if due > now {
                break;
            }
            self.resend_q.pop_front();
            if let Some(p) = self.uplinks.get_mut(&msg_id) {
                if p.sent_at.is_some_and(|s| s + after <= now) {
                    self.out.extend_from_slice(&p.frame);
                    l.last_sent = now;
                    p.sent_at = Some(now);
                    self.resend_q.push_back((now + after, msg_id));
                }
            }
        }
    }

    fn write(&mut self, frame: &Frame) {
        // Frames built here are small and valid; a failure is a bug, not input.
        let _ = frame.encode(&mut self.out, &self.cfg.limits);
    }

    fn processed(&mut self, r: Receipt, now: Option<Instant>) {
        if r.epoch != self.epoch || r.seq <= self.processed_seq {
            return;
        }
        self.processed_seq = r.seq.min(self.received_seq);
        if let Some(now) = now {
            self.schedule_ack(now);
        }
    }

    fn schedule_ack(&mut self, now: Instant) {
        let unacked = self.processed_seq.saturating_sub(self.acked_seq);
        if unacked >= u64::from(self.cfg.ack_every.max(1)) {
            self.ack_due = Some(now);
        } else if self.ack_due.is_none() {
            self.ack_due = Some(now + self.cfg.ack_delay);
        }
    }

    /// DOWNLINK_ACK(processed) if anything processed is unacked (or a duplicate asks).
    fn send_ack(&mut self, now: Instant) {
        if self.processed_seq > 0 && (self.processed_seq > self.acked_seq || self.force_ack) {
            let seq = self.processed_seq;
            self.write(&Frame::new(Header::DownlinkAck(pb::DownlinkAck { seq })));
            self.acked_seq = seq;
            if let Phase::Online(l) = &mut self.phase {
                l.last_sent = now;
            }
        }
        self.force_ack = false;
        self.ack_due = None;
    }

    fn backoff(&mut self) -> Duration {
        let ceiling = self
            .cfg
            .backoff_initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cfg.backoff_max);
        self.attempt = self.attempt.saturating_add(1);
        self.rng.jitter(ceiling)
    }

    /// The core gives the connection up (a deadline, a protocol error, an ERROR frame).
    fn disconnect(&mut self, now: Instant, code: Option<pb::ErrorCode>, retry: Option<Duration>) {
        self.events.push_back(CoreEvent::Disconnect);
        self.lost(now, code, retry);
    }

    fn lost(&mut self, now: Instant, code: Option<pb::ErrorCode>, retry: Option<Duration>) {
        let planned = match &self.phase {
            Phase::Online(Link {
                goaway: Some((at, _)),
                ..
            }) => Some(*at),
            _ => None,
        };
        let at = if !self.cfg.reconnect {
            None
        } else if let Some(at) = planned {
            Some(at.max(now))
        } else if let Some(d) = retry {
            Some(now + d + self.rng.jitter(d / 2))
        } else {
            Some(now + self.backoff())
        };
        self.offline_until(at, code, now);
    }

    fn offline_until(&mut self, at: Option<Instant>, code: Option<pb::ErrorCode>, now: Instant) {
        self.unsend();
        self.ack_due = None;
        self.force_ack = false;
        self.phase = match at {
            Some(at) => Phase::Offline(at),
            None => Phase::Stopped,
        };
        self.events.push_back(CoreEvent::Offline {
            code,
            retry_in: at.map(|at| at.saturating_duration_since(now)),
        });
        if at.is_none() {
            self.fail_pending();
        }
    }

    /// Nothing written is on a connection any more; unsent bytes are dropped (a new
    /// connection starts with LOGIN and the pending uplinks).
    fn unsend(&mut self) {
        self.out.clear();
        self.resend_q.clear();
        for p in self.uplinks.values_mut() {
            p.sent_at = None;
        }
    }

    fn fail_pending(&mut self) {
        let stopped = || Nack {
            code: pb::ErrorCode::Internal,
            retry_after: None,
            message: "the client stopped".into(),
        };
        for (msg_id, _) in std::mem::take(&mut self.uplinks) {
            self.events.push_back(CoreEvent::UplinkAcked {
                msg_id,
                result: Err(stopped()),
            });
        }
        for (request_id, r) in std::mem::take(&mut self.rooms) {
            self.events.push_back(CoreEvent::Room {
                request_id,
                room_id: r.room_id,
                join: r.join,
                automatic: r.automatic,
                result: Err(stopped()),
            });
        }
    }

    fn stop(&mut self, event: CoreEvent) {
        self.events.push_back(CoreEvent::Disconnect);
        self.unsend();
        self.phase = Phase::Stopped;
        self.events.push_back(event);
        self.fail_pending();
    }

    fn on_login_answer(&mut self, now: Instant, frame: Frame) {
        let (code, message, retry) = match frame.header {
            Header::LoginResult(r) if r.code == pb::ErrorCode::Ok as i32 => {
                match <[u8; 16]>::try_from(r.session_id.as_ref()) {
                    Ok(id) => return self.on_login(now, id, &r),
                    Err(_) => (pb::ErrorCode::MalformedHeader, String::new(), None),
                }
            }
            Header::LoginResult(r) => (code_of(r.code), r.message, millis(r.retry_after_ms)),
            Header::Error(e) => (code_of(e.code), e.message, millis(e.retry_after_ms)),
            _ => (pb::ErrorCode::UnexpectedKind, String::new(), None),
        };
        if is_terminal(code) {
            self.stop(CoreEvent::Refused { code, message });
        } else {
            self.disconnect(now, Some(code), retry);
        }
    }

    fn on_login(&mut self, now: Instant, session_id: [u8; 16], r: &pb::LoginResult) {
        let resumed = r.resumed && self.session_id == Some(session_id);
        let gap = (r.gap_from != 0 || r.gap_to != 0).then_some((r.gap_from, r.gap_to));
        if resumed {
            // What the LOGIN carried is acked (what the app processed since is acked next);
            // what the app holds unprocessed is kept (a replay of it is dropped as a
            // duplicate), and comes again after a restart.
            self.acked_seq = self.login_seq;
            self.gap = gap;
        } else {
            self.epoch += 1;
            self.received_seq = 0;
            self.processed_seq = 0;
            self.acked_seq = 0;
            self.gap = None;
            // Memberships ended with the old session: join them again.
            for room_id in std::mem::take(&mut self.joined) {
                self.room_request(now, room_id, true, true);
            }
        }
        self.session_id = Some(session_id);
        self.attempt = 0;
        let heartbeat = match self.cfg.heartbeat_interval {
            Some(h) => h,
            None if r.heartbeat_interval_ms == 0 => DEFAULT_HEARTBEAT,
            None => Duration::from_millis(r.heartbeat_interval_ms.into()),
        }
        .clamp(MIN_HEARTBEAT, MAX_HEARTBEAT);
        // The first PING at a random point of the first interval: clients that logged in
        // together (a reconnect storm) spread their heartbeats over the whole interval.
        let phase = self.rng.jitter(heartbeat);
        let last_sent = now.checked_sub(heartbeat - phase).unwrap_or(now);
        // Pending uplinks go first, in msg_id order.
        let resend_at = now + self.cfg.uplink_timeout;
        for (&msg_id, p) in &mut self.uplinks {
            self.out.extend_from_slice(&p.frame);
            p.sent_at = Some(now);
            self.resend_q.push_back((resend_at, msg_id));
        }
        for (&request_id, r) in &self.rooms {
            // Frames built here are small and valid.
            let _ = r.frame(request_id).encode(&mut self.out, &self.cfg.limits);
        }
        self.phase = Phase::Online(Link {
            heartbeat,
            last_sent,
            dead_at: None,
            goaway: None,
        });
        self.events.push_back(CoreEvent::Online {
            session_id,
            resumed,
            gap,
        });
    }

    fn on_frame(&mut self, now: Instant, frame: Frame, in_batch: bool) {
        let Frame { header, gzip, body } = frame;
        match header {
            Header::Pong(_) => {}
            Header::UplinkAck(a) => {
                if self.uplinks.remove(&a.msg_id).is_some() {
                    let result = if a.code == pb::ErrorCode::Ok as i32 {
                        Ok(())
                    } else {
                        Err(Nack {
                            code: code_of(a.code),
                            retry_after: millis(a.retry_after_ms),
                            message: a.message,
                        })
                    };
                    self.events.push_back(CoreEvent::UplinkAcked {
                        msg_id: a.msg_id,
                        result,
                    });
                }
            }
            Header::Downlink(d) => self.on_downlink(now, d.seq, d.body_type, gzip, body),
            Header::RoomResult(r) => {
                if let Some(p) = self.rooms.remove(&r.request_id) {
                    let result = if r.code == pb::ErrorCode::Ok as i32 {
                        if p.join {
                            self.joined.insert(p.room_id.clone());
                        } else {
                            self.joined.remove(&p.room_id);
                        }
                        Ok(())
                    } else {
                        Err(Nack {
                            code: code_of(r.code),
                            retry_after: None,
                            message: r.message,
                        })
                    };
                    self.events.push_back(CoreEvent::Room {
                        request_id: r.request_id,
                        room_id: p.room_id,
                        join: p.join,
                        automatic: p.automatic,
                        result,
                    });
                }
            }
            Header::GoAway(g) => {
                if let Phase::Online(l) = &mut self.phase {
                    if l.goaway.is_none() {
                        let delay = Duration::from_millis(g.reconnect_delay_ms.into());
                        let at = now + delay + self.rng.jitter(delay / 2);
                        l.goaway = Some((at, at.min(now + GOAWAY_LINGER)));
                        self.events.push_back(CoreEvent::GoAway {
                            reconnect_delay: delay,
                        });
                    }
                }
            }
            Header::Kick(k) => self.stop(CoreEvent::Kicked {
                reason: pb::KickReason::try_from(k.reason).unwrap_or_default(),
                message: k.message,
            }),
            Header::Error(e) => {
                let code = code_of(e.code);
                self.disconnect(now, Some(code), millis(e.retry_after_ms));
            }
            Header::Batch(b) if !in_batch => {
                let batch = Frame {
                    header: Header::Batch(b),
                    gzip,
                    body,
                };
                match decode_batch(&batch, &self.cfg.limits) {
                    Err(e) => self.disconnect(now, Some(e.code()), None),
                    Ok(frames) => {
                        for f in frames {
                            if !self.is_online() {
                                break;
                            }
                            self.on_frame(now, f, true);
                        }
                    }
                }
            }
            _ => self.disconnect(now, Some(pb::ErrorCode::UnexpectedKind), None),
        }
    }

    fn on_downlink(&mut self, now: Instant, seq: u64, body_type: u32, gzip: bool, body: Bytes) {
        if seq != 0 && seq <= self.received_seq {
            // A replay of what the application has: drop it, but ack again.
            self.force_ack = true;
            if self.ack_due.is_none() {
                self.ack_due = Some(now + self.cfg.ack_delay);
            }
            return;
        }
        let body = if gzip {
            match gunzip(&body, &self.cfg.limits) {
                Ok(b) => Bytes::from(b),
                // Never ack what could not be inflated: a resume replays it.
                Err(e) => return self.disconnect(now, Some(e.code()), None),
            }
        } else {
            body
        };
        let receipt = (seq != 0).then(|| {
            self.received_seq = seq;
            Receipt {
                epoch: self.epoch,
                seq,
            }
        });
        self.events.push_back(CoreEvent::Message {
            receipt,
            body_type,
            body,
        });
    }
}

#[cfg(test)]
mod tests;
