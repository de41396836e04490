//! The `session` fuzz target's check: one [`SessionCore`] (and a [`Conn`] per connection it
//! is attached to) driven by an arbitrary sequence of operations decoded from the input, the
//! way a worker and the node drive them, beside a plain model of what the core must do. Any
//! difference from the model, or a broken invariant, panics.
//!
//! Included by path from `gateway/tests/fuzz_session.rs` too (which replays
//! `fuzz/regressions/session/` and a few thousand seeded inputs under `cargo test`), so it uses
//! only what the gateway's integration tests can: `tether_gateway`, `tether_codec`,
//! `tether_protocol`, `bytes`.
//!
//! Input: 12 bytes of settings (limits, clock start), then up to [`MAX_OPS`] operations, each
//! one byte of kind and a few bytes of arguments (missing bytes read as 0).
//!
//! What must hold (besides "exactly what the model says" for every return value):
//! - on one attachment (connection), the DOWNLINK seqs on the wire strictly increase and have
//!   no gaps, starting right after what the attachment's resume acked: nothing is written
//!   twice under one seq on one attachment, and a seq is written again on a new attachment
//!   only when its resume asked for it (it was above the resume's `last_seq`);
//! - every body on the wire (inflated) is the body pushed under that seq;
//! - nothing is released that was not acked: an ack above what the connection was sent
//!   releases nothing, and everything accepted is, exactly once, still buffered, released by
//!   an ack or a resume (its receipt handed back), or in `end()`'s undelivered list;
//! - the buffer stays within its frames and bytes bounds (one downlink of any size is taken
//!   into an empty buffer, by design), rooms within `max_rooms`, uplinks in flight within the
//!   dedup window, accepted uplinks and room requests within the rate bucket;
//! - an ended core accepts nothing: no push, ack, resume, detach, transmit, room, uplink;
//! - a handoff (`snapshot`, then `restore` on a sibling process) keeps everything, and the
//!   restored core goes on as the model says.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tether_codec::{decode_batch, CompressOptions, Decoder, Frame, Header, Limits};
use tether_gateway::conn::{Action, Conn, ConnConfig};
use tether_gateway::session::core::{
    ConnRef, Delivery, Link, PushBody, Refusal, SessionCore, SessionLimits, Verdict, BUSY_RETRY_MS,
};
use tether_gateway::session::downlink::DownlinkLimits;
use tether_gateway::timer::Tick;
use tether_protocol::pb::{self, ErrorCode, Platform};

/// Checks of what was found broken (`fuzz/regressions/session/README.md`): all on by default
/// since the session core was fixed (2026-12-02); `TETHER_FUZZ_STRICT=0` turns them off, a
/// comma-separated list of `ended`, `gzip`, `restore` keeps only those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strict {
    /// An ended core must take no uplink and no room request (it does).
    pub ended: bool,
    /// Generate gzip bodies whose plain form does not fit a frame (accepted, then never
    /// written after a resume without gzip: the session is stuck at that seq).
    pub gzip: bool,
    /// A restored core must remember what was sent before the move (§6.6: a resume's
    /// `last_seq` above it counts as it). It does not: `restore` takes the last seq pushed as
    /// sent, so such a resume releases downlinks that were held, never sent.
    pub restore: bool,
}

impl Default for Strict {
    fn default() -> Strict {
        Strict::ALL
    }
}

impl Strict {
    pub const ALL: Strict = Strict {
        ended: true,
        gzip: true,
        restore: true,
    };

    /// From `TETHER_FUZZ_STRICT`: unset, `1` or `all`: all; `0` or `none`: none; or a
    /// comma-separated list of `ended`, `gzip`, `restore`.
    pub fn from_env() -> Strict {
        let v = std::env::var("TETHER_FUZZ_STRICT").unwrap_or_default();
        let all = v.is_empty() || v == "1" || v == "all";
        let has = |w: &str| all || v.split(',').any(|x| x.trim() == w);
        Strict {
            ended: has("ended"),
            gzip: has("gzip"),
            restore: has("restore"),
        }
    }
}

/// `TETHER_FUZZ_TRACE=1`: print every operation and the model after it (for a reproducer).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("TETHER_FUZZ_TRACE").is_some_and(|v| v != "0"))
}

/// Operations per input, at most.
pub const MAX_OPS: usize = 256;

const ROOMS: [&str; 6] = ["r0", "r1", "r2", "r3", "r4", "r5"];

/// Reads the input; past its end every byte is 0.
struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |n, i| n | (self.u8() as u64) << (8 * i))
    }
}

/// One accepted, unacked downlink as the model keeps it.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    body_type: u32,
    receipt: u64,
    /// What the core stored: the gzip body (for a session that took gzip) or the plain one.
    gzip: bool,
    stored: Bytes,
    plain: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MLink {
    Attached(ConnRef),
    Detached(u32),
    Ended,
}

/// One connection: its protocol state and what its wire has carried.
struct Wire {
    conn: Conn,
    /// The highest DOWNLINK seq written on this connection, or the point its attachment
    /// started from (seqs are written from one above it, without gaps).
    last: u64,
    seen: HashSet<u64>,
}

