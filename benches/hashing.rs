//! Hashing throughput: the cost every model load pays before a byte reaches inference.
//!
//! `cargo bench --bench hashing`; compare with `sha256sum` on the same machine (see docs/performance.md).

use std::hint::black_box;

use attest::Sha256Digest;
use attest::lockfile::{HfSource, LockedFile, ModelEntry, Source, Task};
use attest::progress::NoProgress;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const MIB: usize = 1 << 20;

fn sha256_buffers(c: &mut Criterion) {
    let mut group = c.benchmark_group("sha256");
    for size in [MIB, 64 * MIB] {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{} MiB", size / MIB), |b| {
            b.iter(|| Sha256Digest::of(black_box(&data)))
        });
    }
    group.finish();
}

/// A model of four 32 MiB Safetensors shards, verified from the page cache (files hashed in parallel).
fn verify_model_dir(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut files = Vec::new();
    for shard in 0..4u8 {
        let data = vec![shard; 32 * MIB];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![data.len()], &data)
                .expect("tensor view");
        let bytes = safetensors::serialize([("w", view)], None).expect("serialize");
        let path = format!("model-{shard}.safetensors");
        std::fs::write(dir.path().join(&path), &bytes).expect("write shard");
        files.push(LockedFile {
            path,
            sha256: Sha256Digest::of(&bytes),
            size: bytes.len() as u64,
        });
    }
    let source = Source::Hf(HfSource {
        repo: "org/bench".into(),
        revision: "main".into(),
        files: None,
    });
    let entry = ModelEntry::new("bench", Task::Chat, "llama", "Apache-2.0", source, files);
    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Bytes(entry.total_size()));
    group.sample_size(20);
    group.bench_function("load_verified 4x32 MiB", |b| {
        b.iter(|| attest::verify::load_verified(&entry, dir.path(), &NoProgress).expect("verifies"))
    });
    group.finish();
}

criterion_group!(benches, sha256_buffers, verify_model_dir);
criterion_main!(benches);
