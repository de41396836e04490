//! The one error type of the codec.

use std::fmt;

use tether_protocol::{pb::ErrorCode, Kind};

/// Why bytes are not a valid frame, or a body could not be decompressed.
///
/// "Need more bytes" is not an error of the streaming [`Decoder`](crate::Decoder): it
/// returns `Ok(None)`. It is [`Error::Truncated`] only where the input is known to be
/// complete (a batch body, a vector, [`decode_frame`](crate::decode_frame)).
///
/// Every variant but `Truncated` (in a stream) ends the connection: the receiver sends
/// an ERROR frame with [`Error::code`] and closes, as PROTOCOL.md §7 says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The input ended inside a frame that needs `needed` more bytes.
    Truncated { needed: usize },
    /// Byte 4 is not [`tether_protocol::MAGIC`]: this is not a Tether stream.
    BadMagic { found: u8 },
    /// Byte 5 names a frame version this implementation does not speak.
    UnsupportedVersion { found: u8 },
    /// The length prefix (or an encoded frame) exceeds the configured maximum.
    FrameTooLarge { len: u64, max: u32 },
    /// The header_len field exceeds the configured maximum header size.
    HeaderTooLarge { len: u16, max: u16 },
    /// The fixed header is inconsistent (see the reason).
    Malformed(&'static str),
    /// The kind byte is not one v1 defines.
    UnknownKind { kind: u8 },
    /// The protobuf header does not parse as the message its kind names.
    MalformedHeader {
        kind: Kind,
        reason: prost::DecodeError,
    },
    /// The gzip body inflates past the decompression limit.
    DecompressionLimit { limit: usize },
    /// The gzip body is not one valid gzip member.
    CorruptBody,
}

impl Error {
    /// The protocol error code an ERROR frame carries for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Truncated { .. } | Error::Malformed(_) => ErrorCode::MalformedFrame,
            Error::BadMagic { .. } => ErrorCode::BadMagic,
            Error::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Error::FrameTooLarge { .. } | Error::HeaderTooLarge { .. } => ErrorCode::FrameTooLarge,
            Error::UnknownKind { .. } => ErrorCode::UnknownKind,
            Error::MalformedHeader { .. } => ErrorCode::MalformedHeader,
            Error::DecompressionLimit { .. } | Error::CorruptBody => ErrorCode::DecompressionFailed,
        }
    }

    /// A stable snake_case name, as the test vectors spell it (`frame_too_large`).
    pub fn name(&self) -> &'static str {
        match self {
            Error::Truncated { .. } => "truncated",
            Error::BadMagic { .. } => "bad_magic",
            Error::UnsupportedVersion { .. } => "unsupported_version",
            Error::FrameTooLarge { .. } => "frame_too_large",
            Error::HeaderTooLarge { .. } => "header_too_large",
            Error::Malformed(_) => "malformed_frame",
            Error::UnknownKind { .. } => "unknown_kind",
            Error::MalformedHeader { .. } => "malformed_header",
            Error::DecompressionLimit { .. } => "decompression_limit",
            Error::CorruptBody => "corrupt_body",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated { needed } => write!(f, "input ends {needed} bytes short of a frame"),
            Error::BadMagic { found } => {
                write!(f, "bad magic byte {found:#04x} (not a Tether stream)")
            }
            Error::UnsupportedVersion { found } => write!(f, "unsupported frame version {found}"),
            Error::FrameTooLarge { len, max } => {
                write!(f, "frame length {len} exceeds the maximum {max}")
            }
            Error::HeaderTooLarge { len, max } => {
                write!(f, "header length {len} exceeds the maximum {max}")
            }
            Error::Malformed(why) => write!(f, "malformed frame: {why}"),
            Error::UnknownKind { kind } => write!(f, "unknown frame kind {kind:#04x}"),
            Error::MalformedHeader { kind, reason } => {
                write!(f, "malformed {kind} header: {reason}")
            }
            Error::DecompressionLimit { limit } => {
                write!(f, "gzip body inflates past the limit of {limit} bytes")
            }
            Error::CorruptBody => f.write_str("corrupt gzip body"),
        }
    }
}

impl std::error::Error for Error {}
