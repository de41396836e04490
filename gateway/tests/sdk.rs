//! The gateway with the real client SDK: exactly-once delivery across cut connections,
//! chat over TLS, the admin push endpoint, kicks.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use tether_client::{Client, Config as ClientConfig, Event, TlsConfig};
use tether_gateway::node::{Push, Target};
use tether_protocol::pb;

fn client_config(addr: std::net::SocketAddr, user: &str, device: &str) -> ClientConfig {
    let mut c = ClientConfig::new(addr.to_string(), user, device, token(user, device));
    c.backoff_initial = Duration::from_millis(5);
    c.backoff_max = Duration::from_millis(50);
    c.ack_delay = Duration::from_millis(5);
    c
}

/// The next event that is not Online/Offline, within the guard.
async fn next_message(ev: &mut tether_client::Events) -> (u64, bytes::Bytes) {
    loop {
        match tokio::time::timeout(GUARD, ev.next())
            .await
            .expect("an event within the guard")
        {
            Some(Event::Message { seq, body, .. }) => return (seq, body),
            Some(Event::Online { gap, .. }) => assert_eq!(gap, None, "no gap announced"),
            Some(Event::Offline { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_downlinks_across_cut_connections_arrive_once_each_in_order() {
    let g = start(|c| {
        c.max_unacked_frames = 20_000;
        c.max_unacked_bytes = 64 << 20;
        c.replay_batch_min = 16;
    });
    let (client, mut ev) = Client::connect(client_config(g.addrs()[0], "bob", "phone"))
        .await
        .unwrap();
    let target = Target::User("bob".into());
    const N: u64 = 10_000;
    let mut got = Vec::with_capacity(N as usize);
    let mut cuts = 0;
    for chunk in 0..10u64 {
        // Push a chunk, cut the connection while it is on its way, push more while the
        // client is reconnecting, then read.
        for i in chunk * 1000..chunk * 1000 + 700 {
            g.node().push(&target, &Push::new(0, format!("m{}", i + 1)));
        }
        if chunk % 2 == 0 {
            client.drop_connection();
            cuts += 1;
        }
        for i in chunk * 1000 + 700..(chunk + 1) * 1000 {
            g.node().push(&target, &Push::new(0, format!("m{}", i + 1)));
        }
        while (got.len() as u64) < (chunk + 1) * 1000 {
            let (seq, body) = next_message(&mut ev).await;
            assert_eq!(std::str::from_utf8(&body).unwrap(), format!("m{seq}"));
            got.push(seq);
        }
    }
    assert_eq!(got, (1..=N).collect::<Vec<_>>(), "every seq once, in order");
    assert_eq!(cuts, 5);
    let m = g.node().metrics.encode();
    assert!(
        m.contains("tether_resumes_total{outcome=\"resumed\"} 5"),
        "{m}"
    );
    client.close().await;
}

fn tls_files() -> (String, String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("tether-tls-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (
        cert.to_string_lossy().into(),
        key.to_string_lossy().into(),
        ck.cert.pem(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_chat_over_tls_beside_a_plain_listener() {
    let (cert, key, pem) = tls_files();
    let g = start(|c| {
        c.tls_listen = vec!["127.0.0.1:0".into()];
        c.tls_cert = cert;
        c.tls_key = key;
    });
    let mut tls = client_config(g.tls_addrs()[0], "alice", "phone");
    tls.tls = Some(TlsConfig::with_root_pem("localhost", pem.as_bytes()).unwrap());
    let (alice, mut alice_ev) = Client::connect(tls).await.unwrap();
    let (bob, mut bob_ev) = Client::connect(client_config(g.addrs()[0], "bob", "phone"))
        .await
        .unwrap();
    alice
        .send(0, chat_to_user("bob", "over tls"))
        .await
        .unwrap();
    let (seq, body) = next_message(&mut bob_ev).await;
    assert_eq!((seq, text_of(&body)), (1, "over tls".into()));
    // A long message (gzip on the way down) back over TLS.
    let long = "x".repeat(20_000);
    bob.send(0, chat_to_user("alice", &long)).await.unwrap();
    let (_, body) = next_message(&mut alice_ev).await;
    assert_eq!(text_of(&body), long);
    // A TLS handshake that fails (plain bytes on the TLS port) is counted and closed, and
    // nobody else notices.
    let mut garbage = std::net::TcpStream::connect(g.tls_addrs()[0]).unwrap();
    garbage.set_read_timeout(Some(GUARD)).unwrap();
    garbage
        .write_all(b"\x00\x00\x00\x06\xf7\x01\x00\x03\x00\x00")
        .unwrap();
    let mut buf = [0u8; 64];
    while matches!(garbage.read(&mut buf), Ok(n) if n > 0) {}
    assert!(g
        .node()
        .metrics
        .encode()
        .contains("tether_tls_handshake_failures_total 1"));
    alice
        .send(0, chat_to_user("bob", "still here"))
        .await
        .unwrap();
    assert_eq!(text_of(&next_message(&mut bob_ev).await.1), "still here");
}

/// An admin request with the token; (status, body).
fn admin(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let r = http(addr, method, path, Some(ADMIN_TOKEN), body);
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_push_endpoint_delivers_and_counts() {
    let g = start(|c| c.admin_token_file = admin_token_file());
    let admin_addr = g.admin_addr().unwrap();
    let (_bob, mut bob_ev) = Client::connect(client_config(g.addrs()[0], "bob", "phone"))
        .await
        .unwrap();
    let (_bob2, mut bob2_ev) = Client::connect(client_config(g.addrs()[0], "bob", "tablet"))
        .await
        .unwrap();
    let (status, body) = admin(
        admin_addr,
        "POST",
        "/push",
        r#"{"target":{"user":"bob"},"text":"from ops"}"#,
    );
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            r#"{"delivered":2,"held":0,"refused":0,"refused_full":0,"sent":2}"#
        )
    );
    for ev in [&mut bob_ev, &mut bob2_ev] {
        let (_, body) = next_message(ev).await;
        assert_eq!(text_of(&body), "from ops");
    }
    let (status, body) = admin(
        admin_addr,
        "POST",
        "/push",
        r#"{"target":"all","body_type":7,"body_base64":"aGk="}"#,
    );
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            r#"{"delivered":2,"held":0,"refused":0,"refused_full":0,"sent":2}"#
        )
    );
    assert_eq!(&next_message(&mut bob_ev).await.1[..], b"hi");
    let (status, _) = admin(
        admin_addr,
        "POST",
        "/push",
        r#"{"target":{"nobody":1},"text":"x"}"#,
    );
    assert_eq!(status, 400);
    let (status, body) = admin(admin_addr, "GET", "/users/bob/sessions", "");
    assert_eq!(status, 200);
    assert_eq!(body.matches("session_id").count(), 2, "{body}");
    let (status, body) = admin(admin_addr, "GET", "/online", "");
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"connections":2,"sessions":2}"#)
    );
    let (status, body) = admin(admin_addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(body.contains("tether_connections 2"), "{body}");
    assert_eq!(admin(admin_addr, "GET", "/readyz", "").0, 200);
    assert_eq!(admin(admin_addr, "POST", "/drain", "").0, 202);
    assert_eq!(admin(admin_addr, "GET", "/readyz", "").0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kicked_client_does_not_reconnect() {
    let g = start(|_| {});
    let (first, mut first_ev) = Client::connect(client_config(g.addrs()[0], "alice", "phone"))
        .await
        .unwrap();
    let (_second, _second_ev) = Client::connect(client_config(g.addrs()[0], "alice", "phone"))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(GUARD, first_ev.next()).await.unwrap() {
            Some(Event::Kicked { reason, .. }) => {
                assert_eq!(reason, pb::KickReason::LoggedInElsewhere);
                break;
            }
            Some(Event::Online { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(first.send(0, chat_to_user("x", "y")).await.is_err());
    assert_eq!(g.node().user_sessions("alice").len(), 1);
}

#[test]
fn a_tls_handshake_that_does_not_finish_in_time_is_closed() {
    let (cert, key, _) = tls_files();
    let g = start(|c| {
        c.tls_listen = vec!["127.0.0.1:0".into()];
        c.tls_cert = cert;
        c.tls_key = key;
        c.tls_handshake_timeout_secs = 3;
        c.login_timeout_secs = 60;
    });
    let mut s = std::net::TcpStream::connect(g.tls_addrs()[0]).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    eventually(|| g.node().connections() == 1);
    g.advance_clock(3);
    let mut buf = [0u8; 64];
    assert_eq!(
        s.read(&mut buf).unwrap(),
        0,
        "closed without a word (no TLS to speak in)"
    );
    eventually(|| g.node().connections() == 0);
    assert!(g
        .node()
        .metrics
        .encode()
        .contains("tether_tls_handshake_failures_total 1"));
}
