//! `--processes`: a resume that lands on a sibling process claims the session from the one
//! that made it (issue 10: "a reconnect that lands on another process starts a fresh session:
//! what the first process held for the old one is lost, and the client's resent uplinks are
//! forwarded again"). Two gateways in this test process stand for two siblings.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use tether_codec::Header;
use tether_gateway::clock::Clock;
use tether_gateway::handoff::Siblings;
use tether_gateway::node::{Push, Target};
use tether_gateway::upstream::{Downlink, EndReason, Hub, Reply, SessionInfo, Uplink, Upstream};
use tether_gateway::{Gateway, Options};
use tether_protocol::pb::{self, ErrorCode, KickReason};

/// Two sibling gateways sharing a handoff directory of their own.
fn siblings() -> (Gateway, Gateway, std::path::PathBuf) {
    siblings_with(|_| None)
}

/// [`siblings`], with the upstream `up(index)` gives (`None`: the embedded one).
fn siblings_with(
    up: impl Fn(usize) -> Option<Arc<dyn Upstream>>,
) -> (Gateway, Gateway, std::path::PathBuf) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tether-handoff-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let start = |index| {
        let mut c = config();
        c.upstream_timeout_ms = 5_000;
        Gateway::start(
            c,
            Options {
                clock: Some(Clock::manual()),
                upstream: up(index),
                siblings: Some(Siblings {
                    index,
                    count: 2,
                    dir: dir.clone(),
                }),
                ..Options::default()
            },
        )
        .unwrap()
    };
    (start(0), start(1), dir)
}

fn push(g: &Gateway, user: &str, text: &str, receipt: u64) {
    let mut p = Push::new(9, Bytes::from(text.to_owned()));
    p.receipt = receipt;
    assert_eq!(g.node().push(&Target::User(user.into()), &p).sent, 1);
}

fn ack_code(c: &mut Raw) -> (u64, i32) {
    match c.recv().header {
        Header::UplinkAck(a) => (a.msg_id, a.code),
        h => panic!("expected UPLINK_ACK, got {h:?}"),
    }
}

#[test]
fn a_resume_on_a_sibling_takes_the_session_with_its_unacked_downlinks_and_dedup() {
    let (a, b, _dir) = siblings();
    let mut c = Raw::connect(a.addrs()[0]);
    let r = c.login("alice", "phone", None);
    assert_eq!(&r.session_id[..2], &[0, 0], "the id names its process");
    for (i, t) in ["one", "two", "three"].iter().enumerate() {
        push(&a, "alice", t, 10 + i as u64);
    }
    for want in 1..=3 {
        assert_eq!(c.downlink().0, want);
    }
    c.ack(1);
    c.uplink(7, chat_to_user("bob", "hi"));
    assert_eq!(ack_code(&mut c), (7, ErrorCode::Ok as i32));
    drop(c);
    eventually(|| a.node().connections() == 0);

    // The reconnect lands on the other process.
    let mut c = Raw::connect(b.addrs()[0]);
    let r2 = c.login("alice", "phone", Some((r.session_id.clone(), 1)));
    assert!(r2.resumed, "resumed, not a fresh session");
    assert_eq!(r2.session_id, r.session_id);
    assert_eq!((r2.gap_from, r2.gap_to), (0, 0));
    let replay: Vec<(u64, Bytes)> = (0..2).map(|_| c.downlink()).collect();
    assert_eq!(
        replay,
        [
            (2, Bytes::from_static(b"two")),
            (3, Bytes::from_static(b"three"))
        ]
    );
    // The resent uplink the first process answered is answered from the moved window.
    c.uplink(7, chat_to_user("bob", "hi"));
    assert_eq!(ack_code(&mut c), (7, ErrorCode::Ok as i32));
    let mb = b.node().metrics.encode();
    assert!(mb.contains("tether_uplink_duplicates_total 1"), "{mb}");
    assert!(
        mb.contains("tether_handoffs_total{side=\"taken\"} 1"),
        "{mb}"
    );
    // New downlinks go on from seq 4, and acks release as usual.
    push(&b, "alice", "four", 13);
    assert_eq!(c.downlink(), (4, Bytes::from_static(b"four")));
    c.ack(4);
    eventually(|| b.node().buffered_bytes() == 0);

    // The first process holds nothing of it and reported nothing undelivered: it moved.
    assert_eq!(a.node().session_count(), 0);
    let ma = a.node().metrics.encode();
    assert!(
        ma.contains("tether_sessions_ended_total{reason=\"moved\"} 1"),
        "{ma}"
    );
    assert!(!ma.contains("tether_undelivered_total{"), "{ma}");
    assert!(
        ma.contains("tether_handoffs_total{side=\"given\"} 1"),
        "{ma}"
    );
    assert_eq!(a.node().buffered_bytes(), 0);
}

