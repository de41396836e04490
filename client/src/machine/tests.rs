//! The client core on a virtual clock: no sockets, no sleeps. A test plays the gateway by
//! decoding what the core transmits and handing it frames.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tether_codec::{Decoder, Frame, Header, Limits};
use tether_protocol::pb;

use super::*;

const SID: [u8; 16] = [7; 16];
const HB: Duration = Duration::from_secs(30);

fn cfg(seed: u64) -> CoreConfig {
    let mut c = CoreConfig::new(pb::Login {
        token: "t".into(),
        user_id: "u".into(),
        device_id: "d".into(),
        ..Default::default()
    });
    c.seed = Some(seed);
    c
}

struct T {
    core: ClientCore,
    now: Instant,
    events: Vec<CoreEvent>,
}

impl T {
    fn new(c: CoreConfig) -> T {
        let now = Instant::now();
        T {
            core: ClientCore::new(c, now),
            now,
            events: Vec::new(),
        }
    }

    /// Runs the timers up to `until`, one deadline at a time.
    fn run_until(&mut self, until: Instant) {
        while let Some(t) = self.core.poll_timeout() {
            if t > until {
                break;
            }
            self.now = self.now.max(t);
            self.core.handle_timeout(self.now);
            self.drain();
        }
        self.now = self.now.max(until);
    }

    fn drain(&mut self) {
        while let Some(e) = self.core.poll_event() {
            self.events.push(e);
        }
    }

    fn take_events(&mut self) -> Vec<CoreEvent> {
        self.drain();
        std::mem::take(&mut self.events)
    }

    /// Everything transmitted since the last call, decoded.
    fn sent(&mut self) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        while let Some(b) = self.core.poll_transmit() {
            buf.extend_from_slice(&b);
        }
        let d = Decoder::new(Limits::default());
        let mut frames = Vec::new();
        while let Some(f) = d.decode(&mut buf).expect("the core sends valid frames") {
            frames.push(f);
        }
        assert!(buf.is_empty());
        frames
    }

    fn give(&mut self, header: Header) {
        self.core.handle_frame(self.now, Frame::new(header));
        self.drain();
    }

    /// Connect (the Connect event must be due now) and answer the LOGIN.
    fn login(&mut self, resumed: bool) -> Option<pb::Resume> {
        self.core.handle_timeout(self.now);
        assert!(
            self.take_events().contains(&CoreEvent::Connect),
            "no Connect due"
        );
        self.core.handle_connected(self.now);
        let sent = self.sent();
        let Some(Header::Login(l)) = sent.first().map(|f| f.header.clone()) else {
            panic!("LOGIN first, got {sent:?}");
        };
        self.give(Header::LoginResult(Box::new(pb::LoginResult {
            session_id: Bytes::copy_from_slice(&SID),
            heartbeat_interval_ms: HB.as_millis() as u32,
            resumed,
            ..Default::default()
        })));
        l.resume
    }

    /// The connection drops; the core reconnects (after its backoff) and `result` answers
    /// its LOGIN.
    fn reconnect(&mut self, result: pb::LoginResult) {
        self.core.handle_disconnected(self.now);
        self.run_until(self.now + Duration::from_secs(2));
        self.core.handle_connected(self.now);
        let sent = self.sent();
        assert!(matches!(sent[0].header, Header::Login(_)), "{sent:?}");
        self.give(Header::LoginResult(Box::new(result)));
    }

    fn downlink(&mut self, seq: u64) {
        self.core.handle_frame(
            self.now,
            Frame::with_body(
                Header::Downlink(pb::Downlink { seq, body_type: 1 }),
                Bytes::from(format!("m{seq}")),
            ),
        );
        self.drain();
    }
}

fn receipts(events: &[CoreEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            CoreEvent::Message {
                receipt: Some(r), ..
            } => Some(r.seq),
            _ => None,
        })
        .collect()
}

fn acks(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match &f.header {
            Header::DownlinkAck(a) => Some(a.seq),
            _ => None,
        })
        .collect()
}

fn uplink(msg_id: u64) -> Bytes {
    let mut b = BytesMut::new();
    Frame::with_body(
        Header::Uplink(pb::Uplink {
            msg_id,
            ..Default::default()
        }),
        Bytes::from_static(b"hi"),
    )
    .encode(&mut b, &Limits::default())
    .unwrap();
    b.freeze()
}

