//! Tether wire protocol v1: the constants of the fixed frame header, the frame kinds and
//! the protobuf schema of the frame headers, generated from `proto/*.proto` at build time.
//!
//! `PROTOCOL.md` beside this crate is the normative specification; this crate only names
//! what it defines. Framing (length prefix, limits, compression) lives in `tether-codec`.
//!
//! ```text
//!  0       1       2       3       4       5       6       7       8       9
//! +-------+-------+-------+-------+-------+-------+-------+-------+-------+-------+
//! |        length (u32, big-endian)       | magic |version| flags | kind  |header_len (u16 BE)
//! +-------+-------+-------+-------+-------+-------+-------+-------+-------+-------+
//! | header: header_len bytes of protobuf (the message `kind` names) ...
//! | body: length - 6 - header_len bytes, opaque (gzip when flags bit 0 is set) ...
//! ```

/// Generated protobuf types of the frame headers (`proto/tether.proto`).
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/tether.v1.rs"));
}

/// Generated protobuf types of the reference business schema (`proto/chat.proto`).
pub mod chat {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/tether.chat.v1.rs"));
}

/// The encoded `FileDescriptorSet` of both schemas, for reflection (readable JSON forms).
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Byte 4 of every frame. 0xF7 never occurs in UTF-8 text, so a text protocol (HTTP, a
/// WebSocket upgrade, telnet) or a TLS record sent to a plain port fails here at once.
pub const MAGIC: u8 = 0xF7;

/// The frame format version this crate speaks (byte 5).
pub const VERSION: u8 = 1;

/// The frame versions this implementation accepts, sent in ERROR(UNSUPPORTED_VERSION).
pub const SUPPORTED_VERSIONS: &[u8] = &[VERSION];

/// Width of the length prefix (bytes 0..4).
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Width of the fixed header, length prefix included (bytes 0..10).
pub const FIXED_HEADER_LEN: usize = 10;

/// The smallest legal value of the length field: magic, version, flags, kind, header_len.
pub const MIN_LENGTH: u32 = (FIXED_HEADER_LEN - LENGTH_PREFIX_LEN) as u32;

/// Flags bit 0: the body is gzip (RFC 1952).
pub const FLAG_GZIP: u8 = 0x01;

/// Flags bits a v1 sender must leave zero and a v1 receiver must reject when set.
pub const FLAGS_RESERVED: u8 = !FLAG_GZIP;

/// Kinds from this value up are reserved for gateway ⇄ upstream frames.
pub const UPSTREAM_KIND_MIN: u8 = 0x80;

/// The kind byte (byte 7): which protobuf message the header is, and so what the frame
/// means. Values not listed are rejected with `UNKNOWN_KIND`; 0x10..=0x7F are reserved
/// for later client ⇄ gateway kinds, 0x80..=0xFF for gateway ⇄ upstream kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// Client → gateway: the first frame of a connection.
    Login = 0x01,
    /// Gateway → client: the answer to LOGIN.
    LoginResult = 0x02,
    /// Client → gateway heartbeat.
    Ping = 0x03,
    /// Gateway → client heartbeat answer.
    Pong = 0x04,
    /// Client → gateway business message.
    Uplink = 0x05,
    /// Gateway → client: the upstream's verdict on an UPLINK.
    UplinkAck = 0x06,
    /// Gateway → client business message, sequenced per session.
    Downlink = 0x07,
    /// Client → gateway: cumulative acknowledgement of downlinks.
    DownlinkAck = 0x08,
    /// Gateway → client: the session is ended; do not reconnect.
    Kick = 0x09,
    /// Gateway → client: draining; reconnect later and resume.
    GoAway = 0x0A,
    /// Client → gateway: join a room.
    RoomJoin = 0x0B,
    /// Client → gateway: leave a room.
    RoomLeave = 0x0C,
    /// Gateway → client: the answer to ROOM_JOIN / ROOM_LEAVE.
    RoomResult = 0x0D,
    /// Either direction: an error; with a 1xx code the connection closes after it.
    Error = 0x0E,
    /// Gateway → client: several frames in one (usually gzip) body.
    Batch = 0x0F,
}

impl Kind {
    /// Every v1 kind, in wire order.
    pub const ALL: [Kind; 15] = [
        Kind::Login,
        Kind::LoginResult,
        Kind::Ping,
        Kind::Pong,
        Kind::Uplink,
        Kind::UplinkAck,
        Kind::Downlink,
        Kind::DownlinkAck,
        Kind::Kick,
        Kind::GoAway,
        Kind::RoomJoin,
        Kind::RoomLeave,
        Kind::RoomResult,
        Kind::Error,
        Kind::Batch,
    ];

