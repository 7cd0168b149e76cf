//! sanctum's own CPU kernels for q8_0, q4_0, q4_1, q5_0, q4_K and q6_K weight matrices.
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
mod pool;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use candle_core::Device;
use half::f16;
use rayon::prelude::*;

pub use pool::{on_pool, use_every_thread};

/// Values per block, for every format.
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
    /// 5-bit values, one scale per block: nibbles plus a plane of fifth bits.
    Q5_0,
    /// ggml's q4_K: 4-bit values in super-blocks of 8 blocks, each block's scale and minimum a
    /// 6-bit multiple of the super-block's two f16 scales.
    Q4K,
    /// ggml's q6_K: 6-bit values (nibbles plus a plane of two high bits) in super-blocks of 8
    /// blocks, each half block's scale a signed 8-bit multiple of the super-block's f16 scale.
    Q6K,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 6] = [
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q4K,
        Format::Q6K,
    ];

    /// Bytes of quantized values per block in [`PackedMatrix`] (the high bits of q5_0 and q6_K
    /// apart).
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => BLOCK,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q4K | Self::Q6K => BLOCK / 2,
        }
    }

    /// What the stored unsigned value exceeds the signed one by (q4_1's and q4_K's values are
    /// unsigned and their minimums add the rest).
    pub const fn offset(self) -> i32 {
        match self {
            Self::Q8_0 => 128,
            Self::Q4_0 => 8,
            Self::Q5_0 => 16,
            Self::Q6K => 32,
            Self::Q4_1 | Self::Q4K => 0,
        }
    }

    /// True when blocks carry a minimum besides their scale.
    pub const fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q4K)
    }

    /// Nibbles, two values per byte.
    const fn is_nibbles(self) -> bool {
        !matches!(self, Self::Q8_0)
    }

    /// The bits of a value kept in `quants` (q5_0's fifth bit goes to its own plane).
    const fn value_mask(self) -> u8 {
        if self.is_nibbles() { 0x0f } else { 0xff }
    }

    /// Bits of each value above its nibble, kept in a plane of their own: q5_0's fifth bit,
    /// q6_K's fifth and sixth; none for the others.
    const fn high_bits(self) -> usize {
        match self {
            Self::Q5_0 => 1,
            Self::Q6K => 2,
            _ => 0,
        }
    }

    /// Blocks that share one f16 scale (and minimum): 8 for the k-quants' super-blocks, whose
    /// blocks (q6_K: half blocks) each scale it by a small integer; 1 for the others.
    pub const fn blocks_per_scale(self) -> usize {
        match self {
            Self::Q4K | Self::Q6K => GROUP,
            _ => 1,
        }
    }

    /// Scale multipliers per block: q4_K's one, q6_K's two (one per 16 values); none for the
    /// formats whose blocks have a scale of their own.
    const fn multipliers(self) -> usize {
        match self {
            Self::Q4K => 1,
            Self::Q6K => 2,
            _ => 0,
        }
    }

    /// True when the multipliers are signed bytes (q6_K's), not unsigned (q4_K's).
    const fn signed_multipliers(self) -> bool {
        matches!(self, Self::Q6K)
    }

    /// The largest unsigned value a weight is stored as: 255 for q8_0, 15, 31 or 63 for the others.
    const fn max_value(self) -> i32 {
        let bits = if self.is_nibbles() {
            4 + self.high_bits()
        } else {
            8
        };
        (1 << bits) - 1
    }

    /// The bits of a stored byte of the high plane that belong to one value, shifted down.
    const fn high_mask(self) -> u8 {
        (1 << self.high_bits()) - 1
    }

    /// Values that share one scale: 16 for q6_K, a block for the others.
    pub const fn values_per_scale(self) -> usize {
        match self {
            Self::Q6K => BLOCK / 2,
            _ => BLOCK,
        }
    }

    /// What a row's length must be a multiple of.
    pub const fn row_multiple(self) -> usize {
        BLOCK * self.blocks_per_scale()
    }

    /// Bytes of one block in ggml's layout: q8_0, q4_0, q4_1 and q5_0 store the f16 scale, the
    /// minimum when there is one, q5_0's 32 fifth bits, then the values; q4_K the two f16 super
    /// scales, 12 bytes of packed 6-bit block scales and minimums, and 128 bytes of nibbles;
    /// q6_K 128 bytes of nibbles, 64 of high bit pairs, 16 signed scales and the f16 scale.
    pub const fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4K => 4 + 12 + GROUP * BLOCK / 2,
            Self::Q6K => GROUP * BLOCK / 2 + GROUP * BLOCK / 4 + 2 * GROUP + 2,
            _ => {
                2 + if self.has_min() { 2 } else { 0 }
                    + self.high_bits() * BLOCK / 8
                    + self.block_bytes()
            }
        }
    }

    /// Bytes of a row of `cols` values in ggml's layout.
    pub const fn ggml_row_bytes(self, cols: usize) -> usize {
        // A ggml block holds `row_multiple` values (q4_K's super-blocks: 256).
        cols / self.row_multiple() * self.ggml_block_bytes()
    }

    /// candle's (ggml's) type for this format.
    pub fn ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType;
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Items per row in each of a [`PackedMatrix`]'s arrays for rows of `nb` blocks.
    const fn row_sizes(self, nb: usize) -> RowSizes {
        // A shift, not a division: the kernels take a row's sizes for every row they multiply.
        let scales = if self.blocks_per_scale() == 1 {
            nb
        } else {
            nb / GROUP
        };
        let multipliers = nb * self.multipliers();
        RowSizes {
            quants: nb * self.block_bytes(),
            high: nb * BLOCK * self.high_bits() / 8,
            scales,
            mins: if self.has_min() { scales } else { 0 },
            block_scales: multipliers,
            block_mins: if self.has_min() { multipliers } else { 0 },
        }
    }
}

