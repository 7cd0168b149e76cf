//! The f32 operations around the matmuls of a decoder layer, on plain slices: RMS normalization,
//! rotary embedding, causal grouped-query attention over a head-major key/value cache of f16 or
//! f32, and the gated SiLU. On the CPU, one candle op per step costs more than the arithmetic at
//! one token; these run in place, in buffers the caller reuses.

use half::f16;
use rayon::prelude::*;

/// What the key/value cache holds: f16, as llama.cpp keeps it by default (half the memory, and
/// half the bytes each generated token reads at long contexts), or f32.
pub trait CacheValue: Copy + Default + Send + Sync + 'static {
    /// One value as f32.
    fn to_f32(self) -> f32;
    /// The nearest value to `x`.
    fn from_f32(x: f32) -> Self;
    /// `N` values as f32, eight at a time where the CPU converts f16 in vectors.
    fn widen<const N: usize>(x: &[Self; N]) -> [f32; N];
}

impl CacheValue for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }

    #[inline(always)]
    fn widen<const N: usize>(x: &[Self; N]) -> [f32; N] {
        *x
    }
}

impl CacheValue for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }

    #[inline(always)]
    fn widen<const N: usize>(x: &[Self; N]) -> [f32; N] {
        #[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
        #[allow(unsafe_code, reason = "F16C conversion of whole vectors")]
        if N.is_multiple_of(8) {
            use std::arch::x86_64::*;
            let mut out = [0f32; N];
            for i in (0..N).step_by(8) {
                // SAFETY: F16C is a static target feature here, and the 8 values read (16 bytes)
                // and written lie inside the two `N`-value arrays, `N` a multiple of 8.
                unsafe {
                    let h = _mm_loadu_si128(x.as_ptr().add(i).cast());
                    _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                }
            }
            return out;
        }
        std::array::from_fn(|i| x[i].to_f32())
    }
}

/// `out = x / rms(x) · weight`, row by row (`weight.len()` values per row).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (x, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let scale = 1.0 / (sum_of_squares(x) / n as f32 + eps).sqrt();
        for ((o, &x), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = x * scale * w;
        }
    }
}

/// Rotates each head of each row (`heads × head_dim` values) by its position's angles, the two
/// halves of a head paired (Hugging Face's `rotate_half` layout). `cos` and `sin` hold
/// `head_dim / 2` values per row, one row per position of `x`.
pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    let width = x.len() / (cos.len() / half);
    for ((row, cos), sin) in x
        .chunks_exact_mut(width)
        .zip(cos.chunks_exact(half))
        .zip(sin.chunks_exact(half))
    {
        for head in row.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for (((a, b), &c), &s) in a.iter_mut().zip(b).zip(cos).zip(sin) {
                let (x0, x1) = (*a, *b);
                *a = x0 * c - x1 * s;
                *b = x1 * c + x0 * s;
            }
        }
    }
}

/// `gate = silu(gate) · up`, element by element.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; each serves `heads / kv_heads` query heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Positions already in the cache before these queries.
    pub pos: usize,
    /// Positions the cache has room for per key/value head (its stride).
    pub capacity: usize,
    /// Queries (new positions).
    pub seq: usize,
}

/// Query rows per tile of the prompt path: every key and value vector loaded serves this many.
const ROWS: usize = 4;
/// Keys per score tile. A tile's accumulators (`ROWS` × `KEYS` / 8 vectors of 8 lanes) must fit
/// in the vector registers with room for the operands, or every step spills them to the stack:
/// 32 registers with AVX-512, 16 without (24 keys: 12 accumulators; with 64 keys on AVX2 one
/// layer's attention of a 512-token prompt took 5.6 ms instead of 4.3, `benches/kernels.rs`).
const KEYS: usize = if cfg!(target_feature = "avx512f") {
    64
} else {
    24
};
/// Head values per output tile (as [`KEYS`]: 16 values, 8 accumulators, on AVX2).
const DIMS: usize = if cfg!(target_feature = "avx512f") {
    32
} else {
    16
};
/// Key positions transposed together on the prompt path.
const TRANSPOSE: usize = 16;
/// Queries of one head per parallel task on the prompt path.
const TASK_QUERIES: usize = 16;

