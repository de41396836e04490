//! The protocol test vectors in `protocol/vectors/`: every file is loaded and checked.
//!
//! - `check_every_vector_file` reads each JSON file and checks it against the codec: a
//!   valid vector's hex decodes to its readable form and that form encodes back to the
//!   hex; an invalid vector's hex produces the error it names (in one piece and streamed);
//!   a `body_error` is what inflating or unpacking the body gives. It knows nothing of how
//!   the files were made.
//! - `check_every_stream_file` decodes each `streams/` file (frames back to back, maybe
//!   ending in an error) as one complete input, in one piece through the streaming decoder
//!   and byte by byte, and compares the frames and the error with what the file says.
//! - `check_every_transcript_file` decodes every step of each `transcripts/` file (one
//!   frame per step, with its direction) and checks that the direction fits the kind.
//! - `vector_files_match_their_definitions` rebuilds every vector from the definitions
//!   below and fails when a file differs or is missing or extra (drift), or when
//!   `protocol/vectors/` holds anything no check reads. To rewrite the files after a
//!   deliberate change: `TETHER_BLESS=1 cargo test -p tether-codec --all-features --test vectors`.

use std::{collections::BTreeMap, fs, path::PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use serde_json::{json, Value};
use tether_codec::{
    decode_batch, decode_exact, decode_frame, encode_batch, gzip, json as readable,
    CompressOptions, Decoder, Error, Frame, Header, Limits, DEFAULT_MAX_FRAME_LEN,
};
use tether_protocol::{chat, pb, Kind, MAGIC, VERSION};

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../protocol/vectors")
}

/// What a file holds: a name, a description, the bytes, and what they must give.
struct Vector {
    name: &'static str,
    description: &'static str,
    hex: Vec<u8>,
    expect: Expect,
}

enum Expect {
    /// Decodes to this frame; `reencoded` is set when encoding the frame gives other
    /// bytes than `hex` (unknown header fields are skipped).
    Frame {
        frame: Frame,
        reencoded: Option<Vec<u8>>,
    },
    /// The framing fails with this error.
    Error(Error),
    /// The frame decodes, but inflating / unpacking its body fails with this error.
    BodyError { frame: Frame, error: Error },
}

fn enc(f: &Frame) -> Vec<u8> {
    f.to_bytes(&Limits::default()).unwrap().to_vec()
}

fn raw(
    length: u32,
    magic: u8,
    version: u8,
    flags: u8,
    kind: u8,
    header_len: u16,
    rest: &[u8],
) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(length);
    b.put_u8(magic);
    b.put_u8(version);
    b.put_u8(flags);
    b.put_u8(kind);
    b.put_u16(header_len);
    b.put_slice(rest);
    b.to_vec()
}

/// The bytes of a frame of this kind, flags, header and body, its length fields computed.
fn raw_frame(kind: Kind, flags: u8, header: &[u8], body: &[u8]) -> Vec<u8> {
    raw(
        (6 + header.len() + body.len()) as u32,
        MAGIC,
        VERSION,
        flags,
        kind as u8,
        header.len() as u16,
        &[header, body].concat(),
    )
}

/// `data` as one gzip member of exactly `len` bytes: the member `gzip` makes, padded with
/// an FCOMMENT field (RFC 1952 §2.3.1), which every inflater skips. So a body can sit
/// exactly at the expansion-ratio cap.
fn gzip_padded(data: &[u8], len: usize) -> Vec<u8> {
    let z = gzip(data, 9).unwrap();
    assert!(z.len() < len, "{} bytes do not fit {len}", z.len());
    let mut out = z[..10].to_vec();
    out[3] |= 0x10; // FLG.FCOMMENT
    out.extend(b"padding ".iter().cycle().take(len - z.len() - 1));
    out.push(0);
    out.extend_from_slice(&z[10..]);
    assert_eq!(out.len(), len);
    out
}

/// A chat.proto message as the reference back end delivers it: stamped with the sender,
/// a server message id and the time.
fn chat_stamped(
    sender: &str,
    target: Option<chat::chat_message::Target>,
    client_msg_id: u64,
    server_msg_id: u64,
    sent_at_ms: u64,
    text: &str,
) -> Bytes {
    chat::ChatMessage {
        sender: sender.into(),
        target,
        client_msg_id,
        server_msg_id,
        sent_at_ms,
        content: Some(chat::chat_message::Content::Text(chat::Text {
            text: text.into(),
        })),
    }
    .encode_to_vec()
    .into()
}

fn chat_text(sender: &str, to_user: &str, msg_id: u64, text: &str) -> Bytes {
    chat::ChatMessage {
        sender: sender.into(),
        target: Some(chat::chat_message::Target::ToUser(to_user.into())),
        client_msg_id: msg_id,
        server_msg_id: 0,
        sent_at_ms: 0,
        content: Some(chat::chat_message::Content::Text(chat::Text {
            text: text.into(),
        })),
    }
    .encode_to_vec()
    .into()
}

fn downlink(seq: u64, body: Bytes) -> Frame {
    Frame::with_body(Header::Downlink(pb::Downlink { seq, body_type: 0 }), body)
}

const SESSION_ID: [u8; 16] = [
    0x3f, 0x9c, 0x51, 0x0e, 0xa2, 0x47, 0xd8, 0x16, 0xc5, 0x7b, 0x20, 0xe9, 0x64, 0x0d, 0xbb, 0x82,
];

/// The worked example of PROTOCOL.md §4.1.1: HMAC-SHA256 with the secret
/// `tether-example-secret` over `v1.YWxpY2U.ZC03ZjNh.1767225600` (user `alice`, device
/// `d-7f3a`, valid until 2026-01-01T00:00:00Z), base64url without padding. Computed with
/// Python's `hmac` module and with a copy of the gateway's `auth::mint_token`: the same.
const EXAMPLE_TOKEN: &str =
    "v1.YWxpY2U.ZC03ZjNh.1767225600.a1jkMGO0JA-3MJWQ_Os9O3xlydkVpjMnQlCSKS3bltY";

fn example_login() -> pb::Login {
    pb::Login {
        token: EXAMPLE_TOKEN.into(),
        user_id: "alice".into(),
        device_id: "d-7f3a".into(),
        platform: pb::Platform::Ios as i32,
        client_version: "ios-sdk/1.0.0".into(),
        compression: vec![pb::Compression::Gzip as i32],
        resume: None,
    }
}

fn long_text() -> String {
    "Meet at the usual place at seven; bring the slides and the printed agenda. ".repeat(12)
}

/// Downlinks 11..=13 in one gzip BATCH, as a resume replays them.
fn replay_batch() -> Frame {
    let inner = vec![
        downlink(11, chat_text("bob", "alice", 1, "one")),
        downlink(12, chat_text("bob", "alice", 2, "two")),
        downlink(13, Bytes::from(long_text().into_bytes())),
    ];
    let batch = encode_batch(&inner, &CompressOptions::default(), &Limits::default()).unwrap();
    assert!(batch.gzip, "the batch vector's body must be gzip");
    batch
}

fn error_frame(code: pb::ErrorCode, message: &str, retry_after_ms: u32) -> Frame {
    Frame::new(Header::Error(Box::new(pb::Error {
        code: code as i32,
        message: message.into(),
        retry_after_ms,
        supported_versions: Vec::new(),
    })))
}

