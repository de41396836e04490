//! The client against a scripted fake gateway on loopback: what it sends, in which order,
//! and what it tells the application.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use tether_client::{pb, Client, Error, Event, RoomError, SendError};
use tether_codec::{encode_batch, gzip, CompressOptions, Frame, Header, Limits};
use tokio::time::timeout;

#[tokio::test]
async fn login_carries_the_configured_fields() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.platform = pb::Platform::Ios;
    let (client, _events, _peer, login) = connect(&server, cfg, QUIET_HB).await;
    assert_eq!(login.user_id, "alice");
    assert_eq!(login.device_id, "phone-1");
    assert_eq!(login.token, "token-abc");
    assert_eq!(login.platform, pb::Platform::Ios as i32);
    assert_eq!(
        login.client_version,
        concat!("rust-sdk/", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(login.compression, vec![pb::Compression::Gzip as i32]);
    assert_eq!(login.resume, None, "a first login does not resume");
    assert_eq!(client.session_id(), Some(SID));
    assert!(client.is_online());
    assert_eq!(client.last_seq(), 0);

    // Without accept_gzip the LOGIN lists no compression.
    let mut cfg = config(&server.addr);
    cfg.accept_gzip = false;
    let (_c, _e, _p, login) = connect(&server, cfg, QUIET_HB).await;
    assert!(login.compression.is_empty());
}

#[tokio::test]
async fn first_login_refused_is_an_error() {
    let server = Server::bind().await;
    let connecting = tokio::spawn(Client::connect(config(&server.addr)));
    let mut peer = server.accept().await;
    peer.expect_login().await;
    peer.send(login_refused(pb::ErrorCode::AuthFailed, 0)).await;
    drop(peer);
    match connecting.await.unwrap() {
        Err(Error::Login {
            code: pb::ErrorCode::AuthFailed,
            message,
            retry_after: None,
        }) => assert_eq!(message, "refused: ERROR_CODE_AUTH_FAILED"),
        other => panic!("expected a login error, got {other:?}"),
    }

    // SERVER_BUSY as an ERROR frame before LOGIN_RESULT, with retry_after.
    let connecting = tokio::spawn(Client::connect(config(&server.addr)));
    let mut peer = server.accept().await;
    peer.send(error_frame(pb::ErrorCode::ServerBusy, 1500))
        .await;
    drop(peer);
    match connecting.await.unwrap() {
        Err(Error::Login {
            code: pb::ErrorCode::ServerBusy,
            retry_after,
            ..
        }) => assert_eq!(retry_after, Some(Duration::from_millis(1500))),
        other => panic!("expected a login error, got {other:?}"),
    }

    // Closed before any answer.
    let connecting = tokio::spawn(Client::connect(config(&server.addr)));
    let mut peer = server.accept().await;
    peer.expect_login().await;
    drop(peer);
    assert!(matches!(connecting.await.unwrap(), Err(Error::Io(_))));
}

#[tokio::test]
async fn pings_when_idle_and_acks_before_the_ping() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.ack_delay = Duration::from_secs(3600);
    cfg.ack_every = 1000;
    let (_client, mut events, mut peer, _) = connect(&server, cfg, 100).await;
    // Idle: PING, answered; PING again.
    assert!(matches!(peer.recv_header().await, Header::Ping(_)));
    peer.send(Frame::new(Header::Pong(pb::Pong {}))).await;
    assert!(matches!(peer.recv_header().await, Header::Ping(_)));
    peer.send(Frame::new(Header::Pong(pb::Pong {}))).await;
    // A processed but unacked downlink is acked right before the next PING.
    peer.send(downlink(1, b"one")).await;
    assert_eq!(next(&mut events).await, message(1, b"one"));
    match peer.recv_header().await {
        Header::DownlinkAck(a) => assert_eq!(a.seq, 1),
        Header::Ping(_) => panic!("PING before the pending ack"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn send_resolves_on_its_uplink_ack() {
    let server = Server::bind().await;
    let (client, _events, mut peer, _) = connect(&server, config(&server.addr), QUIET_HB).await;

    let c = client.clone();
    let sending = tokio::spawn(async move { c.send(3, Bytes::from_static(b"hello")).await });
    let (id, body_type, body) = peer.expect_uplink().await;
    assert_ne!(id, 0);
    assert_eq!((body_type, &body[..]), (3, &b"hello"[..]));
    peer.send(uplink_ack(id, pb::ErrorCode::Ok, 0, "")).await;
    assert_eq!(sending.await.unwrap(), Ok(id));

    // The next fresh id is the next number; a refusal is a Nack with its details.
    let c = client.clone();
    let sending = tokio::spawn(async move { c.send(0, Bytes::from_static(b"no")).await });
    let (id2, _, _) = peer.expect_uplink().await;
    assert_eq!(id2, id + 1);
    peer.send(uplink_ack(
        id2,
        pb::ErrorCode::RateLimited,
        250,
        "slow down",
    ))
    .await;
    assert_eq!(
        sending.await.unwrap(),
        Err(SendError::Nack {
            code: pb::ErrorCode::RateLimited,
            retry_after: Some(Duration::from_millis(250)),
            message: "slow down".into()
        })
    );

    // Acks out of order are matched by msg_id; duplicates are ignored.
    let (c1, c2) = (client.clone(), client.clone());
    let a = tokio::spawn(async move { c1.send_with_id(1000, 0, Bytes::from_static(b"a")).await });
    assert_eq!(peer.expect_uplink().await.0, 1000);
    let b = tokio::spawn(async move { c2.send_with_id(1001, 0, Bytes::from_static(b"b")).await });
    assert_eq!(peer.expect_uplink().await.0, 1001);
    peer.send(uplink_ack(1001, pb::ErrorCode::Rejected, 0, "spam"))
        .await;
    peer.send(uplink_ack(1001, pb::ErrorCode::Ok, 0, "")).await;
    peer.send(uplink_ack(1000, pb::ErrorCode::Ok, 0, "")).await;
    assert_eq!(a.await.unwrap(), Ok(1000));
    assert!(matches!(
        b.await.unwrap(),
        Err(SendError::Nack {
            code: pb::ErrorCode::Rejected,
            ..
        })
    ));

    // A body too large for one frame fails without being sent.
    let big = Bytes::from(vec![0u8; Limits::default().max_frame_len as usize]);
    assert!(matches!(
        client.send(0, big).await,
        Err(SendError::Nack {
            code: pb::ErrorCode::FrameTooLarge,
            ..
        })
    ));
}

#[tokio::test]
async fn unacked_uplink_is_resent_with_the_same_id_after_the_timeout() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.uplink_timeout = Duration::from_millis(50);
    let (client, _events, mut peer, _) = connect(&server, cfg, QUIET_HB).await;
    let sending = tokio::spawn(async move { client.send(0, Bytes::from_static(b"x")).await });
    let first = peer.expect_uplink().await;
    let again = peer.expect_uplink().await;
    assert_eq!(first, again);
    peer.send(uplink_ack(first.0, pb::ErrorCode::Ok, 0, ""))
        .await;
    assert_eq!(sending.await.unwrap(), Ok(first.0));
}

#[tokio::test]
async fn downlinks_are_acked_every_n_and_transients_never() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.ack_every = 3;
    cfg.ack_delay = Duration::from_secs(3600);
    let (client, mut events, mut peer, _) = connect(&server, cfg, QUIET_HB).await;
    for seq in 1..=3 {
        peer.send(downlink(seq, b"m")).await;
    }
    for seq in 1..=3 {
        assert_eq!(next(&mut events).await, message(seq, b"m"));
    }
    match peer.recv_header().await {
        Header::DownlinkAck(a) => assert_eq!(a.seq, 3),
        other => panic!("expected DOWNLINK_ACK(3), got {other:?}"),
    }
    // A transient is delivered but neither acked nor counted.
    peer.send(downlink(0, b"typing")).await;
    assert_eq!(next(&mut events).await, message(0, b"typing"));
    for seq in 4..=6 {
        peer.send(downlink(seq, b"m")).await;
    }
    for seq in 4..=6 {
        assert_eq!(next(&mut events).await, message(seq, b"m"));
    }
    match peer.recv_header().await {
        Header::DownlinkAck(a) => assert_eq!(a.seq, 6),
        other => panic!("expected DOWNLINK_ACK(6), got {other:?}"),
    }
    assert_eq!(client.last_seq(), 6);
}

#[tokio::test]
async fn duplicates_are_dropped_and_gzip_bodies_inflated() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.ack_delay = Duration::from_millis(20);
    let (_client, mut events, mut peer, _) = connect(&server, cfg, QUIET_HB).await;
    peer.send(downlink(1, b"one")).await;
    peer.send(downlink(2, b"two")).await;
    peer.send(downlink(1, b"one again")).await;
    peer.send(downlink(2, b"two again")).await;
    let text = b"a gzip body, a gzip body, a gzip body, a gzip body".repeat(4);
    peer.send(Frame {
        header: Header::Downlink(pb::Downlink {
            seq: 3,
            body_type: 7,
        }),
        gzip: true,
        body: gzip(&text, 6).unwrap().into(),
    })
    .await;
    assert_eq!(next(&mut events).await, message(1, b"one"));
    assert_eq!(next(&mut events).await, message(2, b"two"));
    assert_eq!(
        next(&mut events).await,
        Event::Message {
            seq: 3,
            body_type: 7,
            body: text.into()
        }
    );
    peer.until_ack(3).await;
    // Duplicates of acked seqs are still acked.
    peer.send(downlink(3, b"dup")).await;
    peer.until_ack(3).await;
    peer.send(downlink(4, b"four")).await;
    assert_eq!(next(&mut events).await, message(4, b"four"));
    peer.until_ack(4).await;
}