fn uplink_ids(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match &f.header {
            Header::Uplink(u) => Some(u.msg_id),
            _ => None,
        })
        .collect()
}

#[test]
fn nothing_is_acked_until_the_application_acks_it() {
    let mut t = T::new(cfg(1));
    t.login(false);
    assert!(t
        .take_events()
        .iter()
        .any(|e| matches!(e, CoreEvent::Online { resumed: false, .. })));
    for seq in 1..=5 {
        t.downlink(seq);
    }
    let ev = t.take_events();
    assert_eq!(receipts(&ev), [1, 2, 3, 4, 5]);
    // Heartbeats come and go: the messages are held, not processed, so no ack goes out.
    for _ in 0..3 {
        t.run_until(t.now + HB);
        t.give(Header::Pong(pb::Pong {}));
    }
    let sent = t.sent();
    assert!(sent.iter().any(|f| matches!(f.header, Header::Ping(_))));
    assert_eq!(acks(&sent), Vec::<u64>::new());
    assert!(t.core.is_online());
    // The app processed 1..=3: one cumulative ack for 3, within ack_delay.
    t.core.ack(t.now, Receipt { epoch: 1, seq: 3 });
    t.run_until(t.now + Duration::from_millis(200));
    assert_eq!(acks(&t.sent()), [3]);
    // Closing acks only what was processed, and fails what is pending.
    t.core.send(t.now, 1, uplink(1));
    t.sent();
    t.core.close(t.now);
    assert_eq!(acks(&t.sent()), Vec::<u64>::new());
    assert!(t.take_events().iter().any(|e| matches!(
        e,
        CoreEvent::UplinkAcked {
            msg_id: 1,
            result: Err(_)
        }
    )));
    assert!(t.core.is_stopped());
    assert_eq!(
        t.core.saved(),
        Some(Saved {
            session_id: SID,
            last_seq: 3
        })
    );
}

#[test]
fn auto_ack_counts_a_message_processed_when_it_is_handed_over() {
    let mut c = cfg(2);
    c.auto_ack = true;
    c.ack_every = 2;
    let mut t = T::new(c);
    t.login(false);
    t.take_events();
    t.downlink(1);
    t.downlink(2);
    t.downlink(3);
    // Handed over (poll_event) but the timer has not run yet: nothing acked.
    t.take_events();
    assert_eq!(acks(&t.sent()), Vec::<u64>::new());
    t.core.handle_timeout(t.now);
    assert_eq!(acks(&t.sent()), [3]);
}

#[test]
fn a_resume_carries_the_processed_seq_and_a_replay_of_held_messages_is_dropped() {
    let mut t = T::new(cfg(3));
    t.login(false);
    for seq in 1..=4 {
        t.downlink(seq);
    }
    t.take_events();
    t.core.ack(t.now, Receipt { epoch: 1, seq: 2 });
    t.core.handle_disconnected(t.now);
    let ev = t.take_events();
    let Some(CoreEvent::Offline {
        retry_in: Some(wait),
        ..
    }) = ev.last()
    else {
        panic!("{ev:?}");
    };
    assert!(*wait <= Duration::from_secs(1));
    t.now += *wait;
    let resume = t.login(true).expect("a resume");
    assert_eq!(resume.session_id.as_ref(), SID);
    assert_eq!(resume.last_seq, 2, "only what was processed");
    // The gateway replays 3 and 4 (the app still holds them) and sends 5.
    t.downlink(3);
    t.downlink(4);
    t.downlink(5);
    let ev = t.take_events();
    assert_eq!(receipts(&ev), [5]);
    t.core.ack(t.now, Receipt { epoch: 1, seq: 5 });
    t.run_until(t.now + Duration::from_millis(200));
    assert_eq!(acks(&t.sent()), [5]);
}