#[test]
fn a_session_still_attached_on_its_process_is_kicked_resumed_elsewhere_and_keeps_its_rooms() {
    let (a, b, _dir) = siblings();
    let mut old = Raw::connect(a.addrs()[0]);
    let r = old.login("alice", "phone", None);
    old.send(&tether_codec::Frame::new(Header::RoomJoin(Box::new(
        pb::RoomJoin {
            request_id: 1,
            room_id: "lobby".into(),
        },
    ))));
    assert!(matches!(old.recv().header, Header::RoomResult(r) if r.code == 0));
    let mut new = Raw::connect(b.addrs()[0]);
    let r2 = new.login("alice", "phone", Some((r.session_id.clone(), 0)));
    assert!(r2.resumed);
    match old.recv().header {
        Header::Kick(k) => assert_eq!(k.reason, KickReason::ResumedElsewhere as i32),
        h => panic!("expected KICK, got {h:?}"),
    }
    assert!(old.until_closed().is_empty());
    assert_eq!(b.node().room_size("lobby"), 1, "its rooms moved with it");
    assert_eq!(a.node().room_size("lobby"), 0);
    // A room push on the new process reaches it.
    let p = Push::new(9, Bytes::from_static(b"hello room"));
    assert_eq!(b.node().push(&Target::Room("lobby".into()), &p).sent, 1);
    assert_eq!(new.downlink(), (1, Bytes::from_static(b"hello room")));
}

#[test]
fn a_claim_nobody_answers_gets_a_fresh_session() {
    let (a, b, _dir) = siblings();
    let mut c = Raw::connect(b.addrs()[0]);
    let r = c.login("alice", "phone", None);
    assert_eq!(&r.session_id[..2], &[0, 1]);
    drop(c);
    eventually(|| b.node().connections() == 0);
    // A session id of process 1 that process 1 does not have: a fresh session.
    let mut unknown = r.session_id.to_vec();
    unknown[15] ^= 1;
    let mut c = Raw::connect(a.addrs()[0]);
    let fresh = c.login("alice", "phone", Some((Bytes::from(unknown), 0)));
    assert!(!fresh.resumed);
    assert_eq!(fresh.code, ErrorCode::Ok as i32);
    // Process 1 stops: the claim of its session fails, and the login still gets a session.
    b.stop();
    let mut c = Raw::connect(a.addrs()[0]);
    let fresh = c.login("alice", "phone", Some((r.session_id.clone(), 0)));
    assert!(!fresh.resumed);
    assert_eq!(fresh.code, ErrorCode::Ok as i32);
    let m = a.node().metrics.encode();
    assert!(
        m.contains("tether_handoffs_total{side=\"failed\"} 1"),
        "{m}"
    );
}

/// Holds every uplink's reply until the test answers it.
#[derive(Default)]
struct Holder {
    held: Mutex<Vec<Reply>>,
    forwarded: AtomicUsize,
}

