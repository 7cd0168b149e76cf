//! x86-64 micro-kernels: AVX-512-VNNI on 256-bit registers and AVX2, chosen at run time.
//!
//! One body serves every format and both instruction sets: a format says how weights are loaded as
//! unsigned bytes ([`Unpack`]), an instruction set how bytes are multiplied and summed into 32-bit
//! lanes ([`Dot`]): VNNI in one instruction, AVX2 in 16-bit partial sums over as many vectors as
//! cannot overflow (a whole run for the 4-bit formats), then widened. Rows are stored in runs of 8
//! interleaved blocks (see `position` in the parent module): for each run the kernel accumulates,
//! per (activation row, weight row) pair, 8 products into one vector whose lanes are the 8 blocks'
//! dot products; one multiply by the 8 scale products and one fused add bring them into the f32
//! accumulator. One token's weight rows go one after the other, each read whole. With several
//! activation rows, each weight vector loaded serves all of them and each activation vector all
//! weight rows, so the tile costs about one load per two products (AVX2's 16 registers do not hold
//! a 4 × 4 tile's accumulators and weights: there it goes as two tiles of 4 × 2). q6_K's half
//! blocks have scales of their own: its runs go in two parts of 4 vectors, the first and the last
//! 16 values of every block. Blocks after the last run go one at a time (8 partial sums per
//! block). Each accumulator is summed across its lanes once at the end.
#![allow(
    unsafe_code,
    reason = "SIMD intrinsics: loads through raw pointers and calls into target-feature functions"
)]

use std::arch::x86_64::*;

use half::f16;

use super::{BLOCK, Band, Format, GROUP, Path, RESIDUE_SCALE, Tile, avx2_unsigned};

/// AVX2, FMA and F16C (the weights' scales), the baseline SIMD path.
pub(super) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// AVX-512 VNNI with 256-bit vectors (VL), on top of AVX2.
pub(super) fn has_vnni() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// The band's micro-kernels of `M × N` on `path` (one of the x86 paths).
pub(super) fn kernel<const M: usize, const N: usize>(path: Path, tile: &Tile<'_>, band: Band<'_>) {
    match tile.format {
        Format::Q8_0 => on::<Q8, M, N>(path, tile, band),
        Format::Q4_0 => on::<Nibbles<false>, M, N>(path, tile, band),
        Format::Q4_1 => on::<Nibbles<true>, M, N>(path, tile, band),
        Format::Q5_0 => on::<Q5, M, N>(path, tile, band),
        Format::Q4K => on::<Q4K, M, N>(path, tile, band),
        Format::Q6K => on::<Q6K, M, N>(path, tile, band),
    }
}

