//! gzip levels and flate2 backends on chat-like bodies.
//!
//! `cargo bench -p tether-benches --bench gzip` (zlib-rs, the default) and
//! `cargo bench -p tether-benches --no-default-features --features miniz --bench gzip`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tether_benches::chat_like;
use tether_codec::{gunzip, gzip, Limits};

const BACKEND: &str = if cfg!(feature = "miniz") && !cfg!(feature = "zlib-rs") {
    "miniz_oxide"
} else {
    "zlib-rs"
};

fn levels(c: &mut Criterion) {
    let limits = Limits {
        max_decompressed_len: 1 << 20,
        max_expansion_ratio: 1000,
        ..Limits::default()
    };
    let mut g = c.benchmark_group(format!("gzip/{BACKEND}"));
    for size in [512usize, 4096, 65536] {
        let body = chat_like(size);
        g.throughput(Throughput::Bytes(size as u64));
        for level in [1u32, 4, 6, 9] {
            let z = gzip(&body, level).unwrap();
            eprintln!(
                "{BACKEND} {size} B level {level}: {} B ({:.1} %)",
                z.len(),
                100.0 * z.len() as f64 / size as f64
            );
            g.bench_function(BenchmarkId::new(format!("compress/l{level}"), size), |b| {
                b.iter(|| gzip(std::hint::black_box(&body), level).unwrap().len())
            });
            g.bench_function(BenchmarkId::new(format!("inflate/l{level}"), size), |b| {
                b.iter(|| gunzip(std::hint::black_box(&z), &limits).unwrap().len())
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = levels
}
criterion_main!(benches);
