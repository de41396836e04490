//! Thin `tokio_util::codec` adapters over the sans-IO [`Decoder`](crate::Decoder).

use std::io;

use bytes::{Bytes, BytesMut};

use crate::{Decoder, Error, Frame};

/// `FramedRead` / `FramedWrite` codec for Tether frames.
///
/// Encodes a [`Frame`], or a pre-encoded frame as [`Bytes`] (a broadcast encoded once
/// with [`Frame::to_bytes`] and cloned to every connection).
#[derive(Debug, Clone, Copy, Default)]
pub struct TetherCodec {
    pub decoder: Decoder,
}

/// An I/O error of the transport, or a protocol error of the bytes.
#[derive(Debug)]
pub enum CodecError {
    Io(io::Error),
    Frame(Error),
}

impl From<io::Error> for CodecError {
    fn from(e: io::Error) -> Self {
        CodecError::Io(e)
    }
}

impl From<Error> for CodecError {
    fn from(e: Error) -> Self {
        CodecError::Frame(e)
    }
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecError::Io(e) => write!(f, "i/o: {e}"),
            CodecError::Frame(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CodecError {}

impl tokio_util::codec::Decoder for TetherCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(self.decoder.decode(src)?)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(crate::decode::truncated(src, &self.decoder.limits).into()),
        }
    }
}

impl tokio_util::codec::Encoder<&Frame> for TetherCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(frame.encode(dst, &self.decoder.limits)?)
    }
}

impl tokio_util::codec::Encoder<Frame> for TetherCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(frame.encode(dst, &self.decoder.limits)?)
    }
}

impl tokio_util::codec::Encoder<Bytes> for TetherCodec {
    type Error = CodecError;

    /// Writes an already encoded frame as it is.
    fn encode(&mut self, frame: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use tether_protocol::pb;
    use tokio_util::codec::{Decoder as _, Encoder as _};

    use super::*;
    use crate::{Header, Limits};

    #[test]
    fn frames_and_pre_encoded_bytes_encode_alike_and_decode_back() {
        let mut codec = TetherCodec::default();
        let frame = Frame::with_body(
            Header::Downlink(pb::Downlink {
                seq: 9,
                body_type: 0,
            }),
            Bytes::from_static(b"hello"),
        );
        let shared = frame.to_bytes(&Limits::default()).unwrap();
        let mut buf = BytesMut::new();
        codec.encode(&frame, &mut buf).unwrap();
        codec.encode(shared.clone(), &mut buf).unwrap();
        assert_eq!(&buf[..shared.len()], &shared[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame.clone()));
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), Some(frame));
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn eof_inside_a_frame_is_a_truncation_error() {
        let mut codec = TetherCodec::default();
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 0xF7, 1, 0, 8, 0, 2, 0x08][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        match codec.decode_eof(&mut buf) {
            Err(CodecError::Frame(Error::Truncated { needed: 1 })) => {}
            other => panic!("{other:?}"),
        }
        let mut short = BytesMut::from(&[0, 0, 0][..]);
        assert!(matches!(
            codec.decode_eof(&mut short),
            Err(CodecError::Frame(Error::Truncated { needed: 7 }))
        ));
    }
}