#[tokio::test]
async fn batch_frames_are_unpacked_in_order() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.ack_delay = Duration::from_millis(10);
    let (_client, mut events, mut peer, _) = connect(&server, cfg, QUIET_HB).await;
    let opts = CompressOptions {
        threshold: 0,
        level: 6,
    };
    let limits = Limits::default();
    let frames: Vec<Frame> = vec![
        downlink(1, b"b1"),
        downlink(2, b"b2"),
        downlink(0, b"presence"),
        downlink(3, b"b3"),
    ];
    let batch = encode_batch(&frames, &opts, &limits).unwrap();
    assert!(batch.gzip);
    peer.send(batch).await;
    assert_eq!(next(&mut events).await, message(1, b"b1"));
    assert_eq!(next(&mut events).await, message(2, b"b2"));
    assert_eq!(next(&mut events).await, message(0, b"presence"));
    assert_eq!(next(&mut events).await, message(3, b"b3"));
    peer.until_ack(3).await;
    // An overlapping replay: only the new one comes through.
    let replay = encode_batch(
        &[downlink(2, b"b2"), downlink(3, b"b3"), downlink(4, b"b4")],
        &opts,
        &limits,
    )
    .unwrap();
    peer.send(replay).await;
    assert_eq!(next(&mut events).await, message(4, b"b4"));
    peer.until_ack(4).await;
}