/// [`kernel`] for one format.
fn on<U: Unpack, const M: usize, const N: usize>(path: Path, tile: &Tile<'_>, band: Band<'_>) {
    match (path, tile.x_residues.is_some()) {
        // SAFETY: `Path::is_available` was checked by the caller (`matmul_on` asserts it), so the
        // CPU has the features these functions are compiled for; `Tile::check` has verified that
        // the tile's slices hold `M × tiles` activation rows (and their residues when there are
        // any) and `N` weight rows (and their minimums when the format has them).
        (Path::Vnni, false) => unsafe { vnni::<U, M, N, false>(tile, band) },
        // SAFETY: as above.
        (Path::Vnni, true) => unsafe { vnni::<U, M, N, true>(tile, band) },
        // SAFETY: as above.
        (_, false) => unsafe { avx2::<U, M, N, false>(tile, band) },
        // SAFETY: as above.
        (_, true) => unsafe { avx2::<U, M, N, true>(tile, band) },
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn vnni<U: Unpack, const M: usize, const N: usize, const SPLIT: bool>(
    tile: &Tile<'_>,
    band: Band<'_>,
) {
    // SAFETY: the caller guarantees the features and the band's bounds (see `kernel`).
    band.fill(tile, |tile| unsafe { body::<U, Vnni, M, N, SPLIT>(tile) });
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<U: Unpack, const M: usize, const N: usize, const SPLIT: bool>(
    tile: &Tile<'_>,
    band: Band<'_>,
) {
    // SAFETY: the caller guarantees the features and the band's bounds (see `kernel`).
    band.fill(tile, |tile| unsafe { body::<U, Avx2, M, N, SPLIT>(tile) });
}

/// [`super::round_block`] with AVX2, or None without it (or for a block that is not 32 values).
#[inline(always)]
pub(super) fn round_block<const RESIDUES: bool>(x: &[f32], id: f32) -> Option<[[i8; BLOCK]; 2]> {
    let x: &[f32; BLOCK] = x.try_into().ok()?;
    // SAFETY: the CPU has the features `round_block_avx2` is compiled for.
    has_avx2().then(|| unsafe { round_block_avx2::<RESIDUES>(x, id) })
}

/// [`round_block`]: 8 values at a time, as the scalar casts (see `rounded_bytes`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_block_avx2<const RESIDUES: bool>(x: &[f32; BLOCK], id: f32) -> [[i8; BLOCK]; 2] {
    // SAFETY: compiled with AVX2; `x` holds 32 values, 8 from `8 × k`, and each output array 32
    // bytes (the loads and stores are unaligned).
    unsafe {
        let id = _mm256_set1_ps(id);
        let residue_scale = _mm256_set1_ps(RESIDUE_SCALE as f32);
        let (mut values, mut residues) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
        for (k, (value, residue)) in values.iter_mut().zip(&mut residues).enumerate() {
            let scaled = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(8 * k)), id);
            *value = round_half_away(scaled);
            if RESIDUES {
                let left = _mm256_mul_ps(_mm256_sub_ps(scaled, *value), residue_scale);
                *residue = round_half_away(left);
            }
        }
        let mut out = [[0i8; BLOCK]; 2];
        _mm256_storeu_si256(out[0].as_mut_ptr().cast(), rounded_bytes(values));
        if RESIDUES {
            _mm256_storeu_si256(out[1].as_mut_ptr().cast(), rounded_bytes(residues));
        }
        out
    }
}

/// `f32::round` on 8 lanes: adding the largest float below 1/2, with the value's sign, and
/// truncating gives the same result for every value (LLVM's own lowering of `round`).
#[inline(always)]
unsafe fn round_half_away(v: __m256) -> __m256 {
    // SAFETY: only called from functions compiled with AVX2.
    unsafe {
        let sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0));
        let half = _mm256_or_ps(sign, _mm256_set1_ps(0.5f32.next_down()));
        _mm256_round_ps(
            _mm256_add_ps(v, half),
            _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC,
        )
    }
}

/// 32 rounded floats as bytes, each as `as i32 as i8` casts it: the low byte of the saturating
/// conversion (`vcvttps2dq` gives `i32::MIN` where Rust saturates up to `i32::MAX`, whose low byte
/// is -1: those lanes are set apart), in order.
#[inline(always)]
unsafe fn rounded_bytes(v: [__m256; 4]) -> __m256i {
    // SAFETY: only called from functions compiled with AVX2.
    unsafe {
        let too_big = _mm256_set1_ps(2_147_483_648.0);
        let low = v.map(|v| {
            let int = _mm256_cvttps_epi32(v);
            let above = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(v, too_big));
            _mm256_and_si256(_mm256_or_si256(int, above), _mm256_set1_epi32(0xff))
        });
        // Unsigned packs keep the bytes as they are (each lane is 0..=255); they interleave the
        // 128-bit halves, which the permutation puts back in order.
        let words = [
            _mm256_packus_epi32(low[0], low[1]),
            _mm256_packus_epi32(low[2], low[3]),
        ];
        let bytes = _mm256_packus_epi16(words[0], words[1]);
        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }
}

/// Where one weight row's run (or tail block) starts: its values, and the bits above them.
#[derive(Clone, Copy)]
struct At {
    quants: *const u8,
    /// Only read by formats with `Unpack::HIGH_BYTES`.
    high: *const u8,
}

