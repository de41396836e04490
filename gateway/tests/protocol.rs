//! The gateway over real loopback TCP, frame by frame, with a manual clock.

mod common;

use bytes::Bytes;
use common::*;
use tether_codec::{Frame, Header};
use tether_protocol::pb::{self, ErrorCode};

#[test]
fn login_succeeds_and_says_session_server_time_and_heartbeat() {
    let g = start(|c| c.heartbeat_mobile_ms = 25_000);
    let mut c = Raw::connect(g.addrs()[0]);
    let r = c.login("alice", "phone", None);
    assert_eq!(r.code, ErrorCode::Ok as i32);
    assert_eq!(r.session_id.len(), 16);
    assert_eq!(r.heartbeat_interval_ms, 25_000);
    assert_eq!(r.server_id, "tether-1");
    assert!(r.server_time_ms > 1_700_000_000_000);
    assert!(!r.resumed);
    // Web clients get the web interval.
    let mut w = Raw::connect(g.addrs()[0]);
    let mut login = login_frame("alice", "browser", None);
    if let Header::Login(l) = &mut login.header {
        l.platform = pb::Platform::Web as i32;
    }
    w.send(&login);
    let Header::LoginResult(r) = w.recv().header else {
        panic!()
    };
    assert_eq!(r.heartbeat_interval_ms, 15_000);
    // PING gets PONG.
    c.send(&Frame::new(Header::Ping(pb::Ping {})));
    assert!(matches!(c.recv().header, Header::Pong(_)));
}

#[test]
fn each_login_failure_gets_its_code_and_a_close() {
    let g = start(|_| {});
    let addr = g.addrs()[0];
    let cases: Vec<(pb::Login, ErrorCode)> = vec![
        (
            pb::Login {
                token: "garbage".into(),
                user_id: "u".into(),
                device_id: "d".into(),
                ..Default::default()
            },
            ErrorCode::AuthFailed,
        ),
        (
            pb::Login {
                token: token("someone-else", "d"),
                user_id: "u".into(),
                device_id: "d".into(),
                ..Default::default()
            },
            ErrorCode::AuthFailed,
        ),
        (
            pb::Login {
                token: tether_gateway::auth::mint_token(SECRET.as_bytes(), "u", "d", 1),
                user_id: "u".into(),
                device_id: "d".into(),
                ..Default::default()
            },
            ErrorCode::TokenExpired,
        ),
        (
            pb::Login {
                token: token("u", "d"),
                user_id: "u".into(),
                device_id: String::new(),
                ..Default::default()
            },
            ErrorCode::AuthFailed,
        ),
    ];
    for (login, code) in cases {
        let mut c = Raw::connect(addr);
        c.send(&Frame::new(Header::Login(Box::new(login))));
        let Header::LoginResult(r) = c.recv().header else {
            panic!("LOGIN_RESULT")
        };
        assert_eq!(r.code, code as i32, "{}", r.message);
        assert!(!r.message.is_empty());
        assert!(
            c.until_closed().is_empty(),
            "closed after the failed LOGIN_RESULT"
        );
    }
    let m = g.node().metrics.encode();
    assert!(
        m.contains("tether_logins_total{result=\"token_expired\"} 1"),
        "{m}"
    );
}

#[test]
fn login_deadline_closes_with_login_timeout() {
    let g = start(|c| c.login_timeout_secs = 10);
    let mut c = Raw::connect(g.addrs()[0]);
    // Make sure the gateway has the connection before time moves.
    eventually(|| g.node().connections() == 1);
    g.advance_clock(9);
    // Still open: a PING before login is answered with NOT_LOGGED_IN, which proves it.
    g.advance_clock(1);
    let f = c.recv();
    assert_eq!(error_code(&f), ErrorCode::LoginTimeout);
    assert!(c.until_closed().is_empty());
    eventually(|| g.node().connections() == 0);
}

