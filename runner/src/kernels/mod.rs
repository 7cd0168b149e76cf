//! sanctum's own CPU kernels for q8_0, q4_0 and q4_1 weight matrices.
//!
//! candle multiplies a batched prompt one activation row at a time and has no hand-written x86
//! code for q4_0 rows of SmolLM2's widths, which left prompt processing at less than half of
//! llama.cpp's speed. These kernels keep candle's (ggml's) quantization, so the weights are the
//! same numbers, but lay them out for the multiply and tile it: each micro-kernel computes an
//! `MR × NR` block of outputs (activation rows × weight rows) from registers, and rayon splits
//! the weight rows across threads so each thread keeps its slice of the matrix in cache while it
//! sweeps every activation row.
//!
//! Activations are quantized to int8 blocks of 32 exactly as ggml's q8_0 (one scale per block), and
//! each block's integer sum is kept: the weights are stored unsigned (q8_0 as `q + 128`, q4_0 as
//! its nibbles `0..=15`), which is what `vpdpbusd` multiplies, and `-offset × sum` restores the
//! signed product. Runs of 8 blocks are stored interleaved so that one vector register holds 8
//! blocks' dot products at once (see `position`). Three paths exist: AVX-512-VNNI (256-bit), AVX2,
//! and portable scalar code that every other target uses; [`Path::best`] picks one at run time.
//!
//! [`Activations::Int16`] quantizes each activation block twice, its values and what rounding left
//! of them: the same integer kernels then multiply at about 16 bits, which keeps a small model's
//! answers where 8-bit activations flip them, for about twice the integer work.

pub mod ops;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

/// Runs `f` on a worker of rayon's global pool (the calling thread waits).
///
/// Callers that make many parallel calls in a row (a model's forward pass) should enter the pool
/// once: from inside, a parallel loop splits work with the other workers directly; from outside,
/// every loop hands its job to the pool and sleeps until it is done, a wake-up per matmul.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Values per block, for both formats.
pub const BLOCK: usize = 32;

/// The block formats these kernels multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// 8-bit values, one scale per block.
    Q8_0,
    /// 4-bit values, one scale per block.
    Q4_0,
    /// 4-bit values, a scale and a minimum per block (`d × q + m`).
    Q4_1,
}

impl Format {
    /// Bytes of quantized values per block in [`PackedMatrix`].
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => BLOCK,
            Self::Q4_0 | Self::Q4_1 => BLOCK / 2,
        }
    }

    /// What the stored unsigned value exceeds the signed one by (q4_1's values are unsigned and
    /// its minimum adds the rest).
    pub const fn offset(self) -> i32 {
        match self {
            Self::Q8_0 => 128,
            Self::Q4_0 => 8,
            Self::Q4_1 => 0,
        }
    }

    /// True when blocks carry a minimum besides their scale.
    pub const fn has_min(self) -> bool {
        matches!(self, Self::Q4_1)
    }

    /// Nibbles, two values per byte.
    const fn is_nibbles(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q4_1)
    }

    /// Bytes of one block in ggml's layout: scale, minimum when there is one, values.
    pub const fn ggml_block_bytes(self) -> usize {
        2 + if self.has_min() { 2 } else { 0 } + self.block_bytes()
    }
}

/// How finely activations are quantized before the integer multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activations {
    /// One int8 block per 32 values, exactly as ggml's q8_0: llama.cpp's arithmetic.
    #[default]
    Int8,
    /// Each value as `hi + lo / 254` in units of the block's scale, two int8 blocks multiplied by
    /// the same kernels and summed exactly: an error about 1/65 000 of the block's largest value,
    /// where `Int8` leaves 1/254.
    Int16,
}

/// What the second (`lo`) block of [`Activations::Int16`] is scaled by.
const RESIDUE_SCALE: i32 = 254;

impl Activations {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::Int16 => "int16",
        }
    }
}

impl std::fmt::Display for Activations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Not an activation precision.
#[derive(Debug, thiserror::Error)]
#[error("unknown activation precision {0:?}: use int8 or int16")]
pub struct UnknownActivations(pub String);

impl std::str::FromStr for Activations {
    type Err = UnknownActivations;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "int8" | "i8" | "8" => Ok(Self::Int8),
            "int16" | "i16" | "16" => Ok(Self::Int16),
            _ => Err(UnknownActivations(s.to_owned())),
        }
    }
}