/// How a format's blocks become unsigned bytes. Everything but the loads follows from the
/// format, as [`Format`] describes it.
trait Unpack {
    /// The format unpacked.
    const FORMAT: Format;
    /// Stored bytes per block.
    const BYTES: usize = Self::FORMAT.block_bytes();
    /// The stored value exceeds the signed one by this much (q8_0's 128 as the byte `-128`).
    const OFFSET: i8 = Self::FORMAT.offset() as u8 as i8;
    /// Blocks have minimums (q4_1, q4_K).
    const MINS: bool = Self::FORMAT.has_min();
    /// Bytes per block of the bits above the nibbles, in a plane of their own: q5_0's 4, q6_K's 8.
    const HIGH_BYTES: usize = Self::FORMAT.high_bits() * BLOCK / 8;
    /// Blocks per f16 scale: 8 for the k-quants, whose blocks scale their super-block's by bytes.
    const PER_SCALE: usize = Self::FORMAT.blocks_per_scale();
    /// Scale multipliers per block (see `Format::multipliers`): 2 for q6_K, one per half block.
    const MULTIPLIERS: usize = Self::FORMAT.multipliers();
    /// The multipliers are signed (q6_K) rather than unsigned (q4_K).
    const SIGNED_MULTIPLIERS: bool = Self::FORMAT.signed_multipliers();
    /// Parts of a block with scales of their own, each taking `GROUP / PARTS` of a run's vectors.
    const PARTS: usize = BLOCK / Self::FORMAT.values_per_scale();
    /// Loads one block stored in ggml's order at `at` (`BYTES` readable bytes, and `HIGH_BYTES`
    /// of high bits). Formats with super-blocks have rows of whole runs and no such blocks.
    unsafe fn load(_at: At) -> __m256i {
        unreachable!("rows of super-blocks are whole runs")
    }
    /// Loads vector `t` (`0..GROUP`) of the interleaved run at `at` (`GROUP × BYTES` readable
    /// bytes, and `GROUP × HIGH_BYTES` of high bits).
    unsafe fn load_vector(at: At, t: usize) -> __m256i;
}

/// q8_0: 32 bytes per block, already unsigned.
struct Q8;
/// 16 bytes of nibbles per block: q4_0 (values offset by 8), or q4_1 (`MINS`: unsigned values
/// and a minimum).
struct Nibbles<const MINS: bool>;
/// q5_0: q4_0's nibbles and a plane of fifth bits, values offset by 16.
struct Q5;
/// q4_K: q4_1's arithmetic, with scales and minimums shared by a super-block of 8 blocks.
struct Q4K;
/// q6_K: q4_0's nibbles and a plane of high bit pairs, values offset by 32, a signed multiplier
/// of the super-block's scale per half block.
struct Q6K;

impl Unpack for Q8 {
    const FORMAT: Format = Format::Q8_0;

    #[inline(always)]
    unsafe fn load(at: At) -> __m256i {
        // SAFETY: the caller guarantees 32 readable bytes; the load is unaligned.
        unsafe { _mm256_loadu_si256(at.quants.cast()) }
    }

    #[inline(always)]
    unsafe fn load_vector(at: At, t: usize) -> __m256i {
        // SAFETY: the caller guarantees 256 readable bytes and `t < GROUP`.
        unsafe { _mm256_loadu_si256(at.quants.add(32 * t).cast()) }
    }
}

impl<const MINS: bool> Unpack for Nibbles<MINS> {
    const FORMAT: Format = if MINS { Format::Q4_1 } else { Format::Q4_0 };

    #[inline(always)]
    unsafe fn load(at: At) -> __m256i {
        // SAFETY: the caller guarantees 16 readable bytes. Both 128-bit halves get the 16 bytes;
        // the upper half is shifted by 4 bits so masking leaves values 0..16 below, 16..32
        // above, in order.
        unsafe {
            let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(at.quants.cast()));
            let shifted = _mm256_srlv_epi64(both, _mm256_set_epi64x(4, 4, 0, 0));
            _mm256_and_si256(shifted, _mm256_set1_epi8(0x0f))
        }
    }

    #[inline(always)]
    unsafe fn load_vector(at: At, t: usize) -> __m256i {
        // SAFETY: the caller guarantees 128 readable bytes (4 vectors, each holding two of the
        // run's vectors in its low and high nibbles) and `t < GROUP`, and AVX2. With `t` known
        // after unrolling, the shift is by a constant (or none).
        unsafe {
            let v = _mm256_loadu_si256(at.quants.add(32 * (t / 2)).cast());
            let v = if t % 2 == 1 {
                _mm256_srli_epi16(v, 4)
            } else {
                v
            };
            _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
        }
    }
}

impl Unpack for Q5 {
    const FORMAT: Format = Format::Q5_0;

    #[inline(always)]
    unsafe fn load(at: At) -> __m256i {
        // SAFETY: the caller guarantees the block's 16 bytes and its 4 bytes of fifth bits.
        unsafe {
            let bits = at.high.cast::<u32>().read_unaligned();
            _mm256_or_si256(Nibbles::<false>::load(at), fifth_bits(bits))
        }
    }