#[test]
fn a_fresh_session_is_a_new_epoch_and_old_receipts_ack_nothing() {
    let mut t = T::new(cfg(4));
    t.login(false);
    t.downlink(1);
    t.downlink(2);
    t.take_events();
    // The gateway lost the session: not resumed.
    t.reconnect(pb::LoginResult {
        session_id: Bytes::copy_from_slice(&[9; 16]),
        heartbeat_interval_ms: 30_000,
        ..Default::default()
    });
    t.take_events();
    t.downlink(1);
    assert_eq!(
        receipts(&t.take_events()),
        [1],
        "seq 1 of the new session is new"
    );
    t.core.ack(t.now, Receipt { epoch: 1, seq: 2 });
    t.core.handle_timeout(t.now + Duration::from_secs(1));
    assert_eq!(
        acks(&t.sent()),
        Vec::<u64>::new(),
        "a receipt of the old session"
    );
    t.core.ack(t.now, Receipt { epoch: 2, seq: 1 });
    t.core.handle_timeout(t.now + Duration::from_secs(1));
    assert_eq!(acks(&t.sent()), [1]);
}

#[test]
fn an_uplink_is_resent_with_the_same_bytes_until_acked_and_answered_once() {
    let mut t = T::new(cfg(5));
    t.login(false);
    t.take_events();
    assert!(t.core.send(t.now, 10, uplink(10)));
    assert!(!t.core.send(t.now, 10, uplink(10)), "already pending");
    assert_eq!(uplink_ids(&t.sent()), [10]);
    t.run_until(t.now + Duration::from_secs(15));
    assert_eq!(uplink_ids(&t.sent()), [10], "resent after uplink_timeout");
    // A new connection sends what is pending first.
    t.core.send(t.now, 11, uplink(11));
    t.sent();
    t.core.handle_disconnected(t.now);
    t.run_until(t.now + Duration::from_secs(1));
    t.core.handle_connected(t.now);
    let sent = t.sent();
    assert!(matches!(sent[0].header, Header::Login(_)));
    t.give(Header::LoginResult(Box::new(pb::LoginResult {
        session_id: Bytes::copy_from_slice(&SID),
        resumed: true,
        ..Default::default()
    })));
    assert_eq!(uplink_ids(&t.sent()), [10, 11]);
    let ok = pb::UplinkAck {
        msg_id: 10,
        ..Default::default()
    };
    t.give(Header::UplinkAck(ok.clone()));
    t.give(Header::UplinkAck(ok));
    let answers: Vec<_> = t
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, CoreEvent::UplinkAcked { .. }))
        .collect();
    assert_eq!(
        answers,
        [CoreEvent::UplinkAcked {
            msg_id: 10,
            result: Ok(())
        }]
    );
    assert_eq!(t.core.pending_uplinks(), 1);
}

#[test]
fn failed_connects_back_off_under_a_doubling_capped_ceiling_and_reconnect_now_skips_it() {
    let mut t = T::new(cfg(6));
    let mut waits = Vec::new();
    for _ in 0..10 {
        t.core.handle_timeout(t.now);
        assert!(t.take_events().contains(&CoreEvent::Connect));
        t.core.handle_disconnected(t.now);
        let Some(CoreEvent::Offline {
            retry_in: Some(w), ..
        }) = t.take_events().pop()
        else {
            panic!()
        };
        waits.push(w);
        t.now += w;
    }
    for (i, w) in waits.iter().enumerate() {
        let ceiling = Duration::from_secs(1 << i).min(Duration::from_secs(60));
        assert!(*w <= ceiling, "attempt {i}: {w:?} > {ceiling:?}");
    }
    assert!(
        waits[6..].iter().any(|w| *w > Duration::from_secs(8)),
        "{waits:?}"
    );
    // Offline with a long wait ahead: a network change connects at once.
    t.core.handle_disconnected(t.now);
    t.core.handle_timeout(t.now);
    t.core.handle_connected(t.now);
    t.core.handle_disconnected(t.now);
    t.take_events();
    t.core.reconnect_now(t.now);
    t.core.handle_timeout(t.now);
    assert!(t.take_events().contains(&CoreEvent::Connect));
}

#[test]
fn the_first_ping_comes_at_a_random_phase_then_every_interval() {
    let mut firsts = Vec::new();
    for seed in 0..200 {
        let mut t = T::new(cfg(seed * 7919 + 1));
        let start = t.now;
        t.login(false);
        let first = t.core.poll_timeout().unwrap();
        assert!(first > start && first <= start + HB);
        t.run_until(first);
        let sent = t.sent();
        assert!(matches!(
            sent[..],
            [Frame {
                header: Header::Ping(_),
                ..
            }]
        ));
        t.give(Header::Pong(pb::Pong {}));
        assert_eq!(t.core.poll_timeout(), Some(first + HB));
        firsts.push((first - start).as_secs_f64() / HB.as_secs_f64());
    }
    // Spread over the whole interval: every tenth of it has some.
    for decile in 0..10 {
        let n = firsts
            .iter()
            .filter(|f| (**f * 10.0) as usize == decile)
            .count();
        assert!(n >= 5, "decile {decile}: {n} of 200");
    }
}