/// A matrix or input that does not fit the kernels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// Rows must be whole blocks.
    #[error("row length {0} is not a positive multiple of {BLOCK}")]
    RowLength(usize),
    /// The data does not have `rows × cols` values.
    #[error("{got} values for a {rows}x{cols} matrix")]
    Values {
        /// Values given.
        got: usize,
        /// Rows expected.
        rows: usize,
        /// Columns expected.
        cols: usize,
    },
    /// The input or output slice does not match the matrix.
    #[error("input of {input} and output of {output} values do not fit a {rows}x{cols} matrix")]
    Operands {
        /// Input values.
        input: usize,
        /// Output values.
        output: usize,
        /// Matrix rows.
        rows: usize,
        /// Matrix columns.
        cols: usize,
    },
}

/// A weight matrix `[rows, cols]` quantized to q8_0 or q4_0 exactly as ggml does, stored for the
/// kernels: per row its blocks' values, unsigned (q8_0: `q + 128`, 32 bytes per block; q4_0: the
/// nibbles `0..=15`, 16 bytes per block), runs of 8 blocks interleaved (see `position`), and the
/// f16 scales in a separate `[rows, blocks]` array (q4_1's minimums in another). Generation reads
/// every weight once per token, so bytes are what it costs: f16 scales keep q4_0 at ggml's 18 bytes
/// per block of 32 (f32 would add 11%).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    format: Format,
    activations: Activations,
    rows: usize,
    cols: usize,
    scales: Vec<f16>,
    /// q4_1's minimums, `[rows, blocks]`; empty for the other formats.
    mins: Vec<f16>,
    quants: Vec<u8>,
}

/// A [`PackedMatrix`] filled a few rows at a time, as a weight streams in from its file: only
/// the packed matrix and the rows at hand are ever in memory.
#[derive(Debug)]
pub struct PackedBuilder {
    matrix: PackedMatrix,
    filled: usize,
}

