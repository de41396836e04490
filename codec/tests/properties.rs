//! Property tests: round trips, arbitrary splits, arbitrary bytes.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tether_codec::{
    decode_batch, decode_exact, encode_batch, gunzip, CompressOptions, Decoder, Error, Frame,
    Header, Limits,
};
use tether_protocol::pb;

fn small_string() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{0,24}"
}

fn header() -> impl Strategy<Value = Header> {
    let login = (
        small_string(),
        small_string(),
        small_string(),
        0i32..6,
        prop::collection::vec(0i32..2, 0..3),
        prop::option::of((prop::collection::vec(any::<u8>(), 16), any::<u64>())),
    )
        .prop_map(
            |(token, user_id, device_id, platform, compression, resume)| {
                Header::Login(Box::new(pb::Login {
                    token,
                    user_id,
                    device_id,
                    platform,
                    client_version: "sdk/1".into(),
                    compression,
                    resume: resume.map(|(id, last_seq)| pb::Resume {
                        session_id: id.into(),
                        last_seq,
                    }),
                }))
            },
        );
    let login_result = (
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(t, hb, resumed, gap_from, gap_to)| {
            Header::LoginResult(Box::new(pb::LoginResult {
                code: 0,
                session_id: Bytes::from_static(&[7; 16]),
                heartbeat_interval_ms: hb,
                server_id: "gw".into(),
                server_time_ms: t,
                resumed,
                gap_from,
                gap_to,
                message: String::new(),
                retry_after_ms: 0,
            }))
        });
    prop_oneof![
        login,
        login_result,
        Just(Header::Ping(pb::Ping {})),
        Just(Header::Pong(pb::Pong {})),
        (any::<u64>(), any::<u32>())
            .prop_map(|(msg_id, body_type)| Header::Uplink(pb::Uplink { msg_id, body_type })),
        (any::<u64>(), 0i32..600, small_string()).prop_map(|(msg_id, code, message)| {
            Header::UplinkAck(pb::UplinkAck {
                msg_id,
                code,
                retry_after_ms: 0,
                message,
            })
        }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(seq, body_type)| Header::Downlink(pb::Downlink { seq, body_type })),
        any::<u64>().prop_map(|seq| Header::DownlinkAck(pb::DownlinkAck { seq })),
        (0i32..6, small_string())
            .prop_map(|(reason, message)| Header::Kick(Box::new(pb::Kick { reason, message }))),
        (
            any::<u32>(),
            small_string(),
            prop::collection::vec(small_string(), 0..3)
        )
            .prop_map(
                |(d, reason, alternatives)| Header::GoAway(Box::new(pb::GoAway {
                    reconnect_delay_ms: d,
                    reason,
                    alternatives
                }))
            ),
        (any::<u64>(), small_string()).prop_map(|(request_id, room_id)| Header::RoomJoin(
            Box::new(pb::RoomJoin {
                request_id,
                room_id
            })
        )),
        (any::<u64>(), small_string()).prop_map(|(request_id, room_id)| Header::RoomLeave(
            Box::new(pb::RoomLeave {
                request_id,
                room_id
            })
        )),
        (any::<u64>(), small_string(), 0i32..600).prop_map(|(request_id, room_id, code)| {
            Header::RoomResult(Box::new(pb::RoomResult {
                request_id,
                room_id,
                code,
                message: String::new(),
            }))
        }),
        (
            0i32..600,
            small_string(),
            prop::collection::vec(any::<u32>(), 0..3)
        )
            .prop_map(
                |(code, message, supported_versions)| Header::Error(Box::new(pb::Error {
                    code,
                    message,
                    retry_after_ms: 0,
                    supported_versions
                }))
            ),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        header(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(header, gzip, body)| Frame {
            header,
            gzip,
            body: body.into(),
        })
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut buf = BytesMut::new();
    for f in frames {
        f.encode(&mut buf, &Limits::default()).unwrap();
    }
    buf
}

/// Decodes everything in `buf`: the frames and how the stream ended.
fn decode_all(decoder: &Decoder, buf: &mut BytesMut) -> (Vec<Frame>, Result<(), Error>) {
    let mut out = Vec::new();
    loop {
        match decoder.decode(buf) {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return (out, Ok(())),
            Err(e) => return (out, Err(e)),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encode_then_decode_gives_the_frame_back(f in frame()) {
        let bytes = f.to_bytes(&Limits::default()).unwrap();
        prop_assert_eq!(bytes.len(), f.encoded_len());
        prop_assert_eq!(decode_exact(&bytes, &Limits::default()).unwrap(), f);
    }

    #[test]
    fn a_stream_split_anywhere_decodes_to_the_same_frames(
        frames in prop::collection::vec(frame(), 1..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        garbage_tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut whole = encode_all(&frames);
        whole.extend_from_slice(&garbage_tail);
        let decoder = Decoder::default();
        let expected = decode_all(&decoder, &mut whole.clone());
        prop_assert_eq!(&expected.0[..], &frames[..]);

        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(whole.len() + 1)).collect();
        points.push(whole.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut end = Ok(());
        let mut from = 0;
        for to in points {
            buf.extend_from_slice(&whole[from..to]);
            from = to;
            let (fs, r) = decode_all(&decoder, &mut buf);
            got.extend(fs);
            if r.is_err() { end = r; break; }
        }
        prop_assert_eq!(got, expected.0);
        prop_assert_eq!(end, expected.1);
    }

    #[test]
    fn arbitrary_bytes_never_panic_nor_reserve_past_the_cap(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        max_frame_len in 6u32..4096,
    ) {
        let limits = Limits { max_frame_len, ..Limits::default() };
        let decoder = Decoder::new(limits);
        let mut buf = BytesMut::from(&bytes[..]);
        let start_cap = buf.capacity();
        let mut before = buf.len();
        while let Ok(Some(f)) = decoder.decode(&mut buf) {
            // What the frame took on the wire (re-encoding may be longer: a negative enum
            // value is a 10-byte varint).
            prop_assert!(before - buf.len() <= 4 + max_frame_len as usize);
            before = buf.len();
            // Bodies are inflated only on request, and then within the cap.
            if let Ok(body) = f.decompressed_body(&limits) {
                if f.gzip {
                    prop_assert!(body.len() <= limits.decompressed_cap(f.body.len()));
                }
            }
            let _ = decode_batch(&f, &limits);
        }
        // `reserve` asks for at most the rest of one capped frame.
        prop_assert!(buf.capacity() <= start_cap.max(buf.len() + 4 + max_frame_len as usize));
    }

    #[test]
    fn arbitrary_gzip_input_never_inflates_past_the_cap(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        ratio in 1u32..200,
    ) {
        let limits = Limits { max_expansion_ratio: ratio, max_decompressed_len: 4096, ..Limits::default() };
        if let Ok(out) = gunzip(&bytes, &limits) {
            prop_assert!(out.len() <= limits.decompressed_cap(bytes.len()));
            prop_assert!(out.capacity() <= limits.decompressed_cap(bytes.len()) + 1);
        }
    }

    #[test]
    fn batches_round_trip(frames in prop::collection::vec(frame(), 0..20)) {
        let limits = Limits::default();
        let batch = encode_batch(&frames, &CompressOptions::default(), &limits).unwrap();
        let bytes = batch.to_bytes(&limits).unwrap();
        let decoded = decode_exact(&bytes, &limits).unwrap();
        prop_assert_eq!(decode_batch(&decoded, &limits).unwrap(), frames);
    }
}

#[test]
fn encoder_refuses_what_the_decoder_would_reject() {
    let limits = Limits {
        max_frame_len: 100,
        ..Limits::default()
    };
    let f = Frame::with_body(
        Header::Downlink(pb::Downlink {
            seq: 1,
            body_type: 0,
        }),
        vec![0u8; 100],
    );
    let mut buf = BytesMut::new();
    assert!(matches!(
        f.encode(&mut buf, &limits),
        Err(Error::FrameTooLarge { .. })
    ));
    assert!(buf.is_empty(), "nothing written on failure");
    let big_login = Frame::new(Header::Login(Box::new(pb::Login {
        token: "x".repeat(5000),
        ..Default::default()
    })));
    assert!(matches!(
        big_login.encode(&mut buf, &Limits::default()),
        Err(Error::HeaderTooLarge { .. })
    ));
}

#[test]
fn batches_hold_at_most_max_batch_frames() {
    let limits = Limits {
        max_batch_frames: 3,
        ..Limits::default()
    };
    let ping = Frame::new(Header::Ping(pb::Ping {}));
    let three = encode_batch(&vec![ping.clone(); 3], &CompressOptions::default(), &limits).unwrap();
    assert_eq!(decode_batch(&three, &limits).unwrap().len(), 3);
    assert!(encode_batch(&vec![ping.clone(); 4], &CompressOptions::default(), &limits).is_err());
    // A body holding more frames than its count is refused without collecting them all.
    let four = encode_batch(
        &vec![ping; 4],
        &CompressOptions::default(),
        &Limits::default(),
    )
    .unwrap();
    let lying = Frame {
        header: Header::Batch(pb::Batch { count: 3 }),
        ..four
    };
    assert_eq!(
        decode_batch(&lying, &limits),
        Err(Error::Malformed("BATCH count does not match its frames"))
    );
}

#[test]
fn an_oversized_length_is_rejected_before_the_body_is_buffered() {
    // Ten bytes announcing a 16 MiB frame: the decoder must fail, not reserve 16 MiB.
    let mut buf = BytesMut::from(&[0x01, 0x00, 0x00, 0x00, 0xF7, 0x01, 0x00, 0x05, 0x00, 0x00][..]);
    let cap = buf.capacity();
    assert!(matches!(
        Decoder::default().decode(&mut buf),
        Err(Error::FrameTooLarge { .. })
    ));
    assert_eq!(buf.capacity(), cap);
}

#[test]
fn a_shared_body_with_per_connection_heads_equals_whole_frames() {
    // The room-broadcast path: one body, a different DOWNLINK seq per member.
    let limits = Limits::default();
    let body = Bytes::from_static(b"one body for every member");
    for seq in [1u64, 300, u64::MAX] {
        let header = Header::Downlink(pb::Downlink { seq, body_type: 0 });
        let mut head = BytesMut::new();
        tether_codec::encode_head(&header, false, body.len(), &mut head, &limits).unwrap();
        head.extend_from_slice(&body);
        let whole = Frame::with_body(header, body.clone())
            .to_bytes(&limits)
            .unwrap();
        assert_eq!(head.freeze(), whole);
    }
}