#[test]
fn silence_after_a_ping_gives_the_connection_up() {
    let mut t = T::new(cfg(8));
    t.login(false);
    t.take_events();
    t.run_until(t.now + HB);
    assert!(t.sent().iter().any(|f| matches!(f.header, Header::Ping(_))));
    t.run_until(t.now + HB + DEAD_SLACK);
    let ev = t.take_events();
    assert!(ev.contains(&CoreEvent::Disconnect), "{ev:?}");
    assert!(!t.core.is_online());
}

#[test]
fn goaway_holds_new_uplinks_closes_after_the_linger_and_reconnects_at_the_planned_time() {
    let mut t = T::new(cfg(9));
    t.login(false);
    t.take_events();
    t.give(Header::GoAway(Box::new(pb::GoAway {
        reconnect_delay_ms: 5_000,
        ..Default::default()
    })));
    assert!(t.take_events().contains(&CoreEvent::GoAway {
        reconnect_delay: Duration::from_secs(5)
    }));
    t.core.send(t.now, 1, uplink(1));
    assert_eq!(uplink_ids(&t.sent()), Vec::<u64>::new());
    let at = t.now;
    t.run_until(at + GOAWAY_LINGER);
    let ev = t.take_events();
    assert!(ev.contains(&CoreEvent::Disconnect));
    let Some(CoreEvent::Offline {
        retry_in: Some(w), ..
    }) = ev.last()
    else {
        panic!("{ev:?}")
    };
    let total = GOAWAY_LINGER + *w;
    assert!(total >= Duration::from_secs(5) && total <= Duration::from_millis(7_500));
    t.now = at + total;
    t.login(true);
    assert_eq!(
        uplink_ids(&t.sent()),
        [1],
        "held, then sent on the new connection"
    );
}

#[test]
fn a_kick_stops_the_core_and_fails_what_is_pending() {
    let mut t = T::new(cfg(10));
    t.login(false);
    t.core.send(t.now, 1, uplink(1));
    t.take_events();
    t.give(Header::Kick(Box::new(pb::Kick {
        reason: pb::KickReason::LoggedInElsewhere as i32,
        message: "elsewhere".into(),
    })));
    let ev = t.take_events();
    assert!(ev.contains(&CoreEvent::Disconnect));
    assert!(ev.iter().any(|e| matches!(e, CoreEvent::Kicked { .. })));
    assert!(ev.iter().any(|e| matches!(
        e,
        CoreEvent::UplinkAcked {
            msg_id: 1,
            result: Err(_)
        }
    )));
    assert!(t.core.is_stopped());
    assert_eq!(t.core.poll_timeout(), None);
}

#[test]
fn a_refused_login_is_terminal_and_a_busy_gateway_is_retried_after_its_delay() {
    let mut t = T::new(cfg(11));
    t.core.handle_timeout(t.now);
    t.core.handle_connected(t.now);
    t.give(Header::LoginResult(Box::new(pb::LoginResult {
        code: pb::ErrorCode::ServerBusy as i32,
        retry_after_ms: 4_000,
        ..Default::default()
    })));
    let Some(CoreEvent::Offline {
        code: Some(pb::ErrorCode::ServerBusy),
        retry_in: Some(w),
    }) = t.take_events().pop()
    else {
        panic!()
    };
    assert!(w >= Duration::from_secs(4) && w <= Duration::from_secs(6));
    t.now += w;
    t.core.handle_timeout(t.now);
    t.core.handle_connected(t.now);
    t.give(Header::LoginResult(Box::new(pb::LoginResult {
        code: pb::ErrorCode::AuthFailed as i32,
        ..Default::default()
    })));
    assert!(t.take_events().iter().any(|e| matches!(
        e,
        CoreEvent::Refused {
            code: pb::ErrorCode::AuthFailed,
            ..
        }
    )));
    assert!(t.core.is_stopped());
}

