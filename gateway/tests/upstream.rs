//! A custom upstream behind the gateway: retriable failures, dropped replies, what the
//! gateway tells the back end; and the multi-device policies.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use tether_codec::Header;
use tether_gateway::config::MultiDevice;
use tether_gateway::upstream::{
    Downlink, EndReason, Hub, LoginRequest, Outcome, Reply, SessionInfo, Uplink, Upstream,
};
use tether_gateway::Gateway;
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
    fn login(&self, _: &dyn Hub, l: &LoginRequest, reply: Reply) {
        let resume = if l.resume.is_some() { " resume" } else { "" };
        assert!(l.peer.is_some_and(|p| p.ip().is_loopback()));
        self.event(format!("login {} {}{resume}", l.user(), l.device()));
        reply.ok()
    }
    fn session_opened(&self, _: &dyn Hub, s: &SessionInfo, _: &Bytes) {
        assert!(s.attached && s.peer.is_some());
        self.event(format!("opened {} {}", s.user(), s.device()));
    }
    fn session_attached(&self, _: &dyn Hub, s: &SessionInfo, _: &Bytes) {
        assert!(s.attached && s.peer.is_some());
        self.event(format!("attached {}", s.user()));
    }
    fn session_detached(&self, _: &dyn Hub, s: &SessionInfo) {
        assert!(!s.attached);
        self.event(format!("detached {}", s.user()));
    }
    fn session_ended(&self, _: &dyn Hub, s: &SessionInfo, reason: EndReason, _: &[Downlink]) {
        self.event(format!("ended {} {}", s.user(), reason.label()));
    }
    fn uplink(&self, _: &dyn Hub, _: &SessionInfo, u: Uplink, reply: Reply) {
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
    fn room_join(&self, _: &dyn Hub, _: &SessionInfo, _: &str, _: Bytes, reply: Reply) {
        reply.send(Outcome::err(ErrorCode::RoomForbidden, "no"))
    }
    fn room_leave(&self, _: &dyn Hub, _: &SessionInfo, _: &str, reply: Reply) {
        reply.ok()
    }
    fn delivered(&self, _: &dyn Hub, _: &SessionInfo, receipts: &[u64]) {
        self.receipts.lock().unwrap().extend_from_slice(receipts);
    }
}

impl Flaky {
    fn event(&self, e: String) {
        self.events.lock().unwrap().push(e)
    }
}