    /// The kind a byte names, if v1 defines it.
    pub const fn from_u8(b: u8) -> Option<Kind> {
        if b >= 0x01 && b <= 0x0F {
            Some(Self::ALL[(b - 1) as usize])
        } else {
            None
        }
    }

    /// The name PROTOCOL.md and the test vectors use (`LOGIN_RESULT`).
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Login => "LOGIN",
            Kind::LoginResult => "LOGIN_RESULT",
            Kind::Ping => "PING",
            Kind::Pong => "PONG",
            Kind::Uplink => "UPLINK",
            Kind::UplinkAck => "UPLINK_ACK",
            Kind::Downlink => "DOWNLINK",
            Kind::DownlinkAck => "DOWNLINK_ACK",
            Kind::Kick => "KICK",
            Kind::GoAway => "GOAWAY",
            Kind::RoomJoin => "ROOM_JOIN",
            Kind::RoomLeave => "ROOM_LEAVE",
            Kind::RoomResult => "ROOM_RESULT",
            Kind::Error => "ERROR",
            Kind::Batch => "BATCH",
        }
    }

    /// The kind with this name, as [`Kind::name`] spells it.
    pub fn from_name(name: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The fully qualified protobuf message of this kind's header (`tether.v1.Login`).
    pub const fn header_message(self) -> &'static str {
        match self {
            Kind::Login => "tether.v1.Login",
            Kind::LoginResult => "tether.v1.LoginResult",
            Kind::Ping => "tether.v1.Ping",
            Kind::Pong => "tether.v1.Pong",
            Kind::Uplink => "tether.v1.Uplink",
            Kind::UplinkAck => "tether.v1.UplinkAck",
            Kind::Downlink => "tether.v1.Downlink",
            Kind::DownlinkAck => "tether.v1.DownlinkAck",
            Kind::Kick => "tether.v1.Kick",
            Kind::GoAway => "tether.v1.GoAway",
            Kind::RoomJoin => "tether.v1.RoomJoin",
            Kind::RoomLeave => "tether.v1.RoomLeave",
            Kind::RoomResult => "tether.v1.RoomResult",
            Kind::Error => "tether.v1.Error",
            Kind::Batch => "tether.v1.Batch",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_bytes_round_trip_and_gaps_are_rejected() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_u8(k as u8), Some(k));
            assert_eq!(Kind::from_name(k.name()), Some(k));
        }
        assert_eq!(Kind::from_u8(0x00), None);
        assert_eq!(Kind::from_u8(0x10), None);
        assert_eq!(Kind::from_u8(UPSTREAM_KIND_MIN), None);
        assert_eq!(Kind::from_u8(0xFF), None);
    }

    #[test]
    fn header_messages_exist_in_the_schema() {
        use prost::Message;
        let fds = prost_types_fds(DESCRIPTOR_SET);
        for k in Kind::ALL {
            let (pkg, name) = k.header_message().rsplit_once('.').unwrap();
            assert!(
                fds.iter().any(|(p, m)| p == pkg && m == name),
                "{} names a message missing from tether.proto",
                k
            );
        }
        // Decoding the set at all proves the embedded bytes are a descriptor set.
        fn prost_types_fds(b: &[u8]) -> Vec<(String, String)> {
            // Minimal walk: FileDescriptorSet.file(1) -> FileDescriptorProto{package(2), message_type(4){name(1)}}.
            #[derive(Clone, PartialEq, prost::Message)]
            struct Set {
                #[prost(message, repeated, tag = "1")]
                file: Vec<File>,
            }
            #[derive(Clone, PartialEq, prost::Message)]
            struct File {
                #[prost(string, tag = "2")]
                package: String,
                #[prost(message, repeated, tag = "4")]
                message_type: Vec<Msg>,
            }
            #[derive(Clone, PartialEq, prost::Message)]
            struct Msg {
                #[prost(string, tag = "1")]
                name: String,
            }
            let set = Set::decode(b).expect("descriptor set decodes");
            set.file
                .into_iter()
                .flat_map(|f| {
                    let p = f.package;
                    f.message_type.into_iter().map(move |m| (p.clone(), m.name))
                })
                .collect()
        }
    }
}
