//! One session's state and its rules, sans-IO (the quinn-proto shape): no sockets, no locks,
//! no clock. The gateway holds a [`SessionCore`] under the session's lock and drives it:
//!
//! - inputs are `handle_*` calls with the time (`now` in [`Tick`]s or gateway milliseconds):
//!   an uplink, a downlink ack, a room request;
//! - pushes go in with [`SessionCore::push`], which says what became of them ([`Delivery`])
//!   and whether the connection must be flushed or closed;
//! - what to transmit comes out of [`SessionCore::poll_transmit`], which writes the frames
//!   a connection has not been sent yet into its outbound bytes;
//! - the lifetime is [`SessionCore::new`] (a fresh login), [`SessionCore::resume`],
//!   [`SessionCore::detach`] and [`SessionCore::end`], which hands back everything that was
//!   accepted and never delivered;
//! - [`SessionCore::snapshot`] and [`SessionCore::restore`] move a session elsewhere.
//!
//! **The delivery contract** (PROTOCOL.md §6.5): every downlink the core accepts is either
//! acked by the client (its receipt is handed back by [`SessionCore::handle_ack`]) or handed
//! back by [`SessionCore::end`] as undelivered. Nothing accepted is dropped: a push that
//! does not fit the bounded buffer is refused ([`Refusal::Full`]) before it takes a seq, so
//! the pusher knows and can keep it (the embedded back end keeps it and sends it again as
//! receipts come back). A receiver that acks is therefore never closed by somebody else's
//! burst; the slow-consumer close is for one whose buffer stays full with no ack progress.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tether_codec::{encode_batch, encode_head, CompressOptions, Frame, Header, Limits};
use tether_protocol::pb::{self, ErrorCode, Platform};
use thin_vec::ThinVec;

use super::bucket::TokenBucket;
use super::dedup::{Seen, UplinkDedup};
use super::downlink::{Downlink, DownlinkBuffer, DownlinkLimits};
use crate::timer::Tick;

/// A connection, as a worker command addresses it: the worker, its slab slot, and the slot's
/// generation (a reused slot has a new one, so a stale command finds nothing). To the core it
/// is an opaque name for "the connection this session is attached to".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub worker: u16,
    pub slot: u32,
    pub gen: u32,
}

/// Where a session's connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Attached(ConnRef),
    /// Waiting for a resume; `epoch` tells this detach from a later one.
    Detached {
        epoch: u32,
    },
    Ended,
}

/// Default transient (seq 0) downlinks queued for one connection's next write.
pub const DEFAULT_MAX_TRANSIENT: usize = 64;
/// Default rooms one session may be in.
pub const DEFAULT_MAX_ROOMS: usize = 256;
/// Default seconds a session's buffer may stay full with no ack progress before a push that
/// does not fit closes the connection (`SLOW_CONSUMER`).
pub const DEFAULT_SLOW_CONSUMER_SECS: u32 = 30;

/// The bounds a session keeps, whatever its client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub downlink: DownlinkLimits,
    /// Largest downlink body that fits a frame.
    pub max_body: usize,
    pub dedup_window: usize,
    /// Uplinks (and room requests) per second, and the burst above it; rate 0: no limit.
    pub uplink_rate: u32,
    pub uplink_burst: u32,
    pub max_transient: usize,
    pub max_rooms: usize,
    pub slow_consumer_secs: u32,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            downlink: DownlinkLimits::default(),
            max_body: SessionLimits::max_body_for(&Limits::default()),
            dedup_window: super::dedup::DEFAULT_DEDUP_WINDOW,
            uplink_rate: 50,
            uplink_burst: 100,
            max_transient: DEFAULT_MAX_TRANSIENT,
            max_rooms: DEFAULT_MAX_ROOMS,
            slow_consumer_secs: DEFAULT_SLOW_CONSUMER_SECS,
        }
    }
}

/// One downlink as it is pushed to a session: the plain body and, when the gateway
/// compressed it (once, for every session that takes gzip), the gzip body.
#[derive(Debug, Clone)]
pub struct PushBody<'a> {
    pub body_type: u32,
    pub plain: &'a Bytes,
    pub gzip: Option<&'a Bytes>,
    /// Non-zero: handed back when the client acks it (or, undelivered, at the end).
    pub receipt: u64,
    /// Seq 0: not buffered, not acked, only to an attached session (typing, presence).
    pub transient: bool,
}

/// What became of a push to one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the attached connection; acked later (a receipt) or handed back at the end.
    Sent,
    /// The session is detached: held for its resume (a receipt when acked after it, or handed
    /// back undelivered when the grace period ends).
    Held,
    /// Not taken: nothing of it remains in the session.
    Refused(Refusal),
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The session's buffer is at its bound: retriable once the client acks.
    Full,
    /// The session has ended.
    Ended,
    /// A transient push to a detached session.
    NotAttached,
    /// The body cannot fit a frame.
    TooLarge,
}

