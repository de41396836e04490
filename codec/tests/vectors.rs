//! The protocol test vectors in `protocol/vectors/`: every file is loaded and checked.
//!
//! - `check_every_vector_file` reads each JSON file and checks it against the codec: a
//!   valid vector's hex decodes to its readable form and that form encodes back to the
//!   hex; an invalid vector's hex produces the error it names (in one piece and streamed);
//!   a `body_error` is what inflating or unpacking the body gives. It knows nothing of how
//!   the files were made.
//! - `vector_files_match_their_definitions` rebuilds every vector from the definitions
//!   below and fails when a file differs or is missing or extra (drift). To rewrite the
//!   files after a deliberate change: `TETHER_BLESS=1 cargo test -p tether-codec --all-features --test vectors`.

use std::{collections::BTreeMap, fs, path::PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use serde_json::{json, Value};
use tether_codec::{
    decode_batch, decode_exact, encode_batch, gzip, json as readable, CompressOptions, Decoder,
    Error, Frame, Header, Limits, DEFAULT_MAX_FRAME_LEN,
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
    let login = pb::Login {
        token: "v1.YWxpY2U.1767225600.6b1f0c".into(),
        user_id: "alice".into(),
        device_id: "d-7f3a".into(),
        platform: pb::Platform::Ios as i32,
        client_version: "ios-sdk/1.0.0".into(),
        compression: vec![pb::Compression::Gzip as i32],
        resume: None,
    };
    let long_text =
        "Meet at the usual place at seven; bring the slides and the printed agenda. ".repeat(12);
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
    let batch_inner = vec![
        downlink(11, chat_text("bob", "alice", 1, "one")),
        downlink(12, chat_text("bob", "alice", 2, "two")),
        downlink(13, Bytes::from(long_text.clone().into_bytes())),
    ];
    let batch = encode_batch(&batch_inner, &CompressOptions::default(), &limits).unwrap();
    assert!(batch.gzip, "the batch vector's body must be gzip");
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
        valid("login", "A first login from an iOS client that reads gzip bodies.",
            Frame::new(Header::Login(Box::new(login.clone())))),
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
        valid("uplink_ack_ok", "The upstream accepted uplink 7.",
            Frame::new(Header::UplinkAck(pb::UplinkAck { msg_id: 7, ..Default::default() }))),
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
        valid("downlink_ack", "The client has everything up to seq 44.",
            Frame::new(Header::DownlinkAck(pb::DownlinkAck { seq: 44 }))),
        valid("kick_logged_in_elsewhere", "The same device logged in on another connection; do not reconnect.",
            Frame::new(Header::Kick(Box::new(pb::Kick {
                reason: pb::KickReason::LoggedInElsewhere as i32,
                message: "logged in elsewhere".into(),
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
        valid("batch_gzip", "Three downlinks (seq 11..=13) replayed in one gzip BATCH; frames shows them decoded.",
            batch.clone()),
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
        invalid("malformed_header_wire_type", "A DOWNLINK header whose seq (field 1) has wire type 2.",
            raw(9, MAGIC, VERSION, 0, Kind::Downlink as u8, 3, &[0x0a, 0x01, 0x00]),
            Error::MalformedHeader { kind: Kind::Downlink, reason: pb::Downlink::decode(&[0x0au8, 0x01, 0x00][..]).unwrap_err() }),
        body_error("gzip_bomb", "A 2 KiB gzip body that inflates to 4 MiB: stopped at 100 x its size.",
            Frame { header: Header::Downlink(pb::Downlink { seq: 45, body_type: 0 }), gzip: true, body: bomb.clone().into() },
            Error::DecompressionLimit { limit: limits.decompressed_cap(bomb.len()) }),
        body_error("gzip_corrupt", "A gzip body whose CRC-32 does not match.",
            Frame { header: Header::Downlink(pb::Downlink { seq: 46, body_type: 0 }), gzip: true, body: corrupt.into() },
            Error::CorruptBody),
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
            Frame::with_body(Header::Batch(pb::Batch { count: 2 }), two_frames.freeze().slice(..20)),
            Error::Truncated { needed: 1 }),
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

fn files_on_disk() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["valid", "invalid"] {
        let Ok(dir) = fs::read_dir(vectors_dir().join(sub)) else {
            continue;
        };
        for e in dir {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn vector_files_match_their_definitions() {
    let defs = definitions();
    let bless = std::env::var_os("TETHER_BLESS").is_some();
    let mut expected: Vec<PathBuf> = Vec::new();
    for v in &defs {
        let path = file_path(v);
        let text = serde_json::to_string_pretty(&to_file(v)).unwrap() + "\n";
        if bless {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, &text).unwrap();
        } else {
            let on_disk = fs::read_to_string(&path).unwrap_or_else(|_| {
                panic!("{} is missing (TETHER_BLESS=1 writes it)", path.display())
            });
            assert!(
                on_disk == text,
                "{} differs from its definition",
                path.display()
            );
        }
        expected.push(path);
    }
    expected.sort();
    let names: std::collections::BTreeSet<_> = defs.iter().map(|v| v.name).collect();
    assert_eq!(names.len(), defs.len(), "vector names are unique");
    if !bless {
        assert_eq!(files_on_disk(), expected, "a vector file has no definition");
    }
}

#[test]
fn check_every_vector_file() {
    let limits = Limits::default();
    let files = files_on_disk();
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
