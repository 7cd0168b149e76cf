//! The kernels against candle: the same weights bit for bit, and products close to candle's
//! quantized matmul and to the exact f32 product, on every path this CPU has; the attention ops
//! against their definition.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::*;
use crate::testing::values;

/// `cols` made to fit the format's rows (q4_K's super-blocks of 256).
fn fitting(format: Format, cols: usize) -> usize {
    cols.next_multiple_of(format.row_multiple())
}

/// candle's q4_1 and q5_0 kernels take blocks in pairs.
fn candle_multiplies(format: Format, cols: usize) -> bool {
    !matches!(format, Format::Q4_1 | Format::Q5_0) || (cols / BLOCK).is_multiple_of(2)
}

/// How far candle's product may be from sanctum's 8-bit one on arbitrary activations. Where
/// candle quantizes them as sanctum does (ggml's q8_0 per 32 values), the integer dot products are
/// the same and only the order of float sums differs (measured: at most 2e-7). q4_1 multiplies
/// candle's q8_1, whose sum it rounds as f16(Σ)·f16(scale) where ggml and sanctum round
/// f16(scale·Σ) (measured: 1.1e-3). The k-quants multiply candle's q8_K activations (one scale per
/// 256 values, so coarser), and so does q8_0 on candle's repacked x86 path, which some AVX-512
/// CPUs take for rows of a multiple of 256 (measured: 5e-3 to 7e-3). [`grid_activations`] checks
/// every format against candle without these differences.
fn candle_bound(format: Format, cols: usize) -> f32 {
    match format {
        Format::Q4K | Format::Q6K => 1e-2,
        Format::Q8_0 if cols.is_multiple_of(256) => 1e-2,
        Format::Q4_1 => 3e-3,
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => 1e-6,
    }
}

/// How far products may differ when the activations quantize exactly ([`grid_activations`]):
/// the order of float sums alone.
const EXACT_INPUTS: f32 = 1e-6;

/// Activation rows every scheme quantizes exactly: each row is integers in [-127, 127] times a
/// power of two `s`, every block of 32 holds a ±127 (so ggml's q8_0 and q8_1 scale, and q8_K's
/// over 256 values, is `s` itself) and adds up to at most 2048 in magnitude (so q8_1's f16 sum is
/// exact too). With these, sanctum's and candle's integer dot products both equal the exact product
/// with the dequantized weights, whatever activation scheme each uses; only the order in which
/// floats are summed differs.
fn grid_activations(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let raw = values(rows * cols, seed, 127.0);
    let mut x = Vec::with_capacity(rows * cols);
    for (r, row) in raw.chunks_exact(cols).enumerate() {
        let s = (-4.0 - (r % 5) as f32).exp2();
        for (b, block) in row.chunks_exact(BLOCK).enumerate() {
            let mut q: Vec<f32> = block.iter().map(|v| v.round()).collect();
            let extreme = (b * 7 + r) % BLOCK;
            q[extreme] = if (b + r) % 2 == 0 { 127.0 } else { -127.0 };
            // The other 31 quartered add up to at most 31 × 31: the block's sum stays within 2048.
            if q.iter().sum::<f32>().abs() > 2048.0 {
                q.iter_mut()
                    .enumerate()
                    .filter(|&(k, _)| k != extreme)
                    .for_each(|(_, v)| *v = (*v / 4.0).trunc());
            }
            x.extend(q.into_iter().map(|v| v * s));
        }
    }
    x
}

/// candle's quantized product of `m` rows of `x`.
fn candle_product(
    candle: &QMatMul,
    x: Vec<f32>,
    m: usize,
    cols: usize,
) -> candle_core::Result<Vec<f32>> {
    let xt = Tensor::from_vec(x, (m, cols), &Device::Cpu)?;
    candle.forward(&xt)?.flatten_all()?.to_vec1()
}

/// `y = x · wᵀ` in f64.
fn exact(w: &[f32], x: &[f32], cols: usize) -> Vec<f32> {
    x.chunks_exact(cols)
        .flat_map(|x| {
            w.chunks_exact(cols).map(move |w| {
                w.iter()
                    .zip(x)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>() as f32
            })
        })
        .collect()
}

fn relative_rms(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| f64::from(g - w).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|&w| f64::from(w).powi(2)).sum();
    (err / norm).sqrt() as f32
}

