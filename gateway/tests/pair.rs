//! The gateway's session core and the client's core wired together in memory: simulated
//! latency, the connection cut at random points (what was in flight on it is lost), the
//! client process killed and restarted from what it persisted, bursts that fill the
//! session's buffer. Over many fixed seeds: every downlink is processed exactly once and in
//! order, its receipt comes back to the pusher exactly once, and every uplink is forwarded
//! once and answered once. No sockets, no clock: time is a counter.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tether_client::machine::{ClientCore, CoreConfig, CoreEvent, Receipt};
use tether_codec::{CompressOptions, Decoder, Frame, Header, Limits};
use tether_gateway::session::core::{
    ConnRef, Delivery, PushBody, Refusal, SessionCore, SessionLimits, Verdict,
};
use tether_gateway::session::downlink::DownlinkLimits;
use tether_protocol::pb::{self, ErrorCode, Platform};

const DOWNLINKS: u64 = 300;
const UPLINKS: u64 = 40;
const SID: [u8; 16] = [5; 16];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// Bytes on the wire: `(arrives_at_ms, connection, bytes)`, in order per direction.
type Wire = VecDeque<(u64, u32, Bytes)>;

struct Sim {
    rng: Rng,
    ms: u64,
    base: Instant,
    limits: Limits,
    slimits: SessionLimits,
    // The gateway side.
    session: Option<SessionCore>,
    /// The connection the client is on (its id; the gateway's ConnRef has it as `gen`).
    conn: Option<u32>,
    next_conn: u32,
    gw_decoder: Option<(u32, BytesMut)>,
    to_client: Wire,
    to_gateway: Wire,
    // The pusher (a back end): receipts 1..=DOWNLINKS, one seq each.
    next_push: u64,
    /// Handed back undelivered by an ended session: pushed again first.
    backlog: VecDeque<u64>,
    receipts: BTreeMap<u64, u32>,
    forwarded: BTreeMap<u64, u32>,
    // The client side.
    cfg: CoreConfig,
    client: ClientCore,
    cl_decoder: Option<(u32, BytesMut)>,
    /// Held by the app, not processed yet (lost when the process is killed).
    held: Vec<(Receipt, u64)>,
    /// The last message the app took (held or processed), to check order.
    app_last: Option<Receipt>,
    /// The pusher's ids of what the app processed, in order (survives a kill: it is the
    /// app's own store).
    processed: Vec<u64>,
    next_uplink: u64,
    answered: BTreeMap<u64, u32>,
    stats: Stats,
}

/// What a run went through: the test asserts the seeds together cover every case.
#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    cuts: u32,
    restarts: u32,
    resumes: u32,
    fresh_replacing: u32,
    refused_full: u32,
}

fn conn_ref(id: u32) -> ConnRef {
    ConnRef {
        worker: 0,
        slot: 0,
        gen: id,
    }
}

fn encode(frame: &Frame, limits: &Limits) -> Bytes {
    let mut b = BytesMut::new();
    frame.encode(&mut b, limits).expect("encodes");
    b.freeze()
}