impl PackedBuilder {
    /// An empty `[rows, cols]` matrix; `cols` must be a multiple of [`BLOCK`].
    pub fn new(format: Format, rows: usize, cols: usize) -> Result<Self, ShapeError> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(ShapeError::RowLength(cols));
        }
        let nb = cols / BLOCK;
        Ok(Self {
            matrix: PackedMatrix {
                format,
                activations: Activations::Int8,
                rows,
                cols,
                scales: vec![f16::ZERO; rows * nb],
                mins: vec![f16::ZERO; if format.has_min() { rows * nb } else { 0 }],
                quants: vec![0u8; rows * nb * format.block_bytes()],
            },
            filled: 0,
        })
    }

    /// The block format.
    pub fn format(&self) -> Format {
        self.matrix.format
    }

    /// The matrix will multiply activations quantized to `activations`.
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.matrix.activations = activations;
        self
    }

    /// Quantizes the next whole rows (`data` is `k × cols` values), in parallel, exactly as ggml
    /// quantizes them.
    pub fn push_rows(&mut self, data: &[f32]) -> Result<(), ShapeError> {
        let (format, cols) = (self.matrix.format, self.matrix.cols);
        self.pack_rows(cols, data, |x, b, values| {
            let x = &x[b * BLOCK..(b + 1) * BLOCK];
            match format {
                Format::Q8_0 => (quantize_q8_0_block(x, values), f16::ZERO),
                Format::Q4_0 => (quantize_q4_0_block(x, values), f16::ZERO),
                Format::Q4_1 => quantize_q4_1_block(x, values),
            }
        })
    }

    /// Takes the next whole rows as ggml stores them in this format (q8_0: per block an f16 scale
    /// and 32 `i8`; q4_0: an f16 scale and 16 bytes, low nibbles first; q4_1: the scale, an f16
    /// minimum, and q4_0's 16 bytes), without requantizing.
    pub fn push_ggml_rows(&mut self, blocks: &[u8]) -> Result<(), ShapeError> {
        let format = self.matrix.format;
        let block = format.ggml_block_bytes();
        let row_bytes = self.matrix.cols / BLOCK * block;
        self.pack_rows(row_bytes, blocks, |row, b, values| {
            let block = &row[b * block..(b + 1) * block];
            let (d, rest) = block.split_at(2);
            let (m, qs) = if format.has_min() {
                let (m, qs) = rest.split_at(2);
                (f16::from_le_bytes([m[0], m[1]]), qs)
            } else {
                (f16::ZERO, rest)
            };
            if format.is_nibbles() {
                for (j, &q) in qs.iter().enumerate() {
                    values[j] = q & 0x0f;
                    values[j + BLOCK / 2] = q >> 4;
                }
            } else {
                for (v, &q) in values.iter_mut().zip(qs) {
                    *v = (q as i8 as i32 + 128) as u8;
                }
            }
            (f16::from_le_bytes([d[0], d[1]]), m)
        })
    }

    /// Packs the rows of `input` (`per_row` items per row) in parallel; `block` writes block `b`
    /// of a row's unsigned values and returns its scale and minimum (zero without one).
    fn pack_rows<T: Sync>(
        &mut self,
        per_row: usize,
        input: &[T],
        block: impl Fn(&[T], usize, &mut [u8; BLOCK]) -> (f16, f16) + Sync,
    ) -> Result<(), ShapeError> {
        let m = &mut self.matrix;
        let (rows, cols) = (m.rows, m.cols);
        let len = input.len();
        let count = len / per_row;
        if !len.is_multiple_of(per_row) || self.filled + count > rows {
            return Err(ShapeError::Values {
                got: count * cols,
                rows: rows - self.filled,
                cols,
            });
        }
        let (format, nb) = (m.format, cols / BLOCK);
        let row_bytes = nb * format.block_bytes();
        let at = self.filled;
        let scales = &mut m.scales[at * nb..(at + count) * nb];
        let quants = &mut m.quants[at * row_bytes..(at + count) * row_bytes];
        let pack_row = |x: &[T], q: &mut [u8], scales: &mut [f16], mut mins: Option<&mut [f16]>| {
            let mut values = [0u8; BLOCK];
            for (b, scale) in scales.iter_mut().enumerate() {
                let (d, min) = block(x, b, &mut values);
                *scale = d;
                if let Some(mins) = mins.as_deref_mut() {
                    mins[b] = min;
                }
                // Runs of 4 values stay together in every layout `position` describes.
                for (t, run) in values.chunks_exact(4).enumerate() {
                    let (at, shift) = position(format, nb, b, 4 * t);
                    for (q, &v) in q[at..at + 4].iter_mut().zip(run) {
                        *q |= v << shift;
                    }
                }
            }
        };
        let rows = input
            .par_chunks_exact(per_row)
            .zip(quants.par_chunks_exact_mut(row_bytes))
            .zip(scales.par_chunks_exact_mut(nb));
        if format.has_min() {
            let mins = &mut m.mins[at * nb..(at + count) * nb];
            rows.zip(mins.par_chunks_exact_mut(nb))
                .for_each(|(((x, q), scales), mins)| pack_row(x, q, scales, Some(mins)));
        } else {
            rows.for_each(|((x, q), scales)| pack_row(x, q, scales, None));
        }
        self.filled += count;
        Ok(())
    }

    /// The matrix, once every row is in.
    pub fn finish(self) -> Result<PackedMatrix, ShapeError> {
        let m = self.matrix;
        if self.filled != m.rows {
            return Err(ShapeError::Values {
                got: self.filled * m.cols,
                rows: m.rows,
                cols: m.cols,
            });
        }
        Ok(m)
    }
}