#[test]
fn frames_before_login_are_refused() {
    let g = start(|_| {});
    let mut c = Raw::connect(g.addrs()[0]);
    c.uplink(1, Bytes::from_static(b"x"));
    assert_eq!(error_code(&c.recv()), ErrorCode::NotLoggedIn);
    assert!(c.until_closed().is_empty());
}

#[test]
fn a_silent_connection_times_out_and_its_session_is_kept_for_resume() {
    let g = start(|c| {
        c.heartbeat_mobile_ms = 10_000;
        c.heartbeat_misses = 3;
    });
    let mut c = Raw::connect(g.addrs()[0]);
    let r = c.login("alice", "phone", None);
    g.advance_clock(20);
    // Any frame counts as life: a PING at 20 s moves the deadline to 50 s.
    c.send(&Frame::new(Header::Ping(pb::Ping {})));
    assert!(matches!(c.recv().header, Header::Pong(_)));
    g.advance_clock(20); // 40 s: not yet
    c.send(&Frame::new(Header::Ping(pb::Ping {})));
    assert!(matches!(c.recv().header, Header::Pong(_)));
    g.advance_clock(31); // 71 s: 31 s silent after the last ping at 40 s
    assert_eq!(error_code(&c.recv()), ErrorCode::HeartbeatTimeout);
    assert!(c.until_closed().is_empty());
    // The session waits: a resume picks it up.
    let mut c2 = Raw::connect(g.addrs()[0]);
    let r2 = c2.login("alice", "phone", Some((r.session_id.clone(), 0)));
    assert!(r2.resumed);
    assert_eq!(r2.session_id, r.session_id);
}

#[test]
fn uplinks_are_acked_and_a_resend_is_not_forwarded_twice() {
    let g = start(|_| {});
    let mut bob = Raw::connect(g.addrs()[0]);
    bob.login("bob", "phone", None);
    let mut alice = Raw::connect(g.addrs()[0]);
    alice.login("alice", "phone", None);
    alice.uplink(7, chat_to_user("bob", "hi"));
    let Header::UplinkAck(a) = alice.recv().header else {
        panic!()
    };
    assert_eq!((a.msg_id, a.code), (7, ErrorCode::Ok as i32));
    let (seq, body) = bob.downlink();
    assert_eq!((seq, text_of(&body)), (1, "hi".to_string()));
    // The same msg_id again: acked again, not delivered again.
    alice.uplink(7, chat_to_user("bob", "hi"));
    let Header::UplinkAck(a) = alice.recv().header else {
        panic!()
    };
    assert_eq!((a.msg_id, a.code), (7, ErrorCode::Ok as i32));
    alice.uplink(8, chat_to_user("bob", "second"));
    let Header::UplinkAck(a) = alice.recv().header else {
        panic!()
    };
    assert_eq!(a.msg_id, 8);
    let (seq, body) = bob.downlink();
    assert_eq!(
        (seq, text_of(&body)),
        (2, "second".to_string()),
        "no duplicate of 7 came first"
    );
    // A body the upstream refuses gets an error ack, never silence.
    alice.uplink(9, Bytes::from_static(b"\xff\xff not protobuf"));
    let Header::UplinkAck(a) = alice.recv().header else {
        panic!()
    };
    assert_eq!((a.msg_id, a.code), (9, ErrorCode::Rejected as i32));
    assert!(!a.message.is_empty());
}

#[test]
fn a_message_to_an_offline_user_waits_for_their_login() {
    let g = start(|_| {});
    let mut alice = Raw::connect(g.addrs()[0]);
    alice.login("alice", "phone", None);
    alice.uplink(1, chat_to_user("carol", "are you there"));
    assert!(matches!(alice.recv().header, Header::UplinkAck(_)));
    let mut carol = Raw::connect(g.addrs()[0]);
    carol.login("carol", "phone", None);
    let (seq, body) = carol.downlink();
    assert_eq!((seq, text_of(&body)), (1, "are you there".into()));
}

