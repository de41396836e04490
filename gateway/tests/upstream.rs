//! A custom upstream behind the gateway: retriable failures, dropped replies, what the
//! gateway tells the back end; and the multi-device policies.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use tether_codec::Header;
use tether_gateway::clock::Clock;
use tether_gateway::config::MultiDevice;
use tether_gateway::upstream::{
    Downlink, EndReason, Hub, Outcome, Reply, SessionRef, Uplink, Upstream,
};
use tether_gateway::{Gateway, Options};
use tether_protocol::pb::{self, ErrorCode};

/// Answers the first uplink of each msg_id with UPSTREAM_UNAVAILABLE, then OK; drops the
/// reply of msg_id 99 unanswered; records what it is told.
#[derive(Default)]
struct Flaky {
    receipts: Mutex<Vec<u64>>,
    forwarded: AtomicUsize,
    seen: Mutex<Vec<u64>>,
    events: Mutex<Vec<String>>,
}

impl Upstream for Flaky {
    fn session_opened(&self, _: &Hub, s: &SessionRef, resumed: bool, _: &Bytes) {
        self.events
            .lock()
            .unwrap()
            .push(format!("opened {} {resumed}", s.user));
    }
    fn session_ended(&self, _: &Hub, s: &SessionRef, reason: EndReason, _: &[Downlink]) {
        self.events
            .lock()
            .unwrap()
            .push(format!("ended {} {}", s.user, reason.label()));
    }
    fn uplink(&self, _: &Hub, _: &SessionRef, u: Uplink, reply: Reply) {
        self.forwarded.fetch_add(1, Ordering::SeqCst);
        if u.msg_id == 99 {
            return drop(reply);
        }
        let mut seen = self.seen.lock().unwrap();
        if seen.contains(&u.msg_id) {
            reply.ok()
        } else {
            seen.push(u.msg_id);
            reply.send(Outcome {
                code: ErrorCode::UpstreamUnavailable,
                retry_after_ms: 250,
                message: "try later".into(),
                body: Bytes::new(),
            })
        }
    }
    fn room_join(&self, _: &Hub, _: &SessionRef, _: &str, _: Bytes, reply: Reply) {
        reply.send(Outcome::err(ErrorCode::RoomForbidden, "no"))
    }
    fn room_leave(&self, _: &Hub, _: &SessionRef, _: &str, reply: Reply) {
        reply.ok()
    }
    fn delivered(&self, _: &Hub, _: &SessionRef, receipts: &[u64]) {
        self.receipts.lock().unwrap().extend_from_slice(receipts);
    }
}

fn start_with(up: Arc<Flaky>) -> Gateway {
    Gateway::start(
        config(),
        Options {
            clock: Some(Clock::manual()),
            upstream: Some(up),
            ..Options::default()
        },
    )
    .unwrap()
}

fn ack(c: &mut Raw) -> pb::UplinkAck {
    match c.recv().header {
        Header::UplinkAck(a) => a,
        h => panic!("expected UPLINK_ACK, got {h:?}"),
    }
}

#[test]
fn a_retriable_failure_lets_the_resend_through_and_a_dropped_reply_answers_internal() {
    let up = Arc::new(Flaky::default());
    let g = start_with(up.clone());
    let mut c = Raw::connect(g.addrs()[0]);
    c.login("alice", "phone", None);
    c.uplink(5, Bytes::from_static(b"x"));
    let a = ack(&mut c);
    assert_eq!(
        (a.msg_id, a.code, a.retry_after_ms),
        (5, ErrorCode::UpstreamUnavailable as i32, 250)
    );
    // The resend is forwarded again (a failure the client may retry is not remembered)...
    c.uplink(5, Bytes::from_static(b"x"));
    assert_eq!(ack(&mut c).code, ErrorCode::Ok as i32);
    // ...but once accepted, a resend is not.
    c.uplink(5, Bytes::from_static(b"x"));
    assert_eq!(ack(&mut c).code, ErrorCode::Ok as i32);
    assert_eq!(up.forwarded.load(Ordering::SeqCst), 2);
    c.uplink(99, Bytes::from_static(b"x"));
    let a = ack(&mut c);
    assert_eq!((a.msg_id, a.code), (99, ErrorCode::Internal as i32));
    // The upstream's room decision is what the client hears.
    c.send(&tether_codec::Frame::new(Header::RoomJoin(Box::new(
        pb::RoomJoin {
            request_id: 3,
            room_id: "vip".into(),
        },
    ))));
    let Header::RoomResult(r) = c.recv().header else {
        panic!()
    };
    assert_eq!((r.request_id, r.code), (3, ErrorCode::RoomForbidden as i32));
    assert_eq!(g.node().room_size("vip"), 0);
}