    #[inline(always)]
    unsafe fn load_vector(at: At, t: usize) -> __m256i {
        // SAFETY: the caller guarantees the run's 128 bytes and 32 bytes of fifth bits, whose
        // word `t` belongs to vector `t` (`high_position`).
        unsafe {
            let bits = at.high.add(4 * t).cast::<u32>().read_unaligned();
            _mm256_or_si256(Nibbles::<false>::load_vector(at, t), fifth_bits(bits))
        }
    }
}

impl Unpack for Q4K {
    const FORMAT: Format = Format::Q4K;

    #[inline(always)]
    unsafe fn load_vector(at: At, t: usize) -> __m256i {
        // SAFETY: as `Nibbles`.
        unsafe { Nibbles::<true>::load_vector(at, t) }
    }
}

impl Unpack for Q6K {
    const FORMAT: Format = Format::Q6K;

    #[inline(always)]
    unsafe fn load_vector(at: At, t: usize) -> __m256i {
        // SAFETY: the caller guarantees the run's 128 bytes and 64 bytes of high bit pairs,
        // vector `t`'s at bits `2 × (t % 4)` of the pairs' vector `t / 4` (`high_position`).
        // With `t` known after unrolling, the shifts are by constants; 16-bit shifts carry bits
        // across bytes only where the mask clears them.
        unsafe {
            let pairs = _mm256_loadu_si256(at.high.add(32 * (t / 4)).cast());
            let pairs = match t % 4 {
                0 => _mm256_slli_epi16(pairs, 4),
                1 => _mm256_slli_epi16(pairs, 2),
                2 => pairs,
                _ => _mm256_srli_epi16(pairs, 2),
            };
            let high = _mm256_and_si256(pairs, _mm256_set1_epi8(0x30));
            _mm256_or_si256(Nibbles::<false>::load_vector(at, t), high)
        }
    }
}

