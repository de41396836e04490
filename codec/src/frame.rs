//! The frame: a typed header (one protobuf message per kind) and an opaque body.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tether_protocol::{
    pb, Kind, FIXED_HEADER_LEN, FLAG_GZIP, LENGTH_PREFIX_LEN, MAGIC, MIN_LENGTH, VERSION,
};

use crate::{Error, Limits};

macro_rules! headers {
    ($( $(#[$doc:meta])* $variant:ident($ty:ty) ),* $(,)?) => {
        /// A frame's header: the protobuf message its kind byte names.
        ///
        /// The control kinds with strings (login, kick, goaway, rooms, error) are boxed so
        /// that the enum, and so every [`Frame`], stays small (48 bytes) on the hot path of
        /// heartbeats, uplinks, downlinks and acks: moving a larger frame around was a
        /// measurable part of decoding one (BENCHMARKS.md).
        #[derive(Debug, Clone, PartialEq)]
        pub enum Header {
            $( $(#[$doc])* $variant($ty), )*
        }

        impl Header {
            /// The kind byte this header travels under.
            pub fn kind(&self) -> Kind {
                match self { $( Header::$variant(_) => Kind::$variant, )* }
            }

            /// Size of the encoded protobuf header.
            pub fn encoded_len(&self) -> usize {
                match self { $( Header::$variant(m) => m.encoded_len(), )* }
            }

            pub(crate) fn encode_raw(&self, dst: &mut BytesMut) {
                // Cannot fail: the caller reserved `encoded_len` bytes.
                let r = match self { $( Header::$variant(m) => m.encode(dst), )* };
                debug_assert!(r.is_ok());
            }

            /// Parses `bytes` as the header of a `kind` frame. (Only LOGIN and LOGIN_RESULT
            /// have `bytes` fields, the 16-byte session id; they are copied. Decoding from a
            /// borrowed slice saves every other frame two reference-count updates.)
            #[inline]
            pub fn decode(kind: Kind, bytes: &[u8]) -> Result<Header, Error> {
                let bad = |reason| Error::MalformedHeader { kind, reason };
                Ok(match kind {
                    $( Kind::$variant => Header::$variant(<$ty>::decode(bytes).map_err(bad)?), )*
                })
            }
        }
    };
}

headers! {
    Login(Box<pb::Login>),
    LoginResult(Box<pb::LoginResult>),
    Ping(pb::Ping),
    Pong(pb::Pong),
    Uplink(pb::Uplink),
    UplinkAck(pb::UplinkAck),
    Downlink(pb::Downlink),
    DownlinkAck(pb::DownlinkAck),
    Kick(Box<pb::Kick>),
    GoAway(Box<pb::GoAway>),
    RoomJoin(Box<pb::RoomJoin>),
    RoomLeave(Box<pb::RoomLeave>),
    RoomResult(Box<pb::RoomResult>),
    Error(Box<pb::Error>),
    Batch(pb::Batch),
}

/// One frame: header, body, and whether the body is gzip.
///
/// A decoded frame's `body` is a slice of the decoder's read buffer, never a copy, and
/// it is never decompressed unless someone calls [`Frame::decompressed_body`]: the
/// gateway forwards bodies as they came.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub header: Header,
    /// Flags bit 0: `body` is a gzip member.
    pub gzip: bool,
    pub body: Bytes,
}

/// What a frame's bytes can come as: a slice of a complete input, or a piece split off a
/// read buffer.
pub(crate) trait FrameBytes: AsRef<[u8]> {
    /// The bytes from `at` on, as the body.
    fn into_body(self, at: usize) -> Bytes;
}

impl FrameBytes for Bytes {
    #[inline]
    fn into_body(mut self, at: usize) -> Bytes {
        bytes::Buf::advance(&mut self, at);
        self
    }
}

/// The bytes of a frame without a body, borrowed from the read buffer: decoding a
/// heartbeat or an ack takes no reference to the buffer at all.
pub(crate) struct Headers<'a>(pub(crate) &'a [u8]);

impl AsRef<[u8]> for Headers<'_> {
    fn as_ref(&self) -> &[u8] {
        self.0
    }
}

impl FrameBytes for Headers<'_> {
    fn into_body(self, at: usize) -> Bytes {
        debug_assert_eq!(
            at,
            self.0.len(),
            "Headers is only for frames without a body"
        );
        Bytes::new()
    }
}

impl FrameBytes for BytesMut {
    #[inline]
    fn into_body(mut self, at: usize) -> Bytes {
        bytes::Buf::advance(&mut self, at);
        self.freeze()
    }
}

/// The 10-byte fixed header, as parsed by [`FixedHeader::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// The length prefix: bytes after it.
    pub length: u32,
    pub flags: u8,
    pub kind: Kind,
    pub header_len: u16,
}

impl FixedHeader {
    /// Bytes of the whole frame, length prefix included.
    pub fn frame_len(&self) -> usize {
        LENGTH_PREFIX_LEN + self.length as usize
    }

    /// Bytes of the body.
    pub fn body_len(&self) -> usize {
        self.length as usize - MIN_LENGTH as usize - self.header_len as usize
    }