struct Harness {
    strict: Strict,
    limits: SessionLimits,
    codec: Limits,
    compress: CompressOptions,
    conn_config: ConnConfig,
    heartbeat_ms: u32,
    now_ms: u64,
    core: SessionCore,
    // The model.
    link: MLink,
    epoch: u32,
    last_seq: u64,
    acked: u64,
    sent: u64,
    buf: VecDeque<Entry>,
    bytes: usize,
    flush_queued: bool,
    progress_at: Tick,
    accept_gzip: bool,
    transient: Vec<(u32, bool, Bytes, Bytes)>,
    rooms: Vec<String>,
    in_flight: Vec<u64>,
    /// Uplinks in flight when the core ended (its window went to an heir, which the model does
    /// not follow): their answers to the ended core change nothing.
    orphans: Vec<u64>,
    answered: HashMap<u64, ErrorCode>,
    /// Uplinks and room requests the bucket let through, by gateway ms.
    takes: Vec<u64>,
    pending_rooms: Vec<(bool, String)>,
    // Accounting of everything accepted.
    accepted: u64,
    released: HashSet<u64>,
    undelivered: HashSet<u64>,
    // Connections still open (the current attachment, and replaced ones whose KICK has not
    // landed yet), and the client's view.
    wires: HashMap<ConnRef, Wire>,
    order: Vec<ConnRef>,
    next_gen: u32,
    client_got: u64,
    next_push: u64,
}

fn tick_of(ms: u64) -> Tick {
    (ms / 1000).min(u32::MAX as u64) as Tick
}

fn pick<T: Copy>(b: u8, from: &[T]) -> T {
    from[b as usize % from.len()]
}

impl Harness {
    fn now(&self) -> Tick {
        tick_of(self.now_ms)
    }

    fn new(input: &mut Input, strict: Strict) -> Harness {
        // Mostly small frame limits (the edges come quickly, bodies are cheap), sometimes
        // the defaults (64 KiB frames).
        let codec = match input.u8() % 8 {
            0..=3 => Limits {
                max_frame_len: 1024,
                max_header_len: 256,
                max_decompressed_len: 16 * 1024,
                max_expansion_ratio: 100,
                max_batch_frames: 4,
            },
            4..=6 => Limits {
                max_frame_len: 8 * 1024,
                max_header_len: 1024,
                max_decompressed_len: 64 * 1024,
                max_expansion_ratio: 100,
                max_batch_frames: 16,
            },
            _ => Limits::default(),
        };
        let max_frames = (input.u8() % 17) as usize;
        let max_bytes = pick(
            input.u8(),
            &[0, 1, 16, 64, 100, 256, 1024, 4096, 256 * 1024, usize::MAX],
        );
        let dedup_window = (input.u8() % 7) as usize;
        let uplink_rate = pick(input.u8(), &[0, 1, 3, 10, 50, 1000]);
        let uplink_burst = pick(input.u8(), &[0, 1, 2, 5, 100]);
        let max_transient = (input.u8() % 5) as usize;
        let max_rooms = (input.u8() % 5) as usize;
        let slow_consumer_secs = pick(input.u8(), &[0, 1, 5, 30]);
        let flags = input.u8();
        let start_ms = input.u16() as u64 * pick(flags >> 4, &[1, 1000, 65_536, 1 << 20]);
        let limits = SessionLimits {
            downlink: DownlinkLimits {
                max_frames,
                max_bytes,
            },
            max_body: SessionLimits::max_body_for(&codec),
            dedup_window,
            uplink_rate,
            uplink_burst,
            max_transient,
            max_rooms,
            slow_consumer_secs,
        };
        let compress = CompressOptions {
            threshold: if flags & 1 == 1 { 0 } else { 32 },
            level: 1,
        };
        let accept_gzip = flags & 2 == 2;
        let now = tick_of(start_ms);
        let c = ConnRef {
            worker: 0,
            slot: 0,
            gen: 1,
        };
        let mut h = Harness {
            strict,
            limits,
            codec,
            compress,
            conn_config: ConnConfig::default(),
            heartbeat_ms: pick(flags >> 2, &[1_000, 30_000, 250, 4_000]),
            now_ms: start_ms,
            core: SessionCore::new(c, accept_gzip, Platform::Ios, now),
            link: MLink::Attached(c),
            epoch: 0,
            last_seq: 0,
            acked: 0,
            sent: 0,
            buf: VecDeque::new(),
            bytes: 0,
            flush_queued: false,
            progress_at: now,
            accept_gzip,
            transient: Vec::new(),
            rooms: Vec::new(),
            in_flight: Vec::new(),
            orphans: Vec::new(),
            answered: HashMap::new(),
            takes: Vec::new(),
            pending_rooms: Vec::new(),
            accepted: 0,
            released: HashSet::new(),
            undelivered: HashSet::new(),
            wires: HashMap::new(),
            order: Vec::new(),
            next_gen: 2,
            client_got: 0,
            next_push: 1,
        };
        h.open(c, None);
        h
    }