fn definitions() -> Vec<Vector> {
    let limits = Limits::default();
    let valid = |name, description, frame: Frame| Vector {
        name,
        description,
        hex: enc(&frame),
        expect: Expect::Frame {
            frame,
            reencoded: None,
        },
    };
    let invalid = |name, description, hex: Vec<u8>, error| Vector {
        name,
        description,
        hex,
        expect: Expect::Error(error),
    };
    let body_error = |name, description, frame: Frame, error| Vector {
        name,
        description,
        hex: enc(&frame),
        expect: Expect::BodyError { frame, error },
    };
    // Valid bytes that encode back differently (a reader's leniency).
    let quirky = |name: &'static str, description, hex: Vec<u8>, frame: Frame| {
        let reencoded = enc(&frame);
        assert_ne!(reencoded, hex, "{name} re-encodes to itself");
        Vector {
            name,
            description,
            hex,
            expect: Expect::Frame {
                frame,
                reencoded: Some(reencoded),
            },
        }
    };
    // A frame of `kind` whose header does not parse (PROTOCOL.md §3.4).
    let bad_header = |name: &'static str, description, kind: Kind, header: &[u8]| {
        let error = Header::decode(kind, header).unwrap_err();
        assert_eq!(error.name(), "malformed_header", "{name}");
        Vector {
            name,
            description,
            hex: raw_frame(kind, 0, header, &[]),
            expect: Expect::Error(error),
        }
    };
    let login = example_login();
    let long_text = long_text();
    let gz_body = chat_text("bob", "alice", 7, &long_text);
    let (gz, is_gz) = CompressOptions::default().compress(gz_body.clone(), &limits);
    assert!(is_gz, "the gzip vector's body must compress");
    let max_body = DEFAULT_MAX_FRAME_LEN as usize
        - 6
        - pb::Downlink {
            seq: 1,
            body_type: 0,
        }
        .encoded_len();
    let batch = replay_batch();
    let mut nested_body = BytesMut::new();
    batch.encode(&mut nested_body, &limits).unwrap();
    let mut two_frames = BytesMut::new();
    downlink(1, Bytes::from_static(b"a"))
        .encode(&mut two_frames, &limits)
        .unwrap();
    downlink(2, Bytes::from_static(b"b"))
        .encode(&mut two_frames, &limits)
        .unwrap();
    let bomb = gzip(&vec![0u8; 4 * 1024 * 1024], 9).unwrap();
    assert_eq!(
        bomb.len(),
        4_098,
        "the gzip_bomb description gives its size"
    );
    // 64 bytes of gzip that inflate to exactly 100 x 64 bytes, and to one byte more.
    let at_cap = gzip_padded(&[0u8; 6_400], 64);
    let past_cap = gzip_padded(&[0u8; 6_401], 64);
    assert_eq!(limits.decompressed_cap(at_cap.len()), 6_400);
    let member = gzip(long_text.as_bytes(), 6).unwrap();
    let plain_batch = encode_batch(
        &[
            downlink(21, chat_text("bob", "alice", 4, "four")),
            downlink(22, chat_text("bob", "alice", 5, "five")),
        ],
        &CompressOptions::default(),
        &limits,
    )
    .unwrap();
    assert!(
        !plain_batch.gzip,
        "two short frames are not worth compressing"
    );
    let gz_inner = Frame {
        header: Header::Downlink(pb::Downlink {
            seq: 23,
            body_type: 0,
        }),
        gzip: true,
        body: gz.clone(),
    };
    let batch_of_gzip = encode_batch(
        std::slice::from_ref(&gz_inner),
        &CompressOptions::default(),
        &limits,
    )
    .unwrap();
    assert!(!batch_of_gzip.gzip, "a gzip member does not compress again");
    let mut three_frames = two_frames.clone();
    downlink(3, Bytes::from_static(b"c"))
        .encode(&mut three_frames, &limits)
        .unwrap();
    let unknown_kind_inner = raw(6, MAGIC, VERSION, 0, 0x10, 0, &[]);
    // LOGIN with `compression` (field 6, repeated enum) unpacked: one tag per value.
    let login_unpacked = {
        let plain = pb::Login {
            compression: Vec::new(),
            ..login.clone()
        };
        let mut header = plain.encode_to_vec();
        header.extend_from_slice(&[0x30, 0x01]);
        raw_frame(Kind::Login, 0, &header, &[])
    };
    // LOGIN with `resume` (field 7, a message) given twice: the two are merged.
    let login_resume_split = {
        let mut header = login.encode_to_vec();
        header.extend_from_slice(&[0x3a, 0x12, 0x0a, 0x10]);
        header.extend_from_slice(&SESSION_ID);
        header.extend_from_slice(&[0x3a, 0x02, 0x10, 0x29]);
        raw_frame(Kind::Login, 0, &header, &[])
    };
    let mut corrupt = gzip(long_text.as_bytes(), 6).unwrap();
    let n = corrupt.len();
    corrupt[n - 6] ^= 0xFF; // the CRC-32 in the trailer no longer matches
                            // A DOWNLINK header with field 15 (unknown to v1) before seq: skipped by a v1 reader.
    let unknown_field_header = [0x78, 0x05, 0x08, 0x2a];

    vec![
        valid("ping", "Heartbeat, client to gateway: the fixed header alone, 10 bytes.",
            Frame::new(Header::Ping(pb::Ping {}))),
        valid("pong", "Heartbeat answer, gateway to client: 10 bytes.",
            Frame::new(Header::Pong(pb::Pong {}))),
        valid("login", "A first login from an iOS client that reads gzip bodies. The token is the worked example of PROTOCOL.md 4.1.1 (secret tether-example-secret, user alice, device d-7f3a, expiry 1767225600).",
            Frame::new(Header::Login(Box::new(login.clone())))),
        valid("login_with_body", "A login with a body: opaque to the gateway, handed to the upstream with the new session.",
            Frame::with_body(Header::Login(Box::new(login.clone())), Bytes::from_static(b"{\"locale\":\"en-GB\"}"))),
        valid("login_unknown_platform", "A login naming platform 9, unknown to v1: the gateway treats it as PLATFORM_UNSPECIFIED (the mobile heartbeat interval).",
            Frame::new(Header::Login(Box::new(pb::Login { platform: 9, ..login.clone() })))),
        quirky("login_compression_unpacked", "LOGIN.compression (repeated enum, field 6) sent unpacked, tag 0x30 per value: a reader accepts packed and unpacked. Re-encoding packs it.",
            login_unpacked, Frame::new(Header::Login(Box::new(login.clone())))),
        quirky("login_resume_split", "LOGIN.resume given twice, session_id in the first, last_seq 41 in the second: a message field seen twice is merged, as protobuf says.",
            login_resume_split, Frame::new(Header::Login(Box::new(pb::Login {
                resume: Some(pb::Resume { session_id: Bytes::from_static(&SESSION_ID), last_seq: 41 }),
                ..login.clone()
            })))),
        valid("login_resume", "A login that asks to resume a session, having received up to seq 41.",
            Frame::new(Header::Login(Box::new(pb::Login {
                resume: Some(pb::Resume { session_id: Bytes::from_static(&SESSION_ID), last_seq: 41 }),
                ..login.clone()
            })))),
        valid("login_result_ok", "A successful login: new session, heartbeat every 30 s.",
            Frame::new(Header::LoginResult(Box::new(pb::LoginResult {
                code: pb::ErrorCode::Ok as i32,
                session_id: Bytes::from_static(&SESSION_ID),
                heartbeat_interval_ms: 30_000,
                server_id: "gw-1".into(),
                server_time_ms: 1_764_028_800_000,
                ..Default::default()
            })))),
        valid("login_result_resumed_with_gap", "A resume that was honoured, but downlinks 42..=57 were dropped while the client was away: fetch them from the back end.",
            Frame::new(Header::LoginResult(Box::new(pb::LoginResult {
                code: pb::ErrorCode::Ok as i32,
                session_id: Bytes::from_static(&SESSION_ID),
                heartbeat_interval_ms: 30_000,
                server_id: "gw-1".into(),
                server_time_ms: 1_764_028_860_000,
                resumed: true,
                gap_from: 42,
                gap_to: 57,
                ..Default::default()
            })))),
        valid("login_result_auth_failed", "A failed login; the gateway closes the connection after it.",
            Frame::new(Header::LoginResult(Box::new(pb::LoginResult {
                code: pb::ErrorCode::AuthFailed as i32,
                message: "bad token signature".into(),
                server_time_ms: 1_764_028_800_000,
                ..Default::default()
            })))),
        valid("login_result_server_busy", "The gateway is at its connection limit: retry after 5 s.",
            Frame::new(Header::LoginResult(Box::new(pb::LoginResult {
                code: pb::ErrorCode::ServerBusy as i32,
                retry_after_ms: 5_000,
                ..Default::default()
            })))),
        valid("uplink_text", "A chat.proto text message from alice to bob, client message id 7.",
            Frame::with_body(Header::Uplink(pb::Uplink { msg_id: 7, body_type: 0 }),
                chat_text("", "bob", 7, "hi bob"))),
        valid("uplink_gzip", "An UPLINK whose body is gzip: the gateway forwards it compressed, the upstream inflates it.",
            Frame { header: Header::Uplink(pb::Uplink { msg_id: 9, body_type: 0 }), gzip: true, body: gz.clone() }),
        valid("uplink_ack_ok", "The upstream accepted uplink 7.",
            Frame::new(Header::UplinkAck(pb::UplinkAck { msg_id: 7, ..Default::default() }))),
        valid("uplink_ack_with_body", "The upstream accepted uplink 10 and answered with a body, passed to the client as it came (here a ChatMessage with the server message id; the reference back end sends no body).",
            Frame::with_body(Header::UplinkAck(pb::UplinkAck { msg_id: 10, ..Default::default() }),
                chat_stamped("alice", Some(chat::chat_message::Target::ToUser("bob".into())), 10, 1_001, 1_764_028_800_250, ""))),
        valid("uplink_ack_rejected_body", "Uplink 11 had a gzip body the upstream could not inflate: REJECTED, the connection stays open. Do not resend.",
            Frame::new(Header::UplinkAck(pb::UplinkAck {
                msg_id: 11,
                code: pb::ErrorCode::Rejected as i32,
                retry_after_ms: 0,
                message: "body: corrupt gzip body".into(),
            }))),
        valid("uplink_ack_rate_limited", "Uplink 8 refused: too fast, retry after 1 s.",
            Frame::new(Header::UplinkAck(pb::UplinkAck {
                msg_id: 8,
                code: pb::ErrorCode::RateLimited as i32,
                retry_after_ms: 1_000,
                message: String::new(),
            }))),
        valid("downlink_text", "Downlink seq 42: a chat.proto text message from bob.",
            downlink(42, chat_text("bob", "alice", 3, "hi alice"))),
        valid("downlink_empty_body", "Downlink seq 43 with an empty body (body_type 9, an application signal).",
            Frame::new(Header::Downlink(pb::Downlink { seq: 43, body_type: 9 }))),
        valid("downlink_transient", "A transient downlink (seq 0): not acked, not replayed.",
            downlink(0, Bytes::from_static(b"typing"))),
        valid("downlink_gzip", "Downlink seq 44 whose body is gzip (flags bit 0); body_plain is the inflated body.",
            Frame { header: Header::Downlink(pb::Downlink { seq: 44, body_type: 0 }), gzip: true, body: gz }),
        valid("downlink_max_size", "The largest frame the default limits accept: the length field is exactly 65536.",
            downlink(1, Bytes::from(vec![0x5a; max_body]))),
        valid("downlink_gzip_at_ratio_cap", "A 64-byte gzip body (padded with an FCOMMENT) that inflates to 6,400 bytes: exactly 100 x, the cap, so it is accepted.",
            Frame { header: Header::Downlink(pb::Downlink { seq: 48, body_type: 9 }), gzip: true, body: at_cap.into() }),
        valid("downlink_ack", "The client has everything up to seq 44.",
            Frame::new(Header::DownlinkAck(pb::DownlinkAck { seq: 44 }))),
        quirky("downlink_ack_duplicate_field", "seq given twice (1, then 44): for a scalar field the last one wins.",
            raw_frame(Kind::DownlinkAck, 0, &[0x08, 0x01, 0x08, 0x2c], &[]),
            Frame::new(Header::DownlinkAck(pb::DownlinkAck { seq: 44 }))),
        quirky("downlink_body_type_overflow", "body_type (uint32) sent as the varint 2^32 + 9: a 32-bit field keeps the low 32 bits (9), as protobuf says.",
            raw_frame(Kind::Downlink, 0, &[0x08, 0x2a, 0x10, 0x89, 0x80, 0x80, 0x80, 0x10], b"hi"),
            Frame::with_body(Header::Downlink(pb::Downlink { seq: 42, body_type: 9 }), Bytes::from_static(b"hi"))),
        quirky("downlink_unknown_group_field", "A DOWNLINK header with an unknown field 15 encoded as a group (start 0x7b, a varint, end 0x7c) before seq 42: skipped with its contents.",
            raw_frame(Kind::Downlink, 0, &[0x7b, 0x08, 0x01, 0x7c, 0x08, 0x2a], b"hi"),
            downlink(42, Bytes::from_static(b"hi"))),
        valid("kick_logged_in_elsewhere", "The same device logged in on another connection; do not reconnect.",
            Frame::new(Header::Kick(Box::new(pb::Kick {
                reason: pb::KickReason::LoggedInElsewhere as i32,
                message: "logged in elsewhere".into(),
            })))),
        valid("kick_resumed_elsewhere", "The session was resumed on another connection: this connection is done, the session lives on there. Do not reconnect.",
            Frame::new(Header::Kick(Box::new(pb::Kick {
                reason: pb::KickReason::ResumedElsewhere as i32,
                message: "resumed on another connection".into(),
            })))),
        valid("goaway", "The gateway drains: reconnect in 2.5 s (plus jitter), preferably to gw-2.",
            Frame::new(Header::GoAway(Box::new(pb::GoAway {
                reconnect_delay_ms: 2_500,
                reason: "draining".into(),
                alternatives: vec!["gw-2.example.com:14000".into()],
            })))),
        valid("room_join", "Join room lobby, request 1.",
            Frame::new(Header::RoomJoin(Box::new(pb::RoomJoin { request_id: 1, room_id: "lobby".into() })))),
        valid("room_leave", "Leave room lobby, request 2.",
            Frame::new(Header::RoomLeave(Box::new(pb::RoomLeave { request_id: 2, room_id: "lobby".into() })))),
        valid("room_result_ok", "Request 1 succeeded.",
            Frame::new(Header::RoomResult(Box::new(pb::RoomResult {
                request_id: 1,
                room_id: "lobby".into(),
                code: pb::ErrorCode::Ok as i32,
                message: String::new(),
            })))),
        valid("room_result_forbidden", "Request 3 refused by the upstream.",
            Frame::new(Header::RoomResult(Box::new(pb::RoomResult {
                request_id: 3,
                room_id: "staff".into(),
                code: pb::ErrorCode::RoomForbidden as i32,
                message: "members only".into(),
            })))),
        valid("error_not_logged_in", "The answer to any frame but LOGIN before login; the gateway then closes.",
            Frame::new(Header::Error(Box::new(pb::Error {
                code: pb::ErrorCode::NotLoggedIn as i32,
                message: "log in first".into(),
                ..Default::default()
            })))),
        valid("error_unsupported_version", "The answer to a frame of another version: lists the versions spoken. Always sent as version 1.",
            Frame::new(Header::Error(Box::new(pb::Error {
                code: pb::ErrorCode::UnsupportedVersion as i32,
                message: "unsupported frame version 2".into(),
                retry_after_ms: 0,
                supported_versions: vec![1],
            })))),
        valid("error_server_busy", "The gateway is at its connection limit (sent on accept, maybe before the LOGIN): retry after 5 s plus jitter.",
            error_frame(pb::ErrorCode::ServerBusy, "connection limit reached", 5_000)),
        valid("error_login_timeout", "No LOGIN arrived within the login deadline.",
            error_frame(pb::ErrorCode::LoginTimeout, "no LOGIN in time", 0)),
        valid("error_heartbeat_timeout", "Nothing arrived for heartbeat_misses intervals: the session is kept, resume.",
            error_frame(pb::ErrorCode::HeartbeatTimeout, "nothing received in time", 0)),
        valid("error_slow_consumer", "The client did not drain its downlinks: the session is kept, resume.",
            error_frame(pb::ErrorCode::SlowConsumer, "slow consumer", 0)),
        valid("error_unknown_code", "An ERROR with code 109, unknown to v1: handled by its hundreds group (1xx, a protocol error); the sender closes.",
            Frame::new(Header::Error(Box::new(pb::Error { code: 109, message: "something new".into(), ..Default::default() })))),
        valid("batch_gzip", "Three downlinks (seq 11..=13) replayed in one gzip BATCH; frames shows them decoded.",
            batch.clone()),
        valid("batch_plain", "Two downlinks (seq 21, 22) in a BATCH whose body is not compressed.",
            plain_batch),
        valid("batch_empty", "A BATCH of count 0 and an empty body: valid, and nothing to process.",
            Frame::new(Header::Batch(pb::Batch { count: 0 }))),
        valid("batch_gzip_inner", "A plain BATCH holding one DOWNLINK whose own body is gzip: inner frames keep their flags, and their bodies are inflated when each is processed.",
            batch_of_gzip),
        Vector {
            name: "downlink_unknown_header_field",
            description: "A DOWNLINK header carrying field 15, unknown to v1, before seq 42: a reader skips it. Re-encoding drops it (reencoded_hex).",
            hex: raw(6 + 4 + 2, MAGIC, VERSION, 0, Kind::Downlink as u8, 4, &[&unknown_field_header[..], b"hi"].concat()),
            expect: Expect::Frame { frame: downlink(42, Bytes::from_static(b"hi")), reencoded: Some(enc(&downlink(42, Bytes::from_static(b"hi")))) },
        },
        invalid("bad_magic_http", "An HTTP request sent to the port: byte 4 is '/', not 0xF7.",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), Error::BadMagic { found: b'/' }),
        invalid("bad_magic_tls", "A TLS ClientHello sent to a plain port.",
            hex::decode("160301020001000200030000").unwrap(), Error::BadMagic { found: 0x00 }),
        invalid("unsupported_version", "A version 2 ping: answer ERROR(UNSUPPORTED_VERSION, supported_versions [1]) and close.",
            raw(6, MAGIC, 2, 0, Kind::Ping as u8, 0, &[]), Error::UnsupportedVersion { found: 2 }),
        invalid("length_over_cap", "Length 65537, one over the default cap: rejected from the fixed header, before any of the body is buffered.",
            raw(DEFAULT_MAX_FRAME_LEN + 1, MAGIC, VERSION, 0, Kind::Uplink as u8, 0, &[]),
            Error::FrameTooLarge { len: DEFAULT_MAX_FRAME_LEN as u64 + 1, max: DEFAULT_MAX_FRAME_LEN }),
        invalid("length_max_u32", "Length 0xFFFFFFFF.",
            raw(u32::MAX, MAGIC, VERSION, 0, Kind::Uplink as u8, 0, &[]),
            Error::FrameTooLarge { len: u32::MAX as u64, max: DEFAULT_MAX_FRAME_LEN }),
        invalid("length_below_minimum", "Length 5: shorter than the rest of the fixed header.",
            raw(5, MAGIC, VERSION, 0, Kind::Ping as u8, 0, &[]), Error::Malformed("length is below 6")),
        invalid("reserved_flags", "A ping with flags 0x02 (a reserved bit).",
            raw(6, MAGIC, VERSION, 0x02, Kind::Ping as u8, 0, &[]), Error::Malformed("reserved flag bits are set")),
        invalid("kind_zero", "Kind 0x00 is never valid.",
            raw(6, MAGIC, VERSION, 0, 0x00, 0, &[]), Error::UnknownKind { kind: 0x00 }),
        invalid("kind_unassigned", "Kind 0x10 is not defined in v1.",
            raw(6, MAGIC, VERSION, 0, 0x10, 0, &[]), Error::UnknownKind { kind: 0x10 }),
        invalid("kind_upstream_reserved", "Kind 0x80 is reserved for gateway-upstream frames.",
            raw(6, MAGIC, VERSION, 0, 0x80, 0, &[]), Error::UnknownKind { kind: 0x80 }),
        invalid("header_len_exceeds_length", "header_len 5 but only 2 bytes follow the fixed header.",
            raw(8, MAGIC, VERSION, 0, Kind::DownlinkAck as u8, 5, &[0x08, 0x2c]), Error::Malformed("header_len exceeds length")),
        invalid("header_over_cap", "header_len 4097, one over the default header cap.",
            raw(6 + 4097, MAGIC, VERSION, 0, Kind::Login as u8, 4097, &[]), Error::HeaderTooLarge { len: 4097, max: 4096 }),
        invalid("truncated_fixed_header", "Seven bytes of a ping: a stream decoder waits for more; at the end of input it is truncated.",
            enc(&Frame::new(Header::Ping(pb::Ping {})))[..7].to_vec(), Error::Truncated { needed: 3 }),
        invalid("truncated_body", "A downlink cut 3 bytes short.",
            { let b = enc(&downlink(42, chat_text("bob", "alice", 3, "hi alice"))); b[..b.len() - 3].to_vec() },
            Error::Truncated { needed: 3 }),
        invalid("malformed_header_varint", "A DOWNLINK_ACK header that ends inside a varint.",
            raw(8, MAGIC, VERSION, 0, Kind::DownlinkAck as u8, 2, &[0x08, 0xff]),
            Error::MalformedHeader { kind: Kind::DownlinkAck, reason: pb::DownlinkAck::decode(&[0x08u8, 0xff][..]).unwrap_err() }),
        invalid("malformed_header_wire_type", "A DOWNLINK header whose seq (field 1) has wire type 2. Most protobuf libraries would skip it as unknown; a Tether receiver MUST reject it.",
            raw(9, MAGIC, VERSION, 0, Kind::Downlink as u8, 3, &[0x0a, 0x01, 0x00]),
            Error::MalformedHeader { kind: Kind::Downlink, reason: pb::Downlink::decode(&[0x0au8, 0x01, 0x00][..]).unwrap_err() }),
        bad_header("malformed_header_nested_wire_type", "A LOGIN whose resume.last_seq (field 2 of the nested Resume) has wire type 2: the rules apply inside nested messages too.",
            Kind::Login, &[0x3a, 0x03, 0x12, 0x01, 0x00]),
        bad_header("malformed_header_utf8", "A LOGIN whose user_id (a string) is not UTF-8.",
            Kind::Login, &[0x12, 0x02, 0xff, 0xfe]),
        bad_header("malformed_header_field_zero", "A DOWNLINK_ACK header with a field number 0.",
            Kind::DownlinkAck, &[0x00, 0x00]),
        bad_header("malformed_header_wire_type_7", "A DOWNLINK header with a field of wire type 7 (none exists), on a field number v1 does not know.",
            Kind::Downlink, &[0x7f, 0x08, 0x2a]),
        bad_header("malformed_header_end_group", "A DOWNLINK header with an end-group tag (wire type 4) that no start-group opened.",
            Kind::Downlink, &[0x7c, 0x08, 0x2a]),
        bad_header("malformed_header_varint_overlong", "A DOWNLINK_ACK whose seq is a varint of 10 bytes whose last byte is 0x02: more than 64 bits.",
            Kind::DownlinkAck, &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
        bad_header("malformed_header_length_overrun", "A LOGIN whose token says 10 bytes but the header ends after 3.",
            Kind::Login, &[0x0a, 0x0a, 0x61, 0x62, 0x63]),
        body_error("gzip_bomb", "A 4,098-byte gzip body that inflates to 4 MiB: stopped at 100 x its size (409,800 bytes).",
            Frame { header: Header::Downlink(pb::Downlink { seq: 45, body_type: 0 }), gzip: true, body: bomb.clone().into() },
            Error::DecompressionLimit { limit: limits.decompressed_cap(bomb.len()) }),
        body_error("gzip_corrupt", "A gzip body whose CRC-32 does not match.",
            Frame { header: Header::Downlink(pb::Downlink { seq: 46, body_type: 0 }), gzip: true, body: corrupt.into() },
            Error::CorruptBody),
        body_error("gzip_trailing_bytes", "A valid gzip member followed by one more byte: the body must be exactly one member.",
            Frame { header: Header::Downlink(pb::Downlink { seq: 49, body_type: 0 }), gzip: true, body: [&member[..], &[0x00]].concat().into() },
            Error::CorruptBody),
        body_error("gzip_truncated", "A gzip member cut 5 bytes short (in its trailer).",
            Frame { header: Header::Downlink(pb::Downlink { seq: 50, body_type: 0 }), gzip: true, body: member[..member.len() - 5].to_vec().into() },
            Error::CorruptBody),
        body_error("gzip_past_ratio_cap", "A 64-byte gzip body that inflates to 6,401 bytes: one byte past 100 x, so inflating stops there.",
            Frame { header: Header::Downlink(pb::Downlink { seq: 51, body_type: 9 }), gzip: true, body: past_cap.into() },
            Error::DecompressionLimit { limit: 6_400 }),
        body_error("gzip_flag_on_plain_body", "Flags say gzip, the body is plain text.",
            Frame { header: Header::Downlink(pb::Downlink { seq: 47, body_type: 0 }), gzip: true, body: Bytes::from_static(b"plain text") },
            Error::CorruptBody),
        body_error("batch_nested", "A BATCH whose body holds a BATCH.",
            Frame::with_body(Header::Batch(pb::Batch { count: 1 }), nested_body.freeze()),
            Error::Malformed("a BATCH holds a BATCH")),
        body_error("batch_count_mismatch", "A BATCH that says 3 frames and holds 2.",
            Frame::with_body(Header::Batch(pb::Batch { count: 3 }), two_frames.clone().freeze()),
            Error::Malformed("BATCH count does not match its frames")),
        body_error("batch_count_over_cap", "A BATCH announcing 1025 frames, one over the default cap: refused before its body is inflated.",
            Frame::with_body(Header::Batch(pb::Batch { count: 1025 }), Bytes::from_static(b"not even looked at")),
            Error::Malformed("more frames than max_batch_frames")),
        body_error("batch_truncated_inner", "A BATCH whose second frame is cut short.",
            Frame::with_body(Header::Batch(pb::Batch { count: 2 }), two_frames.clone().freeze().slice(..20)),
            Error::Truncated { needed: 1 }),
        body_error("batch_extra_frame", "A BATCH that says 2 frames and holds 3: the third is refused.",
            Frame::with_body(Header::Batch(pb::Batch { count: 2 }), three_frames.freeze()),
            Error::Malformed("BATCH count does not match its frames")),
        body_error("batch_trailing_bytes", "A BATCH of 2 frames followed by two more bytes: they are read as the start of a frame, which the body ends inside.",
            Frame::with_body(Header::Batch(pb::Batch { count: 2 }), [&two_frames[..], &[0x00, 0x00]].concat()),
            Error::Truncated { needed: 8 }),
        body_error("batch_inner_unknown_kind", "A BATCH holding a frame of kind 0x10: an inner frame is checked as on the stream (PROTOCOL.md 3.2), and its error is reported with its own code.",
            Frame::with_body(Header::Batch(pb::Batch { count: 1 }), unknown_kind_inner),
            Error::UnknownKind { kind: 0x10 }),
    ]
}