#[test]
fn a_live_burst_is_not_packed_into_batches_only_a_resume_replay_is() {
    let g = start(|c| c.replay_batch_min = 4);
    let mut bob = Raw::connect(g.addrs()[0]);
    bob.login("bob", "phone", None);
    // Twenty downlinks in one push: queued together, written in one fill, yet sent as
    // twenty DOWNLINK frames (a BATCH would be gzipped for this connection alone).
    let target = tether_gateway::node::Target::Users(vec!["bob".to_string(); 20]);
    let push = tether_gateway::node::Push::new(0, chat_to_user("bob", "burst"));
    assert_eq!(g.node().push(&target, &push).sent, 20);
    for seq in 1..=20u64 {
        assert_eq!(bob.downlink().0, seq);
    }
    assert_eq!(
        bob.batches, 0,
        "live traffic is never packed per connection"
    );
}

#[test]
fn resume_replays_unacked_downlinks_and_after_the_grace_period_the_session_is_new() {
    let g = start(|c| {
        c.resume_grace_secs = 120;
        c.replay_batch_min = 4;
    });
    let mut alice = Raw::connect(g.addrs()[0]);
    alice.login("alice", "phone", None);
    let mut bob = Raw::connect(g.addrs()[0]);
    let r = bob.login("bob", "phone", None);
    for i in 1..=10u64 {
        alice.uplink(i, chat_to_user("bob", &format!("m{i}")));
        assert!(matches!(alice.recv().header, Header::UplinkAck(_)));
    }
    for i in 1..=10u64 {
        assert_eq!(bob.downlink().0, i);
    }
    bob.ack(3);
    drop(bob);
    eventually(|| g.node().connections() == 1);
    // While bob is away, more arrive.
    for i in 11..=12u64 {
        alice.uplink(i, chat_to_user("bob", &format!("m{i}")));
        assert!(matches!(alice.recv().header, Header::UplinkAck(_)));
    }
    // Resume having processed 5: 6..=12 come back, in order (7 frames: a BATCH).
    let mut bob = Raw::connect(g.addrs()[0]);
    let r2 = bob.login("bob", "phone", Some((r.session_id.clone(), 5)));
    assert!(r2.resumed);
    assert_eq!((r2.gap_from, r2.gap_to), (0, 0));
    let mut seqs = Vec::new();
    while seqs.len() < 7 {
        let (seq, body) = bob.downlink();
        assert_eq!(text_of(&body), format!("m{seq}"));
        seqs.push(seq);
    }
    assert_eq!(seqs, (6..=12).collect::<Vec<_>>());
    assert_eq!(
        bob.batches, 1,
        "a replay of 7 >= replay_batch_min travels as one BATCH"
    );
    drop(bob);
    eventually(|| g.node().connections() == 1);
    g.advance_clock(121);
    eventually(|| g.node().user_sessions("bob").is_empty());
    let mut bob = Raw::connect(g.addrs()[0]);
    let r3 = bob.login("bob", "phone", Some((r.session_id.clone(), 12)));
    assert!(!r3.resumed);
    assert_ne!(r3.session_id, r.session_id);
}