    /// A connection logs in (a fresh login for the first, a resume after): LOGIN through its
    /// `Conn`, the node's part (`resume`), then LOGIN_RESULT OK.
    fn open(&mut self, c: ConnRef, resume: Option<(u64, bool, Platform)>) {
        let now = self.now();
        let mut conn = Conn::new(now);
        let mut out = Vec::new();
        let login = pb::Login {
            user_id: "u".into(),
            device_id: "d".into(),
            resume: resume.map(|(last_seq, _, _)| pb::Resume {
                session_id: Bytes::from_static(&[0; 16]),
                last_seq,
            }),
            ..Default::default()
        };
        conn.handle_frame(now, Frame::new(Header::Login(Box::new(login))), &mut out);
        assert!(
            matches!(&out[..], [Action::Login { .. }]),
            "a LOGIN on a new connection is for the node: {out:?}"
        );
        if let Some((last_seq, gzip, platform)) = resume {
            let r = self.core.resume(c, last_seq, gzip, platform, now);
            if self.link == MLink::Ended {
                assert!(r.is_none(), "an ended core resumed: {r:?}");
                return; // the node makes a fresh session instead; not this core's business
            }
            let r = r.expect("a live core resumes");
            let replaced = match self.link {
                MLink::Attached(old) => Some(old),
                _ => None,
            };
            assert_eq!(r.replaced, replaced, "the connection a resume replaces");
            assert_eq!(r.gap, None, "a live buffer never has a gap");
            let upto = last_seq.min(self.sent);
            let receipts = self.release(upto);
            assert_eq!(
                r.receipts, receipts,
                "a resume's receipts (last_seq {last_seq})"
            );
            self.sent = self.acked;
            self.link = MLink::Attached(c);
            self.flush_queued = false;
            self.transient.clear();
            self.accept_gzip = gzip;
            self.progress_at = now;
            assert_eq!(self.core.platform(), platform);
        }
        conn.login_accepted(now, self.heartbeat_ms);
        assert!(conn.is_logged_in());
        self.wires.insert(
            c,
            Wire {
                conn,
                last: self.sent,
                seen: HashSet::new(),
            },
        );
        self.order.push(c);
    }

    /// Releases every model entry up to `seq` (clamped to the last seq pushed): their
    /// receipts, oldest first.
    fn release(&mut self, seq: u64) -> Vec<u64> {
        let seq = seq.min(self.last_seq);
        self.acked = self.acked.max(seq);
        let mut receipts = Vec::new();
        while self.buf.front().is_some_and(|e| e.seq <= self.acked) {
            let e = self.buf.pop_front().unwrap();
            self.bytes -= e.stored.len();
            assert!(self.released.insert(e.seq), "seq {} released twice", e.seq);
            assert!(e.seq <= self.sent, "seq {} released, never sent", e.seq);
            if e.receipt != 0 {
                receipts.push(e.receipt);
            }
        }
        receipts
    }

    fn current(&self) -> Option<ConnRef> {
        match self.link {
            MLink::Attached(c) => Some(c),
            _ => None,
        }
    }

    /// A connection chosen by `b`: an open one (the current attachment first), if any.
    fn conn_at(&self, b: u8) -> Option<ConnRef> {
        if self.order.is_empty() {
            return None;
        }
        Some(self.order[b as usize % self.order.len()])
    }

    /// A frame from the client on `c`, through its `Conn`; the actions it asks for are
    /// carried out as the worker does (the session ones on the core, whether or not it is
    /// still attached to `c`).
    fn frame(&mut self, c: ConnRef, frame: Frame) {
        let now = self.now();
        let mut out = Vec::new();
        let w = self.wires.get_mut(&c).expect("open");
        w.conn.handle_frame(now, frame, &mut out);
        for a in out {
            match a {
                Action::Send(_) => {}
                Action::Close(_) => self.close(c),
                Action::Login { .. } => panic!("a LOGIN on a logged-in connection"),
                Action::Uplink { msg_id, .. } => self.uplink(msg_id),
                Action::DownlinkAck(seq) => self.ack(seq),
                Action::RoomJoin { room_id, .. } => self.room_request(true, room_id),
                Action::RoomLeave { room_id, .. } => self.room_request(false, room_id),
            }
        }
    }

    /// The connection `c` is gone (closed by either side, or its KICK landed): the worker
    /// detaches the session from it.
    fn close(&mut self, c: ConnRef) {
        if self.wires.remove(&c).is_none() {
            return;
        }
        self.order.retain(|&o| o != c);
        let epoch = self.core.detach(c);
        if self.link == MLink::Attached(c) {
            self.epoch = self.epoch.wrapping_add(1);
            assert_eq!(epoch, Some(self.epoch), "detach epoch");
            self.link = MLink::Detached(self.epoch);
            self.transient.clear();
            self.flush_queued = false;
        } else {
            assert_eq!(
                epoch, None,
                "detached from a connection it was not attached to"
            );
        }
    }