fn body_result(frame: &Frame, limits: &Limits) -> Result<(), Error> {
    if frame.kind() == Kind::Batch {
        decode_batch(frame, limits).map(drop)
    } else {
        frame.decompressed_body(limits).map(drop)
    }
}

/// What a vector looks like on disk.
fn to_file(v: &Vector) -> Value {
    let limits = Limits::default();
    let mut o = BTreeMap::new();
    o.insert("name", json!(v.name));
    o.insert("description", json!(v.description));
    o.insert("hex", json!(hex::encode(&v.hex)));
    match &v.expect {
        Expect::Frame { frame, reencoded } => {
            o.insert("frame", readable::to_json(frame, &limits));
            if let Some(r) = reencoded {
                o.insert("reencoded_hex", json!(hex::encode(r)));
            }
        }
        Expect::Error(e) => {
            o.insert("error", json!(e.name()));
            o.insert("error_code", json!(e.code().as_str_name()));
        }
        Expect::BodyError { frame, error } => {
            o.insert("frame", readable::to_json(frame, &limits));
            o.insert("body_error", json!(error.name()));
            o.insert("error_code", json!(error.code().as_str_name()));
        }
    }
    serde_json::to_value(o).unwrap()
}

fn file_path(v: &Vector) -> PathBuf {
    let sub = match v.expect {
        Expect::Frame { .. } => "valid",
        _ => "invalid",
    };
    vectors_dir().join(sub).join(format!("{}.json", v.name))
}