/// Weights with some structure ggml's quantizers treat specially: an all-zero block, a block whose
/// largest magnitude is negative, and values on rounding ties.
fn awkward_weights(rows: usize, cols: usize) -> Vec<f32> {
    let mut w = values(rows * cols, 7, 0.5);
    w[..BLOCK].fill(0.0);
    w[BLOCK] = -0.9;
    for (k, v) in w[2 * BLOCK..3 * BLOCK].iter_mut().enumerate() {
        *v = (k as f32 - 16.0) * 0.25;
    }
    w
}

#[test]
fn packed_weights_dequantize_to_candles_values() -> candle_core::Result<()> {
    for format in Format::ALL {
        let (rows, cols) = (24, fitting(format, 320));
        let w = awkward_weights(rows, cols);
        let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu)?;
        let want: Vec<f32> = QTensor::quantize(&t, format.ggml())?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let packed = PackedMatrix::quantize(format, &w, rows, cols)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut got = vec![0f32; rows * cols];
        for (r, out) in got.chunks_exact_mut(cols).enumerate() {
            packed.dequantize_row(r, out);
        }
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "{format:?}: {differ} values differ from candle's"
        );
    }
    Ok(())
}

/// ggml's block bytes in and out: candle's quantization of a matrix packs and unpacks to the same
/// bytes, and packing from f32 gives candle's bytes.
#[test]
fn ggml_blocks_round_trip_through_the_packing() -> candle_core::Result<()> {
    for format in Format::ALL {
        // More than one run of 8 blocks, and a partial one (k-quants: three super-blocks).
        let (rows, cols) = (
            5,
            if format.blocks_per_scale() > 1 {
                768
            } else {
                352
            },
        );
        let w = awkward_weights(rows, cols);
        let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu)?;
        let theirs = QTensor::quantize(&t, format.ggml())?.data()?.to_vec();
        let ours = PackedMatrix::quantize(format, &w, rows, cols)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        assert_eq!(ours.ggml_blocks(), theirs, "{format:?} from f32");
        let mut builder = PackedBuilder::new(format, rows, cols)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let row_bytes = theirs.len() / rows;
        builder
            .push_ggml_rows(&theirs[..2 * row_bytes])
            .and_then(|()| builder.push_ggml_rows(&theirs[2 * row_bytes..]))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let passed = builder
            .finish()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        assert_eq!(passed.ggml_blocks(), theirs, "{format:?} passed through");
        // q4_K keeps its 6-bit multipliers as bytes: 148 bytes per 256 values against 144.
        let unpacked = if format == Format::Q4K {
            4 * theirs.len() / 144
        } else {
            0
        };
        assert_eq!(passed.bytes(), theirs.len() + unpacked, "{format:?} size");
    }
    Ok(())
}

#[test]
fn shapes_that_do_not_fit_are_refused() {
    assert_eq!(
        PackedMatrix::quantize(Format::Q8_0, &[0.0; 48], 1, 48).err(),
        Some(ShapeError::RowLength(48, 32))
    );
    for format in [Format::Q4K, Format::Q6K] {
        assert_eq!(
            PackedMatrix::quantize(format, &[0.0; 576], 1, 576).err(),
            Some(ShapeError::RowLength(576, 256))
        );
    }
    assert!(matches!(
        PackedMatrix::quantize(Format::Q4_0, &[0.0; 64], 2, 64),
        Err(ShapeError::Values { got: 64, .. })
    ));
    let w = PackedMatrix::quantize(Format::Q8_0, &[0.0; 64], 2, 32).expect("fits");
    let mut y = [0.0; 3];
    assert!(matches!(
        w.matmul(&[0.0; 64], &mut y, &mut Scratch::default()),
        Err(ShapeError::Operands { .. })
    ));
}

/// Whether `path` runs on this CPU. Where it does not, the skip is said on the terminal; and
/// where the operating system's account of the CPU (`/proc/cpuinfo`'s flags) lists every feature
/// the path needs, a path the dispatch calls unavailable is a failure, not a skip: the machine
/// class CI runs on has its paths tested, whatever the detection says.
fn runs_here(path: Path) -> bool {
    if path.is_available() {
        return true;
    }
    let needs: &[&str] = match path {
        Path::Scalar => &[],
        Path::Avx2 => &["avx2", "fma", "f16c"],
        Path::Vnni => &["avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512_vnni"],
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().collect())
        .unwrap_or_default();
    assert!(
        flags.is_empty() || !needs.iter().all(|f| flags.contains(f)),
        "the {path:?} kernels are reported unavailable, but /proc/cpuinfo lists {needs:?}"
    );
    crate::testing::skip(&format!("the {path:?} kernels: this CPU lacks {needs:?}"));
    false
}

