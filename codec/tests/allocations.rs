//! Decoding a stream of small frames does no heap allocation per frame in steady state.
//!
//! What it measures: a counting global allocator counts `alloc`/`realloc` calls made
//! while 10,000 small DOWNLINK frames (16 and 256-byte bodies, numeric headers) are
//! decoded, one read-sized chunk at a time, from a `BytesMut` whose earlier frames have
//! been dropped, the way a connection's read loop uses it. The first chunk warms the
//! buffer up (its first `split_to` turns the `Vec` into shared storage, one allocation);
//! after that the buffer's storage is reclaimed by `reserve` and reused, and a frame is a
//! reference-counted slice of it, so the count over the measured frames must be zero.
//! This file holds one test so that no other test's allocations land in the window.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
};

use bytes::{Bytes, BytesMut};
use tether_codec::{Decoder, Frame, Header, Limits};
use tether_protocol::pb;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_decoding_allocates_nothing_per_frame() {
    const FRAMES: usize = 10_000;
    const READ: usize = 4096;
    let limits = Limits::default();
    let mut wire = BytesMut::new();
    for i in 0..FRAMES as u64 {
        let body = if i % 2 == 0 {
            &[0x11; 16][..]
        } else {
            &[0x22; 256][..]
        };
        Frame::with_body(
            Header::Downlink(pb::Downlink {
                seq: i + 1,
                body_type: 0,
            }),
            Bytes::copy_from_slice(body),
        )
        .encode(&mut wire, &limits)
        .unwrap();
    }
    let wire = wire.freeze();
    let decoder = Decoder::new(limits);
    let mut buf = BytesMut::with_capacity(2 * READ);
    let mut decoded = 0usize;
    let mut seq_sum = 0u64;
    let mut body_bytes = 0usize;
    let mut measured_from = None;
    for (i, chunk) in wire.chunks(READ).enumerate() {
        if i == 1 {
            measured_from = Some(decoded);
            COUNTING.store(true, Ordering::SeqCst);
        }
        buf.reserve(chunk.len());
        buf.extend_from_slice(chunk);
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            let Header::Downlink(h) = frame.header else {
                panic!("not a downlink")
            };
            seq_sum += h.seq;
            body_bytes += frame.body.len();
            decoded += 1;
            // `frame` (and its slice of `buf`) is dropped here, as a read loop would.
        }
    }
    COUNTING.store(false, Ordering::SeqCst);
    let allocs = ALLOCS.load(Ordering::SeqCst);
    let measured = decoded - measured_from.unwrap();

    assert_eq!(decoded, FRAMES);
    assert_eq!(seq_sum, (FRAMES as u64) * (FRAMES as u64 + 1) / 2);
    assert_eq!(body_bytes, FRAMES / 2 * (16 + 256));
    assert!(measured > 9_000, "only {measured} frames were measured");
    assert_eq!(
        allocs, 0,
        "{allocs} allocations while decoding {measured} frames"
    );
}