    fn push(&mut self, input: &mut Input) {
        let flags = input.u8();
        let transient = flags & 1 == 1;
        let receipt = if flags & 2 == 2 { 0 } else { self.next_push };
        let want_gzip = flags & 4 == 4;
        let incompressible = flags & 8 == 8;
        let body_type = (flags >> 4) as u32;
        // Mostly small bodies: a long replay is compressed into BATCH frames, halving and
        // compressing again when one does not fit, and big bodies made that most of the time.
        let len = match input.u8() {
            0..=119 => input.u8() as usize % 32,
            120..=219 => input.u8() as usize * 4,
            220..=227 => self.limits.max_body,
            228..=235 => self.limits.max_body + 1,
            236..=245 => self.limits.downlink.max_bytes.min(1 << 16),
            _ => input.u16() as usize,
        };
        // Past max_body every size is refused alike (TooLarge); only a gzip body can make a
        // larger one fit, which is the open finding `Strict::gzip` generates.
        let len = if self.strict.gzip {
            len
        } else {
            len.min(self.limits.max_body + 1)
        };
        let id = self.next_push;
        self.next_push += 1;
        let mut body = Vec::with_capacity(len);
        let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for i in 0..len {
            body.push(if i < 8 {
                (id >> (8 * i)) as u8
            } else if incompressible {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                b'a' + (i % 3) as u8
            });
        }
        let plain = Bytes::from(body);
        let gz = if want_gzip && (self.strict.gzip || len <= self.limits.max_body) {
            match self.compress.compress(plain.clone(), &self.codec) {
                (b, true) => Some(b),
                _ => None,
            }
        } else {
            None
        };
        let now = self.now();
        let p = self.core.push(
            &PushBody {
                body_type,
                plain: &plain,
                gzip: gz.as_ref(),
                receipt,
                transient,
            },
            &self.limits,
            now,
        );
        let (gzip, stored) = match &gz {
            Some(b) if self.accept_gzip => (true, b.clone()),
            _ => (false, plain.clone()),
        };
        let conn = self.current();
        let refused = |r| (Delivery::Refused(r), None, None);
        let (n, bytes) = (self.buf.len(), self.bytes);
        let lim = self.limits.downlink;
        // The plain body must fit too (a later connection without gzip is sent it).
        let too_large = stored.len() > self.limits.max_body || plain.len() > self.limits.max_body;
        let expected = if too_large {
            refused(Refusal::TooLarge)
        } else if self.link == MLink::Ended {
            refused(Refusal::Ended)
        } else if transient && conn.is_none() {
            refused(Refusal::NotAttached)
        } else if transient && self.transient.len() >= self.limits.max_transient {
            refused(Refusal::Full)
        } else if !transient
            && n > 0
            && (n >= lim.max_frames || bytes + stored.len() > lim.max_bytes)
        {
            let stuck = now
                >= self
                    .progress_at
                    .saturating_add(self.limits.slow_consumer_secs);
            (
                Delivery::Refused(Refusal::Full),
                None,
                conn.filter(|_| stuck),
            )
        } else {
            if transient {
                self.transient.push((body_type, gzip, stored, plain));
            } else {
                if n == 0 {
                    self.progress_at = now;
                }
                self.last_seq += 1;
                self.accepted += 1;
                self.bytes += stored.len();
                self.buf.push_back(Entry {
                    seq: self.last_seq,
                    body_type,
                    receipt,
                    gzip,
                    stored,
                    plain,
                });
            }
            let flush = conn.filter(|_| !std::mem::replace(&mut self.flush_queued, true));
            let d = if conn.is_some() {
                Delivery::Sent
            } else {
                Delivery::Held
            };
            (d, flush, None)
        };
        assert_eq!(
            (p.delivery, p.flush, p.slow),
            expected,
            "push of {len} bytes (transient {transient}, gzip {gzip}) to {:?} holding {n} \
             frames / {bytes} bytes",
            self.link
        );
    }

    fn ack(&mut self, seq: u64) {
        let receipts = self.core.handle_ack(seq, self.now());
        let expected = if seq > self.sent || self.current().is_none() {
            Vec::new()
        } else {
            let before = self.buf.len();
            let r = self.release(seq);
            if self.buf.len() != before {
                self.progress_at = self.now();
            }
            r
        };
        assert_eq!(receipts, expected, "ack of {seq} (sent {})", self.sent);
    }

    /// The worker writes what `c` has not been sent; `lost`: the bytes never reach the
    /// client (the connection dies with them in its buffer).
    fn transmit(&mut self, c: ConnRef, replay_batch_min: usize, lost: bool) {
        let mut out = BytesMut::new();
        let replay_min = replay_batch_min;
        let frames = self
            .core
            .poll_transmit(c, &mut out, &self.codec, &self.compress, replay_min);
        if self.link != MLink::Attached(c) {
            assert_eq!(
                frames, None,
                "transmit to {c:?}, the core is {:?}",
                self.link
            );
            assert!(out.is_empty());
            return;
        }
        let frames = frames.expect("attached");
        self.flush_queued = false;
        // Decode what was written: BATCH frames unpacked.
        let decoder = Decoder::new(self.codec);
        let mut wire: Vec<(Frame, bool)> = Vec::new();
        let mut written = 0u64;
        while let Some(f) = decoder
            .decode(&mut out)
            .expect("the core writes valid frames")
        {
            written += 1;
            if let Header::Batch(_) = f.header {
                for inner in decode_batch(&f, &self.codec).expect("a valid BATCH") {
                    wire.push((inner, true));
                }
            } else {
                wire.push((f, false));
            }
        }
        assert!(out.is_empty(), "a partial frame written");
        assert_eq!(frames, written, "poll_transmit counts the frames it wrote");
        let pending: Vec<Entry> = self
            .buf
            .iter()
            .filter(|e| e.seq > self.sent)
            .cloned()
            .collect();
        let transient = std::mem::take(&mut self.transient);
        assert_eq!(
            wire.len(),
            pending.len() + transient.len(),
            "frames on the wire: {:?}, expected seqs {:?} and {} transient",
            wire.iter()
                .map(|(f, _)| f.header.clone())
                .collect::<Vec<_>>(),
            pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
            transient.len()
        );
        let w = self
            .wires
            .get_mut(&c)
            .expect("the attached connection is open");
        let mut numbered = true;
        for (i, (f, batched)) in wire.iter().enumerate() {
            let Header::Downlink(d) = &f.header else {
                panic!("not a DOWNLINK: {:?}", f.header);
            };
            let body = f
                .decompressed_body(&self.codec)
                .expect("a body that inflates");
            if d.seq == 0 {
                numbered = false;
                assert!(!batched, "a transient downlink in a BATCH");
                let k = i
                    .checked_sub(pending.len())
                    .expect("a transient before a numbered one");
                let (bt, gzip, _, plain) = &transient[k];
                assert_eq!((d.body_type, &body, f.gzip), (*bt, plain, *gzip));
                continue;
            }
            assert!(numbered, "seq {} after a transient downlink", d.seq);
            // Strictly increasing, no gap, never twice on this attachment.
            assert_eq!(
                d.seq,
                w.last + 1,
                "seq {} on {c:?} after {} (no gaps, nothing twice)",
                d.seq,
                w.last
            );
            assert!(w.seen.insert(d.seq), "seq {} twice on {c:?}", d.seq);
            w.last = d.seq;
            let e = &pending[i];
            assert_eq!(d.seq, e.seq);
            assert_eq!(d.body_type, e.body_type);
            assert_eq!(body, e.plain, "the body of seq {}", d.seq);
            assert_eq!(
                f.gzip,
                e.gzip && self.accept_gzip,
                "gzip flag of seq {}",
                d.seq
            );
            if *batched {
                assert!(self.accept_gzip, "a BATCH for a client without gzip");
            }
            if !lost && d.seq == self.client_got + 1 {
                self.client_got = d.seq;
            }
        }
        if let Some(e) = pending.last() {
            self.sent = e.seq;
        }
    }

