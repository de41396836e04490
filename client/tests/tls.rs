//! Login over TLS against a rustls server with an rcgen self-signed certificate.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tether_client::{pb, Client, Error, Event, TlsConfig};

struct SelfSigned {
    cert_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
}

fn self_signed(name: &str) -> SelfSigned {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    SelfSigned {
        cert_pem: ck.cert.pem(),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    }
}

#[tokio::test]
async fn login_and_send_over_tls() {
    let ss = self_signed("localhost");
    let server = Server::bind_tls(ss.acceptor).await;
    let mut cfg = config(&server.addr);
    cfg.tls = Some(TlsConfig::with_root_pem("localhost", ss.cert_pem.as_bytes()).unwrap());
    let (client, mut events, mut peer, login) = connect(&server, cfg, QUIET_HB).await;
    assert_eq!(login.user_id, "alice");
    let c = client.clone();
    let sending = tokio::spawn(async move { c.send(0, Bytes::from_static(b"secret")).await });
    let (id, _, body) = peer.expect_uplink().await;
    assert_eq!(&body[..], b"secret");
    peer.send(uplink_ack(id, pb::ErrorCode::Ok, 0, "")).await;
    assert_eq!(sending.await.unwrap(), Ok(id));
    peer.send(downlink(1, b"over tls")).await;
    assert_eq!(next(&mut events).await, message(1, b"over tls"));

    // Reconnects go over TLS too, with resume.
    drop(peer);
    assert_eq!(next(&mut events).await, Event::Offline { code: None });
    let mut peer = server.accept().await;
    assert!(peer.expect_login().await.resume.is_some());
    peer.login_ok(SID, QUIET_HB, true).await;
    assert!(matches!(
        next(&mut events).await,
        Event::Online { resumed: true, .. }
    ));
}

#[tokio::test]
async fn an_untrusted_certificate_fails_the_connect() {
    let served = self_signed("localhost");
    let other = self_signed("localhost");
    let server = Server::bind().await; // plain accept: the handshake runs on the client only
    let mut cfg = config(&server.addr);
    cfg.tls = Some(TlsConfig::with_root_pem("localhost", other.cert_pem.as_bytes()).unwrap());
    let connecting = tokio::spawn(Client::connect(cfg));
    let tcp = server.accept_tcp().await;
    let acceptor = served.acceptor;
    // The server side fails too once the client aborts; ignore its result.
    let _ = tokio::time::timeout(GUARD, acceptor.accept(tcp)).await;
    match connecting.await.unwrap() {
        Err(Error::Tls(msg)) => assert!(!msg.is_empty()),
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[test]
fn bad_pem_is_an_error() {
    assert!(matches!(
        TlsConfig::with_root_pem("localhost", b"not a pem"),
        Err(Error::Tls(_))
    ));
}