#[test]
fn a_full_buffer_refuses_new_downlinks_and_keeps_every_one_it_took() {
    let g = start(|c| c.max_unacked_frames = 5);
    let mut bob = Raw::connect(g.addrs()[0]);
    let r = bob.login("bob", "phone", None);
    drop(bob);
    eventually(|| g.node().connections() == 0);
    let target = tether_gateway::node::Target::User("bob".into());
    let push = |i: u64| {
        g.node().push(
            &target,
            &tether_gateway::node::Push::new(0, format!("m{i}")),
        )
    };
    for i in 1..=5 {
        assert_eq!(push(i).held, 1, "held for resume, not delivered");
    }
    for i in 6..=8 {
        assert_eq!(push(i).full.len(), 1, "refused to the pusher, retriable");
    }
    let mut bob = Raw::connect(g.addrs()[0]);
    let r2 = bob.login("bob", "phone", Some((r.session_id, 0)));
    assert!(r2.resumed);
    assert_eq!(
        (r2.gap_from, r2.gap_to),
        (0, 0),
        "nothing accepted was dropped"
    );
    let seqs: Vec<u64> = (0..5).map(|_| bob.downlink().0).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    bob.ack(5);
    eventually(|| g.node().user_sessions("bob")[0].downlink_state().0 == 0);
    assert_eq!(push(6).sent, 1, "room again once acked");
    assert_eq!(bob.downlink().0, 6);
}

#[test]
fn a_second_login_on_the_same_device_kicks_the_first() {
    let g = start(|_| {});
    let mut first = Raw::connect(g.addrs()[0]);
    let r1 = first.login("alice", "phone", None);
    let mut second = Raw::connect(g.addrs()[0]);
    let r2 = second.login("alice", "phone", None);
    assert_ne!(r1.session_id, r2.session_id);
    let Header::Kick(k) = first.recv().header else {
        panic!("KICK")
    };
    assert_eq!(k.reason, pb::KickReason::LoggedInElsewhere as i32);
    assert!(first.until_closed().is_empty());
    // Another device of the same user is not affected.
    let mut tablet = Raw::connect(g.addrs()[0]);
    tablet.login("alice", "tablet", None);
    assert_eq!(g.node().user_sessions("alice").len(), 2);
    // The kicked session cannot be resumed.
    let mut again = Raw::connect(g.addrs()[0]);
    let r3 = again.login("alice", "phone", Some((r1.session_id, 0)));
    assert!(!r3.resumed);
}

#[test]
fn rooms_fan_out_to_every_member_but_the_sender() {
    let g = start(|_| {});
    let mut members: Vec<Raw> = (0..5)
        .map(|i| {
            let mut c = Raw::connect(g.addrs()[0]);
            c.login(&format!("u{i}"), "d", None);
            c.send(&Frame::new(Header::RoomJoin(Box::new(pb::RoomJoin {
                request_id: 40 + i,
                room_id: "lobby".into(),
            }))));
            let Header::RoomResult(r) = c.recv().header else {
                panic!()
            };
            assert_eq!((r.request_id, r.code), (40 + i, ErrorCode::Ok as i32));
            c
        })
        .collect();
    assert_eq!(g.node().room_size("lobby"), 5);
    members[0].uplink(1, chat_to_room("lobby", "hello room"));
    assert!(matches!(members[0].recv().header, Header::UplinkAck(_)));
    for m in &mut members[1..] {
        let (seq, body) = m.downlink();
        assert_eq!((seq, text_of(&body)), (1, "hello room".into()));
    }
    // Leave, then a message to the room no longer reaches that member.
    members[4].send(&Frame::new(Header::RoomLeave(Box::new(pb::RoomLeave {
        request_id: 9,
        room_id: "lobby".into(),
    }))));
    let Header::RoomResult(r) = members[4].recv().header else {
        panic!()
    };
    assert_eq!(r.code, ErrorCode::Ok as i32);
    members[1].uplink(1, chat_to_room("lobby", "after"));
    assert!(matches!(members[1].recv().header, Header::UplinkAck(_)));
    assert_eq!(text_of(&members[0].downlink().1), "after");
    // A non-member cannot post to the room.
    let mut outsider = Raw::connect(g.addrs()[0]);
    outsider.login("x", "d", None);
    outsider.uplink(1, chat_to_room("lobby", "spam"));
    let Header::UplinkAck(a) = outsider.recv().header else {
        panic!()
    };
    assert_eq!(a.code, ErrorCode::Rejected as i32);
    members[4].send(&Frame::new(Header::Ping(pb::Ping {})));
    assert!(
        matches!(members[4].recv().header, Header::Pong(_)),
        "nothing else queued for the leaver"
    );
}