    fn uplink(&mut self, msg_id: u64) {
        let now_ms = self.now_ms;
        let v = self.core.handle_uplink(msg_id, now_ms, &self.limits);
        let window = self.limits.dedup_window;
        if self.link == MLink::Ended && self.strict.ended {
            assert!(
                !matches!(v, Verdict::Forward | Verdict::Wait),
                "an ended core took uplink {msg_id}: {v:?}"
            );
        }
        if v == Verdict::Ended {
            assert_eq!(
                self.link,
                MLink::Ended,
                "uplink {msg_id}: Ended from a live core"
            );
            return;
        }
        if msg_id == 0 {
            assert_eq!(v, Verdict::Ack(ErrorCode::Rejected, 0));
            return;
        }
        let flying = window > 0 && self.in_flight.contains(&msg_id);
        match v {
            Verdict::Wait => assert!(flying, "Wait for {msg_id}, not in flight"),
            Verdict::Forward => {
                assert!(!flying, "uplink {msg_id} forwarded twice while in flight");
                self.in_flight.push(msg_id);
                self.answered.remove(&msg_id);
                if window > 0 {
                    assert!(
                        self.in_flight.len() <= window,
                        "{} uplinks in flight, window {window}",
                        self.in_flight.len()
                    );
                }
                self.take();
            }
            Verdict::Ack(ErrorCode::RateLimited, wait) => {
                // The bucket, or a window full of uplinks in flight (Busy): not recorded.
                assert!(!flying, "uplink {msg_id} in flight refused");
                assert!(wait >= 1, "retry_after_ms 0");
                let busy = window > 0 && self.in_flight.len() >= window;
                assert!(busy || wait != BUSY_RETRY_MS || self.limits.uplink_rate > 0);
                self.answered.remove(&msg_id);
            }
            Verdict::Ack(code, 0) => {
                assert!(!flying, "uplink {msg_id} in flight acked with {code:?}");
                assert_eq!(
                    self.answered.get(&msg_id),
                    Some(&code),
                    "uplink {msg_id} acked from the window with {code:?}"
                );
            }
            Verdict::Ack(code, wait) => panic!("uplink {msg_id}: {code:?} retry {wait}"),
            Verdict::Ended => unreachable!("returned above"),
        }
    }

    /// The bucket let one through at now: check the rate bound over every earlier take.
    fn take(&mut self) {
        self.takes.push(self.now_ms);
        let rate = self.limits.uplink_rate as u64;
        if rate == 0 {
            return;
        }
        let burst = self.limits.uplink_burst.max(1) as u64;
        let n = self.takes.len() as u64;
        for (i, &t) in self.takes.iter().enumerate() {
            let k = n - i as u64;
            let dt = self.now_ms - t;
            assert!(
                1000 * k <= 1000 * burst + rate * dt,
                "{k} takes in {dt} ms at {rate}/s, burst {burst}"
            );
        }
    }

    fn answer(&mut self, input: &mut Input) {
        let b = input.u8();
        let code = pick(
            input.u8(),
            &[
                ErrorCode::Ok,
                ErrorCode::Rejected,
                ErrorCode::UpstreamUnavailable,
                ErrorCode::UpstreamTimeout,
                ErrorCode::RateLimited,
                ErrorCode::Internal,
            ],
        );
        if b & 0x80 == 0x80 && !self.orphans.is_empty() {
            // A late answer to an uplink forwarded before the core ended: it reaches the
            // ended core, whose window knows that id only if it was forwarded again since.
            let msg_id = self.orphans.remove(b as usize % self.orphans.len());
            self.core.uplink_answered(msg_id, code);
            let flying = self.in_flight.iter().position(|&m| m == msg_id);
            if let Some(i) = flying {
                self.in_flight.remove(i);
            }
            self.record(msg_id, code, flying.is_none());
            return;
        }
        if self.in_flight.is_empty() {
            return;
        }
        let msg_id = self.in_flight.remove(b as usize % self.in_flight.len());
        self.core.uplink_answered(msg_id, code);
        self.record(msg_id, code, false);
    }