/// A path against candle's `QMatMul` on the same weights, against the exact product with the
/// dequantized weights (only the activations' quantization differs), and against the exact product
/// with the original weights.
fn check_path(path: Path, ms: &[usize], shapes: &[(usize, usize)]) -> candle_core::Result<()> {
    if !runs_here(path) {
        return Ok(());
    }
    let mut scratch = Scratch::default();
    for &(rows, cols) in shapes {
        let w = values(rows * cols, (rows * 31 + cols) as u64, 0.2);
        let wt = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu)?;
        for format in Format::ALL {
            if !cols.is_multiple_of(format.row_multiple()) {
                continue;
            }
            let candle = QMatMul::from_qtensor(QTensor::quantize(&wt, format.ggml())?)?;
            let packed = PackedMatrix::quantize(format, &w, rows, cols)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let precise = packed.clone().with_activations(Activations::Int16);
            let mut dequantized = vec![0f32; rows * cols];
            for (r, out) in dequantized.chunks_exact_mut(cols).enumerate() {
                packed.dequantize_row(r, out);
            }
            for &m in ms {
                let x = values(m * cols, (m * 7 + cols) as u64, 1.0);
                let mut y = vec![f32::NAN; m * rows];
                packed
                    .matmul_on(path, &x, &mut y, &mut scratch)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let what = format!("{path:?} {format:?} m={m} {rows}x{cols}");
                if candle_multiplies(format, cols) {
                    let theirs = candle_product(&candle, x.clone(), m, cols)?;
                    let vs_candle = relative_rms(&y, &theirs);
                    let bound = candle_bound(format, cols);
                    assert!(vs_candle < bound, "{what}: {vs_candle} from candle");
                }
                let vs_dequantized = relative_rms(&y, &exact(&dequantized, &x, cols));
                assert!(
                    vs_dequantized < 1e-2,
                    "{what}: {vs_dequantized} from the product with the dequantized weights"
                );
                // Tiny shapes have few values to average over: q4_0's error varies more there.
                let bound = if format == Format::Q8_0 { 2e-2 } else { 0.25 };
                let vs_exact = relative_rms(&y, &exact(&w, &x, cols));
                assert!(
                    vs_exact < bound,
                    "{what}: {vs_exact} from the exact product"
                );
                // 16-bit activations: only the weights' quantization is left.
                precise
                    .matmul_on(path, &x, &mut y, &mut scratch)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let vs_dequantized = relative_rms(&y, &exact(&dequantized, &x, cols));
                assert!(
                    vs_dequantized < 1e-4,
                    "{what} int16: {vs_dequantized} from the product with the dequantized weights"
                );
                // Activations both quantize exactly: sanctum, candle and the exact product agree
                // but for the order of float sums.
                let grid = grid_activations(m, cols, (m * 5 + cols) as u64);
                packed
                    .matmul_on(path, &grid, &mut y, &mut scratch)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let vs_dequantized = relative_rms(&y, &exact(&dequantized, &grid, cols));
                assert!(
                    vs_dequantized < EXACT_INPUTS,
                    "{what} exact inputs: {vs_dequantized} from the product with the dequantized weights"
                );
                if candle_multiplies(format, cols) {
                    let theirs = candle_product(&candle, grid, m, cols)?;
                    let vs_candle = relative_rms(&y, &theirs);
                    assert!(
                        vs_candle < EXACT_INPUTS,
                        "{what} exact inputs: {vs_candle} from candle"
                    );
                }
            }
        }
    }
    Ok(())
}

/// SmolLM2-135M's shapes plus ones that leave partial tiles and a single serial chunk.
const SHAPES: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (100, 64),
    (7, 32),
    (7, 256),
];
/// Activation rows: one token, and every remainder after whole tiles of `MR` (2, 3, 1, none).
const MS: [usize; 5] = [1, 2, 7, 9, 64];

#[test]
fn vnni_path_matches_candle() -> candle_core::Result<()> {
    check_path(Path::Vnni, &MS, &SHAPES)
}

#[test]
fn avx2_path_matches_candle() -> candle_core::Result<()> {
    check_path(Path::Avx2, &MS, &SHAPES)
}

#[test]
fn scalar_path_matches_candle() -> candle_core::Result<()> {
    check_path(Path::Scalar, &MS, &SHAPES)
}