fn start_with(up: Arc<Flaky>) -> Gateway {
    start_upstream(up, |_| {})
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
fn the_upstream_hears_of_logins_and_sessions_opening_detaching_attaching_and_ending() {
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
            "login alice phone",
            "opened alice phone",
            "detached alice",
            "login alice phone resume",
            "attached alice",
            "detached alice",
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
    fn session_opened(&self, _: &dyn Hub, _: &SessionInfo, _: &Bytes) {}
    fn session_ended(&self, _: &dyn Hub, _: &SessionInfo, _: EndReason, _: &[Downlink]) {}
    fn uplink(&self, _: &dyn Hub, _: &SessionInfo, _: Uplink, reply: Reply) {
        self.held.lock().unwrap().push(reply);
    }
    fn room_join(&self, _: &dyn Hub, _: &SessionInfo, _: &str, _: Bytes, reply: Reply) {
        self.held.lock().unwrap().push(reply);
    }
    fn room_leave(&self, _: &dyn Hub, _: &SessionInfo, _: &str, reply: Reply) {
        reply.ok()
    }
    fn delivered(&self, _: &dyn Hub, _: &SessionInfo, _: &[u64]) {}
}

#[test]
fn an_upstream_that_does_not_answer_gets_upstream_timeout_and_its_late_answer_is_ignored() {
    let up = Arc::new(Silent::default());
    let g = start_upstream(up.clone(), |c| c.upstream_timeout_ms = 5_000);
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

/// A takeover storm's case: the same device logs in afresh while its uplink is with the
/// upstream. The new session carries the window on with that uplink in flight, so the
/// client's resend (§6.4: resend what was not acked) is not forwarded a second time, and the
/// first send's answer, when it comes, is acked on the new connection. (Before, the window
/// forgot what was in flight at the end: the resend was forwarded again and the answer had
/// nowhere to go.)
#[test]
fn a_resend_after_a_takeover_waits_for_the_answer_to_the_first_send() {
    let up = Arc::new(Silent::default());
    let g = start_upstream(up.clone(), |c| c.upstream_timeout_ms = 5_000);
    let mut old = Raw::connect(g.addrs()[0]);
    old.login("alice", "phone", None);
    old.uplink(7, Bytes::from_static(b"x"));
    old.uplink(8, Bytes::from_static(b"y"));
    eventually(|| up.held.lock().unwrap().len() == 2);
    // 8 is answered before the takeover: the old connection hears it, the window keeps it.
    let eight = up.held.lock().unwrap().pop().unwrap();
    eight.ok();
    let a = ack(&mut old);
    assert_eq!((a.msg_id, a.code), (8, ErrorCode::Ok as i32));
    let mut new = Raw::connect(g.addrs()[0]);
    new.login("alice", "phone", None);
    assert_eq!(kicked(&mut old), pb::KickReason::LoggedInElsewhere);
    new.uplink(7, Bytes::from_static(b"x"));
    new.uplink(8, Bytes::from_static(b"y"));
    let a = ack(&mut new);
    assert_eq!(
        (a.msg_id, a.code),
        (8, ErrorCode::Ok as i32),
        "8 from the window"
    );
    new.send(&tether_codec::Frame::new(Header::Ping(pb::Ping {})));
    assert!(
        matches!(new.recv().header, Header::Pong(_)),
        "7 waits for its first send's answer"
    );
    assert_eq!(up.held.lock().unwrap().len(), 1, "7 not forwarded again");
    up.held.lock().unwrap().pop().unwrap().ok();
    let a = ack(&mut new);
    assert_eq!((a.msg_id, a.code), (7, ErrorCode::Ok as i32));
    new.uplink(7, Bytes::from_static(b"x"));
    assert_eq!(ack(&mut new).code, ErrorCode::Ok as i32);
    assert!(up.held.lock().unwrap().is_empty());
    // A takeover of a takeover: the window moves on again, in flight with it, and a timeout
    // of the first send reaches the newest connection (which may then resend).
    new.uplink(9, Bytes::from_static(b"z"));
    eventually(|| up.held.lock().unwrap().len() == 1);
    let mut third = Raw::connect(g.addrs()[0]);
    third.login("alice", "phone", None);
    assert_eq!(kicked(&mut new), pb::KickReason::LoggedInElsewhere);
    third.uplink(9, Bytes::from_static(b"z"));
    g.advance_clock(5);
    let a = ack(&mut third);
    assert_eq!((a.msg_id, a.code), (9, ErrorCode::UpstreamTimeout as i32));
    third.uplink(9, Bytes::from_static(b"z"));
    eventually(|| up.held.lock().unwrap().len() == 2);
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
        .map(|s| s.device().to_string())
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
    fn session_opened(&self, _: &dyn Hub, _: &SessionInfo, body: &Bytes) {
        self.login_bodies.lock().unwrap().push(body.clone());
    }
    fn session_ended(&self, _: &dyn Hub, _: &SessionInfo, _: EndReason, _: &[Downlink]) {}
    fn uplink(&self, _: &dyn Hub, _: &SessionInfo, u: Uplink, reply: Reply) {
        let mut o = Outcome::ok();
        o.body = Bytes::from([&b"stored: "[..], &u.body[..]].concat());
        reply.send(o)
    }
    fn room_join(&self, _: &dyn Hub, _: &SessionInfo, room: &str, body: Bytes, reply: Reply) {
        let mut o = Outcome::ok();
        o.body = Bytes::from(format!(
            "welcome to {room}, {}",
            String::from_utf8_lossy(&body)
        ));
        reply.send(o)
    }
    fn room_leave(&self, _: &dyn Hub, _: &SessionInfo, _: &str, reply: Reply) {
        reply.ok()
    }
    fn delivered(&self, _: &dyn Hub, _: &SessionInfo, _: &[u64]) {}
}

#[test]
fn bodies_travel_where_the_spec_says_login_to_the_upstream_answers_to_the_client() {
    // Seen: LOGIN's body never reached the upstream; UPLINK_ACK and ROOM_RESULT had none.
    let up = Arc::new(Bodies::default());
    let g = start_upstream(up.clone(), |_| {});
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

/// Holds every login's reply for the test to answer (from its own thread, later); panics in
/// `uplink` when the body says so.
#[derive(Default)]
struct Doorman {
    logins: Mutex<Vec<(String, Reply)>>,
    opened: AtomicUsize,
}

impl Upstream for Doorman {
    fn login(&self, _: &dyn Hub, l: &LoginRequest, reply: Reply) {
        self.logins
            .lock()
            .unwrap()
            .push((l.user().to_string(), reply));
    }
    fn session_opened(&self, _: &dyn Hub, _: &SessionInfo, _: &Bytes) {
        self.opened.fetch_add(1, Ordering::SeqCst);
    }
    fn session_ended(&self, _: &dyn Hub, _: &SessionInfo, _: EndReason, _: &[Downlink]) {}
    fn uplink(&self, _: &dyn Hub, _: &SessionInfo, u: Uplink, reply: Reply) {
        if &u.body[..] == b"panic" {
            panic!("a back end bug");
        }
        reply.ok()
    }
    fn room_join(&self, _: &dyn Hub, _: &SessionInfo, _: &str, _: Bytes, reply: Reply) {
        reply.ok()
    }
    fn room_leave(&self, _: &dyn Hub, _: &SessionInfo, _: &str, reply: Reply) {
        reply.ok()
    }
    fn delivered(&self, _: &dyn Hub, _: &SessionInfo, _: &[u64]) {}
}

fn start_doorman(up: &Arc<Doorman>, workers: usize) -> Gateway {
    start_upstream(up.clone(), |c| {
        c.workers = workers;
        c.upstream_timeout_ms = 5_000;
    })
}

fn login_result(c: &mut Raw) -> Box<pb::LoginResult> {
    match c.recv().header {
        Header::LoginResult(r) => r,
        h => panic!("{h:?}"),
    }
}

#[test]
fn a_login_the_upstream_answers_later_waits_without_holding_up_the_worker() {
    // One worker: if it waited for the verdict, nothing else on it would move.
    let up = Arc::new(Doorman::default());
    let g = start_doorman(&up, 1);
    let mut a = Raw::connect(g.addrs()[0]);
    a.send(&login_frame("alice", "phone", None));
    let mut b = Raw::connect(g.addrs()[0]);
    b.send(&login_frame("bob", "phone", None));
    let mut m = Raw::connect(g.addrs()[0]);
    m.send(&login_frame("mallory", "phone", None));
    eventually(|| up.logins.lock().unwrap().len() == 3);
    assert_eq!(
        g.node().session_count(),
        0,
        "nothing bound before a verdict"
    );
    let mut held: Vec<_> = up.logins.lock().unwrap().drain(..).collect();
    held.sort_by(|x, y| x.0.cmp(&y.0));
    let mut held = held.into_iter().map(|(_, r)| r);
    let (ra, rb, rm) = (
        held.next().unwrap(),
        held.next().unwrap(),
        held.next().unwrap(),
    );
    // Bob is admitted from another thread while alice still waits.
    std::thread::spawn(move || rb.ok()).join().unwrap();
    let r = login_result(&mut b);
    assert_eq!(r.code, ErrorCode::Ok as i32);
    b.send(&tether_codec::Frame::new(Header::Ping(pb::Ping {})));
    assert!(matches!(b.recv().header, Header::Pong(_)));
    // Mallory is refused with the upstream's code, message and retry.
    rm.send(Outcome {
        code: ErrorCode::RateLimited,
        retry_after_ms: 700,
        message: "slow down".into(),
        body: Bytes::new(),
    });
    let r = login_result(&mut m);
    assert_eq!(
        (r.code, r.retry_after_ms, r.message.as_str()),
        (ErrorCode::RateLimited as i32, 700, "slow down")
    );
    assert!(m.until_closed().is_empty());
    // Alice's verdict never comes: UPSTREAM_TIMEOUT at the upstream timeout, not before (a
    // PONG is written at the end of a turn whose timers saw the clock moved).
    g.advance_clock(4);
    b.send(&tether_codec::Frame::new(Header::Ping(pb::Ping {})));
    assert!(matches!(b.recv().header, Header::Pong(_)));
    assert_eq!(g.node().connections(), 2, "alice still waits at 4 s");
    g.advance_clock(1);
    // Her first frame: nothing was answered before.
    let r = login_result(&mut a);
    assert_eq!(r.code, ErrorCode::UpstreamTimeout as i32);
    drop(ra);
    assert_eq!(
        up.opened.load(Ordering::SeqCst),
        1,
        "only bob has a session"
    );
    assert_eq!(g.node().session_count(), 1);
}

#[test]
fn a_verdict_for_a_connection_that_has_gone_binds_nothing() {
    let up = Arc::new(Doorman::default());
    let g = start_doorman(&up, 1);
    let mut a = Raw::connect(g.addrs()[0]);
    a.send(&login_frame("alice", "phone", None));
    eventually(|| up.logins.lock().unwrap().len() == 1);
    drop(a);
    eventually(|| g.node().connections() == 0);
    let (_, r) = up.logins.lock().unwrap().pop().unwrap();
    r.ok();
    // A later connection works, and no session was made for the one that left.
    let mut b = Raw::connect(g.addrs()[0]);
    b.send(&login_frame("bob", "phone", None));
    eventually(|| up.logins.lock().unwrap().len() == 1);
    up.logins.lock().unwrap().pop().unwrap().1.ok();
    assert_eq!(login_result(&mut b).code, ErrorCode::Ok as i32);
    assert_eq!(g.node().session_count(), 1);
    assert_eq!(up.opened.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panic_in_the_upstream_answers_internal_and_the_worker_goes_on() {
    // Seen: a panic inside an Upstream unwound the worker thread; its sessions stayed
    // attached forever and shutdown never completed.
    let up = Arc::new(Doorman::default());
    let g = start_doorman(&up, 1);
    let mut c = Raw::connect(g.addrs()[0]);
    c.send(&login_frame("alice", "phone", None));
    eventually(|| up.logins.lock().unwrap().len() == 1);
    up.logins.lock().unwrap().pop().unwrap().1.ok();
    assert_eq!(login_result(&mut c).code, ErrorCode::Ok as i32);
    c.uplink(1, Bytes::from_static(b"panic"));
    let Header::UplinkAck(a) = c.recv().header else {
        panic!()
    };
    assert_eq!((a.msg_id, a.code), (1, ErrorCode::Internal as i32));
    c.uplink(2, Bytes::from_static(b"fine"));
    let Header::UplinkAck(a) = c.recv().header else {
        panic!()
    };
    assert_eq!((a.msg_id, a.code), (2, ErrorCode::Ok as i32));
    let metrics = g.node().metrics.encode();
    assert!(
        metrics.contains("tether_upstream_panics_total{call=\"uplink\"} 1"),
        "{metrics}"
    );
    // Shutdown completes.
    g.stop();
}

/// Answers with what does not fit a frame: a body past the frame limit, a very long message.
struct Oversized;

impl Upstream for Oversized {
    fn session_opened(&self, _: &dyn Hub, _: &SessionInfo, _: &Bytes) {}
    fn session_ended(&self, _: &dyn Hub, _: &SessionInfo, _: EndReason, _: &[Downlink]) {}
    fn uplink(&self, _: &dyn Hub, _: &SessionInfo, u: Uplink, reply: Reply) {
        let mut o = Outcome::ok();
        if u.msg_id == 1 {
            o.body = Bytes::from(vec![b'x'; 200_000]);
        } else {
            o.message = "é".repeat(10_000);
        }
        reply.send(o)
    }
    fn room_join(&self, _: &dyn Hub, _: &SessionInfo, _: &str, _: Bytes, reply: Reply) {
        let mut o = Outcome::ok();
        o.body = Bytes::from(vec![b'x'; 200_000]);
        reply.send(o)
    }
    fn room_leave(&self, _: &dyn Hub, _: &SessionInfo, _: &str, reply: Reply) {
        reply.ok()
    }
    fn delivered(&self, _: &dyn Hub, _: &SessionInfo, _: &[u64]) {}
}

#[test]
fn an_answer_too_large_for_a_frame_still_reaches_the_client() {
    // Seen (read in the code): a frame that failed to encode, e.g. an upstream answer past
    // the header cap, was logged and dropped: the client waited for an ack that never came.
    let g = start_upstream(Arc::new(Oversized), |_| {});
    let mut c = Raw::connect(g.addrs()[0]);
    c.login("alice", "phone", None);
    c.uplink(1, Bytes::from_static(b"x"));
    let Header::UplinkAck(a) = c.recv().header else {
        panic!()
    };
    assert_eq!((a.msg_id, a.code), (1, ErrorCode::Internal as i32));
    c.uplink(2, Bytes::from_static(b"x"));
    let Header::UplinkAck(a) = c.recv().header else {
        panic!()
    };
    assert_eq!((a.msg_id, a.code), (2, ErrorCode::Ok as i32));
    assert!(a.message.len() <= 1024 && a.message.starts_with('é'));
    c.send(&tether_codec::Frame::new(Header::RoomJoin(Box::new(
        pb::RoomJoin {
            request_id: 3,
            room_id: "r".into(),
        },
    ))));
    let Header::RoomResult(r) = c.recv().header else {
        panic!()
    };
    assert_eq!((r.request_id, r.code), (3, ErrorCode::Internal as i32));
    assert_eq!(
        g.node().room_size("r"),
        0,
        "what the client heard is what was done"
    );
}

/// A push to many sessions counts the metrics once for all of them (the node adds up what
/// each member's buffer took); the figures still follow every member: buffered bytes and
/// downlinks pushed, and the bytes go back to 0 as the members ack.
#[test]
fn a_room_push_counts_every_members_bytes_and_downlinks() {
    let up = Arc::new(Silent::default());
    let g = start_upstream(up, |_| {});
    let node = g.node();
    let mut members: Vec<Raw> = (0..5)
        .map(|i| {
            let mut c = Raw::connect(g.addrs()[0]);
            let r = c.login(&format!("m{i}"), "phone", None);
            let s = node.session(&sid(&r.session_id)).expect("session");
            assert!(node.room_add("lobby", &s));
            c
        })
        .collect();
    let body = Bytes::from_static(b"twelve bytes");
    let p = tether_gateway::node::Push::new(9, body.clone());
    let room = tether_gateway::node::Target::Room("lobby".into());
    assert_eq!(node.push(&room, &p).sent, 5);
    assert_eq!(node.push(&room, &p).sent, 5);
    assert_eq!(node.buffered_bytes(), 2 * 5 * body.len());
    assert!(
        node.metrics.encode().contains("tether_downlinks_total 10"),
        "{}",
        node.metrics.encode()
    );
    for c in &mut members {
        assert_eq!(c.downlink(), (1, body.clone()));
        assert_eq!(c.downlink(), (2, body.clone()));
        c.ack(2);
    }
    eventually(|| node.buffered_bytes() == 0);
}

/// The embedded back end accepts an uplink once per device. A session that ends with no login
/// of its device replacing it (kicked, expired) takes the gateway's window with it, so the
/// client's resend of an uplink whose ack it never heard reaches the back end again: acked
/// OK, not delivered a second time. Before, the recipient got it twice. The ids are kept for
/// `accepted_max_devices` devices, the longest idle forgotten first.
#[test]
fn the_embedded_back_end_acks_a_resend_after_its_session_ended_without_delivering_it_again() {
    let (g, chat) = start_chat(|c| {
        c.resume_grace_secs = 5;
        c.accepted_max_devices = 3;
    });
    let addr = g.addrs()[0];
    let mut bob = Raw::connect(addr);
    bob.login("bob", "phone", None);
    let bob_s = g.node().user_sessions("bob")[0].clone();
    // Every delivery to bob takes a seq (the embedded back end delivers within the uplink
    // call, before its ack).
    let pushed_to_bob = || bob_s.downlink_state().2;
    let mut alice = Raw::connect(addr);
    alice.login("alice", "phone", None);
    alice.uplink(5, chat_to_user("bob", "once"));
    assert_eq!(ack(&mut alice).code, ErrorCode::Ok as i32);
    let (seq, body) = bob.downlink();
    assert_eq!(text_of(&body), "once");
    bob.ack(seq);

    // Kicked before it heard the ack (as far as the client knows): it logs in afresh and
    // resends.
    g.node().kick_user("alice", pb::KickReason::Admin);
    assert_eq!(kicked(&mut alice), pb::KickReason::Admin);
    let mut alice = Raw::connect(addr);
    alice.login("alice", "phone", None);
    alice.uplink(5, chat_to_user("bob", "once"));
    let a = ack(&mut alice);
    assert_eq!((a.msg_id, a.code), (5, ErrorCode::Ok as i32));
    assert_eq!(pushed_to_bob(), 1, "delivered once");
    assert_eq!(chat.resends.load(Ordering::SeqCst), 1);

    // Expired: the same.
    alice.uplink(6, chat_to_user("bob", "twice?"));
    assert_eq!(ack(&mut alice).code, ErrorCode::Ok as i32);
    let (seq, _) = bob.downlink();
    bob.ack(seq);
    drop(alice);
    eventually(|| {
        g.node()
            .user_sessions("alice")
            .iter()
            .all(|s| !s.is_attached())
    });
    g.advance_clock(6);
    eventually(|| g.node().user_sessions("alice").is_empty());
    let mut alice = Raw::connect(addr);
    alice.login("alice", "phone", None);
    alice.uplink(6, chat_to_user("bob", "twice?"));
    assert_eq!(ack(&mut alice).code, ErrorCode::Ok as i32);
    // Another device's id 6 is its own message.
    let mut tablet = Raw::connect(addr);
    tablet.login("alice", "tablet", None);
    tablet.uplink(6, chat_to_user("bob", "from the tablet"));
    assert_eq!(ack(&mut tablet).code, ErrorCode::Ok as i32);
    let (seq, body) = bob.downlink();
    assert_eq!(text_of(&body), "from the tablet");
    bob.ack(seq);
    assert_eq!(pushed_to_bob(), 3, "each delivered once");
    assert_eq!(chat.resends.load(Ordering::SeqCst), 2);

    // Bounded in devices: the longest idle goes first.
    assert_eq!(chat.accepted_devices(), 2);
    for d in ["d1", "d2"] {
        let mut c = Raw::connect(addr);
        c.login("carol", d, None);
        c.uplink(1, chat_to_user("bob", d));
        assert_eq!(ack(&mut c).code, ErrorCode::Ok as i32);
        let (seq, _) = bob.downlink();
        bob.ack(seq);
    }
    assert_eq!(chat.accepted_devices(), 3);
}