    /// What an answer does to the window, by id (`late`: the id was not in flight; the window
    /// changes only an answered entry of it).
    fn record(&mut self, msg_id: u64, code: ErrorCode, late: bool) {
        match code {
            ErrorCode::UpstreamUnavailable
            | ErrorCode::UpstreamTimeout
            | ErrorCode::RateLimited => {
                self.answered.remove(&msg_id);
            }
            _ if self.limits.dedup_window == 0 => {}
            _ if late && !self.answered.contains_key(&msg_id) => {}
            _ => {
                self.answered.insert(msg_id, code);
            }
        }
    }

    fn room_request(&mut self, join: bool, room: String) {
        let r = self
            .core
            .handle_room_request(join, &room, self.now_ms, &self.limits);
        if self.link == MLink::Ended && self.strict.ended {
            assert!(r.is_err(), "an ended core took a room request ({room})");
        }
        let over = join && !self.rooms.contains(&room) && self.rooms.len() >= self.limits.max_rooms;
        match r {
            Ok(()) => {
                assert!(!over, "a join past max_rooms let through");
                self.take();
                self.pending_rooms.push((join, room));
            }
            Err((ErrorCode::RoomForbidden, 0)) => {
                assert!(over, "a join refused under max_rooms");
                self.take(); // the bucket is asked first
            }
            Err((ErrorCode::RateLimited, wait)) => assert!(wait >= 1),
            Err((ErrorCode::NotLoggedIn, 0)) => {
                assert_eq!(
                    self.link,
                    MLink::Ended,
                    "a live core refused a room request"
                )
            }
            Err(e) => panic!("room request: {e:?}"),
        }
    }

    fn room_add(&mut self, room: &str) {
        let added = self.core.room_add(&Arc::from(room), &self.limits);
        let expected = self.link != MLink::Ended
            && (self.rooms.iter().any(|r| r == room) || self.rooms.len() < self.limits.max_rooms);
        assert_eq!(added, expected, "room_add {room} with {:?}", self.rooms);
        if added && !self.rooms.iter().any(|r| r == room) {
            self.rooms.push(room.to_owned());
        }
    }

    fn room_remove(&mut self, room: &str) {
        let was = self.core.room_remove(room);
        let n = self.rooms.len();
        self.rooms.retain(|r| r != room);
        assert_eq!(was, n != self.rooms.len(), "room_remove {room}");
    }

    fn end(&mut self) {
        let ended = self.core.end();
        if self.link == MLink::Ended {
            assert!(ended.is_none(), "ended twice");
            return;
        }
        let ended = ended.expect("a live core ends");
        let link = match self.link {
            MLink::Attached(c) => Link::Attached(c),
            MLink::Detached(epoch) => Link::Detached { epoch },
            MLink::Ended => unreachable!(),
        };
        assert_eq!(ended.link, link);
        let rooms: Vec<&str> = ended.rooms.iter().map(|r| &**r).collect();
        assert_eq!(rooms, self.rooms, "the rooms an end hands back");
        let got: Vec<(u64, u64, &Bytes)> = ended
            .undelivered
            .iter()
            .map(|d| (d.seq, d.receipt, &d.body))
            .collect();
        let want: Vec<(u64, u64, &Bytes)> = self
            .buf
            .iter()
            .map(|e| (e.seq, e.receipt, &e.stored))
            .collect();
        assert_eq!(
            got, want,
            "undelivered: everything accepted and not acked, in order"
        );
        for e in self.buf.drain(..) {
            assert!(self.undelivered.insert(e.seq));
            assert!(!self.released.contains(&e.seq));
        }
        // What a re-login carries on with: the answered ids with their codes, and what is
        // still in flight as in flight (the node sends those answers to the heir).
        let mut dedup = ended.carry.dedup;
        for (id, code) in dedup.done_entries() {
            assert_eq!(self.answered.get(&id), Some(&code), "carried uplink {id}");
        }
        for &id in &self.in_flight {
            if self.limits.dedup_window > 0 {
                let seen = dedup.check(id, self.limits.dedup_window);
                assert!(
                    matches!(seen, tether_gateway::session::dedup::Seen::InFlight),
                    "uplink {id} in flight not carried as in flight: a resend to the heir \
                     would be forwarded again ({seen:?})"
                );
            }
        }
        self.orphans.append(&mut self.in_flight);
        self.answered.clear();
        self.bytes = 0;
        self.rooms.clear();
        self.transient.clear();
        self.flush_queued = false;
        self.link = MLink::Ended;
    }