#[test]
fn bad_input_gets_an_error_and_a_close_and_others_are_served() {
    let g = start(|_| {});
    let mut bystander = Raw::connect(g.addrs()[0]);
    bystander.login("by", "stander", None);
    let garbage: Vec<(Vec<u8>, ErrorCode)> = vec![
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), ErrorCode::BadMagic),
        // length 2^31: over the frame cap.
        (
            vec![0x80, 0, 0, 0, 0xF7, 1, 0, 3, 0, 0],
            ErrorCode::FrameTooLarge,
        ),
        (
            vec![0, 0, 0, 6, 0xF7, 9, 0, 3, 0, 0],
            ErrorCode::UnsupportedVersion,
        ),
    ];
    for (bytes, code) in garbage {
        let mut c = Raw::connect(g.addrs()[0]);
        c.send_bytes(&bytes);
        assert_eq!(error_code(&c.recv()), code);
        assert!(c.until_closed().is_empty());
    }
    // A gzip bomb in an UPLINK is the upstream's to refuse (the gateway forwards bodies as
    // they came); the embedded upstream inflates within the limits and rejects it.
    let mut c = Raw::connect(g.addrs()[0]);
    c.login("bomber", "d", None);
    let bomb = tether_codec::gzip(&vec![0u8; 4 << 20], 9).unwrap();
    assert!(bomb.len() < 65_000, "{}", bomb.len());
    c.send(&Frame {
        header: Header::Uplink(pb::Uplink {
            msg_id: 1,
            body_type: 0,
        }),
        gzip: true,
        body: bomb.into(),
    });
    let Header::UplinkAck(a) = c.recv().header else {
        panic!()
    };
    assert_eq!(a.code, ErrorCode::Rejected as i32);
    // The bystander is still served.
    bystander.send(&Frame::new(Header::Ping(pb::Ping {})));
    assert!(matches!(bystander.recv().header, Header::Pong(_)));
}

#[test]
fn past_the_connection_limit_a_client_is_told_server_busy() {
    let g = start(|c| {
        c.max_connections = 2;
        c.busy_retry_after_ms = 1234;
    });
    let mut a = Raw::connect(g.addrs()[0]);
    a.login("a", "d", None);
    let mut b = Raw::connect(g.addrs()[0]);
    b.login("b", "d", None);
    let mut c = Raw::connect(g.addrs()[0]);
    let f = c.recv();
    assert_eq!(error_code(&f), ErrorCode::ServerBusy);
    let Header::Error(e) = f.header else {
        unreachable!()
    };
    assert_eq!(e.retry_after_ms, 1234);
    assert!(c.until_closed().is_empty());
    drop(a);
    eventually(|| g.node().connections() == 1);
    let mut d = Raw::connect(g.addrs()[0]);
    assert_eq!(d.login("d", "d", None).code, ErrorCode::Ok as i32);
}