#[test]
fn paths_agree_closely() -> candle_core::Result<()> {
    let (rows, m) = (37, 5);
    let mut scratch = Scratch::default();
    for (format, activations) in Format::ALL
        .into_iter()
        .flat_map(|f| [(f, Activations::Int8), (f, Activations::Int16)])
    {
        // A run and a block after it; k-quants: three super-blocks.
        let cols = if format.blocks_per_scale() > 1 {
            768
        } else {
            288
        };
        let w = awkward_weights(rows, cols);
        let x = values(m * cols, 3, 2.0);
        let packed = PackedMatrix::quantize(format, &w, rows, cols)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .with_activations(activations);
        let mut reference = vec![0f32; m * rows];
        packed
            .matmul_on(Path::Scalar, &x, &mut reference, &mut scratch)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        for path in Path::ALL.into_iter().filter(|&p| runs_here(p)) {
            let mut y = vec![0f32; m * rows];
            packed
                .matmul_on(path, &x, &mut y, &mut scratch)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let diff = relative_rms(&y, &reference);
            assert!(
                diff < 1e-6,
                "{path:?} {format:?} {activations}: {diff} from scalar"
            );
        }
    }
    Ok(())
}

/// ggml blocks of `format` with every value at its largest stored magnitude (all bits of the
/// values set; q8_0's `-128`) and every f16 scale and minimum `2^-6`.
fn saturated_blocks(format: Format, blocks: usize) -> Vec<u8> {
    let (size, fill) = (
        format.ggml().type_size(),
        if format == Format::Q8_0 { 0x80 } else { 0xff },
    );
    // Where each block's f16 fields are, in ggml's structs.
    let halves: &[usize] = match format {
        Format::Q8_0 | Format::Q4_0 | Format::Q5_0 => &[0],
        Format::Q4_1 | Format::Q4K => &[0, 2],
        Format::Q6K => &[208],
    };
    let mut bytes = vec![fill; size * blocks];
    for block in bytes.chunks_exact_mut(size) {
        for &at in halves {
            block[at..at + 2].copy_from_slice(&f16::from_f32(1.0 / 64.0).to_le_bytes());
        }
    }
    bytes
}