/// Items per row in each array of a [`PackedMatrix`]; 0 for the arrays a format does not use.
#[derive(Debug, Clone, Copy)]
struct RowSizes {
    quants: usize,
    high: usize,
    scales: usize,
    mins: usize,
    block_scales: usize,
    block_mins: usize,
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
    /// Rows must be whole blocks (q4_K: whole super-blocks).
    #[error("row length {0} is not a positive multiple of {1}")]
    RowLength(usize, usize),
    /// candle could not quantize the rows (the formats whose quantizer is candle's).
    #[error("quantizing rows: {0}")]
    Quantize(String),
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

/// A weight matrix `[rows, cols]` quantized exactly as ggml does, stored for the kernels: per row
/// its blocks' values, unsigned (q8_0: `q + 128`, 32 bytes per block; the other formats: nibbles
/// `0..=15`, 16 bytes per block, and the bits above them in a plane of their own: q5_0's 4 bytes
/// per block, q6_K's 8), runs of 8 blocks interleaved (see `position`), and the f16 scales in a
/// separate array (the minimums of q4_1 and q4_K in another). Generation reads every weight once
/// per token, so bytes are what it costs: f16 scales keep q4_0 at ggml's 18 bytes per block of 32
/// (f32 would add 11%), q4_K keeps its super-blocks (one f16 scale and minimum per 8 blocks, a
/// byte each per block: 148 bytes per 256 values against ggml's 144, whose 6-bit fields would
/// cost shifts per run), and q6_K takes ggml's 210 bytes per 256.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    format: Format,
    activations: Activations,
    rows: usize,
    cols: usize,
    /// `[rows, blocks / blocks_per_scale]`.
    scales: Vec<f16>,
    /// q4_1's minimums (as `scales`), or q4_K's super-block minimums negated; else empty.
    mins: Vec<f16>,
    /// The multipliers of `scales`: q4_K's 6-bit ones, one per block, q6_K's signed bytes, one
    /// per half block (see `multiplier_index`); else empty.
    block_scales: Vec<u8>,
    /// q4_K's 6-bit multipliers of `mins`, one per block; else empty.
    block_mins: Vec<u8>,
    quants: Vec<u8>,
    /// The bits above the nibbles: q5_0's fifth, 4 bytes per block, q6_K's fifth and sixth, 8
    /// bytes per block (see `high_position`); else empty.
    high: Vec<u8>,
}

/// One block's numbers as a packing step produces them: its unsigned values, and its scale and
/// minimum (for the k-quants those of its super-block, plus its own multipliers: q4_K's scale
/// and minimum ones, q6_K's two signed scale ones as bytes).
#[derive(Debug, Default)]
struct Block {
    values: [u8; BLOCK],
    scale: f16,
    min: f16,
    multipliers: [u8; 2],
    block_min: u8,
}

/// A [`PackedMatrix`] filled a few rows at a time, as a weight streams in from its file: only
/// the packed matrix and the rows at hand are ever in memory.
#[derive(Debug)]
pub struct PackedBuilder {
    matrix: PackedMatrix,
    filled: usize,
}