/// A byte stream as a receiver reads it: complete frames back to back, then maybe bytes
/// that fail (or end inside a frame).
struct Stream {
    name: &'static str,
    description: &'static str,
    frames: Vec<Frame>,
    /// Bytes after the frames.
    tail: Vec<u8>,
    /// What the tail gives once all of it is there; `None`: no tail.
    error: Option<Error>,
}

fn stream_to_file(s: &Stream) -> Value {
    let limits = Limits::default();
    let mut hex = Vec::new();
    for f in &s.frames {
        hex.extend(enc(f));
    }
    let offset = hex.len();
    hex.extend_from_slice(&s.tail);
    let mut o = BTreeMap::new();
    o.insert("name", json!(s.name));
    o.insert("description", json!(s.description));
    o.insert("hex", json!(hex::encode(&hex)));
    o.insert(
        "frames",
        Value::Array(
            s.frames
                .iter()
                .map(|f| readable::to_json(f, &limits))
                .collect(),
        ),
    );
    if let Some(e) = &s.error {
        o.insert("error", json!(e.name()));
        o.insert("error_code", json!(e.code().as_str_name()));
        o.insert("error_offset", json!(offset));
    }
    serde_json::to_value(o).unwrap()
}

fn streams() -> Vec<Stream> {
    let ping = Frame::new(Header::Ping(pb::Ping {}));
    let ack = |seq| Frame::new(Header::DownlinkAck(pb::DownlinkAck { seq }));
    let uplink = Frame::with_body(
        Header::Uplink(pb::Uplink {
            msg_id: 7,
            body_type: 0,
        }),
        chat_text("", "bob", 7, "hi bob"),
    );
    let stream = |name, description, frames, tail: Vec<u8>, error| Stream {
        name,
        description,
        frames,
        tail,
        error,
    };
    vec![
        stream("frames_back_to_back", "A LOGIN, a PING, an UPLINK and a DOWNLINK_ACK with nothing between them: a receiver finds each frame's end from its length field alone.",
            vec![Frame::new(Header::Login(Box::new(example_login()))), ping.clone(), uplink.clone(), ack(3)], Vec::new(), None),
        stream("frame_then_http", "A PING, then an HTTP request on the same connection: one frame, then bad_magic at the request's byte 4.",
            vec![ping.clone()], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), Some(Error::BadMagic { found: b'/' })),
        stream("frames_then_oversize", "A PING and an UPLINK, then a fixed header announcing length 65537: two frames, then frame_too_large from that fixed header alone, before any of its body.",
            vec![ping.clone(), uplink.clone()], raw(DEFAULT_MAX_FRAME_LEN + 1, MAGIC, VERSION, 0, Kind::Uplink as u8, 0, &[]),
            Some(Error::FrameTooLarge { len: DEFAULT_MAX_FRAME_LEN as u64 + 1, max: DEFAULT_MAX_FRAME_LEN })),
        stream("frame_then_malformed_header", "A DOWNLINK_ACK, then a DOWNLINK_ACK whose seq has wire type 2: one frame, then malformed_header once the second frame is all there.",
            vec![ack(3)], raw(9, MAGIC, VERSION, 0, Kind::DownlinkAck as u8, 3, &[0x0a, 0x01, 0x00]),
            Some(Header::decode(Kind::DownlinkAck, &[0x0a, 0x01, 0x00]).unwrap_err())),
        stream("frames_then_fin_inside_a_frame", "Two frames, then 7 bytes of a third, then the peer closes (FIN): a stream decoder waits for more; at the close it is truncated, and the receiver sends ERROR(MALFORMED_FRAME) before closing.",
            vec![ping.clone(), ack(4)], enc(&ping)[..7].to_vec(), Some(Error::Truncated { needed: 3 })),
    ]
}