/// What [`SessionCore::push`] asks of the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    pub delivery: Delivery,
    /// Ask this connection's worker to write (once per batch: later pushes see it queued).
    pub flush: Option<ConnRef>,
    /// Close this connection as a slow consumer (its buffer stayed full with no ack).
    pub slow: Option<ConnRef>,
}

/// What to do with an UPLINK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New: hand it to the upstream, then call [`SessionCore::uplink_answered`].
    Forward,
    /// The same id is with the upstream: its answer will ack both.
    Wait,
    /// Ack now with this code (and `retry_after_ms`).
    Ack(ErrorCode, u32),
    /// The session has ended (its connection is being kicked): not forwarded, not answered;
    /// the client resends it on its next session.
    Ended,
}

/// What a resume found.
#[derive(Debug, PartialEq, Eq)]
pub struct Resumed {
    /// Seqs lost for good (`LoginResult.gap_from..=gap_to`).
    pub gap: Option<(u64, u64)>,
    /// Receipts of what the resume's `last_seq` acked.
    pub receipts: Vec<u64>,
    /// The connection the session was still attached to (gets KICK `RESUMED_ELSEWHERE`).
    pub replaced: Option<ConnRef>,
}

/// What an ended session hands back.
#[derive(Debug)]
pub struct Ended {
    /// Where it was (an attached connection is to be kicked or closed).
    pub link: Link,
    pub rooms: ThinVec<Arc<str>>,
    /// Everything accepted and never acked, oldest first.
    pub undelivered: Vec<Downlink>,
    /// What a login replacing it on the same device carries on with.
    pub carry: Carry,
}

/// What a new session of the same (user, device) takes over from the one it replaces, so
/// that logging in again neither refills the rate bucket nor forgets which uplinks were
/// already forwarded (answered, or still with the upstream: those answers are the new
/// session's to send).
#[derive(Debug, Default)]
pub struct Carry {
    pub dedup: UplinkDedup,
    pub bucket: TokenBucket,
}

/// A session's state as plain values, to move it to another process or gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub last_seq: u64,
    /// The highest seq written to a connection (a resume's `last_seq` past it counts as it).
    pub sent: u64,
    pub acked: u64,
    pub unacked: Vec<Downlink>,
    pub lost: Option<(u64, u64)>,
    /// Recent uplink ids and their outcome code.
    pub dedup: Vec<(u64, ErrorCode)>,
    /// Uplink ids still with the upstream of the process the session leaves: restored as in
    /// flight, their answers relayed by that process (`handoff`), or timed out here.
    pub in_flight: Vec<u64>,
    pub rooms: Vec<String>,
    pub bucket: TokenBucket,
    pub accept_gzip: bool,
    pub platform: Platform,
}

/// One session's protocol state.
#[derive(Debug)]
pub struct SessionCore {
    downlink: DownlinkBuffer,
    dedup: UplinkDedup,
    link: Link,
    /// The highest seq written to the attached connection.
    sent: u64,
    /// A flush command is on its way to the worker (one per batch of pushes).
    flush_queued: bool,
    /// The next transmit is a resume's replay: packed into gzip BATCH frames when long. Live
    /// traffic is never packed per connection (a busy room's burst would be compressed once
    /// per member).
    replay: bool,
    /// The login asked for gzip bodies (updated by a resume: the new connection's list).
    accept_gzip: bool,
    epoch: u32,
    /// When the buffer last made progress: became non-empty, released something on an ack,
    /// or was attached. A full buffer this old makes a slow consumer.
    progress_at: Tick,
    platform: Platform,
    /// Transient (seq 0) downlinks waiting for the next write (ThinVec: 8 bytes, nothing
    /// allocated while empty, which is nearly always).
    transient: ThinVec<(u32, bool, Bytes)>,
    rooms: ThinVec<Arc<str>>,
    bucket: TokenBucket,
}

/// Room for the largest DOWNLINK header (two varints) besides the fixed header.
const MAX_DOWNLINK_HEADER: usize = 2 + 10 + 1 + 5;

impl SessionLimits {
    /// The largest downlink body that fits a frame under `limits`.
    pub fn max_body_for(limits: &Limits) -> usize {
        (limits.frame_len_cap() as usize)
            .saturating_sub(tether_protocol::MIN_LENGTH as usize + MAX_DOWNLINK_HEADER)
    }
}

impl SessionCore {
    /// A fresh session, attached to `conn` at `now`.
    pub fn new(conn: ConnRef, accept_gzip: bool, platform: Platform, now: Tick) -> SessionCore {
        SessionCore {
            downlink: DownlinkBuffer::default(),
            dedup: UplinkDedup::default(),
            link: Link::Attached(conn),
            sent: 0,
            flush_queued: false,
            replay: false,
            accept_gzip,
            epoch: 0,
            progress_at: now,
            platform,
            transient: ThinVec::new(),
            rooms: ThinVec::new(),
            bucket: TokenBucket::default(),
        }
    }

    /// Takes over what the session this one replaces carried (see [`Carry`]).
    pub fn inherit(&mut self, carry: Carry) {
        self.dedup = carry.dedup;
        self.bucket = carry.bucket;
    }