impl PackedMatrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix; `cols` must be a multiple of [`BLOCK`].
    pub fn quantize(
        format: Format,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, ShapeError> {
        if data.len() != rows * cols {
            return Err(ShapeError::Values {
                got: data.len(),
                rows,
                cols,
            });
        }
        let mut builder = PackedBuilder::new(format, rows, cols)?;
        builder.push_rows(data)?;
        builder.finish()
    }

    /// The matrix, multiplying activations quantized to `activations`.
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        self
    }

    /// How its products quantize activations.
    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// Bytes it takes in memory (values, scales, minimums).
    pub fn bytes(&self) -> usize {
        self.quants.len() + 2 * (self.scales.len() + self.mins.len())
    }

    /// The block format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// The matrix in ggml's own block layout (what [`PackedBuilder::push_ggml_rows`] takes): per
    /// block the f16 scale, q4_1's f16 minimum, then q8_0's 32 `i8` or the 16 bytes of nibbles,
    /// low nibbles first.
    pub fn ggml_blocks(&self) -> Vec<u8> {
        let nb = self.blocks_per_row();
        let row_bytes = nb * self.format.block_bytes();
        let mut out = Vec::with_capacity(self.rows * nb * self.format.ggml_block_bytes());
        for (r, (row, scales)) in self
            .quants
            .chunks_exact(row_bytes)
            .zip(self.scales.chunks_exact(nb))
            .enumerate()
        {
            for (b, d) in scales.iter().enumerate() {
                out.extend_from_slice(&d.to_le_bytes());
                if self.format.has_min() {
                    out.extend_from_slice(&self.mins[r * nb + b].to_le_bytes());
                }
                let value = |e| stored(self.format, row, nb, b, e);
                if self.format.is_nibbles() {
                    out.extend(
                        (0..BLOCK / 2).map(|j| (value(j) | (value(j + BLOCK / 2) << 4)) as u8),
                    );
                } else {
                    out.extend((0..BLOCK).map(|e| (value(e) - 128) as i8 as u8));
                }
            }
        }
        out
    }

    /// Writes row `row` as f32 (the values candle's dequantization gives) into `out` (`cols` long).
    ///
    /// # Panics
    /// If `row` is out of range or `out` is not `cols` long.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows && out.len() == self.cols);
        let nb = self.blocks_per_row();
        let scales = &self.scales[row * nb..(row + 1) * nb];
        let quants = &self.quants[row * nb * self.format.block_bytes()..];
        let offset = self.format.offset();
        for (b, (o, &d)) in out.chunks_exact_mut(BLOCK).zip(scales).enumerate() {
            let q = |e| (stored(self.format, quants, nb, b, e) - offset) as f32;
            if self.format.has_min() {
                let m = self.mins[row * nb + b].to_f32();
                for (e, v) in o.iter_mut().enumerate() {
                    *v = q(e) * d.to_f32() + m;
                }
            } else {
                for (e, v) in o.iter_mut().enumerate() {
                    *v = q(e) * d.to_f32();
                }
            }
        }
    }

    /// `y[m, rows] = x[m, cols] · selfᵀ` on the fastest path this CPU has (see [`Path::best`]).
    /// `scratch` holds the quantized activations between calls, so nothing is allocated once it
    /// has grown to the largest `m` seen.
    pub fn matmul(
        &self,
        x: &[f32],
        y: &mut [f32],
        scratch: &mut Scratch,
    ) -> Result<(), ShapeError> {
        self.matmul_on(Path::best(), x, y, scratch)
    }

    /// [`Self::matmul`] on a given path.
    ///
    /// # Panics
    /// If `path` is not available on this CPU (see [`Path::is_available`]).
    pub fn matmul_on(
        &self,
        path: Path,
        x: &[f32],
        y: &mut [f32],
        scratch: &mut Scratch,
    ) -> Result<(), ShapeError> {
        assert!(path.is_available(), "{path:?} is not available on this CPU");
        let m = x.len() / self.cols;
        if x.len() != m * self.cols || y.len() != m * self.rows {
            return Err(ShapeError::Operands {
                input: x.len(),
                output: y.len(),
                rows: self.rows,
                cols: self.cols,
            });
        }
        if m == 0 || self.rows == 0 {
            return Ok(());
        }
        let Scratch { acts, out } = scratch;
        acts.quantize(
            x,
            self.cols,
            path.bias_offset(self.format),
            self.activations,
        );
        let acts = &*acts;
        let chunk_rows = self.chunk_rows(m);
        if chunk_rows >= self.rows {
            tile_rows(path, self, acts, 0, self.rows, y);
            return Ok(());
        }
        // Each chunk writes its `[m, chunk]` outputs contiguously: with one activation row that
        // is `y`'s layout, otherwise the chunks are scattered into `y` afterwards.
        let run = |out: &mut [f32]| {
            out.par_chunks_mut(m * chunk_rows)
                .enumerate()
                .for_each(|(c, out)| {
                    let r0 = c * chunk_rows;
                    let r1 = (r0 + chunk_rows).min(self.rows);
                    tile_rows(path, self, acts, r0, r1, out);
                });
        };
        if m == 1 {
            run(y);
            return Ok(());
        }
        out.resize(m * self.rows, 0.0);
        run(out);
        for (c, chunk) in out.chunks(m * chunk_rows).enumerate() {
            let r0 = c * chunk_rows;
            let len = chunk.len() / m;
            for (src, dst) in chunk.chunks_exact(len).zip(y.chunks_exact_mut(self.rows)) {
                dst[r0..r0 + len].copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Weight rows per parallel task: all of them for problems too small to be worth waking the
    /// pool, else 8 tasks per thread (whole tiles), so that a thread the OS preempts for a busy
    /// neighbour holds up one small task, not a quarter of the matrix (generation beside a busy
    /// loop kept 35–45 % of its speed with 2 tasks per thread, 35–57 % with 8; idle speed the same).
    fn chunk_rows(&self, m: usize) -> usize {
        const SERIAL_BELOW: usize = 1 << 17;
        let threads = rayon::current_num_threads();
        if threads <= 1 || m * self.rows * self.cols < SERIAL_BELOW {
            return self.rows;
        }
        let tasks = 8 * threads;
        self.rows.div_ceil(tasks).next_multiple_of(NR)
    }
}

/// Blocks interleaved together (see [`position`]).
pub(crate) const GROUP: usize = 8;

/// Where value `e` of block `b` of a row of `nb` blocks is stored: byte offset in the row and the
/// bit shift of its nibble (q4_0) or 0.
///
/// Each run of [`GROUP`] blocks is interleaved 4 bytes at a time: the row's `t`-th 32-byte vector
/// holds values `4t..4t + 4` of each of the 8 blocks, one block per 32-bit lane. Then `vpdpbusd`
/// over the 8 vectors leaves each block's whole dot product in its own lane, and the scales of 8
/// blocks apply with one multiply, where the natural order needs a horizontal sum per block. q4_0
/// packs vectors `2u` and `2u + 1` into the low and high nibbles of one 32-byte vector. Blocks after
/// the last full run keep ggml's order (q4_0: low nibbles the first 16 values). Activations use the
/// q8_0 layout.
fn position(format: Format, nb: usize, b: usize, e: usize) -> (usize, u8) {
    let bytes = format.block_bytes();
    if b >= nb / GROUP * GROUP {
        return match format {
            Format::Q8_0 => (b * bytes + e, 0),
            Format::Q4_0 | Format::Q4_1 => (b * bytes + e % 16, if e < 16 { 0 } else { 4 }),
        };
    }
    let (group, lane) = (b / GROUP, b % GROUP);
    let (t, byte) = (e / 4, e % 4);
    let base = group * GROUP * bytes;
    match format {
        Format::Q8_0 => (base + t * 32 + lane * 4 + byte, 0),
        Format::Q4_0 | Format::Q4_1 => (base + t / 2 * 32 + lane * 4 + byte, 4 * (t % 2) as u8),
    }
}

/// Value `e` of block `b` in a packed row, unsigned.
fn stored(format: Format, row: &[u8], nb: usize, b: usize, e: usize) -> i32 {
    let (at, shift) = position(format, nb, b, e);
    match format {
        Format::Q8_0 => i32::from(row[at]),
        Format::Q4_0 | Format::Q4_1 => i32::from((row[at] >> shift) & 0x0f),
    }
}

/// ggml's `quantize_row_q8_0` for one block (scale `amax / 127` rounded to f16, values rounded
/// half away from zero) into unsigned values in order; returns the scale.
fn quantize_q8_0_block(x: &[f32], q: &mut [u8; BLOCK]) -> f16 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        // `as i8` saturates like ggml's conversion; the +128 makes it unsigned for `vpdpbusd`.
        *q = ((v * id).round() as i8 as i32 + 128) as u8;
    }
    f16::from_f32(d)
}