/// Causal attention of `seq` queries (`q`: `[seq, heads × head_dim]`) over the cached keys and
/// values (`[kv_heads, capacity, head_dim]`, positions `0..pos + seq` filled, the new ones
/// included) into `out` (`[seq, heads × head_dim]`). `scratch` is reused between calls.
///
/// A prompt is multiplied in tiles (see [`Prompt`]); a single query (generation) streams its head's
/// keys directly, as transposing the whole cache for one query would double what it reads.
///
/// # Panics
/// If a slice is shorter than the shape says.
pub fn attention<T: CacheValue>(
    shape: AttentionShape,
    q: &[f32],
    keys: &[T],
    values: &[T],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    if shape.seq >= ROWS && shape.head_dim.is_multiple_of(DIMS) {
        prompt_attention(shape, q, keys, values, out, scratch);
    } else {
        query_attention(shape, q, keys, values, out, scratch);
    }
}

/// [`attention`] one head per task, one query at a time, each key's dot product summed on its own.
fn query_attention<T: CacheValue>(
    shape: AttentionShape,
    q: &[f32],
    keys: &[T],
    values: &[T],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
        pos,
        capacity,
        seq,
    } = shape;
    let (width, kv_len) = (heads * head_dim, pos + seq);
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // Per head: its outputs `[seq, head_dim]`, then room for one query's scores.
    let per_head = seq * head_dim + kv_len;
    scratch.resize(heads * per_head, 0.0);
    scratch
        .par_chunks_mut(per_head)
        .enumerate()
        .for_each(|(h, buf)| {
            let (head_out, scores) = buf.split_at_mut(seq * head_dim);
            let kv = (h / group) * capacity * head_dim;
            let head = Head {
                q: &q[h * head_dim..],
                q_stride: width,
                keys: &keys[kv..kv + kv_len * head_dim],
                values: &values[kv..kv + kv_len * head_dim],
                pos,
                scale,
            };
            head.attend(head_dim, head_out, scores);
        });
    for (h, buf) in scratch.chunks_exact(per_head).enumerate() {
        for (i, o) in buf[..seq * head_dim].chunks_exact(head_dim).enumerate() {
            out[i * width + h * head_dim..][..head_dim].copy_from_slice(o);
        }
    }
}

/// [`attention`] for a prompt: the keys of each key/value head are first transposed
/// (`[head_dim, keys]`), so that the scores of [`ROWS`] queries against [`KEYS`] keys are whole
/// vectors of fused multiply-adds with no horizontal sum per key, and the weighted sum of values
/// likewise covers [`ROWS`] queries per value row loaded. Tasks are blocks of [`TASK_QUERIES`]
/// queries of one head, so both threads stay busy whatever the head count.
fn prompt_attention<T: CacheValue>(
    shape: AttentionShape,
    q: &[f32],
    keys: &[T],
    values: &[T],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        pos,
        capacity,
        seq,
    } = shape;
    let (width, kv_len) = (heads * hd, pos + seq);
    // Rows of whole score tiles; the padding is computed and never read.
    let ld = kv_len.next_multiple_of(KEYS);
    let group = heads / kv_heads;
    let blocks = seq.div_ceil(TASK_QUERIES);
    let per_task = TASK_QUERIES * hd;
    scratch.resize(kv_heads * hd * ld + heads * blocks * per_task, 0.0);
    let (kt, outs) = scratch.split_at_mut(kv_heads * hd * ld);
    kt.par_chunks_mut(hd * ld)
        .enumerate()
        .for_each_init(Vec::new, |block, (g, kt)| {
            let k = &keys[g * capacity * hd..][..kv_len * hd];
            // [`TRANSPOSE`] positions at a time, widened in order and then written to that many
            // consecutive places of each row of `kt` (one store per value, each to another row,
            // was 6 % of a prompt's profile).
            for (b, keys) in k.chunks(TRANSPOSE * hd).enumerate() {
                block.clear();
                block.extend(keys.iter().map(|v| v.to_f32()));
                let n = keys.len() / hd;
                for d in 0..hd {
                    let row = &mut kt[d * ld + b * TRANSPOSE..][..n];
                    for (i, out) in row.iter_mut().enumerate() {
                        *out = block[i * hd + d];
                    }
                }
            }
        });
    let kt = &*kt;
    let scale = 1.0 / (hd as f32).sqrt();
    outs.par_chunks_mut(per_task)
        .enumerate()
        .for_each_init(Vec::new, |scores, (t, o)| {
            let (h, b) = (t / blocks, t % blocks);
            let (g, i0) = (h / group, b * TASK_QUERIES);
            let prompt = Prompt {
                q: &q[i0 * width + h * hd..],
                q_stride: width,
                kt: &kt[g * hd * ld..][..hd * ld],
                ld,
                values: &values[g * capacity * hd..][..kv_len * hd],
                hd,
                visible: pos + i0 + 1,
                scale,
            };
            let rows = TASK_QUERIES.min(seq - i0);
            scores.resize(ROWS * ld, 0.0);
            prompt.attend(&mut o[..rows * hd], scores);
        });
    for (t, o) in outs.chunks_exact(per_task).enumerate() {
        let (h, i0) = (t / blocks, t % blocks * TASK_QUERIES);
        let rows = TASK_QUERIES.min(seq - i0);
        for (i, o) in o[..rows * hd].chunks_exact(hd).enumerate() {
            out[(i0 + i) * width + h * hd..][..hd].copy_from_slice(o);
        }
    }
}