    pub fn link(&self) -> Link {
        self.link
    }

    pub fn is_attached(&self) -> bool {
        matches!(self.link, Link::Attached(_))
    }

    pub fn is_ended(&self) -> bool {
        self.link == Link::Ended
    }

    pub fn accept_gzip(&self) -> bool {
        self.accept_gzip
    }

    pub fn platform(&self) -> Platform {
        self.platform
    }

    pub fn rooms(&self) -> &[Arc<str>] {
        &self.rooms
    }

    pub fn in_room(&self, room: &str) -> bool {
        self.rooms.iter().any(|r| **r == *room)
    }

    /// (unacked downlinks, their body bytes, last seq pushed).
    pub fn downlink_state(&self) -> (usize, usize, u64) {
        let (n, b) = self.downlink.unacked();
        (n, b, self.downlink.last_seq())
    }

    /// A resume on `conn` with the client's `last_seq` and the new LOGIN's compression list
    /// and platform. `None` if the session has ended.
    pub fn resume(
        &mut self,
        conn: ConnRef,
        last_seq: u64,
        accept_gzip: bool,
        platform: Platform,
        now: Tick,
    ) -> Option<Resumed> {
        let replaced = match self.link {
            Link::Ended => return None,
            Link::Attached(c) => Some(c),
            Link::Detached { .. } => None,
        };
        self.link = Link::Attached(conn);
        // A last_seq above what was ever sent counts as the highest seq sent (§6.6), not as
        // the highest pushed: downlinks buffered while detached were never seen.
        let last_seq = last_seq.min(self.sent);
        let (receipts, _) = self.release(last_seq);
        let gap = self.downlink.resume(last_seq).gap;
        self.sent = self.downlink.acked().max(gap.map_or(0, |g| g.1));
        self.flush_queued = false;
        self.replay = true;
        self.transient = ThinVec::new();
        self.accept_gzip = accept_gzip;
        self.platform = platform;
        self.progress_at = now;
        Some(Resumed {
            gap,
            receipts,
            replaced,
        })
    }

    /// The connection `conn` is gone: wait for a resume. Returns the detach epoch to expire
    /// the session by, or `None` if the session had moved on (another connection, ended).
    pub fn detach(&mut self, conn: ConnRef) -> Option<u32> {
        if self.link != Link::Attached(conn) {
            return None;
        }
        self.epoch = self.epoch.wrapping_add(1);
        self.link = Link::Detached { epoch: self.epoch };
        self.transient = ThinVec::new();
        self.flush_queued = false;
        Some(self.epoch)
    }

    /// Whether the session is still in the detach `epoch` (its grace period may end it).
    pub fn detached_since(&self, epoch: u32) -> bool {
        self.link == Link::Detached { epoch }
    }

    /// Ends the session and releases everything it holds at once. `None` if it had ended.
    pub fn end(&mut self) -> Option<Ended> {
        if self.link == Link::Ended {
            return None;
        }
        let link = std::mem::replace(&mut self.link, Link::Ended);
        // Uplinks still with the upstream stay in it as in flight: a login that carries
        // the window on waits for their answers (the node sends each to the session holding
        // the window by then) instead of forwarding the client's resend a second time.
        let dedup = std::mem::take(&mut self.dedup);
        self.transient = ThinVec::new();
        self.flush_queued = false;
        Some(Ended {
            link,
            rooms: std::mem::take(&mut self.rooms),
            undelivered: self.downlink.take_unacked(),
            carry: Carry {
                dedup,
                bucket: self.bucket,
            },
        })
    }

    /// Pushes one downlink at `now`.
    pub fn push(&mut self, push: &PushBody<'_>, limits: &SessionLimits, now: Tick) -> Pushed {
        let refused = |r| Pushed {
            delivery: Delivery::Refused(r),
            flush: None,
            slow: None,
        };
        let (gzip, body) = match push.gzip {
            Some(b) if self.accept_gzip => (true, b),
            _ => (false, push.plain),
        };
        // The plain body too: a later connection that does not take gzip is sent that (found
        // by the session fuzz target: a body that fitted only gzipped stuck the session at its
        // seq after a resume without gzip).
        if body.len() > limits.max_body || push.plain.len() > limits.max_body {
            return refused(Refusal::TooLarge);
        }
        let conn = match self.link {
            Link::Ended => return refused(Refusal::Ended),
            Link::Detached { .. } if push.transient => return refused(Refusal::NotAttached),
            Link::Detached { .. } => None,
            Link::Attached(c) => Some(c),
        };
        if push.transient {
            if self.transient.len() >= limits.max_transient {
                return refused(Refusal::Full);
            }
            self.transient.push((push.body_type, gzip, body.clone()));
        } else {
            let was_empty = self.downlink.unacked().0 == 0;
            let pushed = self.downlink.push(
                push.body_type,
                gzip,
                body.clone(),
                push.receipt,
                &limits.downlink,
            );
            if pushed.is_err() {
                // Somebody else's burst must not close a client that acks: only a buffer
                // that has made no progress for a while makes a slow consumer.
                let stuck = now >= self.progress_at.saturating_add(limits.slow_consumer_secs);
                return Pushed {
                    delivery: Delivery::Refused(Refusal::Full),
                    flush: None,
                    slow: conn.filter(|_| stuck),
                };
            }
            if was_empty {
                self.progress_at = now;
            }
        }
        let flush = conn.filter(|_| !std::mem::replace(&mut self.flush_queued, true));
        Pushed {
            delivery: if conn.is_some() {
                Delivery::Sent
            } else {
                Delivery::Held
            },
            flush,
            slow: None,
        }
    }

