//! The properties the fuzz targets check, as plain functions: the fuzz targets call them, and
//! `codec/tests/fuzz_regressions.rs` (which includes this file by path) replays the inputs
//! kept under `fuzz/regressions/` through them without the fuzzer. Each panics when a
//! property breaks; none may panic for any other reason.

use bytes::{Bytes, BytesMut};
use tether_codec::{
    decode_batch, decode_exact, decode_frame, gunzip, Decoder, Error, Frame, Header, Kind, Limits,
};
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
            assert!(inner.len() <= limits.max_batch_frames as usize);
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

/// `decode_frame` over the whole input, frame after frame, gives the frames and the error the
/// streaming decoder gave; where the stream stopped for more bytes (`left` bytes unused) it
/// reports `Truncated`. `decode_exact` accepts the input iff it is exactly one frame.
fn complete_input_agrees(
    data: &[u8],
    limits: &Limits,
    frames: &[Frame],
    error: &Option<Error>,
    left: usize,
) {
    let all = Bytes::copy_from_slice(data);
    let mut rest = all.clone();
    let mut got = Vec::new();
    let end = loop {
        if rest.is_empty() {
            break None;
        }
        match decode_frame(&rest, limits) {
            Ok((f, used)) => {
                got.push(f);
                rest = rest.slice(used..);
            }
            Err(e) => break Some(e),
        }
    };
    assert_eq!(
        got, frames,
        "decode_frame and Decoder::decode disagree on the frames"
    );
    match (error, &end) {
        (None, None) => assert_eq!(left, 0),
        (None, Some(Error::Truncated { needed })) => assert!(left > 0 && *needed > 0),
        _ => assert_eq!(
            &end, error,
            "decode_frame and Decoder::decode disagree on the error"
        ),
    }
    let exact = decode_exact(&all, limits);
    if frames.len() == 1 && error.is_none() && left == 0 {
        assert_eq!(exact.as_ref(), Ok(&frames[0]));
    } else {
        assert!(
            exact.is_err(),
            "decode_exact took an input that is not one frame"
        );
    }
}

/// The same bytes fed in arbitrary chunks give the same frames and the same error as in
/// one piece, and as `decode_frame` over the complete input. `data[0] % 16 + 1` chunk sizes
/// follow (bytes, 0 taken as 1, used in turn); the rest is the stream.
pub fn decode_chunked(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % 16 + 1).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let decoder = Decoder::new(small_limits());
    let mut all = BytesMut::from(stream);
    let whole = decode_stream(&decoder, &mut all);
    complete_input_agrees(stream, &decoder.limits, &whole.0, &whole.1, all.len());

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
        let cap = limits.decompressed_cap(data.len());
        assert!(out.len() <= cap);
        // The output buffer never grows past the cap plus the one byte that proves it crossed.
        assert!(out.capacity() <= cap + 1, "{} > {cap} + 1", out.capacity());
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

/// Arbitrary bytes as the body of a BATCH frame: `data[0..4]` the count (u32 LE), `data[4]`
/// the flags: bit 0 gzip, bit 1 take the count as it is (else mod 64, so that most counts are
/// near the cap of 32 frames); the rest the body.
pub fn batch(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let raw = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let count = if data[4] & 2 != 0 { raw } else { raw % 64 };
    let frame = Frame {
        header: Header::Batch(pb::Batch { count }),
        gzip: data[4] & 1 == 1,
        body: Bytes::copy_from_slice(&data[5..]),
    };
    let limits = small_limits();
    if let Ok(inner) = decode_batch(&frame, &limits) {
        assert_eq!(inner.len(), count as usize);
        assert!(
            count <= limits.max_batch_frames,
            "a BATCH over the frame cap unpacked"
        );
        assert!(inner.iter().all(|f| f.kind() != Kind::Batch));
    }
}