/// ggml's `quantize_row_q4_0` for one block (scale from the value of largest magnitude divided by
/// -8, rounded to f16; values truncated after adding 8.5, at most 15) into unsigned values in
/// order; returns the scale.
fn quantize_q4_0_block(x: &[f32], q: &mut [u8; BLOCK]) -> f16 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * id + 8.5) as u8).min(15);
    }
    f16::from_f32(d)
}

/// ggml's `quantize_row_q4_1` for one block (scale `(max - min) / 15` and minimum rounded to f16,
/// values `(x - min) / scale` truncated after adding 0.5, at most 15); returns scale and minimum.
fn quantize_q4_1_block(x: &[f32], q: &mut [u8; BLOCK]) -> (f16, f16) {
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        min = v.min(min);
        max = v.max(max);
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (((v - min) * id + 0.5) as u8).min(15);
    }
    (f16::from_f32(d), f16::from_f32(min))
}

/// Activation rows quantized to int8 blocks of 32: per block the scale, the values, and
/// `-offset × Σ values` (the correction for unsigned weights, zero on paths that multiply signed).
/// [`Activations::Int8`] quantizes exactly as ggml's q8_0 (the scale rounded to f16, kept here as
/// f32); [`Activations::Int16`] adds `residues`, what rounding left times [`RESIDUE_SCALE`], and
/// then keeps the exact scale divided by [`RESIDUE_SCALE`] and the correction of both blocks, so
/// that a kernel's `RESIDUE_SCALE × dot(w, hi) + dot(w, lo)` takes the same scales as `Int8`'s dot.
#[derive(Debug, Default, Clone)]
pub struct ActBlocks {
    scales: Vec<f32>,
    /// What each block's values add up to (scale × Σ values), which a q4_1 minimum multiplies; as
    /// ggml's q8_1 rounds it, to f16, for `Int8`.
    sums: Vec<f32>,
    biases: Vec<i32>,
    quants: Vec<i8>,
    residues: Vec<i8>,
}