#[test]
fn the_upstream_hears_of_sessions_opening_resuming_and_ending() {
    let up = Arc::new(Flaky::default());
    let g = start_with(up.clone());
    let mut c = Raw::connect(g.addrs()[0]);
    let r = c.login("alice", "phone", None);
    drop(c);
    eventually(|| g.node().connections() == 0);
    let mut c = Raw::connect(g.addrs()[0]);
    assert!(c.login("alice", "phone", Some((r.session_id, 0))).resumed);
    drop(c);
    eventually(|| g.node().connections() == 0);
    g.advance_clock(121);
    eventually(|| g.node().session_count() == 0);
    assert_eq!(
        *up.events.lock().unwrap(),
        [
            "opened alice false",
            "opened alice true",
            "ended alice expired"
        ]
    );
}

/// Holds every uplink's reply and never answers.
#[derive(Default)]
struct Silent {
    held: Mutex<Vec<Reply>>,
}

impl Upstream for Silent {
    fn session_opened(&self, _: &Hub, _: &SessionRef, _: bool, _: &Bytes) {}
    fn session_ended(&self, _: &Hub, _: &SessionRef, _: EndReason, _: &[Downlink]) {}
    fn uplink(&self, _: &Hub, _: &SessionRef, _: Uplink, reply: Reply) {
        self.held.lock().unwrap().push(reply);
    }
    fn room_join(&self, _: &Hub, _: &SessionRef, _: &str, _: Bytes, reply: Reply) {
        self.held.lock().unwrap().push(reply);
    }
    fn room_leave(&self, _: &Hub, _: &SessionRef, _: &str, reply: Reply) {
        reply.ok()
    }
    fn delivered(&self, _: &Hub, _: &SessionRef, _: &[u64]) {}
}

#[test]
fn an_upstream_that_does_not_answer_gets_upstream_timeout_and_its_late_answer_is_ignored() {
    let up = Arc::new(Silent::default());
    let mut c = config();
    c.upstream_timeout_ms = 5_000;
    let g = Gateway::start(
        c,
        Options {
            clock: Some(Clock::manual()),
            upstream: Some(up.clone()),
            ..Options::default()
        },
    )
    .unwrap();
    let mut c = Raw::connect(g.addrs()[0]);
    c.login("alice", "phone", None);
    c.uplink(1, Bytes::from_static(b"x"));
    c.send(&tether_codec::Frame::new(Header::RoomJoin(Box::new(
        pb::RoomJoin {
            request_id: 2,
            room_id: "r".into(),
        },
    ))));
    eventually(|| up.held.lock().unwrap().len() == 2);
    g.advance_clock(4);
    c.send(&tether_codec::Frame::new(Header::Ping(pb::Ping {})));
    assert!(
        matches!(c.recv().header, Header::Pong(_)),
        "nothing timed out at 4 s"
    );
    g.advance_clock(1);
    let mut codes = Vec::new();
    for _ in 0..2 {
        match c.recv().header {
            Header::UplinkAck(a) => codes.push(("uplink", a.code)),
            Header::RoomResult(r) => codes.push(("room", r.code)),
            h => panic!("{h:?}"),
        }
    }
    codes.sort();
    let t = ErrorCode::UpstreamTimeout as i32;
    assert_eq!(codes, [("room", t), ("uplink", t)]);
    // The late answers go nowhere; the next frame is the PONG.
    for r in up.held.lock().unwrap().drain(..) {
        r.ok();
    }
    c.send(&tether_codec::Frame::new(Header::Ping(pb::Ping {})));
    assert!(matches!(c.recv().header, Header::Pong(_)));
    // A timed-out uplink may be resent, and is forwarded again.
    c.uplink(1, Bytes::from_static(b"x"));
    eventually(|| up.held.lock().unwrap().len() == 1);
}