#[test]
fn a_gap_announced_on_resume_is_reported_and_messages_after_it_flow() {
    let mut t = T::new(cfg(12));
    t.login(false);
    t.downlink(1);
    t.take_events();
    t.core.ack(t.now, Receipt { epoch: 1, seq: 1 });
    t.reconnect(pb::LoginResult {
        session_id: Bytes::copy_from_slice(&SID),
        resumed: true,
        gap_from: 2,
        gap_to: 9,
        ..Default::default()
    });
    assert!(t.take_events().contains(&CoreEvent::Online {
        session_id: SID,
        resumed: true,
        gap: Some((2, 9))
    }));
    t.downlink(10);
    assert_eq!(receipts(&t.take_events()), [10]);
}

fn room_frames(frames: &[Frame]) -> Vec<(u64, String, bool)> {
    frames
        .iter()
        .filter_map(|f| match &f.header {
            Header::RoomJoin(j) => Some((j.request_id, j.room_id.clone(), true)),
            Header::RoomLeave(l) => Some((l.request_id, l.room_id.clone(), false)),
            _ => None,
        })
        .collect()
}

fn room_ok(t: &mut T, request_id: u64) {
    t.give(Header::RoomResult(Box::new(pb::RoomResult {
        request_id,
        ..Default::default()
    })));
}

#[test]
fn room_requests_wait_for_a_connection_and_memberships_are_joined_again_after_a_fresh_session() {
    let mut t = T::new(cfg(13));
    // Asked while offline: sent once the login succeeds.
    let a = t.core.room(t.now, "a", true);
    t.login(false);
    assert_eq!(room_frames(&t.sent()), [(a, "a".to_string(), true)]);
    room_ok(&mut t, a);
    let b = t.core.room(t.now, "b", true);
    assert_eq!(room_frames(&t.sent()), [(b, "b".to_string(), true)]);
    // Unanswered when the connection goes: sent again on the next one (resumed: "a" is
    // still joined, nothing else is sent).
    t.reconnect(pb::LoginResult {
        session_id: Bytes::copy_from_slice(&SID),
        resumed: true,
        ..Default::default()
    });
    assert_eq!(room_frames(&t.sent()), [(b, "b".to_string(), true)]);
    room_ok(&mut t, b);
    let ev = t.take_events();
    assert!(ev.contains(&CoreEvent::Room {
        request_id: b,
        room_id: "b".into(),
        join: true,
        automatic: false,
        result: Ok(())
    }));
    assert_eq!(t.core.joined().collect::<Vec<_>>(), ["a", "b"]);
    // A fresh session: both joined again, by the core.
    t.reconnect(pb::LoginResult {
        session_id: Bytes::copy_from_slice(&[3; 16]),
        ..Default::default()
    });
    let again = room_frames(&t.sent());
    assert_eq!(
        again.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(t.core.joined().count(), 0, "not joined until answered");
    for (id, _, _) in &again {
        room_ok(&mut t, *id);
    }
    let automatic = t
        .take_events()
        .iter()
        .filter(|e| {
            matches!(
                e,
                CoreEvent::Room {
                    automatic: true,
                    result: Ok(()),
                    ..
                }
            )
        })
        .count();
    assert_eq!(automatic, 2);
    assert_eq!(t.core.joined().collect::<Vec<_>>(), ["a", "b"]);
}

#[test]
fn what_the_app_acks_while_the_login_is_out_is_acked_after_the_resume() {
    let mut t = T::new(cfg(14));
    t.login(false);
    t.downlink(1);
    t.downlink(2);
    t.take_events();
    t.core.ack(t.now, Receipt { epoch: 1, seq: 1 });
    t.core.handle_disconnected(t.now);
    t.run_until(t.now + Duration::from_secs(1));
    t.core.handle_connected(t.now);
    let Some(Header::Login(l)) = t.sent().first().map(|f| f.header.clone()) else {
        panic!()
    };
    assert_eq!(l.resume.map(|r| r.last_seq), Some(1));
    // The app processes seq 2 before LOGIN_RESULT arrives: the gateway has not heard of it.
    t.core.ack(t.now, Receipt { epoch: 1, seq: 2 });
    t.give(Header::LoginResult(Box::new(pb::LoginResult {
        session_id: Bytes::copy_from_slice(&SID),
        resumed: true,
        ..Default::default()
    })));
    t.run_until(t.now + Duration::from_millis(200));
    assert_eq!(acks(&t.sent()), [2]);
}