/// A block of one head's queries on the prompt path.
struct Prompt<'a, T> {
    /// The block's first query; the next ones follow every `q_stride` values.
    q: &'a [f32],
    q_stride: usize,
    /// The head's keys transposed: `[hd, ld]`, positions `0..` in each row.
    kt: &'a [f32],
    ld: usize,
    /// `[positions, hd]`.
    values: &'a [T],
    hd: usize,
    /// Positions the block's first query sees (the next query sees one more).
    visible: usize,
    scale: f32,
}

impl<T: CacheValue> Prompt<'_, T> {
    /// Attends the block's queries into `out` (`[rows, hd]`), with `scores` as room for
    /// [`ROWS`] × `ld` scores.
    fn attend(&self, out: &mut [f32], scores: &mut [f32]) {
        let rows = out.len() / self.hd;
        let mut r = 0;
        while r < rows {
            if rows - r >= ROWS {
                self.tile::<ROWS>(r, out, scores);
                r += ROWS;
            } else {
                self.tile::<1>(r, out, scores);
                r += 1;
            }
        }
    }

    /// Queries `r0..r0 + R` of the block.
    fn tile<const R: usize>(&self, r0: usize, out: &mut [f32], scores: &mut [f32]) {
        let (hd, ld) = (self.hd, self.ld);
        let seen = |r: usize| self.visible + r0 + r;
        let keys = seen(R - 1);
        let q: [&[f32]; R] = std::array::from_fn(|r| &self.q[(r0 + r) * self.q_stride..][..hd]);
        for k0 in (0..keys).step_by(KEYS) {
            let mut acc = [[0f32; KEYS]; R];
            for d in 0..hd {
                let kt = &self.kt[d * ld..][..ld].as_chunks::<KEYS>().0[k0 / KEYS];
                for (acc, q) in acc.iter_mut().zip(&q) {
                    axpy(acc, q[d] * self.scale, kt);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                scores[r * ld + k0..][..KEYS].copy_from_slice(acc);
            }
        }
        // Each row's softmax, left unnormalized; positions it may not see weigh nothing.
        let mut inv = [0f32; R];
        for (r, inv) in inv.iter_mut().enumerate() {
            let (seen, unseen) = scores[r * ld..][..keys].split_at_mut(seen(r));
            *inv = 1.0 / softmax_weights(seen);
            unseen.fill(0.0);
        }
        let p: [&[f32]; R] = std::array::from_fn(|r| &scores[r * ld..][..keys]);
        for d0 in (0..hd).step_by(DIMS) {
            let mut acc = [[0f32; DIMS]; R];
            for (k, v) in self.values[..keys * hd].chunks_exact(hd).enumerate() {
                let v = T::widen(&v.as_chunks::<DIMS>().0[d0 / DIMS]);
                for (acc, p) in acc.iter_mut().zip(&p) {
                    axpy(acc, p[k], &v);
                }
            }
            for (r, (acc, inv)) in acc.iter().zip(inv).enumerate() {
                let o = &mut out[(r0 + r) * hd + d0..][..DIMS];
                for (o, &a) in o.iter_mut().zip(acc) {
                    *o = a * inv;
                }
            }
        }
    }
}

/// One attention head's operands.
struct Head<'a, T> {
    /// The head's query of the first new position; the next ones follow every `q_stride` values.
    q: &'a [f32],
    q_stride: usize,
    /// `[pos + seq, head_dim]`.
    keys: &'a [T],
    values: &'a [T],
    pos: usize,
    scale: f32,
}