#[tokio::test]
async fn a_burst_larger_than_the_event_channel_arrives_complete() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.ack_delay = Duration::from_millis(10);
    let (_client, mut events, mut peer, _) = connect(&server, cfg, QUIET_HB).await;
    let n = tether_client::EVENT_CHANNEL_CAPACITY as u64 * 2 + 100;
    // Written while nobody reads the events: the client must stop and resume reading.
    let writer = tokio::spawn(async move {
        for seq in 1..=n {
            peer.send(downlink(seq, b"burst")).await;
        }
        peer
    });
    for seq in 1..=n {
        assert_eq!(next(&mut events).await, message(seq, b"burst"));
    }
    let mut peer = writer.await.unwrap();
    peer.until_ack(n).await;
}

#[tokio::test]
async fn reconnects_with_resume_and_resends_the_unacked_uplink() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.ack_delay = Duration::from_millis(10);
    let (client, mut events, mut peer, _) = connect(&server, cfg, QUIET_HB).await;
    peer.send(downlink(1, b"one")).await;
    peer.send(downlink(2, b"two")).await;
    assert_eq!(next(&mut events).await, message(1, b"one"));
    assert_eq!(next(&mut events).await, message(2, b"two"));
    peer.until_ack(2).await;
    let c = client.clone();
    let sending = tokio::spawn(async move { c.send(5, Bytes::from_static(b"pending")).await });
    let uplink = peer.expect_uplink().await;

    // The gateway goes away without answering.
    drop(peer);
    assert_eq!(next(&mut events).await, Event::Offline { code: None });
    let mut peer = server.accept().await;
    let login = peer.expect_login().await;
    let resume = login.resume.expect("a reconnect resumes");
    assert_eq!(&resume.session_id[..], &SID[..]);
    assert_eq!(resume.last_seq, 2);
    peer.login_ok(SID, QUIET_HB, true).await;
    // The pending uplink is resent first, same msg_id, same body.
    assert_eq!(peer.expect_uplink().await, uplink);
    peer.send(uplink_ack(uplink.0, pb::ErrorCode::Ok, 0, ""))
        .await;
    assert_eq!(sending.await.unwrap(), Ok(uplink.0));
    assert_eq!(
        next(&mut events).await,
        Event::Online {
            session_id: SID,
            resumed: true,
            gap: None
        }
    );
    assert!(client.is_online());
    // Replay overlapping what was processed: only seq 3 is new.
    peer.send(downlink(2, b"two")).await;
    peer.send(downlink(3, b"three")).await;
    assert_eq!(next(&mut events).await, message(3, b"three"));
    peer.until_ack(3).await;
}