/// The largest products the formats can make: saturated weights against activations at ±127 whose
/// residues are ±127 too. Partial sums that the AVX2 path keeps in 16 bits must not overflow: every
/// path agrees with the scalar one, which sums in 32 bits.
#[test]
fn the_largest_products_do_not_overflow() -> candle_core::Result<()> {
    let (rows, m) = (5, 5);
    let mut scratch = Scratch::default();
    for format in Format::ALL {
        // A run and a block after it; k-quants: two super-blocks.
        let cols = if format.blocks_per_scale() > 1 {
            512
        } else {
            288
        };
        let mut builder = PackedBuilder::new(format, rows, cols)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        builder
            .push_ggml_rows(&saturated_blocks(
                format,
                rows * cols / format.ggml().block_size(),
            ))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let packed = builder
            .finish()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        // Each block: 127 (its scale, 2^-7) and 126.5, which rounds to 127 and leaves the residue
        // -127; every other row negated.
        let x: Vec<f32> = (0..m * cols)
            .map(|k| {
                let units = if k % BLOCK == 0 { 127.0 } else { 126.5 };
                let sign = if (k / cols) % 2 == 0 { 1.0 } else { -1.0 };
                sign * units / 128.0
            })
            .collect();
        for activations in [Activations::Int8, Activations::Int16] {
            let packed = packed.clone().with_activations(activations);
            for m in [1, m] {
                let x = &x[..m * cols];
                let mut reference = vec![0f32; m * rows];
                packed
                    .matmul_on(Path::Scalar, x, &mut reference, &mut scratch)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                for path in Path::ALL.into_iter().filter(|&p| runs_here(p)) {
                    let mut y = vec![0f32; m * rows];
                    packed
                        .matmul_on(path, x, &mut y, &mut scratch)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    let diff = relative_rms(&y, &reference);
                    assert!(
                        diff < EXACT_INPUTS,
                        "{path:?} {format:?} {activations} m={m}: {diff} from scalar"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Attention in f64, one query and head at a time, as the definition reads.
fn reference_attention(
    shape: ops::AttentionShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
) -> Vec<f32> {
    let ops::AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        pos,
        capacity,
        seq,
    } = shape;
    let mut out = vec![0f32; seq * heads * hd];
    for i in 0..seq {
        for h in 0..heads {
            let kv = h / (heads / kv_heads) * capacity * hd;
            let qi = &q[(i * heads + h) * hd..][..hd];
            let scores: Vec<f64> = (0..=pos + i)
                .map(|k| {
                    let key = &keys[kv + k * hd..][..hd];
                    let dot: f64 = qi.iter().zip(key).map(|(&a, &b)| f64::from(a * b)).sum();
                    dot / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for (d, o) in out[(i * heads + h) * hd..][..hd].iter_mut().enumerate() {
                let v: f64 = weights
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * f64::from(values[kv + k * hd + d]))
                    .sum();
                *o = (v / total) as f32;
            }
        }
    }
    out
}

/// Both attention paths (tiled prompts, single queries) against the definition: grouped heads,
/// cached positions before the queries, query counts that leave partial tiles and tasks, and a
/// cache with room to spare.
#[test]
fn attention_matches_reference() {
    for (seq, pos, hd) in [
        (1, 0, 64),
        (1, 37, 64),
        (4, 0, 64),
        (23, 5, 64),
        (70, 61, 32),
        (5, 3, 24),
    ] {
        let (heads, kv_heads, capacity) = (6, 2, pos + seq + 3);
        let shape = ops::AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            pos,
            capacity,
            seq,
        };
        let q = values(seq * heads * hd, 3, 2.0);
        let keys = values(kv_heads * capacity * hd, 4, 2.0);
        let vals = values(kv_heads * capacity * hd, 5, 1.0);
        let mut out = vec![0f32; q.len()];
        let mut scratch = vec![f32::NAN; 11];
        ops::attention(shape, &q, &keys, &vals, &mut out, &mut scratch);
        let want = reference_attention(shape, &q, &keys, &vals);
        let err = relative_rms(&out, &want);
        assert!(err < 1e-5, "seq {seq} pos {pos} hd {hd}: {err}");
        // An f16 cache: the same attention over the rounded keys and values.
        let half = |v: &[f32]| v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
        let widened = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let (keys16, vals16) = (half(&keys), half(&vals));
        ops::attention(shape, &q, &keys16, &vals16, &mut out, &mut scratch);
        let want = reference_attention(shape, &q, &widened(&keys16), &widened(&vals16));
        let err = relative_rms(&out, &want);
        assert!(err < 1e-5, "f16 cache, seq {seq} pos {pos} hd {hd}: {err}");
    }
}

/// The vectorizable `exp` within a few ulp over the range softmax and SiLU use, and its clamps.
#[test]
fn exp_is_close_to_libm() {
    for k in -100_000..=100_000 {
        let x = k as f32 * 8.7e-4;
        let (got, want) = (ops::exp(x), x.exp());
        assert!(
            ((got - want) / want).abs() < 4.0 * f32::EPSILON,
            "{x}: {got} vs {want}"
        );
    }
    assert!(ops::exp(-1e4) < 2e-38 && ops::exp(-1e4) > 0.0);
    assert!(ops::exp(1e4).is_finite());
    assert!(ops::exp(f32::NAN).is_nan());
}

/// The SIMD rounding of activation blocks casts exactly as the scalar code: ties both ways,
/// values past `i8`'s and `i32`'s ranges, infinities, NaN, subnormals, and residues of each.
#[cfg(target_arch = "x86_64")]
#[test]
fn simd_rounding_matches_the_scalar_casts() {
    if !x86::has_avx2() {
        return;
    }
    let awkward = [
        0.5,
        -0.5,
        1.5,
        -1.5,
        2.5,
        -2.5,
        0.5f32.next_down(),
        -0.5f32.next_down(),
        126.5,
        -127.5,
        127.49,
        128.0,
        255.5,
        -128.5,
        8_388_607.5,
        8_388_609.0,
        2_147_483_520.0,
        2_147_483_648.0,
        -2_147_483_648.0,
        1e20,
        -1e20,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-45,
        -0.0,
        0.0,
        3.333_333_3,
        -77.25,
        0.25,
        63.75,
        100.0,
    ];
    let mut state = 7u64;
    let mut random = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 300.0
    };
    let mut blocks = vec![awkward];
    blocks.extend((0..200).map(|_| std::array::from_fn::<f32, BLOCK, _>(|_| random())));
    for block in &blocks {
        for id in [1.0, 0.5, 3.0, 1.0 / 3.0, 127.0 / 99.9, f32::INFINITY, 0.0] {
            let simd = x86::round_block::<true>(block, id).expect("AVX2 is there");
            assert_eq!(
                simd,
                round_block_scalar::<true>(block, id),
                "{block:?} × {id}"
            );
            let simd = x86::round_block::<false>(block, id).expect("AVX2 is there");
            assert_eq!(
                simd,
                round_block_scalar::<false>(block, id),
                "{block:?} × {id}"
            );
        }
    }
}
