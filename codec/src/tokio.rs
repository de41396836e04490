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
            None => Err(Error::Truncated {
                needed: crate::FixedHeader::parse(src, &self.decoder.limits)?
                    .map_or(crate::FIXED_HEADER_LEN - src.len(), |h| {
                        h.frame_len() - src.len()
                    }),
            }
            .into()),
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