#[tokio::test]
async fn drop_connection_reconnects_and_a_new_session_restarts_numbering() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.ack_delay = Duration::from_millis(10);
    let (client, mut events, mut peer, _) = connect(&server, cfg, QUIET_HB).await;
    peer.send(downlink(1, b"one")).await;
    peer.send(downlink(2, b"two")).await;
    assert_eq!(next(&mut events).await, message(1, b"one"));
    assert_eq!(next(&mut events).await, message(2, b"two"));
    peer.until_ack(2).await;
    let c = client.clone();
    let sending =
        tokio::spawn(async move { c.send_with_id(77, 0, Bytes::from_static(b"p")).await });
    assert_eq!(peer.expect_uplink().await.0, 77);

    client.drop_connection();
    peer.expect_eof().await;
    assert_eq!(next(&mut events).await, Event::Offline { code: None });
    let mut peer = server.accept().await;
    let login = peer.expect_login().await;
    assert_eq!(login.resume.map(|r| r.last_seq), Some(2));
    // The gateway does not honour the resume: a new session.
    peer.login_ok(SID2, QUIET_HB, false).await;
    assert_eq!(
        next(&mut events).await,
        Event::Online {
            session_id: SID2,
            resumed: false,
            gap: None
        }
    );
    // Pending uplinks are still resent.
    assert_eq!(peer.expect_uplink().await.0, 77);
    peer.send(uplink_ack(77, pb::ErrorCode::Ok, 0, "")).await;
    assert_eq!(sending.await.unwrap(), Ok(77));
    assert_eq!(client.session_id(), Some(SID2));
    assert_eq!(client.last_seq(), 0);
    // Numbering restarts at 1, which is not a duplicate.
    peer.send(downlink(1, b"new one")).await;
    assert_eq!(next(&mut events).await, message(1, b"new one"));
    peer.until_ack(1).await;
    assert_eq!(client.last_seq(), 1);
}