    /// The session moves to a sibling process (`--processes`, handoff): snapshot, then a core
    /// restored from it, detached (epoch 0), waiting for its resume there. The connections are
    /// the old process's (they get KICK RESUMED_ELSEWHERE there): gone from here.
    fn handoff(&mut self) {
        if self.link == MLink::Ended {
            return;
        }
        let snap = self.core.snapshot();
        assert_eq!(
            (snap.last_seq, snap.acked, snap.lost),
            (self.last_seq, self.acked, None)
        );
        let unacked: Vec<u64> = snap.unacked.iter().map(|d| d.seq).collect();
        let want: Vec<u64> = self.buf.iter().map(|e| e.seq).collect();
        assert_eq!(unacked, want, "a snapshot's unacked downlinks");
        assert_eq!(snap.rooms, self.rooms, "a snapshot's rooms");
        for (id, code) in &snap.dedup {
            assert_eq!(self.answered.get(id), Some(code), "snapshot of uplink {id}");
            assert!(!self.in_flight.contains(id));
        }
        let mut flying = snap.in_flight.clone();
        flying.sort_unstable();
        let mut want = self.in_flight.clone();
        want.sort_unstable();
        if self.limits.dedup_window > 0 {
            assert_eq!(flying, want, "a snapshot's uplinks in flight");
        } else {
            // Nothing is recorded without a window: nothing waits here.
            self.in_flight.clear();
        }
        let now = self.now();
        self.core = SessionCore::restore(snap.clone(), now);
        assert_eq!(self.core.snapshot(), snap, "a restore keeps everything");
        self.answered = snap.dedup.iter().copied().collect();
        // What was in flight stays in flight here: the old process relays the answers (the
        // model's answers to them now reach this core). Late answers to an ended core of
        // before are the old process's and go nowhere.
        self.orphans.clear();
        self.link = MLink::Detached(0);
        self.epoch = 0;
        if !self.strict.restore {
            // What the core does today (see `Strict::restore`).
            self.sent = self.last_seq;
        }
        self.flush_queued = false;
        self.transient.clear();
        self.progress_at = now;
        self.wires.clear();
        self.order.clear();
    }

    fn clock(&mut self, input: &mut Input) {
        let b = input.u8();
        let step = match b % 4 {
            0 => input.u8() as u64,
            1 => 1000 * (input.u8() as u64 % 64),
            2 => self.heartbeat_ms as u64 * self.conn_config.heartbeat_misses as u64,
            _ => pick(input.u8(), &[1 << 31, 1 << 32, 86_400_000, 3_600_000]),
        };
        self.now_ms += step;
        let now = self.now();
        for c in self.order.clone() {
            let mut out = Vec::new();
            let w = self.wires.get_mut(&c).unwrap();
            w.conn.handle_timeout(now, &self.conn_config, &mut out);
            if out.iter().any(|a| matches!(a, Action::Close(_))) {
                self.close(c);
            }
        }
    }

    /// Checks the core against the model and the bounds, after every operation.
    fn check(&self) {
        let (n, bytes, last) = self.core.downlink_state();
        assert_eq!(
            (n, bytes, last),
            (self.buf.len(), self.bytes, self.last_seq),
            "buffer (frames, bytes, last seq)"
        );
        let lim = self.limits.downlink;
        assert!(
            n <= lim.max_frames.max(1),
            "{n} frames buffered, bound {}",
            lim.max_frames
        );
        assert!(
            bytes <= lim.max_bytes || n == 1,
            "{bytes} bytes buffered in {n} frames, bound {}",
            lim.max_bytes
        );
        let rooms: Vec<&str> = self.core.rooms().iter().map(|r| &**r).collect();
        assert_eq!(rooms, self.rooms);
        assert!(rooms.len() <= self.limits.max_rooms);
        let link = match self.link {
            MLink::Attached(c) => Link::Attached(c),
            MLink::Detached(epoch) => Link::Detached { epoch },
            MLink::Ended => Link::Ended,
        };
        assert_eq!(self.core.link(), link);
        if let MLink::Detached(e) = self.link {
            assert!(self.core.detached_since(e));
        }
        if self.link == MLink::Ended {
            assert_eq!((n, bytes), (0, 0), "an ended core holds downlinks");
            assert!(
                !self.core.has_room(0, &self.limits),
                "an ended core has room"
            );
        } else {
            assert_eq!(self.core.accept_gzip(), self.accept_gzip);
        }
        assert_eq!(
            self.accepted as usize,
            self.buf.len() + self.released.len() + self.undelivered.len(),
            "every accepted downlink is buffered, released or undelivered, exactly once"
        );
        assert!(self.acked <= self.sent && self.sent <= self.last_seq);
    }

