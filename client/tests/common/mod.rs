//! A scripted fake gateway on a loopback socket: it reads exactly what the client sends
//! and answers what the test tells it to. Every wait is bounded by [`GUARD`], only as a
//! failure guard.

#![allow(dead_code)]

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tether_client::{pb, Client, Config, Event, Events};
use tether_codec::{Frame, Header, TetherCodec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::codec::Decoder as _;

/// How long any single step may take before the test fails.
pub const GUARD: Duration = Duration::from_secs(5);

pub const SID: [u8; 16] = [7; 16];
pub const SID2: [u8; 16] = [9; 16];

/// A heartbeat long enough that no PING shows up in tests that do not want one.
pub const QUIET_HB: u32 = 60_000;

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub struct Server {
    listener: TcpListener,
    pub addr: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Server {
    pub async fn bind() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        Server {
            listener,
            addr,
            tls: None,
        }
    }

    pub async fn bind_tls(acceptor: tokio_rustls::TlsAcceptor) -> Server {
        let mut s = Server::bind().await;
        s.tls = Some(acceptor);
        s
    }

    /// The next TCP connection, nothing done on it.
    pub async fn accept_tcp(&self) -> tokio::net::TcpStream {
        timeout(GUARD, self.listener.accept())
            .await
            .expect("the client did not connect in time")
            .unwrap()
            .0
    }

    /// The next connection (TLS-accepted when the server is TLS).
    pub async fn accept(&self) -> Peer {
        let (tcp, _) = timeout(GUARD, self.listener.accept())
            .await
            .expect("the client did not connect in time")
            .unwrap();
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(acceptor) => Box::new(
                timeout(GUARD, acceptor.accept(tcp))
                    .await
                    .expect("TLS handshake timed out")
                    .expect("TLS handshake failed"),
            ),
        };
        Peer {
            io,
            rbuf: BytesMut::new(),
            codec: TetherCodec::default(),
        }
    }
}

/// The server's side of one connection.
pub struct Peer {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    codec: TetherCodec,
}