/// One connection's frames in order, each with its direction.
struct Transcript {
    name: &'static str,
    description: &'static str,
    steps: Vec<Step>,
}

struct Step {
    /// "c2g" (client to gateway) or "g2c".
    dir: &'static str,
    note: &'static str,
    frame: Frame,
    /// The frame is fine but its body does not inflate: whoever inflates it gets this.
    body_error: Option<Error>,
}

fn c2g(note: &'static str, frame: Frame) -> Step {
    Step {
        dir: "c2g",
        note,
        frame,
        body_error: None,
    }
}

fn g2c(note: &'static str, frame: Frame) -> Step {
    Step {
        dir: "g2c",
        note,
        frame,
        body_error: None,
    }
}

impl Step {
    fn body_error(self, e: Error) -> Step {
        Step {
            body_error: Some(e),
            ..self
        }
    }
}

fn transcript_to_file(t: &Transcript) -> Value {
    let limits = Limits::default();
    let steps = t
        .steps
        .iter()
        .map(|s| {
            let mut o = json!({
                "dir": s.dir,
                "note": s.note,
                "hex": hex::encode(enc(&s.frame)),
                "frame": readable::to_json(&s.frame, &limits),
            });
            if let Some(e) = &s.body_error {
                o["body_error"] = json!(e.name());
            }
            o
        })
        .collect();
    json!({ "name": t.name, "description": t.description, "steps": Value::Array(steps) })
}