#[tokio::test]
async fn resume_with_an_announced_gap() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.ack_delay = Duration::from_millis(10);
    let (client, mut events, mut peer, _) = connect(&server, cfg, QUIET_HB).await;
    peer.send(downlink(1, b"one")).await;
    assert_eq!(next(&mut events).await, message(1, b"one"));
    peer.until_ack(1).await;
    drop(peer);
    assert_eq!(next(&mut events).await, Event::Offline { code: None });
    let mut peer = server.accept().await;
    peer.expect_login().await;
    let mut result = login_result(SID, QUIET_HB, true);
    if let Header::LoginResult(r) = &mut result.header {
        r.gap_from = 2;
        r.gap_to = 4;
    }
    peer.send(result).await;
    assert_eq!(
        next(&mut events).await,
        Event::Online {
            session_id: SID,
            resumed: true,
            gap: Some((2, 4))
        }
    );
    peer.send(downlink(5, b"five")).await;
    assert_eq!(next(&mut events).await, message(5, b"five"));
    peer.until_ack(5).await;
    assert_eq!(client.last_seq(), 5);
}

#[tokio::test]
async fn kick_is_terminal() {
    let server = Server::bind().await;
    let (client, mut events, mut peer, _) = connect(&server, config(&server.addr), QUIET_HB).await;
    let c = client.clone();
    let sending = tokio::spawn(async move { c.send(0, Bytes::from_static(b"late")).await });
    peer.expect_uplink().await;
    peer.send(Frame::new(Header::Kick(Box::new(pb::Kick {
        reason: pb::KickReason::LoggedInElsewhere as i32,
        message: "another phone".into(),
    }))))
    .await;
    drop(peer);
    assert_eq!(
        next(&mut events).await,
        Event::Kicked {
            reason: pb::KickReason::LoggedInElsewhere,
            message: "another phone".into()
        }
    );
    // The stream ends: the task is gone, so no reconnect can follow.
    assert_eq!(next_or_end(&mut events).await, None);
    assert_eq!(sending.await.unwrap(), Err(SendError::Closed));
    assert_eq!(
        client.send(0, Bytes::from_static(b"x")).await,
        Err(SendError::Closed)
    );
    assert!(client.join_room("r").await.unwrap_err().is_closed());
    assert!(!client.is_online());
    client.close().await; // a no-op now
}

#[tokio::test]
async fn goaway_reconnects_with_resume_and_holds_new_uplinks() {
    let server = Server::bind().await;
    let (client, mut events, mut peer, _) = connect(&server, config(&server.addr), QUIET_HB).await;
    peer.send(Frame::new(Header::GoAway(Box::new(pb::GoAway {
        reconnect_delay_ms: 30,
        reason: "restart".into(),
        alternatives: vec![],
    }))))
    .await;
    assert_eq!(
        next(&mut events).await,
        Event::GoAway {
            reconnect_delay: Duration::from_millis(30)
        }
    );
    // Sent after the GOAWAY: not on the draining connection.
    let c = client.clone();
    let sending = tokio::spawn(async move { c.send(0, Bytes::from_static(b"held")).await });
    // The client closes the drained connection itself (the fake gateway does not).
    peer.expect_eof().await;
    assert_eq!(next(&mut events).await, Event::Offline { code: None });
    let mut peer = server.accept().await;
    let login = peer.expect_login().await;
    assert_eq!(
        login.resume.map(|r| r.session_id),
        Some(Bytes::copy_from_slice(&SID))
    );
    peer.login_ok(SID, QUIET_HB, true).await;
    let (id, _, body) = peer.expect_uplink().await;
    assert_eq!(&body[..], b"held");
    peer.send(uplink_ack(id, pb::ErrorCode::Ok, 0, "")).await;
    assert_eq!(sending.await.unwrap(), Ok(id));
    assert_eq!(
        next(&mut events).await,
        Event::Online {
            session_id: SID,
            resumed: true,
            gap: None
        }
    );
}