#[test]
fn uplinks_past_the_rate_are_acked_rate_limited_and_may_be_resent() {
    let g = start(|c| {
        c.uplink_rate = 1;
        c.uplink_burst = 2;
    });
    let mut c = Raw::connect(g.addrs()[0]);
    c.login("alice", "phone", None);
    for id in 1..=3 {
        c.uplink(id, tether_client_free_echo());
    }
    let mut acks: Vec<(u64, i32, u32)> = (0..3)
        .map(|_| loop {
            match c.recv().header {
                Header::UplinkAck(a) => break (a.msg_id, a.code, a.retry_after_ms),
                Header::Downlink(_) => continue,
                h => panic!("{h:?}"),
            }
        })
        .collect();
    acks.sort();
    assert_eq!(acks[0].1, ErrorCode::Ok as i32);
    assert_eq!(acks[1].1, ErrorCode::Ok as i32);
    assert_eq!(acks[2], (3, ErrorCode::RateLimited as i32, 1000));
    g.advance_clock(1);
    c.uplink(3, tether_client_free_echo());
    loop {
        match c.recv().header {
            Header::UplinkAck(a) => {
                assert_eq!((a.msg_id, a.code), (3, ErrorCode::Ok as i32));
                break;
            }
            Header::Downlink(_) => continue,
            h => panic!("{h:?}"),
        }
    }
}

/// An empty ChatMessage: the embedded upstream echoes it to the sender.
fn tether_client_free_echo() -> Bytes {
    Bytes::new()
}

fn login_as(g: &Gateway, user: &str, device: &str, platform: pb::Platform) -> Raw {
    let mut c = Raw::connect(g.addrs()[0]);
    let mut f = login_frame(user, device, None);
    if let Header::Login(l) = &mut f.header {
        l.platform = platform as i32;
    }
    c.send(&f);
    let Header::LoginResult(r) = c.recv().header else {
        panic!()
    };
    assert_eq!(r.code, ErrorCode::Ok as i32);
    c
}

fn kicked(c: &mut Raw) -> pb::KickReason {
    match c.recv().header {
        Header::Kick(k) => pb::KickReason::try_from(k.reason).unwrap(),
        h => panic!("expected KICK, got {h:?}"),
    }
}

#[test]
fn per_platform_class_replaces_the_same_class_only() {
    let g = start(|c| c.multi_device = MultiDevice::PerPlatformClass);
    let mut phone = login_as(&g, "u", "phone", pb::Platform::Android);
    let _web = login_as(&g, "u", "browser", pb::Platform::Web);
    let _iphone = login_as(&g, "u", "iphone", pb::Platform::Ios);
    assert_eq!(kicked(&mut phone), pb::KickReason::LoggedInElsewhere);
    assert_eq!(g.node().user_sessions("u").len(), 2);
}

#[test]
fn past_the_per_user_limit_the_oldest_session_goes() {
    let g = start(|c| c.max_sessions_per_user = 2);
    let mut a = login_as(&g, "u", "a", pb::Platform::Android);
    let _b = login_as(&g, "u", "b", pb::Platform::Android);
    let _c = login_as(&g, "u", "c", pb::Platform::Android);
    assert_eq!(kicked(&mut a), pb::KickReason::SessionLimit);
    let devices: Vec<String> = g
        .node()
        .user_sessions("u")
        .iter()
        .map(|s| s.device.to_string())
        .collect();
    assert_eq!(devices, ["b", "c"]);
}

#[test]
fn single_session_per_user() {
    let g = start(|c| c.multi_device = MultiDevice::Single);
    let mut a = login_as(&g, "u", "a", pb::Platform::Android);
    let _b = login_as(&g, "u", "b", pb::Platform::Web);
    assert_eq!(kicked(&mut a), pb::KickReason::LoggedInElsewhere);
    assert_eq!(g.node().user_sessions("u").len(), 1);
}