fn transcripts() -> Vec<Transcript> {
    let login = example_login();
    let resume = |last_seq| {
        Frame::new(Header::Login(Box::new(pb::Login {
            resume: Some(pb::Resume {
                session_id: Bytes::from_static(&SESSION_ID),
                last_seq,
            }),
            ..example_login()
        })))
    };
    let result = |resumed, gap_from, gap_to, server_time_ms| {
        Frame::new(Header::LoginResult(Box::new(pb::LoginResult {
            code: pb::ErrorCode::Ok as i32,
            session_id: Bytes::from_static(&SESSION_ID),
            heartbeat_interval_ms: 30_000,
            server_id: "gw-1".into(),
            server_time_ms,
            resumed,
            gap_from,
            gap_to,
            ..Default::default()
        })))
    };
    let ack = |seq| Frame::new(Header::DownlinkAck(pb::DownlinkAck { seq }));
    let uplink_ack = |msg_id, code: pb::ErrorCode, message: &str| {
        Frame::new(Header::UplinkAck(pb::UplinkAck {
            msg_id,
            code: code as i32,
            retry_after_ms: 0,
            message: message.into(),
        }))
    };
    let to_bob = || Some(chat::chat_message::Target::ToUser("bob".into()));
    let from_bob = |seq, client_msg_id, server_msg_id, at, text| {
        downlink(
            seq,
            chat_stamped(
                "bob",
                Some(chat::chat_message::Target::ToUser("alice".into())),
                client_msg_id,
                server_msg_id,
                at,
                text,
            ),
        )
    };
    let mut corrupt = gzip(long_text().as_bytes(), 6).unwrap();
    let n = corrupt.len();
    corrupt[n - 6] ^= 0xFF;
    vec![
        Transcript {
            name: "login_echo",
            description: "A fresh login; a message with no target, which the reference back end echoes to the sending session; the ack of the echo; a heartbeat.",
            steps: vec![
                c2g("The first frame, within the login deadline (10 s) of connecting.",
                    Frame::new(Header::Login(Box::new(login.clone())))),
                g2c("A new session; PING after 30 s without sending.", result(false, 0, 0, 1_764_028_800_000)),
                c2g("A ChatMessage with no target: sender left empty, the gateway stamps it.",
                    Frame::with_body(Header::Uplink(pb::Uplink { msg_id: 1, body_type: 0 }),
                        chat_stamped("", None, 1, 0, 0, "note to self"))),
                g2c("The echo, stamped with sender, server_msg_id and sent_at_ms: seq 1 of the session. It may come before or after the UPLINK_ACK.",
                    downlink(1, chat_stamped("alice", None, 1, 1, 1_764_028_800_250, "note to self"))),
                g2c("The upstream accepted uplink 1.", uplink_ack(1, pb::ErrorCode::Ok, "")),
                c2g("Cumulative ack within 200 ms.", ack(1)),
                c2g("30 s later, nothing sent since: a heartbeat.", Frame::new(Header::Ping(pb::Ping {}))),
                g2c("At once.", Frame::new(Header::Pong(pb::Pong {}))),
            ],
        },
        Transcript {
            name: "resume_with_gap",
            description: "A resume that is honoured with a gap: downlinks 42..=57 are not held by this gateway (e.g. the session was restored from elsewhere); the replay starts at 58.",
            steps: vec![
                c2g("Resume: everything up to seq 41 was received and processed.", resume(41)),
                g2c("Honoured, same session; 42..=57 will not come: fetch them from the back end.", result(true, 42, 57, 1_764_028_860_000)),
                g2c("The replay starts after gap_to.", from_bob(58, 5, 120, 1_764_028_830_000, "are you there?")),
                g2c("Then what followed, in order.", from_bob(59, 6, 121, 1_764_028_840_000, "call me")),
                c2g("Cumulative ack of both.", ack(59)),
            ],
        },
        Transcript {
            name: "replay_in_batch",
            description: "A resume whose replay comes packed in one gzip BATCH (the reference gateway packs replays of 16 frames or more; three keep the example short), then a new downlink.",
            steps: vec![
                c2g("Resume from seq 10; the client reads gzip.", resume(10)),
                g2c("Honoured, no gap.", result(true, 0, 0, 1_764_028_920_000)),
                g2c("Seqs 11..=13 in one BATCH: processed in order as if they had come one by one.", replay_batch()),
                g2c("New downlinks only after the replay.", from_bob(14, 7, 130, 1_764_028_920_100, "welcome back")),
                c2g("Cumulative ack of the replay and the new one.", ack(14)),
            ],
        },
        Transcript {
            name: "uplink_rejected_body",
            description: "An UPLINK whose gzip body does not inflate: the gateway forwards it without inflating, the upstream refuses it, and the connection stays open.",
            steps: vec![
                c2g("Logged in already (not shown). The body's CRC-32 is wrong.",
                    Frame { header: Header::Uplink(pb::Uplink { msg_id: 12, body_type: 0 }), gzip: true, body: corrupt.into() })
                    .body_error(Error::CorruptBody),
                g2c("REJECTED by the upstream, not a framing-level ERROR: do not resend.",
                    uplink_ack(12, pb::ErrorCode::Rejected, "body: corrupt gzip body")),
                c2g("The connection carries on.",
                    Frame::with_body(Header::Uplink(pb::Uplink { msg_id: 13, body_type: 0 }),
                        chat_stamped("", to_bob(), 13, 0, 0, "sorry, again: see you at seven"))),
                g2c("Accepted.", uplink_ack(13, pb::ErrorCode::Ok, "")),
            ],
        },
    ]
}