    /// Whether a body of `len` bytes would be taken now (for a pusher that checks first).
    pub fn has_room(&self, len: usize, limits: &SessionLimits) -> bool {
        !self.is_ended() && self.downlink.has_room(len, &limits.downlink)
    }

    /// A cumulative DOWNLINK_ACK at `now`: the receipts of what it released. An ack for a
    /// seq this connection was never sent is ignored (§6.5).
    pub fn handle_ack(&mut self, seq: u64, now: Tick) -> Vec<u64> {
        if seq > self.sent || !self.is_attached() {
            return Vec::new();
        }
        let (receipts, released) = self.release(seq);
        if released {
            self.progress_at = now;
        }
        receipts
    }

    /// Acks up to `seq`: the receipts of what that released, and whether it released any.
    fn release(&mut self, seq: u64) -> (Vec<u64>, bool) {
        // One allocation for the usual ack (every 32 downlinks, §6.5), not one per doubling.
        let mut receipts = Vec::with_capacity(self.downlink.unacked().0.min(RECEIPTS_HINT));
        let mut released = false;
        self.downlink.ack(seq, |d| {
            released = true;
            if d.receipt != 0 {
                receipts.push(d.receipt);
            }
        });
        (receipts, released)
    }

    /// An UPLINK at `now_ms` (gateway milliseconds).
    pub fn handle_uplink(&mut self, msg_id: u64, now_ms: u64, limits: &SessionLimits) -> Verdict {
        if self.is_ended() {
            return Verdict::Ended;
        }
        if msg_id == 0 {
            return Verdict::Ack(ErrorCode::Rejected, 0);
        }
        match self.dedup.check(msg_id, limits.dedup_window) {
            Seen::InFlight => Verdict::Wait,
            Seen::Done(code) => Verdict::Ack(code, 0),
            Seen::Busy => Verdict::Ack(ErrorCode::RateLimited, BUSY_RETRY_MS),
            Seen::New => {
                match self
                    .bucket
                    .take(now_ms, limits.uplink_rate, limits.uplink_burst)
                {
                    Some(wait_ms) => {
                        // Not forwarded: a resend must be taken as new.
                        self.dedup.forget(msg_id);
                        Verdict::Ack(ErrorCode::RateLimited, wait_ms)
                    }
                    None => Verdict::Forward,
                }
            }
        }
    }

    /// Whether the uplink `msg_id` is with the upstream as far as this session's window
    /// knows (a window carried on from an ended session holds that session's too).
    pub fn uplink_in_flight(&self, msg_id: u64) -> bool {
        self.dedup.is_in_flight(msg_id)
    }

    /// The upstream answered the uplink `msg_id` with `code`.
    pub fn uplink_answered(&mut self, msg_id: u64, code: ErrorCode) {
        match code {
            ErrorCode::UpstreamUnavailable
            | ErrorCode::UpstreamTimeout
            | ErrorCode::RateLimited => self.dedup.forget(msg_id),
            code => self.dedup.complete(msg_id, code),
        }
    }

    /// A ROOM_JOIN or ROOM_LEAVE at `now_ms`: room requests take tokens from the uplink
    /// bucket, and a join past `max_rooms` is refused before the upstream sees it.
    pub fn handle_room_request(
        &mut self,
        join: bool,
        room: &str,
        now_ms: u64,
        limits: &SessionLimits,
    ) -> Result<(), (ErrorCode, u32)> {
        if self.is_ended() {
            return Err((ErrorCode::NotLoggedIn, 0));
        }
        if let Some(wait) = self
            .bucket
            .take(now_ms, limits.uplink_rate, limits.uplink_burst)
        {
            return Err((ErrorCode::RateLimited, wait));
        }
        if join && !self.in_room(room) && self.rooms.len() >= limits.max_rooms {
            return Err((ErrorCode::RoomForbidden, 0));
        }
        Ok(())
    }

    /// Adds a room the upstream let the session into. False if the session has ended or is
    /// at `max_rooms`.
    pub fn room_add(&mut self, room: &Arc<str>, limits: &SessionLimits) -> bool {
        if self.is_ended() {
            return false;
        }
        if self.in_room(room) {
            return true;
        }
        if self.rooms.len() >= limits.max_rooms {
            return false;
        }
        self.rooms.push(room.clone());
        true
    }

