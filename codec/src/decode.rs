//! Decoding: bytes in, frames or errors out. No I/O, no clock, no tokio.

use bytes::{Buf, Bytes, BytesMut};

use crate::{
    frame::{FixedHeader, Headers},
    Error, Frame, Limits,
};

/// The streaming decoder. Stateless apart from its limits: feed it the read buffer as
/// often as bytes arrive.
#[derive(Debug, Clone, Copy, Default)]
pub struct Decoder {
    pub limits: Limits,
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder { limits }
    }

    /// Takes the next complete frame off the front of `src`.
    ///
    /// - `Ok(Some(frame))`: one frame was split off `src`; its body shares `src`'s memory.
    /// - `Ok(None)`: need more bytes. `src` is unchanged, with room reserved for the rest of
    ///   the frame (never more than the frame-length cap, which is checked on the length
    ///   prefix before anything is reserved).
    /// - `Err(e)`: the stream is broken at this frame; send ERROR(`e.code()`) and close.
    pub fn decode(&self, src: &mut BytesMut) -> Result<Option<Frame>, Error> {
        let Some(fixed) = FixedHeader::parse(src, &self.limits)? else {
            return Ok(None);
        };
        let frame_len = fixed.frame_len();
        if src.len() < frame_len {
            src.reserve(frame_len - src.len());
            return Ok(None);
        }
        if fixed.body_len() == 0 {
            let frame = Frame::from_parts(fixed, Headers(&src[..frame_len]))?;
            src.advance(frame_len);
            return Ok(Some(frame));
        }
        Frame::from_parts(fixed, src.split_to(frame_len)).map(Some)
    }

    /// The stream ended with `rest` left over after the last frame [`decode`](Self::decode)
    /// took: `None` if nothing is left, else the error the peer is owed (PROTOCOL.md §3.2: a
    /// frame cut short is `MALFORMED_FRAME`, or the fixed header's own error).
    pub fn at_end(&self, rest: &[u8]) -> Option<Error> {
        (!rest.is_empty()).then(|| truncated(rest, &self.limits))
    }
}

/// Decodes the one frame at the front of a complete input: returns it and the bytes it
/// took. Input that ends inside the frame is [`Error::Truncated`].
pub fn decode_frame(src: &Bytes, limits: &Limits) -> Result<(Frame, usize), Error> {
    match FixedHeader::parse(src, limits)? {
        Some(fixed) if src.len() >= fixed.frame_len() => {
            let frame_len = fixed.frame_len();
            Ok((Frame::from_parts(fixed, src.slice(..frame_len))?, frame_len))
        }
        _ => Err(truncated(src, limits)),
    }
}

/// The error for input that ends before the frame at its front does: the fixed header's
/// own error if it has one, else how many bytes are missing.
pub(crate) fn truncated(src: &[u8], limits: &Limits) -> Error {
    match FixedHeader::parse(src, limits) {
        Err(e) => e,
        Ok(None) => Error::Truncated {
            needed: tether_protocol::FIXED_HEADER_LEN - src.len(),
        },
        Ok(Some(fixed)) => Error::Truncated {
            needed: fixed.frame_len().saturating_sub(src.len()),
        },
    }
}

/// Decodes an input that must be exactly one frame (a test vector, a datagram).
pub fn decode_exact(src: &Bytes, limits: &Limits) -> Result<Frame, Error> {
    let (frame, used) = decode_frame(src, limits)?;
    if used != src.len() {
        return Err(Error::Malformed("bytes follow the frame"));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use tether_protocol::pb;

    use super::*;
    use crate::Header;

    #[test]
    fn a_stream_that_ends_inside_a_frame_owes_an_error() {
        let d = Decoder::default();
        assert_eq!(d.at_end(b""), None);
        let ping = Frame::new(Header::Ping(pb::Ping {}))
            .to_bytes(&Limits::default())
            .unwrap();
        assert_eq!(d.at_end(&ping[..3]), Some(Error::Truncated { needed: 7 }));
        assert_eq!(d.at_end(&ping[..9]), Some(Error::Truncated { needed: 1 }));
        let mut long = ping.to_vec();
        long[3] = 20; // the length says 20: 14 bytes more
        assert_eq!(d.at_end(&long), Some(Error::Truncated { needed: 14 }));
        assert_eq!(
            d.at_end(&long).unwrap().code(),
            pb::ErrorCode::MalformedFrame
        );
    }

    #[test]
    fn a_decoded_body_points_into_the_read_buffer() {
        let frame = Frame::with_body(
            Header::Uplink(pb::Uplink {
                msg_id: 1,
                body_type: 0,
            }),
            Bytes::from_static(b"zero-copy body"),
        );
        let mut buf = BytesMut::with_capacity(256);
        frame.encode(&mut buf, &Limits::default()).unwrap();
        buf.put_slice(b"next");
        let range = buf.as_ptr_range();
        let decoded = Decoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(decoded, frame);
        assert!(
            range.contains(&decoded.body.as_ptr()),
            "the body was copied"
        );
        assert_eq!(&buf[..], b"next");
    }
}
