//! The f32 operations around the matmuls of a decoder layer, on plain slices: RMS normalization,
//! rotary embedding, causal grouped-query attention over a position-major key/value cache, and the
//! gated SiLU. On the CPU, one candle op per step costs more than the arithmetic at one token;
//! these run in place, in buffers the caller reuses.

use rayon::prelude::*;

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
        *g = *g / (1.0 + (-*g).exp()) * u;
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

/// Causal attention of `seq` queries (`q`: `[seq, heads × head_dim]`) over the cached keys and
/// values (`[kv_heads, capacity, head_dim]`, positions `0..pos + seq` filled, the new ones
/// included) into `out` (`[seq, heads × head_dim]`). Each head's keys are contiguous, so reading
/// them streams instead of striding. `scratch` is reused between calls: per head, its output and
/// scores.
///
/// # Panics
/// If a slice is shorter than the shape says.
pub fn attention(
    shape: AttentionShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
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

/// One attention head's operands.
struct Head<'a> {
    /// The head's query of the first new position; the next ones follow every `q_stride` values.
    q: &'a [f32],
    q_stride: usize,
    /// `[pos + seq, head_dim]`.
    keys: &'a [f32],
    values: &'a [f32],
    pos: usize,
    scale: f32,
}

impl Head<'_> {
    /// Attends each query (`out`: `[seq, head_dim]`) over its visible positions, with `scores` as
    /// room for one query's scores.
    fn attend(&self, hd: usize, out: &mut [f32], scores: &mut [f32]) {
        for (i, o) in out.chunks_exact_mut(hd).enumerate() {
            let qi = &self.q[i * self.q_stride..][..hd];
            let scores = &mut scores[..self.pos + i + 1];
            let mut max = f32::NEG_INFINITY;
            for (s, k) in scores.iter_mut().zip(self.keys.chunks_exact(hd)) {
                *s = dot(qi, k) * self.scale;
                max = max.max(*s);
            }
            let mut total = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            let inv = 1.0 / total;
            o.fill(0.0);
            for (&s, v) in scores.iter().zip(self.values.chunks_exact(hd)) {
                let p = s * inv;
                for (o, &v) in o.iter_mut().zip(v) {
                    *o += p * v;
                }
            }
        }
    }
}

/// Lanes summed independently, so the compiler can keep them in one vector register.
const LANES: usize = 16;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for k in 0..LANES {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn sum_of_squares(x: &[f32]) -> f32 {
    dot(x, x)
}
