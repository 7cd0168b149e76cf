//! The portable micro-kernel: plain Rust, used on every target without a SIMD path and as the
//! reference the SIMD paths are tested against.

use super::{BLOCK, Format, RESIDUE_SCALE, Tile, position};

/// `M × N` outputs of `tile`, block by block: an exact integer dot product per block (with
/// residues, `RESIDUE_SCALE × dot(w, hi) + dot(w, lo)`; q6_K: per half block, each with its own
/// scale), scaled by both blocks' scales, plus the weight block's minimum times the activation
/// block's sum. Activations are quantized with no bias on this path, so the weights are made
/// signed here.
pub(super) fn kernel<const M: usize, const N: usize>(tile: &Tile<'_>) -> [[f32; N]; M] {
    let nb = tile.nb;
    let offset = tile.format.offset();
    let per_scale = tile.format.values_per_scale();
    let mut out = [[0f32; N]; M];
    for (i, row) in out.iter_mut().enumerate() {
        let x = &tile.x_quants[i * nb * BLOCK..][..nb * BLOCK];
        let residues = tile.x_residues.map(|r| &r[i * nb * BLOCK..][..nb * BLOCK]);
        for (j, y) in row.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..nb {
                for part in 0..BLOCK / per_scale {
                    let dot = |x: &[i8]| -> i32 {
                        (part * per_scale..(part + 1) * per_scale)
                            .map(|e| {
                                let xv = x[position(Format::Q8_0, nb, b, e).0];
                                (tile.w.value(j, b, e) - offset) * i32::from(xv)
                            })
                            .sum()
                    };
                    let dot = match residues {
                        None => dot(x),
                        Some(lo) => RESIDUE_SCALE * dot(x) + dot(lo),
                    };
                    let (d, m) = tile.w.scale_min(j, b, part);
                    acc += d * tile.x_scales[i * nb + b] * dot as f32;
                    if tile.format.has_min() {
                        acc += m * tile.x_sums[i * nb + b];
                    }
                }
            }
            *y = acc;
        }
    }
    out
}
