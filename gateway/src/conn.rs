//! The protocol state of one client connection (PROTOCOL.md §6.1-6.3), sans-IO.
//!
//! The shell feeds it decoded frames, decode errors and the time, and carries out the
//! [`Action`]s it returns: writing frames, asking the node to authenticate a login, handing
//! uplinks, acks and room requests to the session, closing. It knows nothing of sessions,
//! the upstream or sockets; it owns what is per connection: the login phase, the login
//! deadline and heartbeat liveness. It is 16 bytes.

use bytes::Bytes;
use tether_codec::{Error as CodecError, Frame, Header};
use tether_protocol::{pb, pb::ErrorCode, Kind, SUPPORTED_VERSIONS};

use crate::timer::Tick;

/// Default time a client has to send LOGIN after connecting: 10 s.
pub const DEFAULT_LOGIN_TIMEOUT_SECS: u32 = 10;

/// Default heartbeat intervals of silence before a connection is closed: 3.
pub const DEFAULT_HEARTBEAT_MISSES: u32 = 3;

/// Per-connection protocol settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnConfig {
    pub login_timeout_secs: u32,
    pub heartbeat_misses: u32,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            login_timeout_secs: DEFAULT_LOGIN_TIMEOUT_SECS,
            heartbeat_misses: DEFAULT_HEARTBEAT_MISSES,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connected; LOGIN not yet received.
    AwaitingLogin,
    /// LOGIN received; the node is authenticating it.
    Authenticating,
    /// LOGIN_RESULT OK sent; the heartbeat interval the client was given.
    LoggedIn { interval_secs: u32 },
    /// A close was asked for; nothing more is accepted.
    Closed,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this frame.
    Send(Frame),
    /// Authenticate this login and bind its session, then call [`Conn::login_accepted`] and
    /// send LOGIN_RESULT, or send LOGIN_RESULT with the failure and close.
    Login { login: Box<pb::Login>, body: Bytes },
    /// An UPLINK for the session (dedup and forwarding are the session's).
    Uplink {
        msg_id: u64,
        body_type: u32,
        gzip: bool,
        body: Bytes,
    },
    /// A cumulative DOWNLINK_ACK for the session.
    DownlinkAck(u64),
    /// A ROOM_JOIN for the upstream to decide.
    RoomJoin {
        request_id: u64,
        room_id: String,
        body: Bytes,
    },
    /// A ROOM_LEAVE.
    RoomLeave { request_id: u64, room_id: String },
    /// Flush what is queued and close the connection. A logged-in connection's session is
    /// kept for resume.
    Close(ErrorCode),
}

/// One connection's protocol state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    phase: Phase,
    opened: Tick,
    last_rx: Tick,
}

fn error_frame(code: ErrorCode, message: impl Into<String>) -> Frame {
    Frame::new(Header::Error(Box::new(pb::Error {
        code: code as i32,
        message: message.into(),
        ..Default::default()
    })))
}

impl Conn {
    /// A connection accepted at `now`.
    pub fn new(now: Tick) -> Conn {
        Conn {
            phase: Phase::AwaitingLogin,
            opened: now,
            last_rx: now,
        }
    }

    /// When the connection was accepted.
    pub fn opened(&self) -> Tick {
        self.opened
    }