#[test]
fn a_slow_consumer_is_closed_with_its_session_kept_and_memory_bounded() {
    let g = start(|c| {
        c.max_unacked_bytes = 256 * 1024;
        c.max_unacked_frames = 100_000;
        c.slow_consumer_secs = 30;
    });
    let mut slow = Raw::connect(g.addrs()[0]);
    slow.s.set_read_timeout(Some(GUARD)).unwrap();
    let r = slow.login("slow", "d", None);
    // Push until its buffer is full, and never read or ack.
    let body = vec![b'x'; 16 * 1024];
    let push = tether_gateway::node::Push::new(1, body);
    let target = tether_gateway::node::Target::User("slow".into());
    let mut accepted = 0;
    loop {
        let rep = g.node().push(&target, &push);
        if !rep.full.is_empty() {
            break;
        }
        accepted += rep.sent;
        assert!(accepted <= 16, "the buffer is bounded");
    }
    assert_eq!(accepted, 16);
    // Refused, but not closed: a full buffer alone is no proof (its client may be acking).
    assert_eq!(g.node().connections(), 1);
    // Still full, no ack for slow_consumer_secs: the next push that does not fit closes it.
    g.advance_clock(30);
    assert_eq!(g.node().push(&target, &push).full.len(), 1);
    eventually(|| g.node().connections() == 0);
    let s = g.node().user_sessions("slow");
    assert_eq!(s.len(), 1, "session kept for resume");
    let (n, unacked_bytes, _) = s[0].downlink_state();
    assert_eq!(
        (n, unacked_bytes),
        (16, 256 * 1024),
        "bounded, and nothing dropped"
    );
    let m = g.node().metrics.encode();
    assert!(m.contains("tether_slow_consumers_total 1"), "{m}");
    // What did reach the socket ends with ERROR SLOW_CONSUMER (or a reset mid-stream).
    let mut last = None;
    while let Some(f) = slow.try_recv() {
        last = Some(f);
    }
    if let Some(f) = last {
        if let Header::Error(e) = f.header {
            assert_eq!(e.code, ErrorCode::SlowConsumer as i32);
        }
    }
    let _ = r;
}

#[test]
fn drain_sends_goaway_refuses_logins_and_stops() {
    let g = start(|c| {
        c.drain_window_ms = 0;
        c.drain_linger_ms = 200;
        c.drain_reconnect_delay_ms = 1000;
    });
    let mut a = Raw::connect(g.addrs()[0]);
    a.login("a", "d", None);
    g.drain();
    let Header::GoAway(ga) = a.recv().header else {
        panic!("GOAWAY")
    };
    assert!(
        (1000..2000).contains(&ga.reconnect_delay_ms),
        "{}",
        ga.reconnect_delay_ms
    );
    let node = g.node().clone();
    g.wait();
    assert!(a.until_closed().is_empty());
    assert_eq!(node.connections(), 0);
    assert_eq!(node.session_count(), 0);
}

#[test]
fn a_last_seq_beyond_what_was_sent_does_not_swallow_what_waited_while_away() {
    let g = start(|_| {});
    let mut bob = Raw::connect(g.addrs()[0]);
    let r = bob.login("bob", "phone", None);
    drop(bob);
    eventually(|| g.node().connections() == 0);
    let target = tether_gateway::node::Target::User("bob".into());
    for i in 1..=3 {
        g.node().push(
            &target,
            &tether_gateway::node::Push::new(0, format!("m{i}")),
        );
    }
    // A confused client claims seq 99; nothing was ever sent to it, so 1..=3 still come.
    let mut bob = Raw::connect(g.addrs()[0]);
    let r2 = bob.login("bob", "phone", Some((r.session_id, 99)));
    assert!(r2.resumed);
    let seqs: Vec<u64> = (0..3).map(|_| bob.downlink().0).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[test]
fn a_downlink_too_large_for_a_frame_is_refused_not_skipped() {
    let g = start(|_| {});
    let mut bob = Raw::connect(g.addrs()[0]);
    bob.login("bob", "phone", None);
    let target = tether_gateway::node::Target::User("bob".into());
    // Incompressible, so gzip does not save it.
    let big: Vec<u8> = xorshift(0x9E37_79B9_7F4A_7C15)
        .take(70_000)
        .map(|x| x as u8)
        .collect();
    assert_eq!(
        g.node()
            .push(&target, &tether_gateway::node::Push::new(0, big))
            .accepted(),
        0
    );
    assert_eq!(
        g.node()
            .push(&target, &tether_gateway::node::Push::new(0, "ok"))
            .sent,
        1
    );
    assert_eq!(
        bob.downlink(),
        (1, bytes::Bytes::from_static(b"ok")),
        "seq 1, no hole"
    );
}
