//! BATCH frames: several frames in one body, so that a long resume replay travels as one
//! gzip member instead of hundreds of small frames.

use bytes::{Bytes, BytesMut};
use tether_protocol::pb;

use crate::{decode::decode_frame, CompressOptions, Error, Frame, Header, Limits};

/// Packs `frames` (none of them a BATCH) into one BATCH frame, its body compressed as
/// `compress` says. Fails if the result would break `limits`; split the input then.
pub fn encode_batch(
    frames: &[Frame],
    compress: &CompressOptions,
    limits: &Limits,
) -> Result<Frame, Error> {
    let mut body = BytesMut::with_capacity(frames.iter().map(Frame::encoded_len).sum());
    for f in frames {
        if matches!(f.header, Header::Batch(_)) {
            return Err(Error::Malformed("a BATCH holds a BATCH"));
        }
        f.encode(&mut body, limits)?;
    }
    if body.len() > limits.max_decompressed_len {
        return Err(Error::DecompressionLimit {
            limit: limits.max_decompressed_len,
        });
    }
    let count = u32::try_from(frames.len())
        .ok()
        .filter(|&n| n <= limits.max_batch_frames)
        .ok_or(Error::Malformed("more frames than max_batch_frames"))?;
    let (body, gzip) = compress.compress(body.freeze(), limits);
    let frame = Frame {
        header: Header::Batch(pb::Batch { count }),
        gzip,
        body,
    };
    // Fail here, not at the peer.
    if frame.encoded_len() > crate::FIXED_HEADER_LEN + limits.frame_len_cap() as usize {
        return Err(Error::FrameTooLarge {
            len: frame.encoded_len() as u64,
            max: limits.frame_len_cap(),
        });
    }
    Ok(frame)
}

/// Unpacks a BATCH frame: checks `count` against `max_batch_frames`, inflates the body
/// (bounded by `limits`) and decodes exactly `count` frames from it, none of them a BATCH,
/// with nothing left over.
pub fn decode_batch(frame: &Frame, limits: &Limits) -> Result<Vec<Frame>, Error> {
    let Header::Batch(pb::Batch { count }) = frame.header else {
        return Err(Error::Malformed("not a BATCH"));
    };
    if count > limits.max_batch_frames {
        return Err(Error::Malformed("more frames than max_batch_frames"));
    }
    let mut rest: Bytes = frame.decompressed_body(limits)?;
    // Every frame takes at least FIXED_HEADER_LEN bytes: that bounds the allocation.
    let mut out = Vec::with_capacity((count as usize).min(rest.len() / crate::FIXED_HEADER_LEN));
    // `count` is checked again per frame so that a body with more frames cannot grow `out`.
    while !rest.is_empty() {
        let (inner, used) = decode_frame(&rest, limits)?;
        if matches!(inner.header, Header::Batch(_)) {
            return Err(Error::Malformed("a BATCH holds a BATCH"));
        }
        if out.len() == count as usize {
            return Err(Error::Malformed("BATCH count does not match its frames"));
        }
        out.push(inner);
        rest = rest.slice(used..);
    }
    if out.len() != count as usize {
        return Err(Error::Malformed("BATCH count does not match its frames"));
    }
    Ok(out)
}
