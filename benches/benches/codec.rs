//! Frame encode / decode, against `LengthDelimitedCodec` + prost and `memcpy`.
//!
//! `cargo bench -p tether-benches --bench codec`. BENCHMARKS.md has the figures.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tether_benches::chat_like;
use tether_codec::{CompressOptions, Decoder, Frame, Header, Limits};
use tether_protocol::pb;
use tokio_util::codec::{Decoder as _, Encoder as _, LengthDelimitedCodec};

const SIZES: [usize; 4] = [16, 256, 4096, 65536];
/// Frames in a streamed-decode buffer.
const STREAM: usize = 10_000;

/// The baseline: the same fields as one prost message behind a plain length prefix.
#[derive(Clone, PartialEq, prost::Message)]
struct Baseline {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(uint32, tag = "2")]
    body_type: u32,
    #[prost(bytes = "bytes", tag = "3")]
    body: Bytes,
}

fn limits() -> Limits {
    Limits {
        max_frame_len: 1 << 20,
        ..Limits::default()
    }
}

fn frame(seq: u64, size: usize, gzip: bool) -> Frame {
    let body = Bytes::from(chat_like(size));
    let (body, gz) = if gzip {
        CompressOptions {
            threshold: 0,
            level: 1,
        }
        .compress(body, &limits())
    } else {
        (body, false)
    };
    Frame {
        header: Header::Downlink(pb::Downlink { seq, body_type: 0 }),
        gzip: gz,
        body,
    }
}

fn tether_wire(n: usize, size: usize, gzip: bool) -> Bytes {
    let mut buf = BytesMut::new();
    let f = frame(1, size, gzip);
    for seq in 1..=n as u64 {
        Frame {
            header: Header::Downlink(pb::Downlink { seq, body_type: 0 }),
            ..f.clone()
        }
        .encode(&mut buf, &limits())
        .unwrap();
    }
    buf.freeze()
}

fn baseline_wire(n: usize, size: usize) -> Bytes {
    let mut codec = LengthDelimitedCodec::builder()
        .max_frame_length(1 << 20)
        .new_codec();
    let body = Bytes::from(chat_like(size));
    let mut buf = BytesMut::new();
    for seq in 1..=n as u64 {
        let msg = Baseline {
            seq,
            body_type: 0,
            body: body.clone(),
        };
        codec
            .encode(Bytes::from(prost::Message::encode_to_vec(&msg)), &mut buf)
            .unwrap();
    }
    buf.freeze()
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for size in SIZES {
        g.throughput(Throughput::Elements(1));
        for gzip in [false, true] {
            let f = frame(42, size, gzip);
            let mut buf = BytesMut::with_capacity(2 * size + 64);
            let id = format!("{size}B{}", if gzip { "/gzip" } else { "" });
            g.bench_function(BenchmarkId::new("tether", id), |b| {
                b.iter(|| {
                    buf.clear();
                    f.encode(&mut buf, &limits()).unwrap();
                    std::hint::black_box(buf.len())
                })
            });
        }
        let body = Bytes::from(chat_like(size));
        let mut codec = LengthDelimitedCodec::builder()
            .max_frame_length(1 << 20)
            .new_codec();
        let mut buf = BytesMut::with_capacity(2 * size + 64);
        g.bench_function(BenchmarkId::new("baseline", format!("{size}B")), |b| {
            b.iter(|| {
                buf.clear();
                let msg = Baseline {
                    seq: 42,
                    body_type: 0,
                    body: body.clone(),
                };
                let mut tmp = BytesMut::with_capacity(prost::Message::encoded_len(&msg));
                prost::Message::encode(&msg, &mut tmp).unwrap();
                codec.encode(tmp.freeze(), &mut buf).unwrap();
                std::hint::black_box(buf.len())
            })
        });
    }
    g.finish();
}

/// Streamed decode of many back-to-back frames: what a connection's read loop does.
fn stream_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("stream_decode");
    for size in SIZES {
        let n = if size >= 4096 { STREAM / 10 } else { STREAM };
        g.throughput(Throughput::Elements(n as u64));
        for gzip in [false, true] {
            let wire = tether_wire(n, size, gzip);
            let decoder = Decoder::new(limits());
            let id = format!("{size}B{}", if gzip { "/gzip" } else { "" });
            g.bench_function(BenchmarkId::new("tether", id), |b| {
                b.iter_batched(
                    || BytesMut::from(&wire[..]),
                    |mut buf| {
                        let mut seqs = 0u64;
                        while let Some(f) = decoder.decode(&mut buf).unwrap() {
                            if let Header::Downlink(h) = f.header {
                                seqs += h.seq;
                            }
                        }
                        assert_eq!(seqs, (n as u64) * (n as u64 + 1) / 2);
                        buf // dropped (and freed) outside the timed section
                    },
                    BatchSize::LargeInput,
                )
            });
        }
        let wire = baseline_wire(n, size);
        g.bench_function(BenchmarkId::new("baseline", format!("{size}B")), |b| {
            b.iter_batched(
                || {
                    (
                        BytesMut::from(&wire[..]),
                        LengthDelimitedCodec::builder()
                            .max_frame_length(1 << 20)
                            .new_codec(),
                    )
                },
                |(mut buf, mut codec)| {
                    let mut seqs = 0u64;
                    while let Some(f) = codec.decode(&mut buf).unwrap() {
                        let m: Baseline = prost::Message::decode(f.freeze()).unwrap();
                        seqs += m.seq;
                    }
                    assert_eq!(seqs, (n as u64) * (n as u64 + 1) / 2);
                    buf
                },
                BatchSize::LargeInput,
            )
        });
        // The floor for large frames: copying the same bytes once.
        let src = vec![0x5au8; wire.len()];
        let mut dst = vec![0u8; wire.len()];
        g.bench_function(BenchmarkId::new("memcpy", format!("{size}B")), |b| {
            b.iter(|| {
                dst.copy_from_slice(std::hint::black_box(&src));
                std::hint::black_box(dst[dst.len() - 1])
            })
        });
    }
    g.finish();
}

/// Decoding a gzip frame and inflating its body: what a client does, never the gateway.
fn decode_and_inflate(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_inflate");
    for size in [4096usize, 65536] {
        g.throughput(Throughput::Bytes(size as u64));
        let wire = tether_wire(1, size, true);
        let decoder = Decoder::new(limits());
        g.bench_function(BenchmarkId::new("tether", format!("{size}B/gzip")), |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let f = decoder.decode(&mut buf).unwrap().unwrap();
                    f.decompressed_body(&limits()).unwrap().len()
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = encode, stream_decode, decode_and_inflate
}
criterion_main!(benches);