#[tokio::test]
async fn error_frame_reports_its_code_then_reconnects() {
    let server = Server::bind().await;
    let (_client, mut events, mut peer, _) = connect(&server, config(&server.addr), QUIET_HB).await;
    peer.send(error_frame(pb::ErrorCode::SlowConsumer, 0)).await;
    drop(peer);
    assert_eq!(
        next(&mut events).await,
        Event::Offline {
            code: Some(pb::ErrorCode::SlowConsumer)
        }
    );
    let mut peer = server.accept().await;
    assert!(peer.expect_login().await.resume.is_some());
    peer.login_ok(SID, QUIET_HB, true).await;
    assert!(matches!(
        next(&mut events).await,
        Event::Online { resumed: true, .. }
    ));
}

#[tokio::test]
async fn busy_on_reconnect_is_retried_and_auth_failure_closes() {
    let server = Server::bind().await;
    let (_client, mut events, peer, _) = connect(&server, config(&server.addr), QUIET_HB).await;
    drop(peer);
    assert_eq!(next(&mut events).await, Event::Offline { code: None });
    // Busy: retried after retry_after.
    let mut peer = server.accept().await;
    peer.expect_login().await;
    peer.send(login_refused(pb::ErrorCode::ServerBusy, 20))
        .await;
    drop(peer);
    let mut peer = server.accept().await;
    peer.expect_login().await;
    peer.send(login_refused(pb::ErrorCode::Draining, 0)).await;
    drop(peer);
    // Token no longer good: terminal.
    let mut peer = server.accept().await;
    peer.expect_login().await;
    peer.send(login_refused(pb::ErrorCode::TokenExpired, 0))
        .await;
    drop(peer);
    assert_eq!(
        next(&mut events).await,
        Event::Closed {
            code: Some(pb::ErrorCode::TokenExpired)
        }
    );
    assert_eq!(next_or_end(&mut events).await, None);
}

#[tokio::test]
async fn close_acks_and_ends_the_event_stream() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.ack_delay = Duration::from_secs(3600);
    let (client, mut events, mut peer, _) = connect(&server, cfg, QUIET_HB).await;
    peer.send(downlink(1, b"one")).await;
    assert_eq!(next(&mut events).await, message(1, b"one"));
    let c = client.clone();
    let sending = tokio::spawn(async move { c.send(0, Bytes::from_static(b"never acked")).await });
    peer.expect_uplink().await;
    timeout(GUARD, client.close()).await.unwrap();
    // The pending ack goes out before the connection closes.
    match peer.recv_header().await {
        Header::DownlinkAck(a) => assert_eq!(a.seq, 1),
        other => panic!("expected the final ack, got {other:?}"),
    }
    peer.expect_eof().await;
    assert_eq!(next(&mut events).await, Event::Closed { code: None });
    assert_eq!(next_or_end(&mut events).await, None);
    assert_eq!(sending.await.unwrap(), Err(SendError::Closed));
    assert_eq!(
        client.send(0, Bytes::from_static(b"x")).await,
        Err(SendError::Closed)
    );
}

#[tokio::test]
async fn dropping_every_handle_closes() {
    let server = Server::bind().await;
    let (client, mut events, mut peer, _) = connect(&server, config(&server.addr), QUIET_HB).await;
    drop(client);
    peer.expect_eof().await;
    assert_eq!(next(&mut events).await, Event::Closed { code: None });
    assert_eq!(next_or_end(&mut events).await, None);
}

#[tokio::test]
async fn without_reconnect_a_loss_is_terminal() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.reconnect = false;
    let (_client, mut events, peer, _) = connect(&server, cfg, QUIET_HB).await;
    drop(peer);
    assert_eq!(next(&mut events).await, Event::Offline { code: None });
    assert_eq!(next(&mut events).await, Event::Closed { code: None });
    assert_eq!(next_or_end(&mut events).await, None);
}

