//! Shared by the integration tests: a gateway on loopback with a manual clock, and a raw
//! frame-level client (the SDK's tests cover the SDK; these check the gateway's bytes).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use tether_codec::{Decoder, Frame, Header, Limits};
use tether_gateway::clock::Clock;
use tether_gateway::config::Config;
use tether_gateway::{Gateway, Options};
use tether_protocol::chat::{chat_message, ChatMessage, Text};
use tether_protocol::pb;

/// A failure guard only: tests wait on sockets, never on time passing.
pub const GUARD: Duration = Duration::from_secs(10);

/// At least `MIN_AUTH_SECRET_LEN` (32) bytes, as the gateway requires.
pub const SECRET: &str = "test-secret-of-at-least-32-bytes-0123";

pub fn config() -> Config {
    Config {
        listen: vec!["127.0.0.1:0".into()],
        admin_listen: "127.0.0.1:0".into(),
        workers: 2,
        auth_secret: SECRET.into(),
        ..Config::default()
    }
}

pub fn start(f: impl FnOnce(&mut Config)) -> Gateway {
    let mut c = config();
    f(&mut c);
    Gateway::start(
        c,
        Options {
            clock: Some(Clock::manual()),
            ..Options::default()
        },
    )
    .expect("gateway starts")
}

pub fn token(user: &str, device: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    tether_gateway::auth::mint_token(SECRET.as_bytes(), user, device, exp)
}

pub fn login_frame(user: &str, device: &str, resume: Option<(Bytes, u64)>) -> Frame {
    Frame::new(Header::Login(Box::new(pb::Login {
        token: token(user, device),
        user_id: user.into(),
        device_id: device.into(),
        platform: pb::Platform::Android as i32,
        compression: vec![pb::Compression::Gzip as i32],
        resume: resume.map(|(session_id, last_seq)| pb::Resume {
            session_id,
            last_seq,
        }),
        ..Default::default()
    })))
}

pub fn chat_to_user(to: &str, text: &str) -> Bytes {
    ChatMessage {
        target: Some(chat_message::Target::ToUser(to.into())),
        content: Some(chat_message::Content::Text(Text { text: text.into() })),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

pub fn chat_to_room(room: &str, text: &str) -> Bytes {
    ChatMessage {
        target: Some(chat_message::Target::ToRoom(room.into())),
        content: Some(chat_message::Content::Text(Text { text: text.into() })),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

pub fn text_of(body: &[u8]) -> String {
    match ChatMessage::decode(body).expect("a ChatMessage").content {
        Some(chat_message::Content::Text(t)) => t.text,
        other => panic!("not text: {other:?}"),
    }
}

/// A frame-level client over a blocking socket.
pub struct Raw {
    pub s: TcpStream,
    buf: BytesMut,
    dec: Decoder,
    /// Frames unpacked from a BATCH, not yet returned.
    unpacked: std::collections::VecDeque<Frame>,
    /// BATCH frames seen.
    pub batches: usize,
    pub limits: Limits,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(GUARD)).unwrap();
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            buf: BytesMut::new(),
            unpacked: Default::default(),
            batches: 0,
            dec: Decoder::new(Limits::default()),
            limits: Limits::default(),
        }
    }

    pub fn send(&mut self, f: &Frame) {
        let b = f.to_bytes(&self.limits).expect("encodes");
        self.s.write_all(&b).expect("write");
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("write");
    }

    /// The next frame; panics if none comes before the guard or the connection closes.
    pub fn recv(&mut self) -> Frame {
        self.try_recv().expect("a frame, not a close")
    }

    /// The next frame (the frames of a BATCH one by one, as PROTOCOL.md §4.15 says to
    /// process them), or `None` when the gateway closed the connection.
    pub fn try_recv(&mut self) -> Option<Frame> {
        if let Some(f) = self.unpacked.pop_front() {
            return Some(f);
        }
        let f = self.try_recv_raw()?;
        if let Header::Batch(_) = f.header {
            self.batches += 1;
            self.unpacked = tether_codec::decode_batch(&f, &self.limits)
                .expect("a valid BATCH")
                .into();
            return self.unpacked.pop_front();
        }
        Some(f)
    }

    /// The next frame as it came on the wire.
    pub fn try_recv_raw(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self
                .dec
                .decode(&mut self.buf)
                .expect("the gateway sends valid frames")
            {
                return Some(f);
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e} (no frame within the guard)"),
            }
        }
    }

    /// Reads until the gateway closes; returns what came before.
    pub fn until_closed(&mut self) -> Vec<Frame> {
        let mut v = Vec::new();
        while let Some(f) = self.try_recv() {
            v.push(f);
        }
        v
    }

    pub fn login(
        &mut self,
        user: &str,
        device: &str,
        resume: Option<(Bytes, u64)>,
    ) -> pb::LoginResult {
        self.send(&login_frame(user, device, resume));
        match self.recv().header {
            Header::LoginResult(r) => *r,
            h => panic!("expected LOGIN_RESULT, got {h:?}"),
        }
    }

    pub fn uplink(&mut self, msg_id: u64, body: Bytes) {
        self.send(&Frame::with_body(
            Header::Uplink(pb::Uplink {
                msg_id,
                body_type: 0,
            }),
            body,
        ));
    }

    pub fn ack(&mut self, seq: u64) {
        self.send(&Frame::new(Header::DownlinkAck(pb::DownlinkAck { seq })));
    }

    /// The next downlink (seq, inflated body), skipping nothing else silently: any other
    /// kind fails the test.
    pub fn downlink(&mut self) -> (u64, Bytes) {
        let f = self.recv();
        match &f.header {
            Header::Downlink(d) => (d.seq, f.decompressed_body(&self.limits).unwrap()),
            h => panic!("expected DOWNLINK, got {h:?}"),
        }
    }
}

pub fn error_code(f: &Frame) -> pb::ErrorCode {
    match &f.header {
        Header::Error(e) => pb::ErrorCode::try_from(e.code).unwrap(),
        h => panic!("expected ERROR, got {h:?}"),
    }
}

/// Waits (bounded) until `cond` holds; for state that another thread updates after a
/// socket event the test already saw.
pub fn eventually(mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < GUARD,
            "condition not reached within the guard"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