/// The whole frames that `bytes`, arriving on connection `c`, complete at a receiver whose
/// current connection and buffer are `rx` (bytes of another connection are dropped: it is gone).
fn read(rx: &mut Option<(u32, BytesMut)>, c: u32, bytes: &[u8], limits: Limits) -> Vec<Frame> {
    let mut frames = Vec::new();
    if let Some((rc, buf)) = rx.as_mut() {
        if *rc == c {
            buf.extend_from_slice(bytes);
            let d = Decoder::new(limits);
            while let Some(f) = d.decode(buf).expect("both sides send valid frames") {
                frames.push(f);
            }
        }
    }
    frames
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut cfg = CoreConfig::new(pb::Login {
            token: "t".into(),
            user_id: "u".into(),
            device_id: "d".into(),
            compression: vec![pb::Compression::Gzip as i32],
            ..Default::default()
        });
        cfg.seed = Some(seed);
        cfg.backoff_initial = Duration::from_millis(200);
        cfg.backoff_max = Duration::from_secs(2);
        cfg.uplink_timeout = Duration::from_secs(3);
        cfg.connect_timeout = Duration::from_secs(5);
        let base = Instant::now();
        let slimits = SessionLimits {
            // Small, so that bursts fill it and pushes are refused and retried.
            downlink: DownlinkLimits {
                max_frames: 24,
                max_bytes: 64 * 1024,
            },
            uplink_rate: 0,
            ..SessionLimits::default()
        };
        Sim {
            rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            ms: 0,
            base,
            limits: Limits::default(),
            slimits,
            session: None,
            conn: None,
            next_conn: 1,
            gw_decoder: None,
            to_client: Wire::new(),
            to_gateway: Wire::new(),
            next_push: 1,
            backlog: VecDeque::new(),
            receipts: BTreeMap::new(),
            forwarded: BTreeMap::new(),
            client: ClientCore::new(cfg.clone(), base),
            cfg,
            cl_decoder: None,
            held: Vec::new(),
            app_last: None,
            processed: Vec::new(),
            next_uplink: 1,
            answered: BTreeMap::new(),
            stats: Stats::default(),
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.ms)
    }

    fn tick(&self) -> u32 {
        (self.ms / 1000) as u32
    }

    fn latency(&mut self) -> u64 {
        1 + self.rng.below(40)
    }

    /// The gateway writes what its session has for the connection.
    fn gw_flush(&mut self) {
        let (Some(c), Some(s)) = (self.conn, self.session.as_mut()) else {
            return;
        };
        let mut out = BytesMut::new();
        s.poll_transmit(
            conn_ref(c),
            &mut out,
            &self.limits,
            &CompressOptions::default(),
            8,
        );
        self.gw_send(c, out.freeze());
    }

    fn gw_send(&mut self, c: u32, b: Bytes) {
        if !b.is_empty() {
            let at = self.ms + self.latency();
            self.to_client.push_back((at, c, b));
        }
    }

    fn gw_frame(&mut self, c: u32, frame: Frame) {
        let now_ms = self.ms;
        let tick = self.tick();
        let reply = match frame.header {
            Header::Login(l) => {
                let mut resumed = None;
                if let (Some(r), Some(s)) = (&l.resume, self.session.as_mut()) {
                    if r.session_id.as_ref() == SID {
                        resumed = s.resume(conn_ref(c), r.last_seq, true, Platform::Android, tick);
                    }
                }
                let result = match resumed {
                    Some(r) => {
                        self.stats.resumes += 1;
                        for id in r.receipts {
                            *self.receipts.entry(id).or_default() += 1;
                        }
                        pb::LoginResult {
                            session_id: Bytes::copy_from_slice(&SID),
                            heartbeat_interval_ms: 5_000,
                            resumed: true,
                            gap_from: r.gap.map_or(0, |g| g.0),
                            gap_to: r.gap.map_or(0, |g| g.1),
                            ..Default::default()
                        }
                    }
                    None => {
                        // A fresh login (the client never saw the LOGIN_RESULT that named
                        // the session): it replaces the session, whose undelivered downlinks
                        // go back to the pusher.
                        if let Some(mut old) = self.session.take() {
                            self.stats.fresh_replacing += 1;
                            let ended = old.end().expect("not ended yet");
                            let mut back: Vec<u64> =
                                ended.undelivered.iter().map(|d| d.receipt).collect();
                            back.extend(self.backlog.drain(..));
                            self.backlog = back.into();
                        }
                        self.session =
                            Some(SessionCore::new(conn_ref(c), true, Platform::Android, tick));
                        pb::LoginResult {
                            session_id: Bytes::copy_from_slice(&SID),
                            heartbeat_interval_ms: 5_000,
                            ..Default::default()
                        }
                    }
                };
                let b = encode(
                    &Frame::new(Header::LoginResult(Box::new(result))),
                    &self.limits,
                );
                self.gw_send(c, b);
                self.gw_flush();
                return;
            }
            Header::Ping(_) => Some(Frame::new(Header::Pong(pb::Pong {}))),
            Header::DownlinkAck(a) => {
                let s = self.session.as_mut().expect("a session");
                for id in s.handle_ack(a.seq, tick) {
                    *self.receipts.entry(id).or_default() += 1;
                }
                None
            }
            Header::Uplink(u) => {
                let s = self.session.as_mut().expect("a session");
                let code = match s.handle_uplink(u.msg_id, now_ms, &self.slimits) {
                    Verdict::Forward => {
                        *self.forwarded.entry(u.msg_id).or_default() += 1;
                        s.uplink_answered(u.msg_id, ErrorCode::Ok);
                        Some(ErrorCode::Ok)
                    }
                    Verdict::Ack(code, _) => Some(code),
                    Verdict::Wait | Verdict::Ended => None,
                };
                code.map(|code| {
                    Frame::new(Header::UplinkAck(pb::UplinkAck {
                        msg_id: u.msg_id,
                        code: code as i32,
                        ..Default::default()
                    }))
                })
            }
            other => panic!("the client sent {:?}", other.kind()),
        };
        if let Some(f) = reply {
            let b = encode(&f, &self.limits);
            self.gw_send(c, b);
        }
    }

    /// The connection is gone (either side noticed): what was on the wire is lost.
    fn cut(&mut self) {
        if let Some(c) = self.conn.take() {
            if let Some(s) = self.session.as_mut() {
                s.detach(conn_ref(c));
            }
        }
        self.to_client.clear();
        self.to_gateway.clear();
        self.gw_decoder = None;
        self.cl_decoder = None;
    }

    fn push_some(&mut self) {
        let n = 1 + self.rng.below(12);
        for _ in 0..n {
            let id = match self.backlog.front() {
                Some(&id) => id,
                None if self.next_push <= DOWNLINKS => self.next_push,
                None => break,
            };
            let tick = self.tick();
            let Some(s) = self.session.as_mut() else {
                return;
            };
            let body = Bytes::from(id.to_string());
            let pushed = s.push(
                &PushBody {
                    body_type: 1,
                    plain: &body,
                    gzip: None,
                    receipt: id,
                    transient: false,
                },
                &self.slimits,
                tick,
            );
            match pushed.delivery {
                Delivery::Sent | Delivery::Held => {
                    if self.backlog.pop_front().is_none() {
                        self.next_push += 1;
                    }
                }
                // Kept by the pusher, pushed again later (after receipts come back).
                Delivery::Refused(Refusal::Full) => {
                    self.stats.refused_full += 1;
                    break;
                }
                Delivery::Refused(r) => panic!("refused: {r:?}"),
            }
            assert_eq!(pushed.slow, None, "the client acks: never a slow consumer");
        }
        self.gw_flush();
    }

    fn client_events(&mut self) {
        let now = self.now();
        while let Some(e) = self.client.poll_event() {
            match e {
                CoreEvent::Connect => {
                    let c = self.next_conn;
                    self.next_conn += 1;
                    self.conn = Some(c);
                    self.gw_decoder = Some((c, BytesMut::new()));
                    self.cl_decoder = Some((c, BytesMut::new()));
                    self.client.handle_connected(now);
                }
                CoreEvent::Disconnect => self.cut(),
                CoreEvent::Message { receipt, body, .. } => {
                    let r = receipt.expect("sequenced");
                    let expected = match self.app_last {
                        Some(last) if last.epoch == r.epoch => last.seq + 1,
                        _ => 1,
                    };
                    assert_eq!(r.seq, expected, "in order, no duplicate, no hole");
                    let id: u64 = std::str::from_utf8(&body).unwrap().parse().unwrap();
                    self.app_last = Some(r);
                    self.held.push((r, id));
                }
                CoreEvent::UplinkAcked { msg_id, result } => {
                    assert_eq!(result, Ok(()), "uplink {msg_id}");
                    *self.answered.entry(msg_id).or_default() += 1;
                }
                CoreEvent::Online { gap, .. } => assert_eq!(gap, None),
                CoreEvent::Offline { .. } | CoreEvent::GoAway { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        if let Some(b) = self.client.poll_transmit() {
            if let Some(c) = self.conn {
                let at = self.ms + self.latency();
                self.to_gateway.push_back((at, c, b));
            }
        }
    }

    /// The app processes what it holds (some of it) and acks the last one processed.
    fn process(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let k = 1 + self.rng.below(self.held.len() as u64) as usize;
        let done: Vec<_> = self.held.drain(..k).collect();
        self.processed.extend(done.iter().map(|(_, id)| *id));
        let last = done.last().expect("k >= 1").0;
        self.client.ack(self.now(), last);
    }

    /// The app is killed and started again from what it persisted (the core's `saved()`
    /// at its last ack, and its own outbox of unanswered uplinks).
    fn restart(&mut self) {
        let saved = self.client.saved();
        self.cut();
        self.held.clear();
        // A restored core counts its sessions from epoch 0 again.
        self.app_last = saved.map(|s| Receipt {
            epoch: 0,
            seq: s.last_seq,
        });
        let now = self.now();
        self.client = match saved {
            Some(s) => ClientCore::restore(self.cfg.clone(), s, now),
            None => ClientCore::new(self.cfg.clone(), now),
        };
        for id in 1..self.next_uplink {
            if !self.answered.contains_key(&id) {
                self.client.send(now, id, self.uplink(id));
            }
        }
    }

    fn uplink(&self, msg_id: u64) -> Bytes {
        encode(
            &Frame::with_body(
                Header::Uplink(pb::Uplink {
                    msg_id,
                    ..Default::default()
                }),
                Bytes::from_static(b"up"),
            ),
            &self.limits,
        )
    }

    fn deliver(&mut self) {
        while self.to_gateway.front().is_some_and(|w| w.0 <= self.ms) {
            let (_, c, b) = self.to_gateway.pop_front().expect("front");
            for f in read(&mut self.gw_decoder, c, &b, self.limits) {
                self.gw_frame(c, f);
                if self.conn != Some(c) {
                    break;
                }
            }
        }
        while self.to_client.front().is_some_and(|w| w.0 <= self.ms) {
            let (_, c, b) = self.to_client.pop_front().expect("front");
            let now = self.now();
            for f in read(&mut self.cl_decoder, c, &b, self.limits) {
                self.client.handle_frame(now, f);
            }
            self.client_events();
        }
    }

    fn done(&self) -> bool {
        self.processed.len() as u64 == DOWNLINKS
            && self.receipts.len() as u64 == DOWNLINKS
            && self.answered.len() as u64 == UPLINKS
    }

    fn run(&mut self) {
        for step in 0..200_000u32 {
            let calm = step > 20_000;
            self.ms += 1 + self.rng.below(20);
            let now = self.now();
            if self.client.poll_timeout().is_some_and(|t| t <= now) {
                self.client.handle_timeout(now);
            }
            self.client_events();
            self.deliver();
            if self.rng.chance(100) {
                self.push_some();
            }
            if self.next_uplink <= UPLINKS && self.rng.chance(20) {
                let id = self.next_uplink;
                self.next_uplink += 1;
                let b = self.uplink(id);
                self.client.send(now, id, b);
            }
            if self.rng.chance(150) {
                self.process();
            }
            if !calm && self.rng.chance(4) {
                // The network drops the connection; the client notices now, the gateway
                // when its read fails (same moment here).
                self.stats.cuts += 1;
                self.cut();
                self.client.handle_disconnected(now);
            }
            if !calm && self.rng.chance(1) {
                self.stats.restarts += 1;
                self.restart();
            }
            self.client_events();
            if self.done() {
                return;
            }
        }
        panic!(
            "not done: processed {}, receipts {}, answered {}",
            self.processed.len(),
            self.receipts.len(),
            self.answered.len()
        );
    }
}

#[test]
fn every_downlink_is_processed_once_in_order_and_every_uplink_answered_once_across_cuts_and_restarts(
) {
    let mut total = Stats::default();
    for seed in 1..=60u64 {
        let mut sim = Sim::new(seed);
        sim.run();
        let s = sim.stats;
        total.cuts += s.cuts;
        total.restarts += s.restarts;
        total.resumes += s.resumes;
        total.fresh_replacing += s.fresh_replacing;
        total.refused_full += s.refused_full;
        assert_eq!(
            sim.processed,
            (1..=DOWNLINKS).collect::<Vec<_>>(),
            "seed {seed}"
        );
        assert!(
            sim.receipts.values().all(|&n| n == 1),
            "seed {seed}: a receipt came back twice"
        );
        assert!(
            sim.forwarded.values().all(|&n| n == 1) && sim.forwarded.len() as u64 == UPLINKS,
            "seed {seed}: forwarded {:?}",
            sim.forwarded
        );
        assert!(
            sim.answered.values().all(|&n| n == 1),
            "seed {seed}: answered twice"
        );
    }
    println!("{total:?}");
    assert!(
        total.cuts > 100 && total.restarts > 10 && total.resumes > 100,
        "{total:?}"
    );
    assert!(total.refused_full > 100, "{total:?}");
}