/// `0x10` in each byte `k` of the vector whose bit `k` is set in `bits`, else 0.
#[inline(always)]
unsafe fn fifth_bits(bits: u32) -> __m256i {
    // SAFETY: only called from functions compiled with AVX2.
    unsafe {
        // Byte `k` gets byte `k / 8` of the word (the shuffle works within 128-bit halves, each
        // of which holds the whole word), then keeps its bit `k % 8`.
        let word = _mm256_set1_epi32(bits as i32);
        let spread = _mm256_shuffle_epi8(
            word,
            _mm256_setr_epi64x(
                0,
                0x0101_0101_0101_0101,
                0x0202_0202_0202_0202,
                0x0303_0303_0303_0303,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }
}

/// The f32 scales of part `part` of weight row `j`'s blocks `g..g + 8` from `scales` (or
/// minimums) and, for the k-quants, the blocks' multipliers.
#[inline(always)]
unsafe fn run_scales<U: Unpack>(
    scales: *const f16,
    multipliers: *const u8,
    nb: usize,
    j: usize,
    g: usize,
    part: usize,
) -> __m256 {
    // SAFETY: the caller guarantees the row's scales (and multipliers) are there, and F16C/AVX2.
    unsafe {
        if U::PER_SCALE == 1 {
            return _mm256_cvtph_ps(_mm_loadu_si128(scales.add(j * nb + g).cast()));
        }
        // One super-block per run: its f16 times 8 bytes, exact in f32 (11 by 8 bits). A run's
        // multipliers of one part are 8 bytes in a row (`multiplier_index`).
        let d = _mm256_set1_ps(f16_to_f32(
            (*scales.add((j * nb + g) / U::PER_SCALE)).to_bits(),
        ));
        let at = (j * nb + g) * U::MULTIPLIERS + part * GROUP;
        let k = _mm_loadl_epi64(multipliers.add(at).cast());
        let k = if U::SIGNED_MULTIPLIERS {
            _mm256_cvtepi8_epi32(k)
        } else {
            _mm256_cvtepu8_epi32(k)
        };
        _mm256_mul_ps(d, _mm256_cvtepi32_ps(k))
    }
}

/// Multiply-accumulate of bytes into 32-bit lanes, through partial sums that may be narrower.
trait Dot {
    /// Vector registers the path has (AVX-512's 32 with VNNI, AVX2's 16).
    const REGISTERS: usize;
    /// Consecutive [`Dot::step`]s of format `U` whose partial sums cannot overflow before
    /// [`Dot::finish`] widens them.
    fn steps<U: Unpack>() -> usize;
    /// `partial` plus, per lane, the products of `u · x` where the activations carry the
    /// correction for unsigned weights (`-offset × Σ x`, in the accumulator from the start), or of
    /// `(u - offset) · x` where the path makes the weights signed.
    unsafe fn step<U: Unpack>(partial: __m256i, u: __m256i, x: __m256i) -> __m256i;
    /// Two partial sums of one chunk of at most [`Dot::steps`] steps as one.
    unsafe fn merge(a: __m256i, b: __m256i) -> __m256i;
    /// `acc` plus the partial sums, widened to one 32-bit sum of 4 products per lane.
    unsafe fn finish(acc: __m256i, partial: __m256i) -> __m256i;

    /// `vectors` in chunks of at most [`Dot::steps`] (on VNNI, one chunk).
    #[inline(always)]
    fn chunks<U: Unpack>(
        vectors: std::ops::Range<usize>,
    ) -> impl Iterator<Item = std::ops::Range<usize>> {
        let steps = Self::steps::<U>().min(vectors.len()).max(1);
        let end = vectors.end;
        vectors.step_by(steps).map(move |t| t..(t + steps).min(end))
    }

    /// One step, finished.
    #[inline(always)]
    unsafe fn dot<U: Unpack>(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the caller guarantees the path's features.
        unsafe { Self::finish(acc, Self::step::<U>(_mm256_setzero_si256(), u, x)) }
    }
}

/// `vpdpbusd` multiplies unsigned by signed bytes and accumulates in 32 bits in one instruction.
struct Vnni;
/// `vpmaddubsw` multiplies unsigned by signed bytes into 16-bit sums of pairs, added up in 16 bits
/// over as many vectors as cannot overflow and widened by `vpmaddwd`. q8_0's unsigned bytes would
/// saturate it, so they are made signed and their signs moved onto the activations (whose
/// corrections are zero for q8_0 on this path).
struct Avx2;

impl Dot for Vnni {
    const REGISTERS: usize = 32;
    #[inline(always)]
    fn steps<U: Unpack>() -> usize {
        usize::MAX
    }

    #[inline(always)]
    unsafe fn step<U: Unpack>(partial: __m256i, u: __m256i, x: __m256i) -> __m256i {
        // SAFETY: only called from `vnni`, compiled with AVX-512 VNNI and VL.
        unsafe { _mm256_dpbusd_epi32(partial, u, x) }
    }

    #[inline(always)]
    unsafe fn merge(a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: only called from `vnni`, compiled with AVX2.
        unsafe { _mm256_add_epi32(a, b) }
    }

    #[inline(always)]
    unsafe fn finish(acc: __m256i, partial: __m256i) -> __m256i {
        // SAFETY: only called from `vnni`, compiled with AVX2.
        unsafe { _mm256_add_epi32(acc, partial) }
    }

    #[inline(always)]
    unsafe fn dot<U: Unpack>(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
        // SAFETY: as `step`.
        unsafe { _mm256_dpbusd_epi32(acc, u, x) }
    }
}

impl Dot for Avx2 {
    const REGISTERS: usize = 16;
    #[inline(always)]
    fn steps<U: Unpack>() -> usize {
        // Each step adds two products of at most the weight's magnitude times 127 (activations
        // are within ±127) to a 16-bit lane.
        let weight = if avx2_unsigned(U::FORMAT) {
            U::FORMAT.max_value()
        } else {
            128
        };
        (i16::MAX as i32 / (2 * weight * 127)) as usize
    }

    #[inline(always)]
    unsafe fn step<U: Unpack>(partial: __m256i, u: __m256i, x: __m256i) -> __m256i {
        // SAFETY: only called from functions compiled with AVX2.
        unsafe {
            let pairs = if avx2_unsigned(U::FORMAT) {
                _mm256_maddubs_epi16(u, x)
            } else {
                let w = _mm256_sub_epi8(u, _mm256_set1_epi8(U::OFFSET));
                _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
            };
            _mm256_add_epi16(partial, pairs)
        }
    }

    #[inline(always)]
    unsafe fn merge(a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: only called from functions compiled with AVX2. The chunk's `steps` bound
        // holds for the sum of its two halves.
        unsafe { _mm256_add_epi16(a, b) }
    }

    #[inline(always)]
    unsafe fn finish(acc: __m256i, partial: __m256i) -> __m256i {
        // SAFETY: only called from functions compiled with AVX2.
        unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(partial, _mm256_set1_epi16(1))) }
    }
}