/// Every file `protocol/vectors/` must hold, with its contents.
fn all_files() -> Vec<(PathBuf, Value)> {
    let mut out: Vec<(PathBuf, Value)> = definitions()
        .iter()
        .map(|v| (file_path(v), to_file(v)))
        .collect();
    for s in streams() {
        let path = vectors_dir()
            .join("streams")
            .join(format!("{}.json", s.name));
        out.push((path, stream_to_file(&s)));
    }
    for t in transcripts() {
        let path = vectors_dir()
            .join("transcripts")
            .join(format!("{}.json", t.name));
        out.push((path, transcript_to_file(&t)));
    }
    out
}

/// The directories of `protocol/vectors/`, each read by a check below.
const SUBDIRS: [&str; 4] = ["valid", "invalid", "streams", "transcripts"];

/// The JSON files of one directory. Anything else there fails: nothing would check it.
fn files_in(sub: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir(vectors_dir().join(sub)) else {
        return out;
    };
    for e in dir {
        let p = e.unwrap().path();
        assert!(
            p.extension().is_some_and(|x| x == "json") && p.is_file(),
            "{}: not a vector file, and nothing checks it",
            p.display()
        );
        out.push(p);
    }
    out.sort();
    out
}

fn files_on_disk() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = SUBDIRS.iter().flat_map(|s| files_in(s)).collect();
    out.sort();
    out
}

#[test]
fn vector_files_match_their_definitions() {
    let files = all_files();
    let bless = std::env::var_os("TETHER_BLESS").is_some();
    let mut expected: Vec<PathBuf> = Vec::new();
    for (path, value) in &files {
        let text = serde_json::to_string_pretty(value).unwrap() + "\n";
        if bless {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, &text).unwrap();
        } else {
            let on_disk = fs::read_to_string(path).unwrap_or_else(|_| {
                panic!("{} is missing (TETHER_BLESS=1 writes it)", path.display())
            });
            assert!(
                on_disk == text,
                "{} differs from its definition",
                path.display()
            );
        }
        expected.push(path.clone());
    }
    expected.sort();
    let unique: std::collections::BTreeSet<_> = expected.iter().collect();
    assert_eq!(unique.len(), expected.len(), "vector names are unique");
    // Only the checked directories and the README: a file elsewhere would be read by nobody.
    for e in fs::read_dir(vectors_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            (p.is_dir() && SUBDIRS.contains(&name.as_str())) || name == "README.md",
            "{}: nothing checks it",
            p.display()
        );
    }
    if !bless {
        assert_eq!(files_on_disk(), expected, "a vector file has no definition");
    }
}

/// Checks that `v` has only keys from `allowed`: a key nobody reads is a claim nobody checks.
fn only_keys(v: &Value, allowed: &[&str], name: &str) {
    for k in v.as_object().unwrap().keys() {
        assert!(
            allowed.contains(&k.as_str()),
            "{name}: key {k} is not checked by anything"
        );
    }
}

