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

/// The admin token of the tests that configure one ([`admin_token_file`]).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A new file holding [`ADMIN_TOKEN`] and a newline (as an editor leaves it), for
/// `admin_token_file`.
pub fn admin_token_file() -> String {
    write_temp("admin-token", &format!("{ADMIN_TOKEN}\n"))
}

/// A new file in the temporary directory with `content`; its path.
pub fn write_temp(name: &str, content: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("tether-{name}-{}-{n}", std::process::id()));
    std::fs::write(&path, content).unwrap();
    path.to_string_lossy().into()
}

/// An HTTP response as the tests look at it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header lines as sent, `name: value`, names lowercased.
    pub headers: Vec<String>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.headers
            .iter()
            .find_map(|h| h.strip_prefix(&prefix))
            .map(str::trim)
    }
}

/// One HTTP/1.1 request to the admin port (`connection: close`), with a bearer `token` if
/// given; no HTTP client crate needed for a test.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> HttpResponse {
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    http_raw(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// Sends `request` as it is and reads the response until the server closes.
pub fn http_raw(addr: SocketAddr, request: &str) -> HttpResponse {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    parse_http(&resp)
}

/// A response's status, header lines and body (not chunked: the admin server sends a length).
pub fn parse_http(resp: &str) -> HttpResponse {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((resp, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.get(9..12))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"));
    let headers = lines
        .map(|l| match l.split_once(':') {
            Some((n, v)) => format!("{}:{v}", n.to_ascii_lowercase()),
            None => l.to_string(),
        })
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

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

/// A gateway (manual clock) with this upstream.
#[allow(dead_code)] // not every test file uses it
pub fn start_upstream(
    up: std::sync::Arc<dyn tether_gateway::upstream::Upstream>,
    f: impl FnOnce(&mut Config),
) -> Gateway {
    let mut c = config();
    f(&mut c);
    Gateway::start(
        c,
        Options {
            clock: Some(Clock::manual()),
            upstream: Some(up),
            ..Options::default()
        },
    )
    .expect("gateway starts")
}

/// A gateway with the embedded chat back end, which the test keeps a handle on.
#[allow(dead_code)] // not every test file uses it
pub fn start_chat(
    f: impl FnOnce(&mut Config),
) -> (
    Gateway,
    std::sync::Arc<tether_gateway::embedded::ChatUpstream>,
) {
    let mut c = config();
    f(&mut c);
    let chat = std::sync::Arc::new(tether_gateway::embedded::ChatUpstream::new(&c));
    (start_upstream(chat.clone(), |to| *to = c), chat)
}

/// A session id from a LOGIN_RESULT's bytes.
#[allow(dead_code)] // not every test file uses it
pub fn sid(b: &Bytes) -> tether_gateway::upstream::SessionId {
    b.as_ref().try_into().expect("a 16-byte session id")
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

/// A reproducible stream of pseudo-random numbers (xorshift64), for test bodies that gzip
/// must not shrink much.
pub fn xorshift(seed: u64) -> impl Iterator<Item = u64> {
    let mut x = seed | 1;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    })
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
        Raw::over(TcpStream::connect(addr).expect("connect"))
    }

    /// Connects from a source address of our own choosing (in 127.0.0.0/8).
    pub fn connect_from(addr: SocketAddr, from: std::net::Ipv4Addr) -> Raw {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&SocketAddr::from((from, 0)).into())
            .expect("bind");
        sock.connect(&addr.into()).expect("connect");
        Raw::over(sock.into())
    }

    fn over(s: TcpStream) -> Raw {
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