/// The micro-kernel (see the module documentation). With `SPLIT` the activations come with
/// residues ([`super::Activations::Int16`]): each run's dot products are taken with the values,
/// scaled by `RESIDUE_SCALE`, and continued with the residues, all in the same integer lanes.
///
/// # Safety
/// The CPU must have the features `D` uses, and `tile` must hold `M` activation rows (with
/// residues when `SPLIT`) and `N` weight rows (`Tile::check`).
#[inline(always)]
unsafe fn body<U: Unpack, D: Dot, const M: usize, const N: usize, const SPLIT: bool>(
    tile: &Tile<'_>,
) -> [[f32; N]; M] {
    if M == 1 && N > 1 {
        // One token: each weight row read whole as one stream, row after row (see `tile_rows`).
        let mut out = [[0f32; N]; M];
        for (j, out) in out[0].iter_mut().enumerate() {
            // SAFETY: the tile holds `N` weight rows, so row `j`'s tile holds one.
            *out = unsafe { body::<U, D, 1, 1, SPLIT>(&tile.skip_rows(j)) }[0][0];
        }
        return out;
    }
    if D::REGISTERS < 32 && M > 1 && N == 4 {
        // Sixteen accumulators leave AVX2 no register for the weights, and every step spilled
        // them (q8_0 needs two per weight vector on top): two tiles of 2 weight rows each, the
        // activations read again from L1, were 5–20 % faster on prompts.
        // SAFETY: the tile holds 4 weight rows: rows 0..2 and 2..4 are two tiles of 2.
        let halves = unsafe {
            [
                body::<U, D, M, 2, SPLIT>(tile),
                body::<U, D, M, 2, SPLIT>(&tile.skip_rows(2)),
            ]
        };
        let mut out = [[0f32; N]; M];
        for (i, out) in out.iter_mut().enumerate() {
            for (j, out) in out.iter_mut().enumerate() {
                *out = halves[j / 2][i][j % 2];
            }
        }
        return out;
    }
    let nb = tile.nb;
    let row_bytes = nb * U::BYTES;
    let w = &tile.w;
    let (wq, ws, wh) = (w.quants.as_ptr(), w.scales.as_ptr(), w.high.as_ptr());
    // Only read with `U::PER_SCALE > 1`, which says they are there.
    let (ks, km) = (w.block_scales.as_ptr(), w.block_mins.as_ptr());
    let (xq, xs, xb, xhb) = (
        tile.x_quants.as_ptr(),
        tile.x_scales.as_ptr(),
        tile.x_biases.as_ptr(),
        tile.x_half_biases.as_ptr(),
    );
    // Only read when `U::MINS`, which says the minimums are there.
    let (wm, x_sums) = (w.mins.as_ptr(), tile.x_sums.as_ptr());
    // Only read when `SPLIT`, which says the residues are there.
    let xr = tile.x_residues.unwrap_or(tile.x_quants).as_ptr();
    // SAFETY: every offset below stays within `N` weight rows of `nb` blocks and `M` activation
    // rows of `nb` blocks, which the caller guarantees the slices hold.
    unsafe {
        let residue_scale = _mm256_set1_epi32(RESIDUE_SCALE);
        // Where weight row `j`'s block `b` (a run's first block, or a block after the runs) is.
        let at = |j: usize, b: usize| At {
            quants: wq.add(j * row_bytes + b * U::BYTES),
            high: wh.add((j * nb + b) * U::HIGH_BYTES),
        };
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        let full = nb / GROUP * GROUP;
        // (Formats with super-blocks have rows of whole runs.)
        debug_assert!(U::PER_SCALE == 1 || full == nb);
        for g in (0..full).step_by(GROUP) {
            let w_at = |j: usize| at(j, g);
            for part in 0..U::PARTS {
                // The part's vectors of the run.
                let vectors = part * GROUP / U::PARTS..(part + 1) * GROUP / U::PARTS;
                // The part's integer dot products of every (activation, weight) row pair, with
                // the activations' corrections.
                let mut p = [[_mm256_setzero_si256(); N]; M];
                // One token with residues: each weight vector, loaded once, meets both
                // activation vectors. With more rows the second accumulators would not fit in
                // registers, so the run is swept again (its weights now in L1).
                let mut lo = [_mm256_setzero_si256(); N];
                if SPLIT && M == 1 {
                    let x = [xq.add(g * BLOCK), xr.add(g * BLOCK)];
                    for (j, (p, lo)) in p[0].iter_mut().zip(&mut lo).enumerate() {
                        for chunk in D::chunks::<U>(vectors.clone()) {
                            let [values, residues] = token_chunk::<U, D, 2>(w_at(j), x, chunk);
                            *p = D::finish(*p, values);
                            *lo = D::finish(*lo, residues);
                        }
                    }
                } else {
                    run_dots::<U, D, M, N>(&mut p, w_at, xq, nb, g, vectors.clone());
                }
                for (i, p) in p.iter_mut().enumerate() {
                    let bias = part_bias::<U>(xb, xhb, i * nb + g, part);
                    for (p, lo) in p.iter_mut().zip(&lo) {
                        *p = if SPLIT {
                            let hi = _mm256_mullo_epi32(*p, residue_scale);
                            _mm256_add_epi32(_mm256_add_epi32(hi, *lo), bias)
                        } else {
                            _mm256_add_epi32(*p, bias)
                        };
                    }
                }
                if SPLIT && M > 1 {
                    run_dots::<U, D, M, N>(&mut p, w_at, xr, nb, g, vectors);
                }
                for j in 0..N {
                    let dw = run_scales::<U>(ws, ks, nb, j, g, part);
                    for (i, (acc, p)) in acc.iter_mut().zip(&p).enumerate() {
                        let scale = _mm256_mul_ps(_mm256_loadu_ps(xs.add(i * nb + g)), dw);
                        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[j]), scale, acc[j]);
                    }
                    if U::MINS {
                        let mw = run_scales::<U>(wm, km, nb, j, g, part);
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let sums = _mm256_loadu_ps(x_sums.add(i * nb + g));
                            acc[j] = _mm256_fmadd_ps(mw, sums, acc[j]);
                        }
                    }
                }
            }
        }
        for b in full..nb {
            let mut w = [_mm256_setzero_si256(); N];
            let mut dw = [_mm256_setzero_ps(); N];
            let mut mw = [0f32; N];
            for j in 0..N {
                w[j] = U::load(at(j, b));
                let (d, m) = tile.w.scale_min(j, b, 0);
                dw[j] = _mm256_set1_ps(d);
                mw[j] = m;
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = i * nb + b;
                let x = _mm256_loadu_si256(xq.add(at * BLOCK).cast());
                let dx = _mm256_set1_ps(*xs.add(at));
                let bias = _mm256_setr_epi32(*xb.add(at), 0, 0, 0, 0, 0, 0, 0);
                for j in 0..N {
                    let p = if SPLIT {
                        let lo = _mm256_loadu_si256(xr.add(at * BLOCK).cast());
                        let hi = D::dot::<U>(_mm256_setzero_si256(), w[j], x);
                        let hi = _mm256_add_epi32(_mm256_mullo_epi32(hi, residue_scale), bias);
                        D::dot::<U>(hi, w[j], lo)
                    } else {
                        D::dot::<U>(bias, w[j], x)
                    };
                    let p = _mm256_cvtepi32_ps(p);
                    acc[j] = _mm256_fmadd_ps(p, _mm256_mul_ps(dx, dw[j]), acc[j]);
                    if U::MINS {
                        let m = mw[j] * *x_sums.add(at);
                        acc[j] =
                            _mm256_add_ps(acc[j], _mm256_setr_ps(m, 0., 0., 0., 0., 0., 0., 0.));
                    }
                }
            }
        }
        let mut out = [[0f32; N]; M];
        for (out, acc) in out.iter_mut().zip(&acc) {
            for (y, &v) in out.iter_mut().zip(acc) {
                *y = hsum(v);
            }
        }
        out
    }
}