#[tokio::test]
async fn rooms_join_and_leave() {
    let server = Server::bind().await;
    let (client, _events, mut peer, _) = connect(&server, config(&server.addr), QUIET_HB).await;
    let c = client.clone();
    let joining = tokio::spawn(async move { c.join_room("lobby").await });
    let join = match peer.recv_header().await {
        Header::RoomJoin(j) => *j,
        other => panic!("expected ROOM_JOIN, got {other:?}"),
    };
    assert_eq!(join.room_id, "lobby");
    peer.send(Frame::new(Header::RoomResult(Box::new(pb::RoomResult {
        request_id: join.request_id,
        room_id: "lobby".into(),
        code: pb::ErrorCode::Ok as i32,
        message: String::new(),
    }))))
    .await;
    assert_eq!(joining.await.unwrap(), Ok(()));

    let c = client.clone();
    let leaving = tokio::spawn(async move { c.leave_room("nowhere").await });
    let leave = match peer.recv_header().await {
        Header::RoomLeave(l) => *l,
        other => panic!("expected ROOM_LEAVE, got {other:?}"),
    };
    assert_ne!(leave.request_id, join.request_id);
    peer.send(Frame::new(Header::RoomResult(Box::new(pb::RoomResult {
        request_id: leave.request_id,
        room_id: "nowhere".into(),
        code: pb::ErrorCode::RoomNotFound as i32,
        message: "no such room".into(),
    }))))
    .await;
    assert_eq!(
        leaving.await.unwrap(),
        Err(RoomError {
            code: pb::ErrorCode::RoomNotFound,
            message: "no such room".into()
        })
    );

    // A new session (resume refused) joins the joined room again by itself.
    client.drop_connection();
    peer.expect_eof().await;
    let mut peer = server.accept().await;
    peer.expect_login().await;
    peer.login_ok(SID2, QUIET_HB, false).await;
    match peer.recv_header().await {
        Header::RoomJoin(j) => assert_eq!(j.room_id, "lobby"),
        other => panic!("expected the re-join, got {other:?}"),
    }
}

#[tokio::test]
async fn a_broken_frame_gets_an_error_and_a_reconnect() {
    let server = Server::bind().await;
    let (_client, mut events, mut peer, _) = connect(&server, config(&server.addr), QUIET_HB).await;
    // Byte 4 is not the magic.
    peer.send_raw(&[0, 0, 0, 6, 0x00, 1, 0, 4, 0, 0]).await;
    match peer.recv_header().await {
        Header::Error(e) => assert_eq!(e.code, pb::ErrorCode::BadMagic as i32),
        other => panic!("expected ERROR, got {other:?}"),
    }
    peer.expect_eof().await;
    assert_eq!(next(&mut events).await, Event::Offline { code: None });
    let mut peer = server.accept().await;
    peer.expect_login().await;
    peer.login_ok(SID, QUIET_HB, true).await;
    assert!(matches!(next(&mut events).await, Event::Online { .. }));

    // A gzip body that does not inflate: ERROR, no ack, and the frame comes again.
    peer.send(Frame {
        header: Header::Downlink(pb::Downlink {
            seq: 1,
            body_type: 0,
        }),
        gzip: true,
        body: Bytes::from_static(b"not gzip at all"),
    })
    .await;
    match peer.recv_header().await {
        Header::Error(e) => assert_eq!(e.code, pb::ErrorCode::DecompressionFailed as i32),
        other => panic!("expected ERROR, got {other:?}"),
    }
    peer.expect_eof().await;
    assert_eq!(next(&mut events).await, Event::Offline { code: None });
    let mut peer = server.accept().await;
    assert_eq!(
        peer.expect_login().await.resume.map(|r| r.last_seq),
        Some(0)
    );
    peer.login_ok(SID, QUIET_HB, true).await;
    assert!(matches!(next(&mut events).await, Event::Online { .. }));

    // A kind a gateway must not send.
    peer.send(Frame::new(Header::Ping(pb::Ping {}))).await;
    match peer.recv_header().await {
        Header::Error(e) => assert_eq!(e.code, pb::ErrorCode::UnexpectedKind as i32),
        other => panic!("expected ERROR, got {other:?}"),
    }
    peer.expect_eof().await;
}