    pub fn is_logged_in(&self) -> bool {
        matches!(self.phase, Phase::LoggedIn { .. })
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    fn close(&mut self, code: ErrorCode, message: impl Into<String>, out: &mut Vec<Action>) {
        out.push(Action::Send(error_frame(code, message)));
        out.push(Action::Close(code));
        self.phase = Phase::Closed;
    }

    /// A frame from the client. Any frame counts as life.
    pub fn handle_frame(&mut self, now: Tick, frame: Frame, out: &mut Vec<Action>) {
        if self.phase == Phase::Closed {
            return;
        }
        self.last_rx = self.last_rx.max(now);
        let Frame { header, gzip, body } = frame;
        match (self.phase, header) {
            (_, Header::Error(e)) => {
                // The client found us at fault and is closing; nothing to answer.
                let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
                out.push(Action::Close(code));
                self.phase = Phase::Closed;
            }
            (Phase::AwaitingLogin, Header::Login(login)) => {
                self.phase = Phase::Authenticating;
                out.push(Action::Login { login, body });
            }
            (Phase::Authenticating, Header::Login(_)) => {
                self.close(ErrorCode::AlreadyLoggedIn, "one LOGIN per connection", out)
            }
            (Phase::AwaitingLogin | Phase::Authenticating, h) if is_client_kind(h.kind()) => {
                self.close(ErrorCode::NotLoggedIn, "log in first", out)
            }
            (Phase::LoggedIn { .. }, Header::Ping(_)) => {
                out.push(Action::Send(Frame::new(Header::Pong(pb::Pong {}))))
            }
            (Phase::LoggedIn { .. }, Header::Uplink(u)) => out.push(Action::Uplink {
                msg_id: u.msg_id,
                body_type: u.body_type,
                gzip,
                body,
            }),
            (Phase::LoggedIn { .. }, Header::DownlinkAck(a)) => {
                out.push(Action::DownlinkAck(a.seq))
            }
            (Phase::LoggedIn { .. }, Header::RoomJoin(r)) => out.push(Action::RoomJoin {
                request_id: r.request_id,
                room_id: r.room_id,
                body,
            }),
            (Phase::LoggedIn { .. }, Header::RoomLeave(r)) => out.push(Action::RoomLeave {
                request_id: r.request_id,
                room_id: r.room_id,
            }),
            (Phase::LoggedIn { .. }, Header::Login(_)) => {
                self.close(ErrorCode::AlreadyLoggedIn, "one LOGIN per connection", out)
            }
            (_, h) => self.close(
                ErrorCode::UnexpectedKind,
                format!("{} is sent by the gateway, not to it", h.kind()),
                out,
            ),
        }
    }

    /// The bytes from the client do not decode: answer with the error's code and close.
    pub fn handle_decode_error(&mut self, error: &CodecError, out: &mut Vec<Action>) {
        if self.phase == Phase::Closed {
            return;
        }
        let mut e = pb::Error {
            code: error.code() as i32,
            message: error.to_string(),
            ..Default::default()
        };
        if error.code() == ErrorCode::UnsupportedVersion {
            e.supported_versions = SUPPORTED_VERSIONS.iter().map(|&v| v.into()).collect();
        }
        out.push(Action::Send(Frame::new(Header::Error(Box::new(e)))));
        out.push(Action::Close(error.code()));
        self.phase = Phase::Closed;
    }

    /// The node accepted the login and sent LOGIN_RESULT OK with this heartbeat interval.
    pub fn login_accepted(&mut self, now: Tick, heartbeat_interval_ms: u32) {
        if self.phase == Phase::Authenticating {
            self.phase = Phase::LoggedIn {
                interval_secs: heartbeat_interval_ms.div_ceil(1000).max(1),
            };
            self.last_rx = self.last_rx.max(now);
        }
    }

    /// When this connection must be checked next: the login deadline before login, the
    /// heartbeat deadline after (the last frame plus `heartbeat_misses` intervals).
    pub fn deadline(&self, config: &ConnConfig) -> Option<Tick> {
        match self.phase {
            Phase::AwaitingLogin | Phase::Authenticating => {
                Some(self.opened.saturating_add(config.login_timeout_secs))
            }
            Phase::LoggedIn { interval_secs } => Some(
                self.last_rx
                    .saturating_add(interval_secs.saturating_mul(config.heartbeat_misses)),
            ),
            Phase::Closed => None,
        }
    }

    /// The timer wheel says this connection is due at `now`: close it if its deadline has
    /// really passed. Returns the deadline to check again otherwise.
    pub fn handle_timeout(
        &mut self,
        now: Tick,
        config: &ConnConfig,
        out: &mut Vec<Action>,
    ) -> Option<Tick> {
        let deadline = self.deadline(config)?;
        if now < deadline {
            return Some(deadline);
        }
        match self.phase {
            Phase::AwaitingLogin | Phase::Authenticating => {
                self.close(ErrorCode::LoginTimeout, "no LOGIN in time", out)
            }
            Phase::LoggedIn { .. } => {
                self.close(ErrorCode::HeartbeatTimeout, "nothing received in time", out)
            }
            Phase::Closed => {}
        }
        None
    }
}

/// Kinds a client sends besides ERROR (anything else from a client is `UNEXPECTED_KIND`).
fn is_client_kind(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Login
            | Kind::Ping
            | Kind::Uplink
            | Kind::DownlinkAck
            | Kind::RoomJoin
            | Kind::RoomLeave
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> Frame {
        Frame::new(Header::Login(Box::new(pb::Login {
            user_id: "alice".into(),
            ..Default::default()
        })))
    }

    fn ping() -> Frame {
        Frame::new(Header::Ping(pb::Ping {}))
    }

    fn logged_in(now: Tick) -> Conn {
        let mut c = Conn::new(now);
        let mut out = Vec::new();
        c.handle_frame(now, login(), &mut out);
        c.login_accepted(now, 30_000);
        c
    }

    fn codes(out: &[Action]) -> Vec<ErrorCode> {
        out.iter()
            .filter_map(|a| match a {
                Action::Close(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn login_then_ping_pong() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        c.handle_frame(1, login(), &mut out);
        assert!(matches!(&out[..], [Action::Login { login, .. }] if login.user_id == "alice"));
        assert!(!c.is_logged_in());
        c.login_accepted(1, 30_000);
        assert!(c.is_logged_in());
        out.clear();
        c.handle_frame(2, ping(), &mut out);
        assert_eq!(out, [Action::Send(Frame::new(Header::Pong(pb::Pong {})))]);
    }

    #[test]
    fn frames_before_login_get_not_logged_in_and_a_close() {
        for early in [
            ping(),
            Frame::new(Header::Uplink(pb::Uplink {
                msg_id: 1,
                body_type: 0,
            })),
        ] {
            let mut c = Conn::new(0);
            let mut out = Vec::new();
            c.handle_frame(0, early, &mut out);
            assert_eq!(codes(&out), [ErrorCode::NotLoggedIn]);
            assert!(matches!(&out[0], Action::Send(f) if f.kind() == Kind::Error));
            assert!(c.is_closed());
            out.clear();
            c.handle_frame(1, login(), &mut out);
            assert!(out.is_empty(), "nothing after close");
        }
        // Also while the login is being authenticated.
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        c.handle_frame(0, login(), &mut out);
        out.clear();
        c.handle_frame(0, ping(), &mut out);
        assert_eq!(codes(&out), [ErrorCode::NotLoggedIn]);
    }

    #[test]
    fn a_second_login_and_gateway_kinds_from_a_client_close_the_connection() {
        let mut c = logged_in(0);
        let mut out = Vec::new();
        c.handle_frame(1, login(), &mut out);
        assert_eq!(codes(&out), [ErrorCode::AlreadyLoggedIn]);

        let mut c = logged_in(0);
        let mut out = Vec::new();
        c.handle_frame(1, Frame::new(Header::Pong(pb::Pong {})), &mut out);
        assert_eq!(codes(&out), [ErrorCode::UnexpectedKind]);

        let mut c = Conn::new(0);
        let mut out = Vec::new();
        c.handle_frame(1, Frame::new(Header::Pong(pb::Pong {})), &mut out);
        assert_eq!(codes(&out), [ErrorCode::UnexpectedKind]);
    }

    #[test]
    fn the_login_deadline_closes_a_silent_connection() {
        let config = ConnConfig::default();
        let mut c = Conn::new(100);
        let mut out = Vec::new();
        assert_eq!(c.deadline(&config), Some(110));
        assert_eq!(c.handle_timeout(109, &config, &mut out), Some(110));
        assert!(out.is_empty());
        // Frames that are not a LOGIN do not extend it (they close it, in fact); a LOGIN
        // under authentication does not either.
        c.handle_frame(105, login(), &mut out);
        out.clear();
        assert_eq!(c.handle_timeout(110, &config, &mut out), None);
        assert_eq!(codes(&out), [ErrorCode::LoginTimeout]);
    }

    #[test]
    fn heartbeat_timeout_counts_from_the_last_frame_of_any_kind() {
        let config = ConnConfig::default(); // 3 misses
        let mut c = logged_in(0);
        assert_eq!(c.deadline(&config), Some(90));
        let mut out = Vec::new();
        c.handle_frame(
            50,
            Frame::new(Header::DownlinkAck(pb::DownlinkAck { seq: 0 })),
            &mut out,
        );
        assert_eq!(c.deadline(&config), Some(140));
        // The wheel fires at the old deadline: not due, check again at the new one.
        assert_eq!(c.handle_timeout(90, &config, &mut out), Some(140));
        assert!(!c.is_closed());
        out.clear();
        assert_eq!(c.handle_timeout(140, &config, &mut out), None);
        assert_eq!(codes(&out), [ErrorCode::HeartbeatTimeout]);
    }

    #[test]
    fn decode_errors_answer_with_their_code_and_unsupported_version_lists_ours() {
        let mut c = Conn::new(0);
        let mut out = Vec::new();
        c.handle_decode_error(&CodecError::UnsupportedVersion { found: 2 }, &mut out);
        match &out[..] {
            [Action::Send(f), Action::Close(ErrorCode::UnsupportedVersion)] => match &f.header {
                Header::Error(e) => {
                    assert_eq!(e.code, ErrorCode::UnsupportedVersion as i32);
                    assert_eq!(e.supported_versions, [1]);
                }
                h => panic!("{h:?}"),
            },
            other => panic!("{other:?}"),
        }
        let mut c = logged_in(0);
        let mut out = Vec::new();
        c.handle_decode_error(
            &CodecError::FrameTooLarge {
                len: 1 << 20,
                max: 65536,
            },
            &mut out,
        );
        assert_eq!(codes(&out), [ErrorCode::FrameTooLarge]);
    }

    #[test]
    fn session_traffic_is_handed_on_with_its_body() {
        let mut c = logged_in(0);
        let mut out = Vec::new();
        c.handle_frame(
            1,
            Frame {
                header: Header::Uplink(pb::Uplink {
                    msg_id: 9,
                    body_type: 3,
                }),
                gzip: true,
                body: Bytes::from_static(b"z"),
            },
            &mut out,
        );
        c.handle_frame(
            1,
            Frame::new(Header::DownlinkAck(pb::DownlinkAck { seq: 4 })),
            &mut out,
        );
        c.handle_frame(
            1,
            Frame::new(Header::RoomJoin(Box::new(pb::RoomJoin {
                request_id: 2,
                room_id: "r".into(),
            }))),
            &mut out,
        );
        assert_eq!(
            out,
            [
                Action::Uplink {
                    msg_id: 9,
                    body_type: 3,
                    gzip: true,
                    body: Bytes::from_static(b"z")
                },
                Action::DownlinkAck(4),
                Action::RoomJoin {
                    request_id: 2,
                    room_id: "r".into(),
                    body: Bytes::new()
                },
            ]
        );
    }

    #[test]
    fn a_connection_is_small() {
        assert!(std::mem::size_of::<Conn>() <= 16);
    }
}