/// The activations' corrections for part `part` of the 8 blocks from block `at` (of all rows):
/// the blocks' whole ones, or for q6_K's halves those of their first or last 16 values.
///
/// # Safety
/// AVX2, and 8 corrections of each kind readable at `at`.
#[inline(always)]
unsafe fn part_bias<U: Unpack>(
    biases: *const i32,
    half_biases: *const i32,
    at: usize,
    part: usize,
) -> __m256i {
    // SAFETY: the caller guarantees the bounds and features.
    unsafe {
        let whole = _mm256_loadu_si256(biases.add(at).cast());
        if U::PARTS == 1 {
            return whole;
        }
        let last = _mm256_loadu_si256(half_biases.add(at).cast());
        if part == 0 {
            _mm256_sub_epi32(whole, last)
        } else {
            last
        }
    }
}

/// Adds to `p` the dot products of `vectors` of one run of [`GROUP`] blocks: weight row `j`'s
/// run starts at `w_at(j)`, the activations' (values or residues, `nb` blocks per row) at block
/// `g` of `x`.
///
/// # Safety
/// As [`body`]: the CPU has `D`'s features and the run is within the operands.
#[inline(always)]
unsafe fn run_dots<U: Unpack, D: Dot, const M: usize, const N: usize>(
    p: &mut [[__m256i; N]; M],
    w_at: impl Fn(usize) -> At,
    x: *const i8,
    nb: usize,
    g: usize,
    vectors: std::ops::Range<usize>,
) {
    // SAFETY: the caller guarantees the bounds and features.
    unsafe {
        let x_at = |i: usize, t: usize| x.add((i * nb + g) * BLOCK + 32 * t);
        for chunk in D::chunks::<U>(vectors) {
            if M == 1 {
                // One token: weight rows one after the other, each read as one contiguous stream
                // (interleaving the rows measured 25% slower on the output head).
                for (j, p) in p[0].iter_mut().enumerate() {
                    let [sums] = token_chunk::<U, D, 1>(w_at(j), [x_at(0, 0)], chunk.clone());
                    *p = D::finish(*p, sums);
                }
            } else {
                // Vector `t` of each weight row is loaded once for all `M` activation rows and
                // each activation vector once for all `N` weight rows: with `M × N`
                // accumulators (32 registers with AVX-512) there is about one load per two
                // products.
                let mut partial = [[_mm256_setzero_si256(); N]; M];
                for t in chunk {
                    let w: [__m256i; N] = std::array::from_fn(|j| U::load_vector(w_at(j), t));
                    for (i, partial) in partial.iter_mut().enumerate() {
                        let x = _mm256_loadu_si256(x_at(i, t).cast());
                        for (partial, &w) in partial.iter_mut().zip(&w) {
                            *partial = D::step::<U>(*partial, w, x);
                        }
                    }
                }
                for (p, partial) in p.iter_mut().zip(&partial) {
                    for (p, &partial) in p.iter_mut().zip(partial) {
                        *p = D::finish(*p, partial);
                    }
                }
            }
        }
    }
}