impl ActBlocks {
    /// Quantizes `x` (rows of `cols`) in place of the previous contents.
    fn quantize(&mut self, x: &[f32], cols: usize, offset: i32, activations: Activations) {
        let blocks = x.len() / BLOCK;
        let nb = cols / BLOCK;
        debug_assert!(cols.is_multiple_of(BLOCK));
        self.scales.resize(blocks, 0.0);
        self.sums.resize(blocks, 0.0);
        self.biases.resize(blocks, 0);
        self.quants.resize(x.len(), 0);
        // Sized for `Int8` too (and left unwritten), so both go through one loop.
        self.residues.resize(x.len(), 0);
        let rows = x
            .par_chunks_exact(cols)
            .zip(self.quants.par_chunks_exact_mut(cols))
            .zip(self.residues.par_chunks_exact_mut(cols))
            .zip(self.scales.par_chunks_exact_mut(nb))
            .zip(self.sums.par_chunks_exact_mut(nb))
            .zip(self.biases.par_chunks_exact_mut(nb));
        let row = |(((((x, hi), lo), scales), sums), biases): ((((_, &mut [i8]), _), _), _)| {
            let blocks = RowBlocks {
                scales,
                sums,
                biases,
            };
            match activations {
                Activations::Int8 => quantize_row(x, hi, blocks, offset),
                Activations::Int16 => quantize_row_split(x, hi, lo, blocks, offset),
            }
        };
        // Rows in parallel for prompts: serial, this would cost a third of the smaller matmuls'
        // time. Below the minimum length rayon does not split, and the caller runs every row.
        rows.with_min_len(ACT_ROWS_PER_TASK).for_each(row);
    }
}

/// One activation row's per-block numbers.
struct RowBlocks<'a> {
    scales: &'a mut [f32],
    sums: &'a mut [f32],
    biases: &'a mut [i32],
}

impl RowBlocks<'_> {
    /// Block by block: (index, values, scale, sum, correction).
    fn each<'x>(
        &mut self,
        x: &'x [f32],
    ) -> impl Iterator<Item = (usize, &'x [f32], &mut f32, &mut f32, &mut i32)> {
        x.chunks_exact(BLOCK)
            .zip(self.scales.iter_mut())
            .zip(self.sums.iter_mut())
            .zip(self.biases.iter_mut())
            .enumerate()
            .map(|(b, (((x, d), sum), bias))| (b, x, d, sum, bias))
    }
}

/// One activation row into its values (`position`'s layout), scales, sums and corrections, as
/// ggml's q8_0 (and q8_1's sums).
fn quantize_row(x: &[f32], q: &mut [i8], mut blocks: RowBlocks<'_>, offset: i32) {
    let nb = blocks.scales.len();
    for (b, x, d, block_sum, bias) in blocks.each(x) {
        // ggml's q8_0 quantization, so every block's integer dot product is the one candle and
        // llama.cpp compute: small models' greedy output is sensitive to it.
        let scale = abs_max(x) / 127.0;
        *d = f16::from_f32(scale).to_f32();
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let mut r = [0i8; BLOCK];
        for (r, &v) in r.iter_mut().zip(x) {
            // |v · id| <= 127 after rounding: through i32 the conversion vectorizes.
            *r = (v * id).round() as i32 as i8;
        }
        let sum = r.iter().map(|&v| i32::from(v)).sum::<i32>();
        *bias = -offset * sum;
        *block_sum = f16::from_f32(scale * sum as f32).to_f32();
        store_block(q, nb, b, &r);
    }
}