impl Peer {
    /// The next frame, or `None` when the client closed the connection.
    pub async fn recv_or_eof(&mut self) -> Option<Frame> {
        timeout(GUARD, async {
            loop {
                if let Some(f) = self.codec.decode(&mut self.rbuf).unwrap() {
                    return Some(f);
                }
                match self.io.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => {
                        assert!(self.rbuf.is_empty(), "the client left a partial frame");
                        return None;
                    }
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("no frame from the client in time")
    }

    /// The next frame; fails the test on EOF.
    pub async fn recv(&mut self) -> Frame {
        self.recv_or_eof()
            .await
            .expect("the client closed the connection")
    }

    /// The next frame's header.
    pub async fn recv_header(&mut self) -> Header {
        self.recv().await.header
    }

    pub async fn expect_eof(&mut self) {
        if let Some(f) = self.recv_or_eof().await {
            panic!("expected the client to close, got {f:?}");
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf, &Default::default()).unwrap();
        self.send_raw(&buf).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        // The client may already have gone (tests of closing); that is not an error here.
        let _ = self.io.write_all(bytes).await;
        let _ = self.io.flush().await;
    }

    pub async fn expect_login(&mut self) -> pb::Login {
        match self.recv_header().await {
            Header::Login(l) => *l,
            other => panic!("expected LOGIN, got {other:?}"),
        }
    }

    pub async fn login_ok(&mut self, sid: [u8; 16], heartbeat_ms: u32, resumed: bool) {
        self.send(login_result(sid, heartbeat_ms, resumed)).await;
    }

    /// Reads frames until a DOWNLINK_ACK with `seq`; every ack on the way must be lower.
    /// Returns the other frames seen.
    pub async fn until_ack(&mut self, seq: u64) -> Vec<Frame> {
        let mut others = Vec::new();
        loop {
            let f = self.recv().await;
            match f.header {
                Header::DownlinkAck(a) if a.seq == seq => return others,
                Header::DownlinkAck(a) => assert!(a.seq < seq, "ack {} past {seq}", a.seq),
                _ => others.push(f),
            }
        }
    }

    /// Reads the next UPLINK, returning (msg_id, body_type, body).
    pub async fn expect_uplink(&mut self) -> (u64, u32, Bytes) {
        let f = self.recv().await;
        match f.header {
            Header::Uplink(u) => (u.msg_id, u.body_type, f.body),
            other => panic!("expected UPLINK, got {other:?}"),
        }
    }
}

pub fn login_result(sid: [u8; 16], heartbeat_ms: u32, resumed: bool) -> Frame {
    Frame::new(Header::LoginResult(Box::new(pb::LoginResult {
        code: pb::ErrorCode::Ok as i32,
        session_id: Bytes::copy_from_slice(&sid),
        heartbeat_interval_ms: heartbeat_ms,
        server_id: "fake-1".into(),
        server_time_ms: 1,
        resumed,
        ..Default::default()
    })))
}

pub fn login_refused(code: pb::ErrorCode, retry_after_ms: u32) -> Frame {
    Frame::new(Header::LoginResult(Box::new(pb::LoginResult {
        code: code as i32,
        message: format!("refused: {}", code.as_str_name()),
        retry_after_ms,
        ..Default::default()
    })))
}

pub fn downlink(seq: u64, body: &'static [u8]) -> Frame {
    Frame::with_body(
        Header::Downlink(pb::Downlink { seq, body_type: 0 }),
        Bytes::from_static(body),
    )
}

pub fn uplink_ack(msg_id: u64, code: pb::ErrorCode, retry_after_ms: u32, message: &str) -> Frame {
    Frame::new(Header::UplinkAck(pb::UplinkAck {
        msg_id,
        code: code as i32,
        retry_after_ms,
        message: message.into(),
    }))
}

pub fn error_frame(code: pb::ErrorCode, retry_after_ms: u32) -> Frame {
    Frame::new(Header::Error(Box::new(pb::Error {
        code: code as i32,
        message: "from the fake gateway".into(),
        retry_after_ms,
        ..Default::default()
    })))
}

/// A test configuration: tiny backoff, long ack delay unless a test shortens it.
pub fn config(addr: &str) -> Config {
    let mut c = Config::new(addr, "alice", "phone-1", "token-abc");
    c.backoff_initial = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(20);
    c.connect_timeout = Duration::from_secs(3);
    c
}

/// Connects `config` to `server`, plays LOGIN / LOGIN_RESULT OK and takes the Online
/// event. Returns the LOGIN the server saw.
pub async fn connect(
    server: &Server,
    config: Config,
    heartbeat_ms: u32,
) -> (Client, Events, Peer, pb::Login) {
    let connecting = tokio::spawn(Client::connect(config));
    let mut peer = server.accept().await;
    let login = peer.expect_login().await;
    peer.login_ok(SID, heartbeat_ms, false).await;
    let (client, mut events) = timeout(GUARD, connecting)
        .await
        .expect("connect did not resolve")
        .unwrap()
        .expect("connect failed");
    assert_eq!(
        next(&mut events).await,
        Event::Online {
            session_id: SID,
            resumed: false,
            gap: None
        }
    );
    (client, events, peer, login)
}

/// The next event (fails the test if the stream ended or nothing came in time).
pub async fn next(events: &mut Events) -> Event {
    timeout(GUARD, events.next())
        .await
        .expect("no event in time")
        .expect("the event stream ended")
}

/// The next event, `None` if the stream ended.
pub async fn next_or_end(events: &mut Events) -> Option<Event> {
    timeout(GUARD, events.next())
        .await
        .expect("no event in time")
}

pub fn message(seq: u64, body: &'static [u8]) -> Event {
    Event::Message {
        seq,
        body_type: 0,
        body: Bytes::from_static(body),
    }
}