/// One token's partial sums over the vectors `chunk` (at most [`Dot::steps`]) of the weight run at
/// `w`, with each of `K` activation streams (values, and residues) whose run starts at `x[k]`. Even
/// and odd vectors go to separate partial sums, merged at the end: half as long a chain of dependent
/// `vpdpbusd`.
///
/// # Safety
/// As [`body`]: the CPU has `D`'s features and the run is within the operands.
#[inline(always)]
unsafe fn token_chunk<U: Unpack, D: Dot, const K: usize>(
    w: At,
    x: [*const i8; K],
    chunk: std::ops::Range<usize>,
) -> [__m256i; K] {
    // SAFETY: the caller guarantees the bounds and features.
    unsafe {
        let (mut even, mut odd) = ([_mm256_setzero_si256(); K], [_mm256_setzero_si256(); K]);
        for t in chunk.clone().step_by(2) {
            for (t, partial) in [(t, &mut even), (t + 1, &mut odd)] {
                // (q8_0's chunks on AVX2 are one vector long.)
                if t < chunk.end {
                    let w = U::load_vector(w, t);
                    for (partial, x) in partial.iter_mut().zip(x) {
                        let x = _mm256_loadu_si256(x.add(32 * t).cast());
                        *partial = D::step::<U>(*partial, w, x);
                    }
                }
            }
        }
        std::array::from_fn(|k| D::merge(even[k], odd[k]))
    }
}

/// One f16 (as bits) to f32 with F16C.
#[inline(always)]
unsafe fn f16_to_f32(bits: u16) -> f32 {
    // SAFETY: only called from functions compiled with F16C.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)))) }
}

/// The sum of 8 lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: only called from functions compiled with AVX2.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}