    /// Parses and checks the first [`FIXED_HEADER_LEN`] bytes of `src`; `Ok(None)` when
    /// fewer are there. Everything that can be known about a frame from its first ten
    /// bytes is checked here, before its body is buffered, in the order PROTOCOL.md §3.2
    /// gives (so every implementation reports the same error for the same bytes).
    #[inline]
    pub fn parse(src: &[u8], limits: &Limits) -> Result<Option<FixedHeader>, Error> {
        let Some(h) = src.first_chunk::<FIXED_HEADER_LEN>() else {
            return Ok(None);
        };
        if h[4] != MAGIC {
            return Err(Error::BadMagic { found: h[4] });
        }
        if h[5] != VERSION {
            return Err(Error::UnsupportedVersion { found: h[5] });
        }
        let length = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if length < MIN_LENGTH {
            return Err(Error::Malformed("length is below 6"));
        }
        let max = limits.frame_len_cap();
        if length > max {
            return Err(Error::FrameTooLarge {
                len: length.into(),
                max,
            });
        }
        let flags = h[6];
        if flags & tether_protocol::FLAGS_RESERVED != 0 {
            return Err(Error::Malformed("reserved flag bits are set"));
        }
        let kind = Kind::from_u8(h[7]).ok_or(Error::UnknownKind { kind: h[7] })?;
        let header_len = u16::from_be_bytes([h[8], h[9]]);
        if u32::from(header_len) > length - MIN_LENGTH {
            return Err(Error::Malformed("header_len exceeds length"));
        }
        if header_len > limits.max_header_len {
            return Err(Error::HeaderTooLarge {
                len: header_len,
                max: limits.max_header_len,
            });
        }
        Ok(Some(FixedHeader {
            length,
            flags,
            kind,
            header_len,
        }))
    }
}

impl Frame {
    /// A frame with an empty body.
    pub fn new(header: Header) -> Frame {
        Frame {
            header,
            gzip: false,
            body: Bytes::new(),
        }
    }

    /// A frame with a plain (not compressed) body.
    pub fn with_body(header: Header, body: impl Into<Bytes>) -> Frame {
        Frame {
            header,
            gzip: false,
            body: body.into(),
        }
    }

    pub fn kind(&self) -> Kind {
        self.header.kind()
    }

    /// Builds a frame from its fixed header and the frame's complete bytes (length prefix
    /// included): `bytes` must be exactly `fixed.frame_len()` long. The body becomes `bytes`
    /// itself, advanced past the headers: one reference to the read buffer, no copy.
    #[inline]
    pub(crate) fn from_parts<B: FrameBytes>(fixed: FixedHeader, bytes: B) -> Result<Frame, Error> {
        debug_assert_eq!(bytes.as_ref().len(), fixed.frame_len());
        let header_end = FIXED_HEADER_LEN + fixed.header_len as usize;
        let header = Header::decode(fixed.kind, &bytes.as_ref()[FIXED_HEADER_LEN..header_end])?;
        Ok(Frame {
            header,
            gzip: fixed.flags & FLAG_GZIP != 0,
            body: bytes.into_body(header_end),
        })
    }

    /// Bytes this frame takes when encoded. For a decoded frame this can differ from the
    /// bytes it was read from: unknown header fields are dropped, and a negative enum value
    /// re-encodes as a 10-byte varint.
    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_LEN + self.header.encoded_len() + self.body.len()
    }

    /// Appends the frame to `dst`. Fails, writing nothing, if the frame would break
    /// `limits` (a peer with the same limits would reject it).
    pub fn encode(&self, dst: &mut BytesMut, limits: &Limits) -> Result<(), Error> {
        encode_head(&self.header, self.gzip, self.body.len(), dst, limits)?;
        dst.put_slice(&self.body);
        Ok(())
    }

    /// The frame as one shareable buffer: encode once, send to many connections (a
    /// room broadcast, a GOAWAY to everyone) by cloning the `Bytes`.
    pub fn to_bytes(&self, limits: &Limits) -> Result<Bytes, Error> {
        let mut dst = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut dst, limits)?;
        Ok(dst.freeze())
    }

    /// The body, inflated if it is gzip, within `limits`. A plain body is returned as it
    /// is (no copy).
    pub fn decompressed_body(&self, limits: &Limits) -> Result<Bytes, Error> {
        if self.gzip {
            crate::compress::gunzip(&self.body, limits).map(Bytes::from)
        } else {
            Ok(self.body.clone())
        }
    }
}

/// Appends the fixed header and the protobuf header of a frame whose body (of `body_len`
/// bytes) the caller sends itself: the per-connection part of a frame whose body is
/// shared, e.g. a room message with a per-session DOWNLINK seq and one body for all.
pub fn encode_head(
    header: &Header,
    gzip: bool,
    body_len: usize,
    dst: &mut BytesMut,
    limits: &Limits,
) -> Result<(), Error> {
    let header_len = header.encoded_len();
    let max_header = limits.max_header_len;
    let header_len = match u16::try_from(header_len) {
        Ok(n) if n <= max_header => n,
        _ => {
            return Err(Error::HeaderTooLarge {
                len: u16::try_from(header_len).unwrap_or(u16::MAX),
                max: max_header,
            })
        }
    };
    let length = MIN_LENGTH as u64 + header_len as u64 + body_len as u64;
    let max = limits.frame_len_cap();
    if length > max as u64 {
        return Err(Error::FrameTooLarge { len: length, max });
    }
    dst.reserve(FIXED_HEADER_LEN + header_len as usize + body_len);
    dst.put_u32(length as u32);
    dst.put_u8(MAGIC);
    dst.put_u8(VERSION);
    dst.put_u8(if gzip { FLAG_GZIP } else { 0 });
    dst.put_u8(header.kind() as u8);
    dst.put_u16(header_len);
    header.encode_raw(dst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_stay_small() {
        // The hot kinds are inline, the rest boxed: see the note on `Header`.
        assert!(
            std::mem::size_of::<Header>() <= 48,
            "{}",
            std::mem::size_of::<Header>()
        );
        assert!(
            std::mem::size_of::<Frame>() <= 88,
            "{}",
            std::mem::size_of::<Frame>()
        );
    }
}