impl Upstream for Holder {
    fn session_opened(&self, _: &dyn Hub, _: &SessionInfo, _: &Bytes) {}
    fn session_ended(&self, _: &dyn Hub, _: &SessionInfo, _: EndReason, _: &[Downlink]) {}
    fn uplink(&self, _: &dyn Hub, _: &SessionInfo, _: Uplink, reply: Reply) {
        self.forwarded.fetch_add(1, Ordering::SeqCst);
        self.held.lock().unwrap().push(reply);
    }
    fn room_join(&self, _: &dyn Hub, _: &SessionInfo, _: &str, _: Bytes, reply: Reply) {
        reply.ok()
    }
    fn room_leave(&self, _: &dyn Hub, _: &SessionInfo, _: &str, reply: Reply) {
        reply.ok()
    }
    fn delivered(&self, _: &dyn Hub, _: &SessionInfo, _: &[u64]) {}
}

fn pong(c: &mut Raw) {
    c.send(&tether_codec::Frame::new(Header::Ping(pb::Ping {})));
    assert!(
        matches!(c.recv().header, Header::Pong(_)),
        "nothing before the PONG"
    );
}

/// An uplink still with the first process's upstream when the session moves: the resend on
/// the sibling is not forwarded there, the first process relays its upstream's answer, and
/// the client gets it on its new connection; with no answer relayed, the sibling answers
/// UPSTREAM_TIMEOUT itself at the upstream timeout (and a late answer goes nowhere). Before,
/// the moved window forgot what was in flight: the resend was forwarded a second time.
#[test]
fn an_uplink_in_flight_when_its_session_moves_is_answered_on_the_sibling() {
    let ups = [Arc::new(Holder::default()), Arc::new(Holder::default())];
    let (a, b, _dir) = siblings_with(|i| Some(ups[i].clone() as Arc<dyn Upstream>));
    let mut c = Raw::connect(a.addrs()[0]);
    let r = c.login("alice", "phone", None);
    c.uplink(7, Bytes::from_static(b"x"));
    c.uplink(8, Bytes::from_static(b"y"));
    eventually(|| ups[0].held.lock().unwrap().len() == 2);
    drop(c);
    eventually(|| a.node().connections() == 0);

    let mut c = Raw::connect(b.addrs()[0]);
    let r2 = c.login("alice", "phone", Some((r.session_id.clone(), 0)));
    assert!(r2.resumed);
    c.uplink(7, Bytes::from_static(b"x"));
    pong(&mut c);
    assert_eq!(
        ups[1].forwarded.load(Ordering::SeqCst),
        0,
        "7 not forwarded again"
    );
    // The first process's upstream answers 7: relayed, acked here.
    ups[0].held.lock().unwrap().remove(0).ok();
    assert_eq!(ack_code(&mut c), (7, ErrorCode::Ok as i32));
    c.uplink(7, Bytes::from_static(b"x"));
    assert_eq!(ack_code(&mut c), (7, ErrorCode::Ok as i32));
    // 8 gets no answer: the sibling times it out itself, and the resend then goes to its
    // own upstream.
    b.advance_clock(5);
    assert_eq!(ack_code(&mut c), (8, ErrorCode::UpstreamTimeout as i32));
    ups[0].held.lock().unwrap().remove(0).ok();
    pong(&mut c);
    c.uplink(8, Bytes::from_static(b"y"));
    eventually(|| ups[1].forwarded.load(Ordering::SeqCst) == 1);
    // The late answer to 8 reaches the sibling too, and changes nothing there.
    eventually(|| {
        let mb = b.node().metrics.encode();
        mb.contains("tether_handoffs_total{side=\"relay_received\"} 2")
    });
    let ma = a.node().metrics.encode();
    assert!(
        ma.contains("tether_handoffs_total{side=\"relayed\"} 2"),
        "{ma}"
    );
    pong(&mut c);
    assert_eq!(ups[1].forwarded.load(Ordering::SeqCst), 1);
}