    fn step(&mut self, input: &mut Input) {
        let op = input.u8();
        match op % 16 {
            0..=2 => self.push(input),
            3 | 4 => {
                let (b, k) = (input.u8(), input.u8());
                let seq = match b % 8 {
                    0 => self.client_got,
                    1 => self.client_got.saturating_sub(k as u64 % 4),
                    2 => self.sent,
                    3 => self.sent + 1,
                    4 => self.last_seq,
                    5 => self.acked,
                    6 => k as u64,
                    _ => input.u64(),
                };
                if let Some(c) = self.conn_at(k) {
                    self.frame(c, Frame::new(Header::DownlinkAck(pb::DownlinkAck { seq })));
                }
            }
            5 | 6 => {
                let b = input.u8();
                let replay_batch_min = pick(b >> 2, &[0, 1, 2, 3, 4, 16]);
                let c = if b & 1 == 1 {
                    self.conn_at(b >> 1)
                } else {
                    self.current()
                };
                if let Some(c) = c {
                    self.transmit(c, replay_batch_min, b & 2 == 2 && b & 0x80 == 0x80);
                }
            }
            7 => {
                let b = input.u8();
                if let Some(c) = self.conn_at(b) {
                    self.close(c);
                }
            }
            8 => {
                let (b, k) = (input.u8(), input.u8());
                let last_seq = match b % 8 {
                    0..=2 => self.client_got,
                    3 => self.client_got.saturating_sub(k as u64 % 8),
                    4 => self.last_seq,
                    5 => u64::MAX,
                    6 => 0,
                    _ => k as u64,
                };
                let c = ConnRef {
                    worker: (b >> 4) as u16 % 2,
                    slot: (self.next_gen % 3),
                    gen: self.next_gen,
                };
                self.next_gen += 1;
                let platform = pick(b >> 5, &[Platform::Ios, Platform::Android, Platform::Web]);
                self.open(c, Some((last_seq, b & 8 == 8, platform)));
            }
            9 | 10 => {
                let b = input.u8();
                let msg_id = match b % 4 {
                    0 => 0,
                    1 => input.u64(),
                    _ => (input.u8() % 8) as u64 + 1,
                };
                if let Some(c) = self.conn_at(b >> 2) {
                    let h = Header::Uplink(pb::Uplink {
                        msg_id,
                        body_type: 0,
                    });
                    self.frame(c, Frame::new(h));
                }
            }
            11 => self.answer(input),
            12 => {
                let b = input.u8();
                let room = ROOMS[(b >> 2) as usize % ROOMS.len()].to_owned();
                if let Some(c) = self.conn_at(input.u8()) {
                    let h = if b & 1 == 1 {
                        Header::RoomJoin(Box::new(pb::RoomJoin {
                            request_id: 1,
                            room_id: room,
                        }))
                    } else {
                        Header::RoomLeave(Box::new(pb::RoomLeave {
                            request_id: 1,
                            room_id: room,
                        }))
                    };
                    self.frame(c, Frame::new(h));
                }
            }
            13 => {
                // The upstream answers a room request (OK: the node adds / removes), or the
                // back end puts the session in a room, or takes it out, by itself.
                let b = input.u8();
                match b % 4 {
                    0 | 1 if !self.pending_rooms.is_empty() => {
                        let i = (b >> 2) as usize % self.pending_rooms.len();
                        let (join, room) = self.pending_rooms.remove(i);
                        if b % 4 == 0 {
                            if join {
                                self.room_add(&room)
                            } else {
                                self.room_remove(&room)
                            }
                        }
                    }
                    2 => self.room_add(ROOMS[(b >> 2) as usize % ROOMS.len()]),
                    _ => self.room_remove(ROOMS[(b >> 2) as usize % ROOMS.len()]),
                }
            }
            14 => {
                let b = input.u8();
                if b % 8 == 0 {
                    self.end()
                } else if b % 8 == 4 {
                    self.handoff()
                } else if let Some(c) = self.conn_at(input.u8()) {
                    // Life on the connection, or a client breaking the rules (a second
                    // LOGIN, a gateway kind): closed by its Conn.
                    let h = match input.u8() % 4 {
                        0 => Header::Login(Box::default()),
                        1 => Header::Pong(pb::Pong {}),
                        _ => Header::Ping(pb::Ping {}),
                    };
                    self.frame(c, Frame::new(h));
                }
            }
            _ => self.clock(input),
        }
    }

    /// What must hold once the input is done: an end still hands back all that is left.
    fn finish(&mut self) {
        self.end();
        self.check();
        assert_eq!(
            self.accepted as usize,
            self.released.len() + self.undelivered.len()
        );
        // An ended core accepts nothing.
        let c = ConnRef {
            worker: 0,
            slot: 0,
            gen: u32::MAX,
        };
        assert!(self
            .core
            .resume(c, 0, false, Platform::Ios, self.now())
            .is_none());
        assert_eq!(self.core.detach(c), None);
        assert!(self.core.handle_ack(u64::MAX, self.now()).is_empty());
        assert!(self.core.end().is_none());
        assert!(!self.core.room_add(&Arc::from("late"), &self.limits));
    }
}

/// The fuzz target's check (see the module docs), as strict as `TETHER_FUZZ_STRICT` says.
pub fn session(data: &[u8]) {
    static STRICT: std::sync::OnceLock<Strict> = std::sync::OnceLock::new();
    session_with(data, *STRICT.get_or_init(Strict::from_env))
}

/// The check, with the known open findings checked too (`strict`) or not.
pub fn session_with(data: &[u8], strict: Strict) {
    let mut input = Input { data, at: 0 };
    let mut h = Harness::new(&mut input, strict);
    if trace() {
        eprintln!("{:?}", h.limits);
    }
    h.check();
    for _ in 0..MAX_OPS {
        if input.done() {
            break;
        }
        let at = input.at;
        h.step(&mut input);
        if trace() {
            eprintln!(
                "op {:?}: link {:?} last_seq {} acked {} sent {} buffered {:?} transient {} \
                 rooms {:?} in flight {:?} now {} ms, client has {}",
                &data[at..input.at.min(data.len())],
                h.link,
                h.last_seq,
                h.acked,
                h.sent,
                h.buf.iter().map(|e| e.seq).collect::<Vec<_>>(),
                h.transient.len(),
                h.rooms,
                h.in_flight,
                h.now_ms,
                h.client_got
            );
        }
        h.check();
    }
    h.finish();
}
