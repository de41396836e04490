//! Sans-IO codec for Tether frames (PROTOCOL.md §3).
//!
//! ```text
//!   bytes from the socket ──► Decoder::decode(&mut BytesMut) ──► Frame { header, gzip, body }
//!                                  │ checks the 10-byte fixed header (magic, version,    │
//!                                  │ length cap, flags, kind, header_len) before it       │ body: a slice of the
//!                                  │ buffers the rest; parses the protobuf header         │ read buffer, never
//!                                  ▼                                                       ▼ inflated unless asked
//!                            Error (non_exhaustive) ──► ERROR frame code ──► close   Frame::decompressed_body (bounded)
//!
//!   Frame ──► Frame::encode(&mut BytesMut) / Frame::to_bytes() (encode once, send to many)
//! ```
//!
//! The codec does no I/O and keeps no clock: it turns bytes into frames and back. The
//! `tokio` feature adds `tokio_util::codec` adapters; the `json` feature the readable
//! form used by the test vectors and the `tether-frame` tool.
//!
//! ```
//! use bytes::BytesMut;
//! use tether_codec::{Decoder, Frame, Header, Limits};
//! use tether_protocol::pb;
//!
//! let ping = Frame::new(Header::Ping(pb::Ping {}));
//! let mut buf = BytesMut::new();
//! ping.encode(&mut buf, &Limits::default()).unwrap();
//! assert_eq!(&buf[..], &[0, 0, 0, 6, 0xF7, 1, 0, 3, 0, 0]); // a heartbeat is 10 bytes
//!
//! let decoder = Decoder::default();
//! let mut partial = BytesMut::from(&buf[..7]);
//! assert_eq!(decoder.decode(&mut partial), Ok(None)); // need more bytes
//! assert_eq!(decoder.decode(&mut buf), Ok(Some(ping)));
//! assert!(buf.is_empty());
//! ```

mod batch;
mod compress;
mod decode;
mod error;
mod frame;
#[cfg(feature = "json")]
pub mod json;
mod limits;
#[cfg(feature = "tokio")]
mod tokio;

#[cfg(feature = "tokio")]
pub use crate::tokio::{CodecError, TetherCodec};
pub use batch::{decode_batch, encode_batch};
pub use compress::{
    gunzip, gzip, CompressOptions, DEFAULT_COMPRESS_LEVEL, DEFAULT_COMPRESS_THRESHOLD,
};
pub use decode::{decode_exact, decode_frame, Decoder};
pub use error::Error;
pub use frame::{encode_head, FixedHeader, Frame, Header};
pub use limits::*;
pub use tether_protocol::{self as protocol, pb, Kind, FIXED_HEADER_LEN};
