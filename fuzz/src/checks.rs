//! The properties the fuzz targets check, as plain functions: the fuzz targets call them, and
//! `codec/tests/fuzz_regressions.rs` (which includes this file by path) replays the inputs
//! kept under `fuzz/regressions/` through them without the fuzzer. Each panics when a
//! property breaks; none may panic for any other reason.

use bytes::{Bytes, BytesMut};
use tether_codec::{decode_batch, gunzip, Decoder, Error, Frame, Header, Kind, Limits};
use tether_protocol::pb;

/// Small limits, so that the fuzzer reaches the edges quickly.
pub fn small_limits() -> Limits {
    Limits {
        max_frame_len: 4096,
        max_header_len: 512,
        max_decompressed_len: 64 * 1024,
        max_expansion_ratio: 100,
        max_batch_frames: 32,
    }
}

fn decode_stream(decoder: &Decoder, buf: &mut BytesMut) -> (Vec<Frame>, Option<Error>) {
    let mut frames = Vec::new();
    loop {
        let before = buf.len();
        match decoder.decode(buf) {
            Ok(Some(f)) => {
                // The bytes a frame took on the wire are within the cap. (Not its
                // `encoded_len`: re-encoding can be longer than the wire form, e.g. a
                // negative enum value is a 10-byte varint; fuzz/regressions/decode/
                // negative_enum_reencodes_longer_than_the_wire.)
                assert!(before - buf.len() <= 4 + decoder.limits.frame_len_cap() as usize);
                frames.push(f)
            }
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// Inflating or unpacking a frame's body stays within the limits.
fn check_body(frame: &Frame, limits: &Limits) {
    if let Ok(body) = frame.decompressed_body(limits) {
        if frame.gzip {
            assert!(body.len() <= limits.decompressed_cap(frame.body.len()));
        }
    }
    if frame.kind() == Kind::Batch {
        if let Ok(inner) = decode_batch(frame, limits) {
            for f in &inner {
                assert!(f.kind() != Kind::Batch, "a BATCH held a BATCH");
            }
        }
    }
}

/// Arbitrary bytes through the streaming decoder, every frame's body inflated / unpacked.
pub fn decode(data: &[u8]) {
    for limits in [Limits::default(), small_limits()] {
        let decoder = Decoder::new(limits);
        let mut buf = BytesMut::from(data);
        let (frames, _) = decode_stream(&decoder, &mut buf);
        for f in &frames {
            check_body(f, &limits);
        }
    }
}

/// The same bytes fed in arbitrary chunks give the same frames and the same error as in
/// one piece. `data[0]` says how many chunk sizes follow; the rest is the stream.
pub fn decode_chunked(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % 16 + 1).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let decoder = Decoder::new(small_limits());
    let whole = decode_stream(&decoder, &mut BytesMut::from(stream));

    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut error = None;
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() && error.is_none() {
        let size = (sizes.get(i % sizes.len().max(1)).copied().unwrap_or(1) as usize).max(1);
        let end = (at + size).min(stream.len());
        buf.extend_from_slice(&stream[at..end]);
        at = end;
        i += 1;
        let (fs, e) = decode_stream(&decoder, &mut buf);
        frames.extend(fs);
        error = e;
    }
    assert_eq!(frames, whole.0, "chunking changed the frames");
    assert_eq!(error, whole.1, "chunking changed the error");
}

/// Bounded decompression of arbitrary bytes.
pub fn gunzip_bounded(data: &[u8]) {
    let limits = small_limits();
    if let Ok(out) = gunzip(data, &limits) {
        assert!(out.len() <= limits.decompressed_cap(data.len()));
    }
}

/// decode → encode → decode gives the same frame, and encoding is stable after that.
pub fn roundtrip(data: &[u8]) {
    let limits = small_limits();
    let decoder = Decoder::new(limits);
    let (frames, _) = decode_stream(&decoder, &mut BytesMut::from(data));
    for frame in frames {
        let bytes = match frame.to_bytes(&limits) {
            Ok(b) => b,
            // Re-encoding can be longer than the input (prost packs a repeated field the
            // input sent unpacked), so a frame at the edge of a limit may no longer fit.
            Err(Error::FrameTooLarge { .. } | Error::HeaderTooLarge { .. }) => continue,
            Err(e) => panic!("encoding a decoded frame failed: {e}"),
        };
        let again = tether_codec::decode_exact(&bytes, &limits).expect("re-encoded frame decodes");
        assert_eq!(again, frame, "decode(encode(f)) != f");
        let bytes2 = again.to_bytes(&limits).expect("encodes again");
        assert_eq!(bytes2, bytes, "encoding is not stable");
    }
}

/// Arbitrary bytes as the body of a BATCH frame: `data[0..4]` the count, bit 0 of
/// `data[4]` the gzip flag, the rest the body.
pub fn batch(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let count = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) % 64; // some over the cap of 32
    let frame = Frame {
        header: Header::Batch(pb::Batch { count }),
        gzip: data[4] & 1 == 1,
        body: Bytes::copy_from_slice(&data[5..]),
    };
    let limits = small_limits();
    if let Ok(inner) = decode_batch(&frame, &limits) {
        assert_eq!(inner.len(), count as usize);
        assert!(inner.iter().all(|f| f.kind() != Kind::Batch));
    }
}
