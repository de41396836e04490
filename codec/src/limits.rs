//! Denial-of-service limits. Every one is a named default and a field of [`Limits`].

/// Default maximum value of the length prefix (bytes after it): 64 KiB. A peer can make
/// the decoder buffer at most this much (plus 4) for one frame. Large media never travel
/// on the long connection, so a chat frame is far smaller.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 64 * 1024;

/// Default maximum protobuf header size (the header_len field): 4 KiB, room for a login
/// token of a few KiB.
pub const DEFAULT_MAX_HEADER_LEN: u16 = 4 * 1024;

/// Default maximum size of a decompressed body: 1 MiB.
pub const DEFAULT_MAX_DECOMPRESSED_LEN: usize = 1024 * 1024;

/// Default maximum expansion ratio of a gzip body: it may inflate to at most 100 times
/// its compressed size (real chat traffic inflates 2-10x; a gzip bomb about 1000x).
pub const DEFAULT_MAX_EXPANSION_RATIO: u32 = 100;

/// Default maximum number of frames in one BATCH: 1,024. Checked on the BATCH header's
/// `count` before anything is inflated, so a small BATCH of tiny frames cannot make the
/// receiver allocate a frame list many times its decompression cap.
pub const DEFAULT_MAX_BATCH_FRAMES: u32 = 1024;

/// Upper bound for a configured `max_frame_len`: 16 MiB. Larger values are clamped.
pub const ABSOLUTE_MAX_FRAME_LEN: u32 = 16 * 1024 * 1024;

/// The limits a decoder (and an encoder, so that we never send what a peer with the same
/// limits would reject) enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum value of the length prefix, checked before any byte of the frame is
    /// buffered. At least [`tether_protocol::MIN_LENGTH`], at most [`ABSOLUTE_MAX_FRAME_LEN`].
    pub max_frame_len: u32,
    /// Maximum header_len.
    pub max_header_len: u16,
    /// Maximum size of a body after gzip decompression.
    pub max_decompressed_len: usize,
    /// Maximum decompressed / compressed size ratio of a body.
    pub max_expansion_ratio: u32,
    /// Maximum number of frames in one BATCH.
    pub max_batch_frames: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_header_len: DEFAULT_MAX_HEADER_LEN,
            max_decompressed_len: DEFAULT_MAX_DECOMPRESSED_LEN,
            max_expansion_ratio: DEFAULT_MAX_EXPANSION_RATIO,
            max_batch_frames: DEFAULT_MAX_BATCH_FRAMES,
        }
    }
}

impl Limits {
    /// The effective maximum length prefix: `max_frame_len` clamped into the legal range.
    pub fn frame_len_cap(&self) -> u32 {
        self.max_frame_len
            .clamp(tether_protocol::MIN_LENGTH, ABSOLUTE_MAX_FRAME_LEN)
    }

    /// How far a gzip body of `compressed_len` bytes may inflate.
    pub fn decompressed_cap(&self, compressed_len: usize) -> usize {
        compressed_len
            .saturating_mul(self.max_expansion_ratio as usize)
            .min(self.max_decompressed_len)
    }
}
