//! gzip bodies: compressed only when worth it, decompressed only on request and bounded.

use std::io::{Read, Write};

use bytes::Bytes;
use flate2::{bufread::GzDecoder, write::GzEncoder};

use crate::{Error, Limits};

/// Default size from which a body is worth compressing: 512 bytes. Below it the gzip
/// member's 18 bytes of framing eat most of what deflate saves.
pub const DEFAULT_COMPRESS_THRESHOLD: usize = 512;

/// Default gzip level (0-9). On chat-like bodies with zlib-rs, level 4 gives the size of
/// level 6 up to 4 KiB (+2 %) and half its time at 64 KiB (+6 % size); level 1 is 2x faster
/// again but 23-65 % larger, which mobile links pay for (BENCHMARKS.md, "gzip level").
pub const DEFAULT_COMPRESS_LEVEL: u32 = 4;

/// When and how hard to compress bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressOptions {
    /// Bodies shorter than this are sent as they are.
    pub threshold: usize,
    /// gzip level, 0 (store) to 9 (best); values above 9 are taken as 9.
    pub level: u32,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            threshold: DEFAULT_COMPRESS_THRESHOLD,
            level: DEFAULT_COMPRESS_LEVEL,
        }
    }
}

impl CompressOptions {
    /// The body to send and whether it is gzip: the gzip member if the body is at least
    /// `threshold` long, the member is smaller than the body, and a receiver with `limits`
    /// would inflate it (a very repetitive body can compress past `max_expansion_ratio`, and
    /// a body over `max_decompressed_len` must not be compressed into one frame); else the
    /// body itself.
    pub fn compress(&self, body: Bytes, limits: &Limits) -> (Bytes, bool) {
        if body.len() < self.threshold || body.len() > limits.max_decompressed_len {
            return (body, false);
        }
        match gzip(&body, self.level) {
            Some(z) if z.len() < body.len() && body.len() <= limits.decompressed_cap(z.len()) => {
                (Bytes::from(z), true)
            }
            _ => (body, false),
        }
    }
}

/// Compresses `data` into one gzip member (mtime 0, no file name: the output depends on
/// the input and the level only).
pub fn gzip(data: &[u8], level: u32) -> Option<Vec<u8>> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(data.len() / 2 + 32),
        flate2::Compression::new(level.min(9)),
    );
    enc.write_all(data).ok()?;
    enc.finish().ok()
}

/// Inflates one gzip member, refusing to produce more than
/// [`Limits::decompressed_cap`] bytes: the output buffer never grows past that cap plus
/// one byte (the byte that proves the cap was crossed). Bytes after the member, or a
/// member that is cut short, are [`Error::CorruptBody`].
pub fn gunzip(compressed: &[u8], limits: &Limits) -> Result<Vec<u8>, Error> {
    let cap = limits.decompressed_cap(compressed.len());
    let mut out: Vec<u8> = Vec::with_capacity(cap.min(compressed.len().saturating_mul(4) + 64));
    let mut dec = GzDecoder::new(compressed);
    loop {
        if out.len() == out.capacity() {
            if out.len() > cap {
                return Err(Error::DecompressionLimit { limit: cap });
            }
            let grow = out.capacity().max(64).min(cap + 1 - out.len());
            out.reserve_exact(grow);
        }
        let start = out.len();
        out.resize(out.capacity(), 0);
        match dec.read(&mut out[start..]) {
            Ok(0) => {
                out.truncate(start);
                break;
            }
            Ok(n) => out.truncate(start + n),
            Err(_) => return Err(Error::CorruptBody),
        }
    }
    if out.len() > cap {
        return Err(Error::DecompressionLimit { limit: cap });
    }
    if !dec.into_inner().is_empty() {
        return Err(Error::CorruptBody);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_only_at_threshold_and_when_smaller() {
        let opts = CompressOptions::default();
        let limits = Limits::default();
        let small = Bytes::from(vec![b'a'; DEFAULT_COMPRESS_THRESHOLD - 1]);
        assert_eq!(opts.compress(small.clone(), &limits), (small, false));
        let big = Bytes::from(vec![b'a'; DEFAULT_COMPRESS_THRESHOLD]);
        let (z, gz) = opts.compress(big.clone(), &limits);
        assert!(gz && z.len() < big.len());
        assert_eq!(gunzip(&z, &Limits::default()).unwrap(), big);
        // Incompressible data is sent as it is.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Bytes = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect::<Vec<_>>()
            .into();
        assert_eq!(opts.compress(noise.clone(), &limits), (noise, false));
    }

    #[test]
    fn never_produces_what_the_receiver_would_call_a_bomb() {
        let opts = CompressOptions {
            level: 9,
            ..CompressOptions::default()
        };
        let limits = Limits::default();
        // 64 KiB of one byte deflates about 1000:1 at level 9, past the default ratio of 100.
        let repetitive = Bytes::from(vec![b'z'; 64 * 1024]);
        let (out, gz) = opts.compress(repetitive.clone(), &limits);
        assert!(
            !gz && out == repetitive,
            "sent as gzip the receiver would refuse"
        );
        let lenient = Limits {
            max_expansion_ratio: 10_000,
            ..limits
        };
        let (z, gz) = opts.compress(repetitive.clone(), &lenient);
        assert!(gz && z.len() * 100 < repetitive.len());
        assert!(gunzip(&z, &lenient).unwrap() == repetitive);
        // Over max_decompressed_len: never compressed into one body.
        let huge = Bytes::from(vec![b'a'; limits.max_decompressed_len + 1]);
        assert!(!opts.compress(huge, &lenient).1);
    }

    #[test]
    fn bomb_is_stopped_at_the_cap_without_allocating_past_it() {
        let z = gzip(&vec![0u8; 10 * 1024 * 1024], 9).unwrap();
        let limits = Limits::default();
        let cap = limits.decompressed_cap(z.len());
        assert_eq!(
            gunzip(&z, &limits),
            Err(Error::DecompressionLimit { limit: cap })
        );
        // The ratio bounds small inputs far below max_decompressed_len.
        assert!(cap < limits.max_decompressed_len);
        assert_eq!(cap, z.len() * limits.max_expansion_ratio as usize);
    }

    #[test]
    fn corrupt_truncated_and_trailing_bytes_are_errors() {
        let z = gzip(b"hello hello hello hello", 6).unwrap();
        let limits = Limits::default();
        assert_eq!(gunzip(&z, &limits).unwrap(), b"hello hello hello hello");
        assert_eq!(gunzip(&z[..z.len() - 3], &limits), Err(Error::CorruptBody));
        let mut flipped = z.clone();
        flipped[12] ^= 0x55;
        assert_eq!(gunzip(&flipped, &limits), Err(Error::CorruptBody));
        let mut trailing = z.clone();
        trailing.push(0);
        assert_eq!(gunzip(&trailing, &limits), Err(Error::CorruptBody));
        assert_eq!(gunzip(b"", &limits), Err(Error::CorruptBody));
    }

    #[test]
    fn output_is_deterministic() {
        assert_eq!(gzip(b"same input", 1), gzip(b"same input", 1));
    }
}