#[tokio::test]
async fn sends_while_offline_wait_for_the_reconnect() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.backoff_initial = Duration::from_millis(200);
    cfg.backoff_max = Duration::from_millis(200);
    let (client, mut events, peer, _) = connect(&server, cfg, QUIET_HB).await;
    drop(peer);
    assert_eq!(next(&mut events).await, Event::Offline { code: None });
    let mut ids = Vec::new();
    let mut sends = Vec::new();
    for i in 0..3u64 {
        let c = client.clone();
        ids.push(1_000 + i);
        sends.push(tokio::spawn(async move {
            c.send_with_id(1_000 + i, 0, Bytes::from_static(b"q")).await
        }));
    }
    let mut peer = server.accept().await;
    peer.expect_login().await;
    peer.login_ok(SID, QUIET_HB, true).await;
    for id in &ids {
        assert_eq!(peer.expect_uplink().await.0, *id, "resent in msg_id order");
        peer.send(uplink_ack(*id, pb::ErrorCode::Ok, 0, "")).await;
    }
    for (s, id) in sends.into_iter().zip(ids) {
        assert_eq!(s.await.unwrap(), Ok(id));
    }
}

#[tokio::test]
async fn connects_from_the_configured_local_address() {
    let server = Server::bind().await;
    let mut cfg = config(&server.addr);
    cfg.local_addr = Some("127.0.0.7".parse().unwrap());
    let connecting = tokio::spawn(Client::connect(cfg));
    let tcp = server.accept_tcp().await;
    assert_eq!(
        tcp.peer_addr().unwrap().ip(),
        "127.0.0.7".parse::<std::net::IpAddr>().unwrap()
    );
    drop(tcp);
    assert!(connecting.await.unwrap().is_err());

    // An address family the gateway's address does not have is an error, not a hang.
    let mut cfg = config(&server.addr);
    cfg.local_addr = Some("::1".parse().unwrap());
    match Client::connect(cfg).await {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::AddrNotAvailable),
        other => panic!("expected an address error, got {other:?}"),
    }
}

#[derive(Default)]
struct Rtts(std::sync::Mutex<Vec<Duration>>);

impl tether_client::Observer for Rtts {
    fn heartbeat_rtt(&self, rtt: Duration) {
        self.0.lock().unwrap().push(rtt);
    }
}

#[tokio::test]
async fn a_forced_heartbeat_interval_wins_and_pongs_are_timed() {
    let server = Server::bind().await;
    let rtts = std::sync::Arc::new(Rtts::default());
    let mut cfg = config(&server.addr);
    cfg.heartbeat_interval = Some(Duration::from_millis(50));
    cfg.observer = Some(rtts.clone());
    // The gateway says a minute; the configured 50 ms wins.
    let (_client, _events, mut peer, _) = connect(&server, cfg, QUIET_HB).await;
    let waited = std::time::Instant::now();
    assert!(matches!(peer.recv_header().await, Header::Ping(_)));
    assert!(waited.elapsed() < Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(30)).await;
    peer.send(Frame::new(Header::Pong(pb::Pong {}))).await;
    assert!(matches!(peer.recv_header().await, Header::Ping(_)));
    peer.send(Frame::new(Header::Pong(pb::Pong {}))).await;
    // A PONG with no PING outstanding is not timed.
    peer.send(Frame::new(Header::Pong(pb::Pong {}))).await;
    assert!(matches!(peer.recv_header().await, Header::Ping(_)));
    let rtts = rtts.0.lock().unwrap().clone();
    assert_eq!(rtts.len(), 2, "{rtts:?}");
    assert!(rtts[0] >= Duration::from_millis(30), "{rtts:?}");
}