#[test]
fn acked_downlinks_are_reported_to_the_upstream_as_delivery_receipts() {
    let up = Arc::new(Flaky::default());
    let g = start_with(up.clone());
    let mut c = Raw::connect(g.addrs()[0]);
    c.login("bob", "phone", None);
    let target = tether_gateway::node::Target::User("bob".into());
    for receipt in [0, 11, 12] {
        let mut p = tether_gateway::node::Push::new(0, "x");
        p.receipt = receipt;
        assert_eq!(g.node().push(&target, &p).sent, 1);
    }
    for seq in 1..=3 {
        assert_eq!(c.downlink().0, seq);
    }
    c.ack(2);
    c.send(&tether_codec::Frame::new(Header::Ping(pb::Ping {})));
    assert!(matches!(c.recv().header, Header::Pong(_)));
    assert_eq!(
        *up.receipts.lock().unwrap(),
        [11],
        "seq 1 had no receipt; seq 3 is not acked"
    );
    c.ack(3);
    c.send(&tether_codec::Frame::new(Header::Ping(pb::Ping {})));
    assert!(matches!(c.recv().header, Header::Pong(_)));
    assert_eq!(*up.receipts.lock().unwrap(), [11, 12]);
}

/// Answers with bodies and keeps the LOGIN body it was handed.
#[derive(Default)]
struct Bodies {
    login_bodies: Mutex<Vec<Bytes>>,
}

impl Upstream for Bodies {
    fn session_opened(&self, _: &Hub, _: &SessionRef, _: bool, body: &Bytes) {
        self.login_bodies.lock().unwrap().push(body.clone());
    }
    fn session_ended(&self, _: &Hub, _: &SessionRef, _: EndReason, _: &[Downlink]) {}
    fn uplink(&self, _: &Hub, _: &SessionRef, u: Uplink, reply: Reply) {
        let mut o = Outcome::ok();
        o.body = Bytes::from([&b"stored: "[..], &u.body[..]].concat());
        reply.send(o)
    }
    fn room_join(&self, _: &Hub, _: &SessionRef, room: &str, body: Bytes, reply: Reply) {
        let mut o = Outcome::ok();
        o.body = Bytes::from(format!(
            "welcome to {room}, {}",
            String::from_utf8_lossy(&body)
        ));
        reply.send(o)
    }
    fn room_leave(&self, _: &Hub, _: &SessionRef, _: &str, reply: Reply) {
        reply.ok()
    }
    fn delivered(&self, _: &Hub, _: &SessionRef, _: &[u64]) {}
}

#[test]
fn bodies_travel_where_the_spec_says_login_to_the_upstream_answers_to_the_client() {
    // Seen: LOGIN's body never reached the upstream; UPLINK_ACK and ROOM_RESULT had none.
    let up = Arc::new(Bodies::default());
    let g = Gateway::start(
        config(),
        Options {
            clock: Some(Clock::manual()),
            upstream: Some(up.clone()),
            ..Options::default()
        },
    )
    .unwrap();
    let mut c = Raw::connect(g.addrs()[0]);
    let mut login = login_frame("alice", "phone", None);
    login.body = Bytes::from_static(b"device-info");
    c.send(&login);
    assert!(matches!(c.recv().header, Header::LoginResult(r) if r.code == 0));
    assert_eq!(
        *up.login_bodies.lock().unwrap(),
        [Bytes::from_static(b"device-info")]
    );
    c.uplink(1, Bytes::from_static(b"hi"));
    let f = c.recv();
    assert!(matches!(f.header, Header::UplinkAck(a) if a.msg_id == 1 && a.code == 0));
    assert_eq!(f.body, Bytes::from_static(b"stored: hi"));
    c.send(&tether_codec::Frame::with_body(
        Header::RoomJoin(Box::new(pb::RoomJoin {
            request_id: 4,
            room_id: "lobby".into(),
        })),
        Bytes::from_static(b"alice"),
    ));
    let f = c.recv();
    assert!(matches!(f.header, Header::RoomResult(r) if r.request_id == 4 && r.code == 0));
    assert_eq!(f.body, Bytes::from_static(b"welcome to lobby, alice"));
}
