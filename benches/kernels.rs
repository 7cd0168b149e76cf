//! Quantized matmul throughput at SmolLM2-135M's shapes: sanctum's kernels (q8_0, q4_0, with 8- and
//! 16-bit activations; q5_0, q4_K and q6_K with 16-bit) against
//! candle's `QMatMul` (q8_0, q4_0, q4k, q6k, f16) in the same run, for one activation row (generation)
//! and 512 rows (a prompt). Elements are multiply-adds (`m × rows × cols`). Also causal attention
//! of a 512-token prompt at SmolLM2-135M's head shapes over an f16 and an f32 cache (elements:
//! query-key pairs per head).
//!
//! `cargo bench --bench kernels`; threads follow `RAYON_NUM_THREADS` like `sanctum --threads`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use half::f16;
use runner::candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use runner::candle_core::{Device, Module, Tensor};
use runner::kernels::ops::{AttentionShape, CacheValue, attention};
use runner::kernels::{Activations, Format, PackedMatrix, Scratch};

/// `[rows, cols]` of SmolLM2-135M's projections (q/o, k/v, gate/up, down).
const LAYER_SHAPES: [(usize, usize); 4] = [(576, 576), (192, 576), (1536, 576), (576, 1536)];
/// The output head, only multiplied for the last position.
const HEAD: (usize, usize) = (49152, 576);

/// Weights and activations in `[-0.1, 0.1)`.
fn values(n: usize, state: u64) -> Vec<f32> {
    runner::testing::values(n, state, 0.1)
}

/// Times `iters` calls made from a worker of the global pool, as the model makes them (see
/// `Llama::forward`): from outside, every parallel call would pay a hand-off to the pool and back.
fn in_pool(iters: u64, mut f: impl FnMut() + Send) -> Duration {
    runner::kernels::on_pool(|| {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        start.elapsed()
    })
}

fn matmuls(c: &mut Criterion, group_name: &str, m: usize, shapes: &[(usize, usize)]) {
    let mut group = c.benchmark_group(group_name);
    group.sample_size(if m == 1 { 50 } else { 10 });
    for &(rows, cols) in shapes {
        let w = values(rows * cols, 1);
        let x = values(m * cols, 2);
        let shape = format!("{rows}x{cols}");
        group.throughput(Throughput::Elements((m * rows * cols) as u64));
        for (name, format, activations) in [
            ("sanctum q8_0", Format::Q8_0, Activations::Int8),
            ("sanctum q4_0", Format::Q4_0, Activations::Int8),
            ("sanctum q8_0+int16", Format::Q8_0, Activations::Int16),
            ("sanctum q4_0+int16", Format::Q4_0, Activations::Int16),
            ("sanctum q5_0+int16", Format::Q5_0, Activations::Int16),
            ("sanctum q4k+int16", Format::Q4K, Activations::Int16),
            ("sanctum q6k+int16", Format::Q6K, Activations::Int16),
        ] {
            if !cols.is_multiple_of(format.row_multiple()) {
                continue;
            }
            let packed = PackedMatrix::quantize(format, &w, rows, cols)
                .expect("quantizes")
                .with_activations(activations);
            let mut y = vec![0f32; m * rows];
            let mut scratch = Scratch::default();
            group.bench_function(BenchmarkId::new(name, &shape), |b| {
                b.iter_custom(|iters| {
                    in_pool(iters, || {
                        packed
                            .matmul(black_box(&x), &mut y, &mut scratch)
                            .expect("fits")
                    })
                })
            });
        }
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("tensor");
        let xt = Tensor::from_vec(x, (m, cols), &Device::Cpu).expect("tensor");
        for (name, dtype) in [
            ("candle q8_0", GgmlDType::Q8_0),
            ("candle q4_0", GgmlDType::Q4_0),
            ("candle q4k", GgmlDType::Q4K),
            ("candle q6k", GgmlDType::Q6K),
            ("candle f16", GgmlDType::F16),
        ] {
            if !cols.is_multiple_of(dtype.block_size()) {
                continue;
            }
            let q = QTensor::quantize(&wt, dtype).expect("quantizes");
            let mm = QMatMul::QTensor(std::sync::Arc::new(q));
            group.bench_function(BenchmarkId::new(name, &shape), |b| {
                b.iter_custom(|iters| {
                    in_pool(iters, || {
                        black_box(mm.forward(black_box(&xt)).expect("multiplies"));
                    })
                })
            });
        }
    }
    group.finish();
}

fn matvec(c: &mut Criterion) {
    let mut shapes = LAYER_SHAPES.to_vec();
    shapes.push(HEAD);
    matmuls(c, "matvec m=1", 1, &shapes);
}

fn matmul_prompt(c: &mut Criterion) {
    matmuls(c, "matmul m=512", 512, &LAYER_SHAPES);
}

/// One layer's attention for a 512-token prompt (9 heads sharing 3 key/value heads of 64), as
/// `ops::attention` runs it between the projections.
fn attention_prompt(c: &mut Criterion) {
    const SEQ: usize = 512;
    let shape = AttentionShape {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        pos: 0,
        capacity: SEQ,
        seq: SEQ,
    };
    let q = values(SEQ * shape.heads * shape.head_dim, 3);
    let kv = values(shape.kv_heads * SEQ * shape.head_dim, 4);
    let mut group = c.benchmark_group("attention prompt=512");
    group.sample_size(20);
    group.throughput(Throughput::Elements(
        (shape.heads * SEQ * (SEQ + 1) / 2) as u64,
    ));
    fn run<T: CacheValue>(
        group: &mut BenchmarkGroup<'_, WallTime>,
        cache: &str,
        shape: AttentionShape,
        q: &[f32],
        kv: &[T],
    ) {
        let mut out = vec![0f32; q.len()];
        let mut scratch = Vec::new();
        group.bench_function(BenchmarkId::new("sanctum", cache), |b| {
            b.iter_custom(|iters| {
                in_pool(iters, || {
                    attention(shape, black_box(q), kv, kv, &mut out, &mut scratch)
                })
            })
        });
    }
    let half: Vec<f16> = kv.iter().map(|&v| f16::from_f32(v)).collect();
    run(&mut group, "f16", shape, &q, &half);
    run(&mut group, "f32", shape, &q, &kv);
    group.finish();
}

criterion_group!(benches, matvec, matmul_prompt, attention_prompt);
criterion_main!(benches);