    /// Takes a room out. False if the session was not in it.
    pub fn room_remove(&mut self, room: &str) -> bool {
        let n = self.rooms.len();
        self.rooms.retain(|r| **r != *room);
        n != self.rooms.len()
    }

    /// Writes what `conn` has not been sent yet (after LOGIN_RESULT, a resume's replay
    /// first; then new downlinks; then transient ones) into `out`. Returns the number of
    /// frames written, or `None` if the session is not attached to `conn`.
    pub fn poll_transmit(
        &mut self,
        conn: ConnRef,
        out: &mut BytesMut,
        limits: &Limits,
        compress: &CompressOptions,
        replay_batch_min: usize,
    ) -> Option<u64> {
        if self.link != Link::Attached(conn) {
            return None;
        }
        self.flush_queued = false;
        let mut frames = 0u64;
        let replay = std::mem::take(&mut self.replay);
        let accept_gzip = self.accept_gzip;
        let pending = self.downlink.after(self.sent);
        let mut sent = self.sent;
        if replay && accept_gzip && pending.len() >= replay_batch_min.max(2) {
            // A long replay: BATCH frames of up to max_batch_frames, gzip-compressed.
            let all: Vec<Frame> = pending
                .map(|d| Frame {
                    header: Header::Downlink(pb::Downlink {
                        seq: d.seq,
                        body_type: d.body_type,
                    }),
                    gzip: d.gzip,
                    body: d.body.clone(),
                })
                .collect();
            let per = (limits.max_batch_frames as usize).max(1);
            let mut rest = &all[..];
            while !rest.is_empty() {
                let mut k = rest.len().min(per);
                let done = loop {
                    match encode_batch(&rest[..k], compress, limits) {
                        Ok(b) if b.encode(out, limits).is_ok() => break k,
                        _ if k > 1 => k /= 2,
                        _ => {
                            break if rest[0].encode(out, limits).is_ok() {
                                1
                            } else {
                                0
                            }
                        }
                    }
                };
                if done == 0 {
                    break;
                }
                frames += 1;
                sent = downlink_seq(&rest[done - 1]);
                rest = &rest[done..];
            }
        } else {
            for d in pending {
                let Some((gzip, body)) = body_for(d, accept_gzip, limits) else {
                    break;
                };
                let h = Header::Downlink(pb::Downlink {
                    seq: d.seq,
                    body_type: d.body_type,
                });
                // Cannot fail for a body `push` took (TooLarge is refused there); if it did,
                // stop here rather than skip a seq: the buffer then stays full and the
                // slow-consumer rule ends the connection, never a silent hole.
                if encode_head(&h, gzip, body.len(), out, limits).is_err() {
                    break;
                }
                out.extend_from_slice(&body);
                frames += 1;
                sent = d.seq;
            }
        }
        self.sent = sent;
        // Transient frames after the numbered ones: a resume's replay goes first (§6.6).
        for (body_type, gzip, body) in self.transient.drain(..) {
            let h = Header::Downlink(pb::Downlink { seq: 0, body_type });
            if encode_head(&h, gzip, body.len(), out, limits).is_ok() {
                out.extend_from_slice(&body);
                frames += 1;
            }
        }
        if self.transient.capacity() > 0 {
            self.transient = ThinVec::new();
        }
        Some(frames)
    }

    /// The session as plain values (see [`Snapshot`]).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            last_seq: self.downlink.last_seq(),
            sent: self.sent,
            acked: self.downlink.acked(),
            unacked: self.downlink.iter().cloned().collect(),
            lost: self.downlink.lost(),
            dedup: self.dedup.done_entries(),
            in_flight: self.dedup.in_flight_ids(),
            rooms: self.rooms.iter().map(|r| r.to_string()).collect(),
            bucket: self.bucket,
            accept_gzip: self.accept_gzip,
            platform: self.platform,
        }
    }

    /// A session restored from a snapshot: detached (epoch 0), waiting for its resume, which
    /// replays from the client's `last_seq` (taken as at most what the owner had written).
    pub fn restore(s: Snapshot, now: Tick) -> SessionCore {
        let downlink = DownlinkBuffer::restore(s.last_seq, s.acked, s.unacked, s.lost);
        // What was written before the move (found by the session fuzz target: taking all of
        // `last_seq` as sent let a resume's `last_seq` past it release downlinks never sent).
        let sent = s.sent.min(s.last_seq);
        SessionCore {
            dedup: UplinkDedup::from_snapshot(&s.dedup, &s.in_flight),
            link: Link::Detached { epoch: 0 },
            // What a resume may take as the highest seq sent: what the owner wrote (the
            // client may have got any of it before the move).
            sent,
            flush_queued: false,
            replay: false,
            accept_gzip: s.accept_gzip,
            epoch: 0,
            progress_at: now,
            platform: s.platform,
            transient: ThinVec::new(),
            rooms: s.rooms.into_iter().map(Arc::from).collect(),
            bucket: s.bucket,
            downlink,
        }
    }
}