/// One activation row as [`Activations::Int16`]: values `hi` and residues `lo` with
/// `x ≈ scale × (hi + lo / RESIDUE_SCALE)`, the exact scale `amax / 127` kept divided by
/// [`RESIDUE_SCALE`], and the correction of `RESIDUE_SCALE × hi + lo`.
fn quantize_row_split(
    x: &[f32],
    hi: &mut [i8],
    lo: &mut [i8],
    mut blocks: RowBlocks<'_>,
    offset: i32,
) {
    let nb = blocks.scales.len();
    for (b, x, d, block_sum, bias) in blocks.each(x) {
        let scale = abs_max(x) / 127.0;
        *d = scale / RESIDUE_SCALE as f32;
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let (mut h, mut l) = ([0i8; BLOCK], [0i8; BLOCK]);
        for ((h, l), &v) in h.iter_mut().zip(&mut l).zip(x) {
            let scaled = v * id;
            let rounded = scaled.round();
            *h = rounded as i32 as i8;
            // |scaled - rounded| <= 1/2, so the residue fits in ±127.
            *l = ((scaled - rounded) * RESIDUE_SCALE as f32).round() as i32 as i8;
        }
        let sum = |v: &[i8; BLOCK]| v.iter().map(|&v| i32::from(v)).sum::<i32>();
        let total = RESIDUE_SCALE * sum(&h) + sum(&l);
        *bias = -offset * total;
        *block_sum = *d * total as f32;
        store_block(hi, nb, b, &h);
        store_block(lo, nb, b, &l);
    }
}

/// Block `b`'s 32 values into a row of `nb` blocks in `position`'s layout, four at a time.
fn store_block(row: &mut [i8], nb: usize, b: usize, values: &[i8; BLOCK]) {
    for (t, run) in values.chunks_exact(4).enumerate() {
        let at = position(Format::Q8_0, nb, b, 4 * t).0;
        row[at..at + 4].copy_from_slice(run);
    }
}

/// The largest magnitude in `x`, over 8 lanes so that it compiles to vector maxima (a running
/// `f32::max` is a serial chain, and was half of the activations' quantization time).
fn abs_max(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for chunk in x.chunks_exact(8) {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            let a = v.abs();
            if a > *l {
                *l = a;
            }
        }
    }
    lanes
        .into_iter()
        .fold(0f32, |a, b| if b > a { b } else { a })
}

/// Activation rows quantized per parallel task (one token's row is not worth a task).
const ACT_ROWS_PER_TASK: usize = 16;

/// Buffers [`PackedMatrix::matmul`] reuses between calls.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    acts: ActBlocks,
    out: Vec<f32>,
}

/// Which implementation of the micro-kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Portable Rust, any target.
    Scalar,
    /// x86-64 AVX2 and FMA: `vpmaddubsw` + `vpmaddwd` on signed weights.
    Avx2,
    /// x86-64 AVX-512 VNNI on 256-bit registers: `vpdpbusd` on unsigned weights.
    Vnni,
}

impl Path {
    /// Every path, slowest first.
    pub const ALL: [Path; 3] = [Path::Scalar, Path::Avx2, Path::Vnni];

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => x86::has_avx2(),
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => x86::has_vnni(),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx2 | Self::Vnni => false,
        }
    }

    /// The fastest path this CPU has (detected once).
    pub fn best() -> Path {
        static BEST: OnceLock<Path> = OnceLock::new();
        *BEST.get_or_init(|| {
            Self::ALL
                .into_iter()
                .rev()
                .find(|p| p.is_available())
                .unwrap_or(Path::Scalar)
        })
    }

    /// The offset the activation sums are scaled by: the format's on the path that multiplies
    /// unsigned weights, none where the weights are made signed first.
    fn bias_offset(self, format: Format) -> i32 {
        match self {
            Self::Vnni => format.offset(),
            Self::Scalar | Self::Avx2 => 0,
        }
    }
}

/// Activation rows per micro-kernel.
const MR: usize = 4;
/// Weight rows per micro-kernel.
const NR: usize = 4;

/// The operands of one micro-kernel call: `MR'` activation rows starting at `i0` and `NR'` weight
/// rows starting at `j0`, over every block of the row.
#[derive(Clone, Copy)]
struct Tile<'a> {
    format: Format,
    /// Blocks per row.
    nb: usize,
    /// Weight values of rows `j0..`, `nb × block_bytes` per row.
    w_quants: &'a [u8],
    /// Weight scales of rows `j0..`, `nb` per row.
    w_scales: &'a [f16],
    /// q4_1's minimums of rows `j0..` (as `w_scales`); None for the other formats.
    w_mins: Option<&'a [f16]>,
    /// Activation values of rows `i0..`, `nb × 32` per row.
    x_quants: &'a [i8],
    /// With [`Activations::Int16`], the residues of rows `i0..` (as `x_quants`), else None.
    x_residues: Option<&'a [i8]>,
    /// Activation scales of rows `i0..`.
    x_scales: &'a [f32],
    /// Activation corrections of rows `i0..`.
    x_biases: &'a [i32],
    /// Activation block sums of rows `i0..`.
    x_sums: &'a [f32],
}