impl PackedBuilder {
    /// An empty `[rows, cols]` matrix; `cols` must be a multiple of the format's
    /// [`Format::row_multiple`].
    pub fn new(format: Format, rows: usize, cols: usize) -> Result<Self, ShapeError> {
        let multiple = format.row_multiple();
        if cols == 0 || !cols.is_multiple_of(multiple) {
            return Err(ShapeError::RowLength(cols, multiple));
        }
        let sizes = format.row_sizes(cols / BLOCK);
        Ok(Self {
            matrix: PackedMatrix {
                format,
                activations: Activations::Int8,
                rows,
                cols,
                scales: vec![f16::ZERO; rows * sizes.scales],
                mins: vec![f16::ZERO; rows * sizes.mins],
                block_scales: vec![0; rows * sizes.block_scales],
                block_mins: vec![0; rows * sizes.block_mins],
                quants: vec![0u8; rows * sizes.quants],
                high: vec![0; rows * sizes.high],
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
        match format {
            // candle's quantizers are ggml's; the k-quants' search their scales iteratively,
            // which is not worth a second copy to keep bit-exact.
            Format::Q5_0 | Format::Q4K | Format::Q6K => {
                // (`pack_rows` checks the other formats' input.)
                if !data.len().is_multiple_of(cols) {
                    return Err(ShapeError::Values {
                        got: data.len(),
                        rows: self.matrix.rows - self.filled,
                        cols,
                    });
                }
                let per_task = (data.len() / cols)
                    .div_ceil(rayon::current_num_threads())
                    .max(1);
                let parts = data
                    .par_chunks(per_task * cols)
                    .map(|rows| ggml_quantize(format, rows, cols))
                    .collect::<Result<Vec<_>, _>>()?;
                parts.iter().try_for_each(|part| self.push_ggml_rows(part))
            }
            Format::Q8_0 | Format::Q4_0 | Format::Q4_1 => {
                self.pack_rows(cols, data, |x, b, block| {
                    let x = &x[b * BLOCK..(b + 1) * BLOCK];
                    match format {
                        Format::Q8_0 => block.scale = quantize_q8_0_block(x, &mut block.values),
                        Format::Q4_0 => block.scale = quantize_q4_0_block(x, &mut block.values),
                        _ => (block.scale, block.min) = quantize_q4_1_block(x, &mut block.values),
                    }
                })
            }
        }
    }

    /// Takes the next whole rows as ggml stores them in this format (see
    /// [`Format::ggml_block_bytes`]), without requantizing.
    pub fn push_ggml_rows(&mut self, blocks: &[u8]) -> Result<(), ShapeError> {
        let format = self.matrix.format;
        let row_bytes = format.ggml_row_bytes(self.matrix.cols);
        self.pack_rows(row_bytes, blocks, |row, b, block| {
            unpack_ggml_block(format, row, b, block);
        })
    }

    /// Packs the rows of `input` (`per_row` items per row) in parallel; `block` fills in block `b`
    /// of a row.
    fn pack_rows<T: Sync>(
        &mut self,
        per_row: usize,
        input: &[T],
        block: impl Fn(&[T], usize, &mut Block) + Sync,
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
        let per_scale = format.blocks_per_scale();
        let at = self.filled;
        let outputs = m.rows_mut(at, count);
        outputs
            .into_par_iter()
            .zip(input.par_chunks_exact(per_row))
            .for_each(|(out, x)| {
                let mut numbers = Block::default();
                for b in 0..nb {
                    block(x, b, &mut numbers);
                    let s = b / per_scale;
                    out.scales[s] = numbers.scale;
                    if let Some(min) = out.mins.get_mut(s) {
                        *min = numbers.min;
                    }
                    for k in 0..format.multipliers() {
                        out.block_scales[multiplier_index(format, b, k)] = numbers.multipliers[k];
                    }
                    if let Some(v) = out.block_mins.get_mut(b) {
                        *v = numbers.block_min;
                    }
                    let values = &numbers.values;
                    // Runs of 4 values stay together in every layout `position` describes.
                    for (t, run) in values.chunks_exact(4).enumerate() {
                        let (at, shift) = position(format, nb, b, 4 * t);
                        for (q, &v) in out.quants[at..at + 4].iter_mut().zip(run) {
                            *q |= (v & format.value_mask()) << shift;
                        }
                    }
                    if format.high_bits() > 0 {
                        for (e, &v) in values.iter().enumerate() {
                            let (at, shift) = high_position(format, nb, b, e);
                            out.high[at] |= (v >> 4 & format.high_mask()) << shift;
                        }
                    }
                }
            });
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
    /// Quantizes a row-major `[rows, cols]` f32 matrix; `cols` must be a multiple of the format's
    /// [`Format::row_multiple`].
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
        self.quants.len()
            + self.high.len()
            + self.block_scales.len()
            + self.block_mins.len()
            + 2 * (self.scales.len() + self.mins.len())
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

    /// Weight rows `j0..` as the kernels read them.
    #[inline(always)]
    fn rows_from(&self, j0: usize) -> WeightRows<'_> {
        let nb = self.blocks_per_row();
        let sizes = self.format.row_sizes(nb);
        WeightRows {
            format: self.format,
            nb,
            sizes,
            quants: &self.quants,
            high: &self.high,
            scales: &self.scales,
            mins: &self.mins,
            block_scales: &self.block_scales,
            block_mins: &self.block_mins,
        }
        .skip(j0)
    }

    /// The matrix in ggml's own block layout (what [`PackedBuilder::push_ggml_rows`] takes, see
    /// [`Format::ggml_block_bytes`]).
    pub fn ggml_blocks(&self) -> Vec<u8> {
        let (format, nb) = (self.format, self.blocks_per_row());
        let mut out = Vec::with_capacity(self.rows * format.ggml_row_bytes(self.cols));
        for r in 0..self.rows {
            let row = self.rows_from(r);
            let value = |b: usize, e: usize| row.value(0, b, e) as u8;
            if format == Format::Q4K {
                for s in 0..nb / GROUP {
                    out.extend_from_slice(&row.scales[s].to_le_bytes());
                    out.extend_from_slice(&(-row.mins[s]).to_le_bytes());
                    let blocks = s * GROUP..(s + 1) * GROUP;
                    out.extend_from_slice(&pack_q4k_scales(
                        &row.block_scales[blocks.clone()],
                        &row.block_mins[blocks],
                    ));
                    for pair in 0..GROUP / 2 {
                        let (even, odd) = (s * GROUP + 2 * pair, s * GROUP + 2 * pair + 1);
                        out.extend((0..BLOCK).map(|e| value(even, e) | (value(odd, e) << 4)));
                    }
                }
                continue;
            }
            if format == Format::Q6K {
                for s in 0..nb / GROUP {
                    let (mut low, mut high) = ([0u8; Q6K_LOW], [0u8; Q6K_HIGH]);
                    for v in 0..GROUP * BLOCK {
                        let q = value(s * GROUP + v / BLOCK, v % BLOCK);
                        let (l, shift, h, pair) = q6k_value_bytes(v);
                        low[l] |= (q & 0x0f) << shift;
                        high[h] |= (q >> 4) << pair;
                    }
                    out.extend_from_slice(&low);
                    out.extend_from_slice(&high);
                    for b in s * GROUP..(s + 1) * GROUP {
                        for k in 0..format.multipliers() {
                            out.push(row.block_scales[multiplier_index(format, b, k)]);
                        }
                    }
                    out.extend_from_slice(&row.scales[s].to_le_bytes());
                }
                continue;
            }
            for b in 0..nb {
                out.extend_from_slice(&row.scales[b].to_le_bytes());
                if format.has_min() {
                    out.extend_from_slice(&row.mins[b].to_le_bytes());
                }
                if format.high_bits() > 0 {
                    let bits = (0..BLOCK).fold(0u32, |h, e| h | u32::from(value(b, e) >> 4) << e);
                    out.extend_from_slice(&bits.to_le_bytes());
                }
                if format.is_nibbles() {
                    out.extend(
                        (0..BLOCK / 2)
                            .map(|j| (value(b, j) & 0x0f) | (value(b, j + BLOCK / 2) << 4)),
                    );
                } else {
                    out.extend((0..BLOCK).map(|e| value(b, e).wrapping_sub(128)));
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
        let weights = self.rows_from(row);
        let (offset, per_scale) = (self.format.offset(), self.format.values_per_scale());
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            for (part, o) in o.chunks_exact_mut(per_scale).enumerate() {
                let (d, m) = weights.scale_min(0, b, part);
                let q = |e| (weights.value(0, b, part * per_scale + e) - offset) as f32;
                if self.format.has_min() {
                    for (e, v) in o.iter_mut().enumerate() {
                        *v = q(e) * d + m;
                    }
                } else {
                    for (e, v) in o.iter_mut().enumerate() {
                        *v = q(e) * d;
                    }
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
/// bit shift of its nibble (every format but q8_0) or 0.
///
/// Each run of [`GROUP`] blocks is interleaved 4 bytes at a time: the row's `t`-th 32-byte vector
/// holds values `4t..4t + 4` of each of the 8 blocks, one block per 32-bit lane. Then `vpdpbusd`
/// over the 8 vectors leaves each block's whole dot product in its own lane, and the scales of 8
/// blocks apply with one multiply, where the natural order needs a horizontal sum per block.
/// Nibbles pack vectors `2u` and `2u + 1` into the low and high nibbles of one 32-byte vector.
/// Blocks after the last full run keep ggml's order (nibbles: low nibbles the first 16 values).
/// Activations use the q8_0 layout.
fn position(format: Format, nb: usize, b: usize, e: usize) -> (usize, u8) {
    let bytes = format.block_bytes();
    if b >= nb / GROUP * GROUP {
        return match format {
            Format::Q8_0 => (b * bytes + e, 0),
            _ => (b * bytes + e % 16, if e < 16 { 0 } else { 4 }),
        };
    }
    let (group, lane) = (b / GROUP, b % GROUP);
    let (t, byte) = (e / 4, e % 4);
    let base = group * GROUP * bytes;
    match format {
        Format::Q8_0 => (base + t * 32 + lane * 4 + byte, 0),
        _ => (base + t / 2 * 32 + lane * 4 + byte, 4 * (t % 2) as u8),
    }
}

/// Where the bits above the nibble of value `e` of block `b` are kept: byte offset in the row's
/// plane and shift.
///
/// q5_0 (4 bytes per block): in a run of [`GROUP`] blocks, the 32-bit word `t` holds the fifth
/// bits of the run's vector `t` (see [`position`]), bit `k` for its byte `k`, so one word expands
/// to the vector's high bits; blocks after the last run keep ggml's `qh` (bit `e` for value `e`).
///
/// q6_K (8 bytes per block, and rows of whole runs): in a run, byte `k` of the 32-byte vector
/// `t / 4` holds the high bit pair of byte `k` of the run's vector `t` at bits `2 × (t % 4)`, so
/// a shift and a mask give a vector's pairs in place.
fn high_position(format: Format, nb: usize, b: usize, e: usize) -> (usize, u8) {
    let (group, lane) = (b / GROUP, b % GROUP);
    let (t, k) = (e / 4, lane * 4 + e % 4);
    if format == Format::Q6K {
        debug_assert!(nb.is_multiple_of(GROUP));
        return (group * GROUP * 8 + t / 4 * 32 + k, 2 * (t % 4) as u8);
    }
    if b >= nb / GROUP * GROUP {
        return (b * 4 + e / 8, (e % 8) as u8);
    }
    (group * GROUP * 4 + t * 4 + k / 8, (k % 8) as u8)
}

/// Where the multiplier `k` of block `b` is in a row: q4_K's one per block in order; q6_K's per
/// run of [`GROUP`] blocks, the 8 blocks' first halves' then their second halves', so that each
/// loads as one vector.
fn multiplier_index(format: Format, b: usize, k: usize) -> usize {
    let per_block = format.multipliers();
    b / GROUP * GROUP * per_block + k * GROUP + b % GROUP
}

/// Bytes of a q6_K super-block's low nibbles and of its high bit pairs.
const Q6K_LOW: usize = GROUP * BLOCK / 2;
const Q6K_HIGH: usize = GROUP * BLOCK / 4;

/// Where ggml's q6_K keeps value `v` (`0..256`) of a super-block: the byte of its low nibble and
/// the nibble's shift, the byte of its high bit pair and the pair's shift. Each half of 128
/// values takes 64 nibble bytes (values `l` and `l + 32` in the low nibbles of bytes `l` and
/// `l + 32`, `l + 64` and `l + 96` in their high nibbles) and 32 bytes of pairs (the four values'
/// pairs in byte `l`).
fn q6k_value_bytes(v: usize) -> (usize, u8, usize, u8) {
    let (half, quarter, l) = (v / 128, v % 128 / 32, v % 32);
    (
        half * 64 + l + 32 * (quarter % 2),
        4 * (quarter / 2) as u8,
        half * 32 + l,
        2 * quarter as u8,
    )
}

/// Weight rows from some row `j0` on, as stored in a [`PackedMatrix`].
#[derive(Clone, Copy)]
struct WeightRows<'a> {
    format: Format,
    /// Blocks per row.
    nb: usize,
    /// Items per row in each array below.
    sizes: RowSizes,
    /// Values, `nb × block_bytes` per row.
    quants: &'a [u8],
    /// q5_0's fifth bits, `4 × nb` per row; else empty.
    high: &'a [u8],
    /// `nb / blocks_per_scale` per row.
    scales: &'a [f16],
    /// Minimums (as `scales`) for the formats that have them; else empty.
    mins: &'a [f16],
    /// q4_K's multipliers, `nb` per row; else empty.
    block_scales: &'a [u8],
    block_mins: &'a [u8],
}

impl WeightRows<'_> {
    /// Value `e` of block `b` of row `j`, unsigned.
    fn value(&self, j: usize, b: usize, e: usize) -> i32 {
        let (nb, format) = (self.nb, self.format);
        let row = &self.quants[j * self.sizes.quants..];
        let (at, shift) = position(format, nb, b, e);
        let low = i32::from((row[at] >> shift) & format.value_mask());
        if format.high_bits() == 0 {
            return low;
        }
        let (at, shift) = high_position(format, nb, b, e);
        low | i32::from(self.high[j * self.sizes.high + at] >> shift & format.high_mask()) << 4
    }

    /// The scale and minimum (0 without one) as f32 of part `part` of block `b` of row `j` (the
    /// part of [`Format::values_per_scale`] values; for every format but q6_K the whole block):
    /// for the k-quants the products of the super-block's with the multipliers, exact in f32 as
    /// ggml computes them.
    #[inline]
    fn scale_min(&self, j: usize, b: usize, part: usize) -> (f32, f32) {
        let format = self.format;
        let per_scale = format.blocks_per_scale();
        let s = j * self.sizes.scales + b / per_scale;
        let d = self.scales[s].to_f32();
        let m = self.mins.get(s).map_or(0.0, |m| m.to_f32());
        if per_scale == 1 {
            return (d, m);
        }
        let k = self.block_scales[j * self.sizes.block_scales + multiplier_index(format, b, part)];
        if format.signed_multipliers() {
            return (d * f32::from(k as i8), 0.0);
        }
        (
            d * f32::from(k),
            m * f32::from(self.block_mins[j * self.sizes.block_mins + b]),
        )
    }

    /// Rows `j..` of these. Always inlined: one token takes a row at a time, and a call that
    /// returns the struct through memory (then read back as vectors) cost a tenth of generation.
    #[inline(always)]
    fn skip(&self, j: usize) -> Self {
        let s = self.sizes;
        Self {
            quants: &self.quants[j * s.quants..],
            high: &self.high[j * s.high..],
            scales: &self.scales[j * s.scales..],
            mins: &self.mins[j * s.mins..],
            block_scales: &self.block_scales[j * s.block_scales..],
            block_mins: &self.block_mins[j * s.block_mins..],
            ..*self
        }
    }

    /// Checks that `nr` rows are in bounds, which the SIMD kernels rely on.
    fn holds(&self, nr: usize) -> bool {
        let s = self.sizes;
        self.quants.len() >= nr * s.quants
            && self.high.len() >= nr * s.high
            && self.scales.len() >= nr * s.scales
            && self.mins.len() >= nr * s.mins
            && self.block_scales.len() >= nr * s.block_scales
            && self.block_mins.len() >= nr * s.block_mins
    }
}

/// One packing step's output slices for one row.
struct RowMut<'a> {
    quants: &'a mut [u8],
    high: &'a mut [u8],
    scales: &'a mut [f16],
    mins: &'a mut [f16],
    block_scales: &'a mut [u8],
    block_mins: &'a mut [u8],
}

impl PackedMatrix {
    /// Rows `at..at + count`, each as a [`RowMut`].
    fn rows_mut(&mut self, at: usize, count: usize) -> Vec<RowMut<'_>> {
        let sizes = self.format.row_sizes(self.blocks_per_row());
        /// `count` row slices of `per` items from row `at` on (empty ones for an unused array).
        fn rows<T>(v: &mut [T], per: usize, at: usize, count: usize) -> Vec<&mut [T]> {
            if per == 0 {
                return std::iter::repeat_with(<&mut [T]>::default)
                    .take(count)
                    .collect();
            }
            v[at * per..(at + count) * per].chunks_mut(per).collect()
        }
        let quants = rows(&mut self.quants, sizes.quants, at, count);
        let high = rows(&mut self.high, sizes.high, at, count);
        let scale_rows = rows(&mut self.scales, sizes.scales, at, count);
        let mins = rows(&mut self.mins, sizes.mins, at, count);
        let block_scales = rows(&mut self.block_scales, sizes.block_scales, at, count);
        let block_mins = rows(&mut self.block_mins, sizes.block_mins, at, count);
        quants
            .into_iter()
            .zip(high)
            .zip(scale_rows)
            .zip(mins)
            .zip(block_scales)
            .zip(block_mins)
            .map(
                |(((((quants, high), scales), mins), block_scales), block_mins)| RowMut {
                    quants,
                    high,
                    scales,
                    mins,
                    block_scales,
                    block_mins,
                },
            )
            .collect()
    }
}

/// Block `b` of a row in ggml's layout (see [`Format::ggml_block_bytes`]) into `out`.
fn unpack_ggml_block(format: Format, row: &[u8], b: usize, out: &mut Block) {
    let f16_at = |bytes: &[u8], at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let size = format.ggml_block_bytes();
    if format == Format::Q6K {
        let (sb, j) = (&row[b / GROUP * size..][..size], b % GROUP);
        for (e, v) in out.values.iter_mut().enumerate() {
            let (l, shift, h, pair) = q6k_value_bytes(j * BLOCK + e);
            *v = (sb[l] >> shift) & 0x0f | ((sb[Q6K_LOW + h] >> pair) & 3) << 4;
        }
        let scales = &sb[Q6K_LOW + Q6K_HIGH..];
        out.multipliers = [scales[2 * j], scales[2 * j + 1]];
        out.scale = f16_at(scales, 2 * GROUP);
        return;
    }
    if format == Format::Q4K {
        let (sb, j) = (&row[b / GROUP * size..][..size], b % GROUP);
        out.scale = f16_at(sb, 0);
        // Negated, so that a value is `scale × q + min` as for q4_1.
        out.min = -f16_at(sb, 2);
        (out.multipliers[0], out.block_min) = q4k_scale_min(&sb[4..16], j);
        // 64 values per 32 bytes: the even block in the low nibbles, the odd one in the high.
        let qs = &sb[16 + j / 2 * BLOCK..][..BLOCK];
        let shift = 4 * (j % 2);
        for (v, &q) in out.values.iter_mut().zip(qs) {
            *v = (q >> shift) & 0x0f;
        }
        return;
    }
    let block = &row[b * size..][..size];
    out.scale = f16_at(block, 0);
    let mut at = 2;
    if format.has_min() {
        out.min = f16_at(block, at);
        at += 2;
    }
    let mut high = 0u32;
    if format.high_bits() > 0 {
        high = u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
        at += 4;
    }
    let qs = &block[at..];
    if format.is_nibbles() {
        for (j, &q) in qs.iter().enumerate() {
            out.values[j] = q & 0x0f;
            out.values[j + BLOCK / 2] = q >> 4;
        }
        for (e, v) in out.values.iter_mut().enumerate() {
            *v |= ((high >> e & 1) as u8) << 4;
        }
    } else {
        for (v, &q) in out.values.iter_mut().zip(qs) {
            *v = (q as i8 as i32 + 128) as u8;
        }
    }
}

/// Block `j`'s 6-bit scale multiplier and minimum multiplier from q4_K's 12 packed bytes: the
/// first four blocks' in the low 6 bits of bytes 0–3 and 4–7, the last four's low 4 bits in bytes
/// 8–11 and their top 2 bits in the top bits of bytes 0–7.
fn q4k_scale_min(packed: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// The inverse of [`q4k_scale_min`] for a super-block's 8 blocks.
fn pack_q4k_scales(scales: &[u8], mins: &[u8]) -> [u8; 12] {
    let mut packed = [0u8; 12];
    for j in 0..GROUP {
        let (d, m) = (scales[j], mins[j]);
        if j < 4 {
            packed[j] |= d;
            packed[j + 4] |= m;
        } else {
            packed[j + 4] = (d & 0x0f) | ((m & 0x0f) << 4);
            packed[j - 4] |= (d >> 4) << 6;
            packed[j] |= (m >> 4) << 6;
        }
    }
    packed
}

/// Whole rows of `cols` values quantized by candle into ggml's block bytes.
fn ggml_quantize(format: Format, rows: &[f32], cols: usize) -> Result<Vec<u8>, ShapeError> {
    let quantize = || -> candle_core::Result<Vec<u8>> {
        let t = candle_core::Tensor::from_slice(rows, (rows.len() / cols, cols), &Device::Cpu)?;
        let q = candle_core::quantized::QTensor::quantize(&t, format.ggml())?;
        Ok(q.data()?.into_owned())
    };
    quantize().map_err(|e| ShapeError::Quantize(e.to_string()))
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
    /// The correction of each block's last 16 values alone: q6_K scales each half on its own.
    half_biases: Vec<i32>,
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
        self.half_biases.resize(blocks, 0);
        self.quants.resize(x.len(), 0);
        // Sized for `Int8` too (and left unwritten), so both go through one loop.
        self.residues.resize(x.len(), 0);
        let numbers = self
            .scales
            .par_chunks_exact_mut(nb)
            .zip(self.sums.par_chunks_exact_mut(nb))
            .zip(self.biases.par_chunks_exact_mut(nb))
            .zip(self.half_biases.par_chunks_exact_mut(nb))
            .map(|(((scales, sums), biases), half_biases)| RowBlocks {
                scales,
                sums,
                biases,
                half_biases,
            });
        let rows = x
            .par_chunks_exact(cols)
            .zip(self.quants.par_chunks_exact_mut(cols))
            .zip(self.residues.par_chunks_exact_mut(cols))
            .zip(numbers);
        let row = |(((x, hi), lo), blocks): (((_, &mut [i8]), _), RowBlocks<'_>)| match activations
        {
            Activations::Int8 => quantize_row(x, hi, blocks, offset),
            Activations::Int16 => quantize_row_split(x, hi, lo, blocks, offset),
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
    half_biases: &'a mut [i32],
}

/// One block's numbers in a [`RowBlocks`].
struct BlockNumbers<'a> {
    scale: &'a mut f32,
    sum: &'a mut f32,
    bias: &'a mut i32,
    half_bias: &'a mut i32,
}

impl BlockNumbers<'_> {
    /// The corrections for unsigned weights of a block whose values (in units of the scale)
    /// add up to `first` over its first 16 and `second` over its last.
    fn set_biases(&mut self, offset: i32, first: i32, second: i32) {
        *self.bias = -offset * (first + second);
        *self.half_bias = -offset * second;
    }
}

impl RowBlocks<'_> {
    /// Block by block: its index, its values and its numbers.
    fn each<'x>(
        &mut self,
        x: &'x [f32],
    ) -> impl Iterator<Item = (usize, &'x [f32], BlockNumbers<'_>)> {
        x.chunks_exact(BLOCK)
            .zip(self.scales.iter_mut())
            .zip(self.sums.iter_mut())
            .zip(self.biases.iter_mut())
            .zip(self.half_biases.iter_mut())
            .enumerate()
            .map(|(b, ((((x, scale), sum), bias), half_bias))| {
                let numbers = BlockNumbers {
                    scale,
                    sum,
                    bias,
                    half_bias,
                };
                (b, x, numbers)
            })
    }
}

/// What the first and the last 16 of a block's values add up to.
fn half_sums(values: &[i8; BLOCK]) -> (i32, i32) {
    let sum = |v: &[i8]| v.iter().map(|&v| i32::from(v)).sum::<i32>();
    (sum(&values[..BLOCK / 2]), sum(&values[BLOCK / 2..]))
}

/// One activation row into its values (`position`'s layout), scales, sums and corrections, as
/// ggml's q8_0 (and q8_1's sums).
fn quantize_row(x: &[f32], q: &mut [i8], mut blocks: RowBlocks<'_>, offset: i32) {
    let nb = blocks.scales.len();
    for (b, x, mut numbers) in blocks.each(x) {
        // ggml's q8_0 quantization, so every block's integer dot product is the one candle and
        // llama.cpp compute: small models' greedy output is sensitive to it.
        let scale = abs_max(x) / 127.0;
        *numbers.scale = f16::from_f32(scale).to_f32();
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let [r, _] = round_block::<false>(x, id);
        let (first, second) = half_sums(&r);
        numbers.set_biases(offset, first, second);
        *numbers.sum = f16::from_f32(scale * (first + second) as f32).to_f32();
        store_block(q, nb, b, &r);
    }
}

/// A block's values `v × id` rounded (half away from zero) and cast `as i32 as i8`, and with
/// `RESIDUES` what rounding left, times [`RESIDUE_SCALE`], rounded and cast the same way
/// (`|v × id - rounded| <= 1/2`, so it fits in ±127); else zeros. On x86 the SIMD path does it: the
/// baseline build has no vector rounding, and a scalar conversion per value was 6 % of a prompt's
/// profile.
#[inline(always)]
fn round_block<const RESIDUES: bool>(x: &[f32], id: f32) -> [[i8; BLOCK]; 2] {
    #[cfg(target_arch = "x86_64")]
    if let Some(rounded) = x86::round_block::<RESIDUES>(x, id) {
        return rounded;
    }
    round_block_scalar::<RESIDUES>(x, id)
}

/// [`round_block`] one value at a time.
fn round_block_scalar<const RESIDUES: bool>(x: &[f32], id: f32) -> [[i8; BLOCK]; 2] {
    let (mut h, mut l) = ([0i8; BLOCK], [0i8; BLOCK]);
    for ((h, l), &v) in h.iter_mut().zip(&mut l).zip(x) {
        let scaled = v * id;
        let rounded = scaled.round();
        *h = rounded as i32 as i8;
        if RESIDUES {
            *l = ((scaled - rounded) * RESIDUE_SCALE as f32).round() as i32 as i8;
        }
    }
    [h, l]
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
    for (b, x, mut numbers) in blocks.each(x) {
        let scale = abs_max(x) / 127.0;
        let d = scale / RESIDUE_SCALE as f32;
        *numbers.scale = d;
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let [h, l] = round_block::<true>(x, id);
        let ((h1, h2), (l1, l2)) = (half_sums(&h), half_sums(&l));
        let (first, second) = (RESIDUE_SCALE * h1 + l1, RESIDUE_SCALE * h2 + l2);
        numbers.set_biases(offset, first, second);
        *numbers.sum = d * (first + second) as f32;
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
    /// x86-64 AVX2 and FMA: `vpmaddubsw` on unsigned weights, summed in 16 bits over as many
    /// vectors as cannot overflow, then `vpmaddwd`; q8_0's bytes, which would saturate, are
    /// made signed first.
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

    /// The offset the activation sums are scaled by: the format's on the paths that multiply
    /// unsigned weights, none where the weights are made signed first.
    fn bias_offset(self, format: Format) -> i32 {
        match self {
            Self::Vnni => format.offset(),
            Self::Avx2 if avx2_unsigned(format) => format.offset(),
            Self::Scalar | Self::Avx2 => 0,
        }
    }
}

/// Whether the AVX2 path multiplies the format's weights unsigned: `vpmaddubsw` saturates a pair
/// of products above `i16::MAX`, which q8_0's 255 × 127 twice reaches and the nibble formats'
/// 63 × 127 twice does not.
const fn avx2_unsigned(format: Format) -> bool {
    2 * format.max_value() * 127 <= i16::MAX as i32
}

/// Activation rows per micro-kernel.
const MR: usize = 4;
/// Weight rows per micro-kernel.
const NR: usize = 4;
/// Weight rows per micro-kernel call for one activation row (which takes them one by one).
const TOKEN_ROWS: usize = 16;

/// The operands of micro-kernel calls: activation rows from the first (see [`Tile::down`]) and
/// weight rows from `j0`, over every block of the row.
#[derive(Clone, Copy)]
struct Tile<'a> {
    format: Format,
    /// Blocks per row.
    nb: usize,
    /// Weight rows `j0..`.
    w: WeightRows<'a>,
    /// Activation values of the tile's rows, `nb × 32` per row.
    x_quants: &'a [i8],
    /// With [`Activations::Int16`], the residues of the tile's rows (as `x_quants`), else None.
    x_residues: Option<&'a [i8]>,
    /// Activation scales of the tile's rows.
    x_scales: &'a [f32],
    /// Activation corrections of the tile's rows.
    x_biases: &'a [i32],
    /// The corrections of their blocks' last 16 values alone (for q6_K).
    x_half_biases: &'a [i32],
    /// Activation block sums of the tile's rows.
    x_sums: &'a [f32],
}

impl<'a> Tile<'a> {
    /// Weight rows from `j0` and every activation row.
    fn new(w: &'a PackedMatrix, acts: &'a ActBlocks, j0: usize) -> Self {
        Self {
            format: w.format,
            nb: w.blocks_per_row(),
            w: w.rows_from(j0),
            x_quants: &acts.quants,
            x_residues: match w.activations {
                Activations::Int8 => None,
                Activations::Int16 => Some(&acts.residues),
            },
            x_scales: &acts.scales,
            x_biases: &acts.biases,
            x_half_biases: &acts.half_biases,
            x_sums: &acts.sums,
        }
    }

    /// The tile of the same weight rows whose activation rows start `rows` further down (empty
    /// past the last).
    #[inline(always)]
    fn down(&self, rows: usize) -> Self {
        let (values, blocks) = (rows * self.nb * BLOCK, rows * self.nb);
        Self {
            x_quants: self.x_quants.get(values..).unwrap_or_default(),
            x_residues: self.x_residues.map(|r| r.get(values..).unwrap_or_default()),
            x_scales: self.x_scales.get(blocks..).unwrap_or_default(),
            x_biases: self.x_biases.get(blocks..).unwrap_or_default(),
            x_half_biases: self.x_half_biases.get(blocks..).unwrap_or_default(),
            x_sums: self.x_sums.get(blocks..).unwrap_or_default(),
            ..*self
        }
    }

    /// The tile without its first `j` weight rows (with the same activation rows).
    #[inline(always)]
    fn skip_rows(&self, j: usize) -> Self {
        Self {
            w: self.w.skip(j),
            ..*self
        }
    }

    /// Checks that `mr` activation rows and `nr` weight rows are in bounds, which the SIMD
    /// kernels rely on.
    fn check(&self, mr: usize, nr: usize) {
        let nb = self.nb;
        assert!(
            self.w.holds(nr)
                && self.x_quants.len() >= mr * nb * BLOCK
                && self.x_residues.is_none_or(|r| r.len() >= mr * nb * BLOCK)
                && self.x_scales.len() >= mr * nb
                && self.x_biases.len() >= mr * nb
                && self.x_half_biases.len() >= mr * nb
                && self.x_sums.len() >= mr * nb
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
        let tile = Tile::new(w, acts, j);
        let out = &mut out[j - r0..];
        // One token still reads each weight row as one stream, row after row (the kernels take
        // the rows of a tile one by one then): four rows side by side (four streams plus the
        // scales') generated 40 % slower, since decoding is bound by memory (q8_0 tg128 116
        // against 190–205 tokens/s, docs/performance.md). A call takes `TOKEN_ROWS` rows where
        // it can: setting up a tile per four rows took an eighth of generation time.
        j += if m == 1 && r1 - j >= TOKEN_ROWS {
            kernel::<1, TOKEN_ROWS>(path, &tile, 1, out, ld);
            TOKEN_ROWS
        } else if r1 - j >= NR {
            column::<NR>(path, &tile, m, out, ld);
            NR
        } else {
            column::<1>(path, &tile, m, out, ld);
            1
        };
    }
}

/// Every activation row of `tile` against its `N` weight rows: whole tiles of `MR` rows in one
/// call down the rows, the rows left over in one narrower tile, not one by one (a batched decode
/// step of m = 2, 3, 5… sequences then reads each weight row once).
fn column<const N: usize>(path: Path, tile: &Tile<'_>, m: usize, out: &mut [f32], ld: usize) {
    let tiles = m / MR;
    kernel::<MR, N>(path, tile, tiles, out, ld);
    let tail = tile.down(tiles * MR);
    let below = (tiles * MR * ld).min(out.len());
    let out = &mut out[below..];
    match m % MR {
        3 => kernel::<3, N>(path, &tail, 1, out, ld),
        2 => kernel::<2, N>(path, &tail, 1, out, ld),
        1 => kernel::<1, N>(path, &tail, 1, out, ld),
        _ => {}
    }
}

/// Where a kernel call's tiles go: `tiles` of them down the activation rows, each tile's outputs
/// into `out` (`ld` outputs per activation row).
struct Band<'o> {
    tiles: usize,
    out: &'o mut [f32],
    ld: usize,
}

impl Band<'_> {
    /// Runs `kernel` on each `M`-row tile down from `tile`'s first activation row and stores its
    /// outputs.
    #[inline(always)]
    fn fill<const M: usize, const N: usize>(
        self,
        tile: &Tile<'_>,
        mut kernel: impl FnMut(&Tile<'_>) -> [[f32; N]; M],
    ) {
        for t in 0..self.tiles {
            let v = kernel(&tile.down(t * M));
            for (i, v) in v.iter().enumerate() {
                self.out[(t * M + i) * self.ld..][..N].copy_from_slice(v);
            }
        }
    }
}

/// `tiles` micro-kernels of `M × N` on `path`, one below the other from `tile`'s first activation
/// row, into `out` (`ld` outputs per activation row). One call takes a whole band of rows: a call
/// per tile, each slicing its operands again, took a tenth of a prompt's time.
fn kernel<const M: usize, const N: usize>(
    path: Path,
    tile: &Tile<'_>,
    tiles: usize,
    out: &mut [f32],
    ld: usize,
) {
    if tiles == 0 {
        return;
    }
    tile.check(M * tiles, N);
    assert!(out.len() >= (M * tiles - 1) * ld + N);
    let band = Band { tiles, out, ld };
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Vnni | Path::Avx2 => x86::kernel::<M, N>(path, tile, band),
        _ => band.fill(tile, scalar::kernel::<M, N>),
    }
}

#[cfg(test)]
mod tests;