/// The body to write for `d` on a connection that does (not) take gzip: a body compressed for
/// an earlier connection that took gzip is inflated for one that does not (the gateway
/// compressed it itself, within its own limits); otherwise the shared body as it is, borrowed
/// (no clone: its reference count is one cache line for every member of a room).
fn body_for<'a>(
    d: &'a Downlink,
    accept_gzip: bool,
    limits: &Limits,
) -> Option<(bool, Cow<'a, [u8]>)> {
    if d.gzip && !accept_gzip {
        tether_codec::gunzip(&d.body, limits)
            .ok()
            .map(|b| (false, Cow::Owned(b)))
    } else {
        Some((d.gzip, Cow::Borrowed(&d.body[..])))
    }
}

/// Receipts room reserved per ack: a client acks at least every 32 downlinks (§6.5).
const RECEIPTS_HINT: usize = 32;

/// retry_after_ms for an uplink refused because the session has a full window of uplinks
/// with the upstream.
pub const BUSY_RETRY_MS: u32 = 1_000;

fn downlink_seq(f: &Frame) -> u64 {
    match &f.header {
        Header::Downlink(d) => d.seq,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: ConnRef = ConnRef {
        worker: 0,
        slot: 1,
        gen: 1,
    };
    const C2: ConnRef = ConnRef {
        worker: 1,
        slot: 7,
        gen: 2,
    };

    fn limits(max_frames: usize) -> SessionLimits {
        SessionLimits {
            downlink: DownlinkLimits {
                max_frames,
                max_bytes: usize::MAX,
            },
            ..SessionLimits::default()
        }
    }

    fn push(core: &mut SessionCore, body: &'static str, receipt: u64, now: Tick) -> Pushed {
        let plain = Bytes::from_static(body.as_bytes());
        core.push(
            &PushBody {
                body_type: 0,
                plain: &plain,
                gzip: None,
                receipt,
                transient: false,
            },
            &limits(3),
            now,
        )
    }

    /// The seqs of the DOWNLINK frames `poll_transmit` wrote.
    fn transmit(core: &mut SessionCore, conn: ConnRef) -> Vec<u64> {
        let mut out = BytesMut::new();
        let l = Limits::default();
        core.poll_transmit(conn, &mut out, &l, &CompressOptions::default(), 1_000)
            .expect("attached to conn");
        let mut seqs = Vec::new();
        while let Some(f) = tether_codec::Decoder::new(l).decode(&mut out).unwrap() {
            match f.header {
                Header::Downlink(d) => seqs.push(d.seq),
                h => panic!("{h:?}"),
            }
        }
        seqs
    }

    #[test]
    fn pushes_are_sent_acked_and_receipted_and_a_flush_is_asked_once_per_batch() {
        let mut s = SessionCore::new(C1, false, Platform::Ios, 0);
        let p = push(&mut s, "a", 11, 0);
        assert_eq!(
            (p.delivery, p.flush, p.slow),
            (Delivery::Sent, Some(C1), None)
        );
        assert_eq!(push(&mut s, "b", 12, 0).flush, None, "one flush queued");
        assert_eq!(transmit(&mut s, C1), [1, 2]);
        assert_eq!(
            push(&mut s, "c", 0, 0).flush,
            Some(C1),
            "asked again after a write"
        );
        assert_eq!(
            s.handle_ack(3, 1),
            Vec::<u64>::new(),
            "seq 3 was never sent: ignored"
        );
        assert_eq!(s.downlink_state().0, 3);
        assert_eq!(s.handle_ack(2, 1), [11, 12]);
        assert_eq!(transmit(&mut s, C1), [3]);
        assert_eq!(s.handle_ack(3, 1), Vec::<u64>::new(), "no receipt id");
        assert_eq!(s.downlink_state(), (0, 0, 3));
    }

    #[test]
    fn a_full_buffer_refuses_and_only_a_stalled_one_makes_a_slow_consumer() {
        let mut s = SessionCore::new(C1, false, Platform::Ios, 0);
        for _ in 0..3 {
            assert_eq!(push(&mut s, "x", 0, 0).delivery, Delivery::Sent);
        }
        transmit(&mut s, C1);
        let p = push(&mut s, "y", 0, 10);
        assert_eq!(p.delivery, Delivery::Refused(Refusal::Full));
        assert_eq!(p.slow, None, "full, but not for long");
        // The client acks one at 20: progress; full again, refused, still not slow at 49.
        s.handle_ack(1, 20);
        assert_eq!(push(&mut s, "z", 0, 20).delivery, Delivery::Sent);
        assert_eq!(push(&mut s, "w", 0, 49).slow, None);
        // No ack for 30 s: the next refused push closes it.
        assert_eq!(push(&mut s, "w", 0, 50).slow, Some(C1));
        assert_eq!(s.downlink_state().0, 3, "nothing dropped");
    }

    #[test]
    fn a_detached_session_holds_resumes_with_a_replay_and_ends_with_what_is_undelivered() {
        let mut s = SessionCore::new(C1, false, Platform::Android, 0);
        push(&mut s, "a", 1, 0);
        push(&mut s, "b", 2, 0);
        assert_eq!(transmit(&mut s, C1), [1, 2]);
        let epoch = s.detach(C1).unwrap();
        assert_eq!(s.detach(C1), None, "only once");
        assert!(s.detached_since(epoch));
        let p = push(&mut s, "c", 3, 5);
        assert_eq!((p.delivery, p.flush), (Delivery::Held, None));
        let plain = Bytes::from_static(b"t");
        let t = PushBody {
            body_type: 0,
            plain: &plain,
            gzip: None,
            receipt: 0,
            transient: true,
        };
        assert_eq!(
            s.push(&t, &limits(3), 5).delivery,
            Delivery::Refused(Refusal::NotAttached)
        );
        // The client had seq 1: 2 and 3 are replayed; 1's receipt comes with the resume.
        let r = s.resume(C2, 1, true, Platform::Web, 6).unwrap();
        assert_eq!(
            r,
            Resumed {
                gap: None,
                receipts: vec![1],
                replaced: None
            }
        );
        assert!(
            !s.detached_since(epoch),
            "a resume outlives the old grace period"
        );
        assert_eq!(
            s.poll_transmit(
                C1,
                &mut BytesMut::new(),
                &Limits::default(),
                &CompressOptions::default(),
                16
            ),
            None
        );
        assert_eq!(transmit(&mut s, C2), [2, 3]);
        assert_eq!((s.platform(), s.accept_gzip()), (Platform::Web, true));
        // Resumed again while attached: the old connection is named, to be kicked.
        let r = s.resume(C1, 3, false, Platform::Web, 7).unwrap();
        assert_eq!(r.replaced, Some(C2));
        assert_eq!(r.receipts, [2, 3]);
        push(&mut s, "d", 4, 8);
        let ended = s.end().unwrap();
        assert_eq!(ended.link, Link::Attached(C1));
        assert_eq!(
            ended
                .undelivered
                .iter()
                .map(|d| d.receipt)
                .collect::<Vec<_>>(),
            [4]
        );
        assert_eq!(s.downlink_state().0, 0, "released at once");
        assert!(s.end().is_none());
        assert!(s.resume(C2, 0, false, Platform::Web, 9).is_none());
        assert_eq!(
            push(&mut s, "e", 0, 9).delivery,
            Delivery::Refused(Refusal::Ended)
        );
    }

    #[test]
    fn a_replay_for_a_client_that_no_longer_takes_gzip_is_inflated() {
        let mut s = SessionCore::new(C1, true, Platform::Ios, 0);
        let plain = Bytes::from(vec![b'a'; 4000]);
        let (gz, is_gz) = CompressOptions::default().compress(plain.clone(), &Limits::default());
        assert!(is_gz);
        for _ in 0..20 {
            let p = PushBody {
                body_type: 0,
                plain: &plain,
                gzip: Some(&gz),
                receipt: 0,
                transient: false,
            };
            s.push(&p, &limits(100), 0);
        }
        s.detach(C1);
        s.resume(C2, 0, false, Platform::Ios, 1).unwrap();
        let mut out = BytesMut::new();
        let l = Limits::default();
        s.poll_transmit(C2, &mut out, &l, &CompressOptions::default(), 16)
            .unwrap();
        let mut n = 0;
        while let Some(f) = tether_codec::Decoder::new(l).decode(&mut out).unwrap() {
            assert!(matches!(f.header, Header::Downlink(_)), "no BATCH: {f:?}");
            assert!(!f.gzip);
            assert_eq!(f.body, plain);
            n += 1;
        }
        assert_eq!(n, 20);
    }

    #[test]
    fn uplinks_are_deduplicated_rate_limited_and_carried_to_a_new_login() {
        let lim = SessionLimits {
            uplink_rate: 1,
            uplink_burst: 2,
            ..SessionLimits::default()
        };
        let mut s = SessionCore::new(C1, false, Platform::Ios, 0);
        assert_eq!(
            s.handle_uplink(0, 0, &lim),
            Verdict::Ack(ErrorCode::Rejected, 0)
        );
        assert_eq!(s.handle_uplink(1, 0, &lim), Verdict::Forward);
        assert_eq!(s.handle_uplink(1, 0, &lim), Verdict::Wait);
        s.uplink_answered(1, ErrorCode::Ok);
        assert_eq!(s.handle_uplink(1, 0, &lim), Verdict::Ack(ErrorCode::Ok, 0));
        assert_eq!(s.handle_uplink(2, 0, &lim), Verdict::Forward);
        assert!(matches!(
            s.handle_uplink(3, 0, &lim),
            Verdict::Ack(ErrorCode::RateLimited, _)
        ));
        s.uplink_answered(2, ErrorCode::UpstreamTimeout);
        // The same device logs in again: the bucket is still empty, 1 is still known, 2 (a
        // retriable failure) may be sent again.
        let carry = s.end().unwrap().carry;
        let mut s2 = SessionCore::new(C2, false, Platform::Ios, 0);
        s2.inherit(carry);
        assert!(matches!(
            s2.handle_uplink(4, 10, &lim),
            Verdict::Ack(ErrorCode::RateLimited, _)
        ));
        assert_eq!(
            s2.handle_uplink(1, 10, &lim),
            Verdict::Ack(ErrorCode::Ok, 0)
        );
        assert_eq!(s2.handle_uplink(2, 1_000, &lim), Verdict::Forward);
    }

    #[test]
    fn rooms_are_capped_and_room_requests_take_tokens() {
        let lim = SessionLimits {
            max_rooms: 2,
            uplink_rate: 1,
            uplink_burst: 3,
            ..SessionLimits::default()
        };
        let mut s = SessionCore::new(C1, false, Platform::Ios, 0);
        for r in ["a", "b"] {
            assert_eq!(s.handle_room_request(true, r, 0, &lim), Ok(()));
            assert!(s.room_add(&Arc::from(r), &lim));
        }
        assert_eq!(
            s.handle_room_request(true, "c", 0, &lim),
            Err((ErrorCode::RoomForbidden, 0))
        );
        assert!(!s.room_add(&Arc::from("c"), &lim), "capped at add too");
        assert!(s.room_add(&Arc::from("a"), &lim), "already in: fine");
        assert!(matches!(
            s.handle_room_request(false, "a", 0, &lim),
            Err((ErrorCode::RateLimited, _))
        ));
        assert!(s.room_remove("a") && !s.room_remove("a"));
        assert_eq!(s.rooms().len(), 1);
    }

    #[test]
    fn a_snapshot_restores_a_session_that_resumes_as_the_original_would() {
        let mut s = SessionCore::new(C1, true, Platform::Ios, 0);
        for (b, r) in [("a", 1), ("b", 2), ("c", 3)] {
            push(&mut s, b, r, 0);
        }
        transmit(&mut s, C1);
        s.handle_ack(1, 1);
        s.handle_uplink(9, 0, &SessionLimits::default());
        s.uplink_answered(9, ErrorCode::Ok);
        s.room_add(&Arc::from("room"), &SessionLimits::default());
        let snap = s.snapshot();
        let mut r = SessionCore::restore(snap.clone(), 5);
        assert_eq!(r.snapshot(), snap, "a restore keeps everything");
        assert!(r.detached_since(0));
        let res = r.resume(C2, 2, true, Platform::Ios, 6).unwrap();
        assert_eq!((res.gap, res.receipts), (None, vec![2]));
        assert_eq!(transmit(&mut r, C2), [3]);
        assert_eq!(
            r.handle_uplink(9, 0, &SessionLimits::default()),
            Verdict::Ack(ErrorCode::Ok, 0)
        );
        assert!(r.in_room("room"));
    }

    #[test]
    fn a_push_that_only_fits_gzipped_is_refused() {
        // Found by the session fuzz target: accepted, then never writable after a resume on
        // a connection without gzip (the session stuck at its seq).
        let l = Limits::default();
        let lim = SessionLimits::default();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let plain: Bytes = (0..lim.max_body + 1000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"0123456789abcdef"[(x % 16) as usize]
            })
            .collect::<Vec<u8>>()
            .into();
        let (gz, true) = CompressOptions::default().compress(plain.clone(), &l) else {
            panic!("compressible")
        };
        assert!(gz.len() <= lim.max_body);
        let mut s = SessionCore::new(C1, true, Platform::Ios, 0);
        let p = PushBody {
            body_type: 0,
            plain: &plain,
            gzip: Some(&gz),
            receipt: 1,
            transient: false,
        };
        assert_eq!(
            s.push(&p, &lim, 0).delivery,
            Delivery::Refused(Refusal::TooLarge)
        );
    }

    #[test]
    fn an_ended_core_takes_no_uplink_and_no_room_request() {
        // Found by the session fuzz target (and races.rs through sockets): an uplink racing
        // the session's end was forwarded and never acked.
        let lim = SessionLimits::default();
        let mut s = SessionCore::new(C1, false, Platform::Ios, 0);
        s.end().unwrap();
        assert_eq!(s.handle_uplink(4, 0, &lim), Verdict::Ended);
        assert!(s.handle_room_request(true, "r1", 0, &lim).is_err());
    }

    #[test]
    fn a_restored_session_takes_no_last_seq_beyond_what_was_sent() {
        // Found by the session fuzz target: a restored core took everything as sent.
        let mut s = SessionCore::new(C1, false, Platform::Ios, 0);
        push(&mut s, "a", 1, 0);
        assert_eq!(transmit(&mut s, C1), [1]);
        s.detach(C1);
        push(&mut s, "b", 2, 1); // held while detached: never sent
        let mut r = SessionCore::restore(s.snapshot(), 2);
        let res = r.resume(C2, u64::MAX, false, Platform::Ios, 3).unwrap();
        assert_eq!(res.receipts, [1], "only what was sent");
        assert_eq!(transmit(&mut r, C2), [2]);
    }
}