impl<'a> Tile<'a> {
    fn new(w: &'a PackedMatrix, acts: &'a ActBlocks, i0: usize, j0: usize) -> Self {
        let nb = w.blocks_per_row();
        let bytes = w.format.block_bytes();
        Self {
            format: w.format,
            nb,
            w_quants: &w.quants[j0 * nb * bytes..],
            w_scales: &w.scales[j0 * nb..],
            w_mins: w.format.has_min().then(|| &w.mins[j0 * nb..]),
            x_quants: &acts.quants[i0 * nb * BLOCK..],
            x_residues: match w.activations {
                Activations::Int8 => None,
                Activations::Int16 => Some(&acts.residues[i0 * nb * BLOCK..]),
            },
            x_scales: &acts.scales[i0 * nb..],
            x_biases: &acts.biases[i0 * nb..],
            x_sums: &acts.sums[i0 * nb..],
        }
    }

    /// Checks that `mr` activation rows and `nr` weight rows are in bounds, which the SIMD
    /// kernels rely on.
    fn check(&self, mr: usize, nr: usize) {
        let nb = self.nb;
        assert!(
            self.w_quants.len() >= nr * nb * self.format.block_bytes()
                && self.w_scales.len() >= nr * nb
                && self.x_quants.len() >= mr * nb * BLOCK
                && self.x_residues.is_none_or(|r| r.len() >= mr * nb * BLOCK)
                && self.x_scales.len() >= mr * nb
                && self.x_biases.len() >= mr * nb
                && self.x_sums.len() >= mr * nb
                && self.w_mins.is_none_or(|m| m.len() >= nr * nb)
        );
    }
}

/// Computes outputs for weight rows `r0..r1` and every activation row into `out` (`[m, r1 - r0]`).
fn tile_rows(
    path: Path,
    w: &PackedMatrix,
    acts: &ActBlocks,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    let m = acts.scales.len() / w.blocks_per_row();
    let ld = r1 - r0;
    let mut j = r0;
    while j < r1 {
        // One token reads each weight row as one stream, row after row: four rows side by side
        // (four streams plus the scales') generated 40 % slower, since decoding is bound by memory
        // (q8_0 tg128 116 against 190–205 tokens/s, docs/performance.md).
        let nr = if m > 1 && r1 - j >= NR { NR } else { 1 };
        let mut i = 0;
        while i < m {
            // The rows left over after whole tiles go in one narrower tile, not one by one: a
            // batched decode step (m = 2, 3, 5… sequences) then reads each weight row once.
            let mr = (m - i).min(MR);
            let tile = Tile::new(w, acts, i, j);
            let at = i * ld + (j - r0);
            match (mr, nr) {
                (MR, NR) => store(out, at, ld, kernel::<MR, NR>(path, &tile)),
                (3, NR) => store(out, at, ld, kernel::<3, NR>(path, &tile)),
                (2, NR) => store(out, at, ld, kernel::<2, NR>(path, &tile)),
                (1, NR) => store(out, at, ld, kernel::<1, NR>(path, &tile)),
                (MR, _) => store(out, at, ld, kernel::<MR, 1>(path, &tile)),
                (3, _) => store(out, at, ld, kernel::<3, 1>(path, &tile)),
                (2, _) => store(out, at, ld, kernel::<2, 1>(path, &tile)),
                _ => store(out, at, ld, kernel::<1, 1>(path, &tile)),
            }
            i += mr;
        }
        j += nr;
    }
}

fn store<const M: usize, const N: usize>(out: &mut [f32], at: usize, ld: usize, v: [[f32; N]; M]) {
    for (i, row) in v.iter().enumerate() {
        out[at + i * ld..at + i * ld + N].copy_from_slice(row);
    }
}

/// One `M × N` micro-kernel on `path`.
fn kernel<const M: usize, const N: usize>(path: Path, tile: &Tile<'_>) -> [[f32; N]; M] {
    tile.check(M, N);
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Vnni | Path::Avx2 => x86::kernel::<M, N>(path, tile),
        _ => scalar::kernel::<M, N>(tile),
    }
}

#[cfg(test)]
mod tests;