/// Frames a client sends (besides ERROR, which either side sends).
fn sent_by_client(kind: Kind) -> bool {
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

#[test]
fn check_every_stream_file() {
    let limits = Limits::default();
    let files = files_in("streams");
    assert!(files.len() >= 5, "only {} stream files found", files.len());
    for path in files {
        let v: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let name = path.display().to_string();
        only_keys(
            &v,
            &[
                "name",
                "description",
                "hex",
                "frames",
                "error",
                "error_code",
                "error_offset",
            ],
            &name,
        );
        let bytes = Bytes::from(hex::decode(v["hex"].as_str().unwrap()).unwrap());
        let want: Vec<Frame> = v["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| readable::from_json(f).unwrap_or_else(|e| panic!("{name}: {e}")))
            .collect();

        // As one complete input: frame after frame, then the error (if any) at its offset.
        let (mut rest, mut offset, mut got) = (bytes.clone(), 0, Vec::new());
        let error = loop {
            if rest.is_empty() {
                break None;
            }
            match decode_frame(&rest, &limits) {
                Ok((f, used)) => {
                    assert_eq!(enc(&f), rest[..used], "{name}: frame {}", got.len());
                    got.push(f);
                    offset += used;
                    rest = rest.slice(used..);
                }
                Err(e) => break Some(e),
            }
        };
        assert_eq!(got, want, "{name}");
        for (f, j) in got.iter().zip(v["frames"].as_array().unwrap()) {
            assert_eq!(&readable::to_json(f, &limits), j, "{name}");
        }
        match &error {
            Some(e) => {
                assert_eq!(Some(e.name()), v["error"].as_str(), "{name}");
                assert_eq!(
                    Some(e.code().as_str_name()),
                    v["error_code"].as_str(),
                    "{name}"
                );
                assert_eq!(v["error_offset"].as_u64(), Some(offset as u64), "{name}");
            }
            None => {
                for k in ["error", "error_code", "error_offset"] {
                    assert!(v.get(k).is_none(), "{name}: {k} without an error");
                }
            }
        }

        // Through the streaming decoder, in one piece and byte by byte: the same frames,
        // then the same error, except that a truncated tail just waits for more.
        let expect_streamed = match &error {
            Some(Error::Truncated { .. }) => None,
            e => e.clone(),
        };
        for chunk in [bytes.len(), 1] {
            let decoder = Decoder::new(limits);
            let (mut buf, mut frames, mut streamed) = (BytesMut::new(), Vec::new(), None);
            'feed: for piece in bytes.chunks(chunk) {
                buf.put_slice(piece);
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(f)) => frames.push(f),
                        Ok(None) => break,
                        Err(e) => {
                            streamed = Some(e);
                            break 'feed;
                        }
                    }
                }
            }
            assert_eq!(frames, want, "{name}: streamed in pieces of {chunk}");
            assert_eq!(streamed, expect_streamed, "{name}: pieces of {chunk}");
        }
    }
}

#[test]
fn check_every_transcript_file() {
    let limits = Limits::default();
    let files = files_in("transcripts");
    assert!(files.len() >= 3, "only {} transcripts found", files.len());
    for path in files {
        let v: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let name = path.display().to_string();
        only_keys(&v, &["name", "description", "steps"], &name);
        let steps = v["steps"].as_array().unwrap();
        assert!(!steps.is_empty(), "{name}");
        for (i, step) in steps.iter().enumerate() {
            let at = format!("{name}: step {i}");
            only_keys(step, &["dir", "note", "hex", "frame", "body_error"], &at);
            let bytes = Bytes::from(hex::decode(step["hex"].as_str().unwrap()).unwrap());
            let frame = decode_exact(&bytes, &limits).unwrap_or_else(|e| panic!("{at}: {e}"));
            assert_eq!(&readable::to_json(&frame, &limits), &step["frame"], "{at}");
            let parsed =
                readable::from_json(&step["frame"]).unwrap_or_else(|e| panic!("{at}: {e}"));
            assert_eq!(parsed, frame, "{at}");
            assert_eq!(enc(&parsed), bytes, "{at}");
            match (body_result(&frame, &limits), step.get("body_error")) {
                (Ok(()), None) => {}
                (Err(e), Some(want)) => assert_eq!(Some(e.name()), want.as_str(), "{at}"),
                (got, want) => panic!("{at}: body gives {got:?}, the file says {want:?}"),
            }
            let kind = frame.kind();
            match step["dir"].as_str() {
                Some("c2g") => assert!(
                    sent_by_client(kind) || kind == Kind::Error,
                    "{at}: a client does not send {kind}"
                ),
                Some("g2c") => assert!(
                    !sent_by_client(kind),
                    "{at}: a gateway does not send {kind}"
                ),
                d => panic!("{at}: dir {d:?} is neither c2g nor g2c"),
            }
        }
    }
}

#[test]
fn check_every_vector_file() {
    let limits = Limits::default();
    let files: Vec<PathBuf> = ["valid", "invalid"]
        .iter()
        .flat_map(|s| files_in(s))
        .collect();
    assert!(files.len() >= 40, "only {} vector files found", files.len());
    let mut kinds_seen = std::collections::BTreeSet::new();
    for path in files {
        let v: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let name = path.display().to_string();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in &keys {
            assert!(
                [
                    "name",
                    "description",
                    "hex",
                    "frame",
                    "reencoded_hex",
                    "error",
                    "body_error",
                    "error_code"
                ]
                .contains(k),
                "{name}: key {k} is not checked by anything"
            );
        }
        let bytes = Bytes::from(hex::decode(v["hex"].as_str().unwrap()).unwrap());
        let error_code = v.get("error_code").map(|c| c.as_str().unwrap().to_owned());

        if let Some(err) = v.get("error") {
            // Invalid framing: in one piece...
            let e = decode_exact(&bytes, &limits).expect_err(&name);
            assert_eq!(e.name(), err.as_str().unwrap(), "{name}");
            assert_eq!(
                Some(e.code().as_str_name().to_owned()),
                error_code,
                "{name}"
            );
            // ...and streamed byte by byte: the same error, or "need more" for truncation.
            let decoder = Decoder::new(limits);
            let mut buf = BytesMut::new();
            let mut streamed = None;
            for b in bytes.iter() {
                buf.put_u8(*b);
                match decoder.decode(&mut buf) {
                    Ok(None) => {}
                    Ok(Some(f)) => panic!("{name}: decoded {f:?}"),
                    Err(e) => {
                        streamed = Some(e);
                        break;
                    }
                }
            }
            match e {
                Error::Truncated { .. } => assert_eq!(streamed, None, "{name}"),
                _ => assert_eq!(streamed, Some(e), "{name}"),
            }
            assert!(v.get("frame").is_none(), "{name}");
            continue;
        }

        let frame = decode_exact(&bytes, &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
        kinds_seen.insert(frame.kind());
        let readable_form = &v["frame"];
        // The bytes decode to the readable form (derived fields included)...
        assert_eq!(&readable::to_json(&frame, &limits), readable_form, "{name}");
        // ...and the readable form encodes back to the bytes.
        let parsed = readable::from_json(readable_form).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed, frame, "{name}");
        let want = match v.get("reencoded_hex") {
            Some(h) => hex::decode(h.as_str().unwrap()).unwrap(),
            None => bytes.to_vec(),
        };
        assert_eq!(enc(&parsed), want, "{name}");

        match v.get("body_error") {
            Some(err) => {
                let e = body_result(&frame, &limits).expect_err(&name);
                assert_eq!(e.name(), err.as_str().unwrap(), "{name}");
                assert_eq!(
                    Some(e.code().as_str_name().to_owned()),
                    error_code,
                    "{name}"
                );
            }
            None => {
                assert_eq!(error_code, None, "{name}");
                body_result(&frame, &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
                if frame.gzip {
                    let plain = hex::decode(readable_form["body_plain"].as_str().unwrap()).unwrap();
                    assert_eq!(frame.decompressed_body(&limits).unwrap(), plain, "{name}");
                }
            }
        }
    }
    assert_eq!(
        kinds_seen.into_iter().collect::<Vec<_>>(),
        Kind::ALL.to_vec(),
        "a kind has no valid vector"
    );
}