impl<T: CacheValue> Head<'_, T> {
    /// Attends each query (`out`: `[seq, head_dim]`) over its visible positions, with `scores` as
    /// room for one query's scores.
    fn attend(&self, hd: usize, out: &mut [f32], scores: &mut [f32]) {
        for (i, o) in out.chunks_exact_mut(hd).enumerate() {
            let qi = &self.q[i * self.q_stride..][..hd];
            let scores = &mut scores[..self.pos + i + 1];
            for (s, k) in scores.iter_mut().zip(self.keys.chunks_exact(hd)) {
                *s = dot(qi, k) * self.scale;
            }
            let inv = 1.0 / softmax_weights(scores);
            o.fill(0.0);
            for (&s, v) in scores.iter().zip(self.values.chunks_exact(hd)) {
                add_scaled(o, s * inv, v);
            }
        }
    }
}

/// Replaces scores by `e^(s - max)` and returns their sum: softmax before the division. Maximum and
/// sum run over [`LANES`] lanes so they vectorize (an ordered float reduction does not).
fn softmax_weights(scores: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = scores.chunks_exact(LANES);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    for chunk in chunks {
        for (l, &s) in lanes.iter_mut().zip(chunk) {
            *l = l.max(s);
        }
    }
    max = lanes.iter().fold(max, |m, &l| m.max(l));
    let mut sums = [0f32; LANES];
    let mut chunks = scores.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (l, s) in sums.iter_mut().zip(chunk) {
            *s = exp(*s - max);
            *l += *s;
        }
    }
    let mut total = 0.0;
    for s in chunks.into_remainder() {
        *s = exp(*s - max);
        total += *s;
    }
    total + sums.iter().sum::<f32>()
}

/// `e^x` to within a few ulp (Cephes' `expf`: `x = n ln 2 + r`, a degree-7 polynomial in `r`,
/// `2^n` from the exponent bits), written without branches so loops over it vectorize where libm's
/// `expf` is one call per value. Inputs are clamped to where `2^n` is a normal f32: below -87 the
/// result is about 1.6e-38 instead of smaller, above 88 about 1.7e38; NaN stays NaN.
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = fma(x, std::f32::consts::LOG2_E, 0.5).floor();
    let r = fma(n, -LN2_LO, fma(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = fma(p, r, c);
    }
    let y = fma(p, r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `acc += a · x`, a fixed number of lanes at a time. LLVM leaves the portable loop scalar inside
/// the attention tiles (measured: a third of a prompt's time), so x86 with AVX2 and FMA, which the
/// build targets (`-C target-cpu=native`), gets explicit 8-lane fused multiply-adds.
#[inline(always)]
fn axpy<const N: usize>(acc: &mut [f32; N], a: f32, x: &[f32; N]) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    #[allow(unsafe_code, reason = "SIMD intrinsics on arrays")]
    {
        use std::arch::x86_64::*;
        const { assert!(N.is_multiple_of(8)) };
        // SAFETY: the crate is compiled with AVX2 and FMA enabled (static target features), and
        // every 8-lane load and store lies inside the two `N`-value arrays, `N` a multiple of 8.
        unsafe {
            let a = _mm256_set1_ps(a);
            for i in (0..N).step_by(8) {
                let p = acc.as_mut_ptr().add(i);
                let v = _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p));
                _mm256_storeu_ps(p, v);
            }
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    for (acc, &x) in acc.iter_mut().zip(x) {
        *acc = fma(a, x, *acc);
    }
}

/// `a · b + c`, fused where the target has FMA (elsewhere `mul_add` is a slow library call).
#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Lanes summed independently, so the compiler can keep them in one vector register.
const LANES: usize = 16;

fn dot<T: CacheValue>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
    let tail: f32 = a_chunks
        .1
        .iter()
        .zip(b_chunks.1)
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (a, b) in a_chunks.0.iter().zip(b_chunks.0) {
        let b = T::widen(b);
        for k in 0..LANES {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out += a · x`, [`LANES`] values at a time.
fn add_scaled<T: CacheValue>(out: &mut [f32], a: f32, x: &[T]) {
    let (out_chunks, out_tail) = out.as_chunks_mut::<LANES>();
    let (x_chunks, x_tail) = x.as_chunks::<LANES>();
    for (o, x) in out_chunks.iter_mut().zip(x_chunks) {
        let x = T::widen(x);
        for k in 0..LANES {
            o[k] += a * x[k];
        }
    }
    for (o, x) in out_tail.iter_mut().zip(x_tail) {
        *o += a * x.to_f32();
    }
}

fn sum_of_squares(x: &[f32]) -> f32 {
    dot(x, x)
}
