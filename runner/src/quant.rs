//! In-situ quantization: the formats weights run in, and how each weight is brought there.
//!
//! Weights are stored on disk only as Safetensors; at load each matrix is quantized in memory, one
//! tensor at a time, into the format asked for. A matrix whose row length does not fit the format's
//! block size falls back to the nearest format that fits (as llama.cpp does), and the fallback is
//! reported so that `--verbose` can show it.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};

use crate::kernels::{Activations, Format, PackedMatrix, Scratch};

/// A format weights run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quant {
    /// 32-bit floats, dense matmuls.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks of 32 with one f16 scale.
    Q8_0,
    /// 4-bit blocks of 32 with one scale.
    Q4_0,
    /// 4-bit blocks of 32 with a scale and a minimum.
    Q4_1,
    /// 5-bit blocks of 32 with one scale (a fallback for `q4k`).
    Q5_0,
    /// 5-bit blocks of 32 with a scale and a minimum (a fallback for `q5k`).
    Q5_1,
    /// 4-bit k-quant, super-blocks of 256.
    Q4K,
    /// 5-bit k-quant, super-blocks of 256.
    Q5K,
    /// 6-bit k-quant, super-blocks of 256.
    Q6K,
}

/// Every format, in the order `--quant` lists them.
pub const ALL: [Quant; 11] = [
    Quant::F32,
    Quant::F16,
    Quant::Bf16,
    Quant::Q8_0,
    Quant::Q4_0,
    Quant::Q4_1,
    Quant::Q5_0,
    Quant::Q5_1,
    Quant::Q4K,
    Quant::Q5K,
    Quant::Q6K,
];

/// Not a format name.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown quantization {0:?}: use one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4k, q5k, q6k"
)]
pub struct UnknownQuant(pub String);

impl FromStr for Quant {
    type Err = UnknownQuant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let q = match lower.as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            "q5_0" => Self::Q5_0,
            "q5_1" => Self::Q5_1,
            "q4k" | "q4_k" => Self::Q4K,
            "q5k" | "q5_k" => Self::Q5K,
            "q6k" | "q6_k" => Self::Q6K,
            _ => return Err(UnknownQuant(s.to_owned())),
        };
        Ok(q)
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Quant {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q4K => "q4k",
            Self::Q5K => "q5k",
            Self::Q6K => "q6k",
        }
    }

    /// candle's (ggml's) type for this format.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// The format of sanctum's own kernels ([`crate::kernels`]) for it on the CPU, if any.
    pub fn packed_format(self) -> Option<Format> {
        match self {
            Self::Q8_0 => Some(Format::Q8_0),
            Self::Q4_0 => Some(Format::Q4_0),
            Self::Q4_1 => Some(Format::Q4_1),
            Self::Q5_0 => Some(Format::Q5_0),
            Self::Q4K => Some(Format::Q4K),
            Self::Q6K => Some(Format::Q6K),
            _ => None,
        }
    }

    /// Weights per block: a row's length must be a multiple of it.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// What a row's length must be a multiple of: the block size, or two blocks for the formats
    /// whose candle kernels take blocks in pairs (q4_1, q5_0, q5_1 assert an even block count).
    pub fn row_multiple(self) -> usize {
        match self {
            Self::Q4_1 | Self::Q5_0 | Self::Q5_1 => 2 * self.block_size(),
            _ => self.block_size(),
        }
    }

    /// Storage cost in bits per weight.
    pub fn bits_per_weight(self) -> f64 {
        let ggml = self.ggml();
        ggml.type_size() as f64 * 8.0 / ggml.block_size() as f64
    }

    /// True for the 4- and 5-bit formats, whose error llama.cpp keeps out of the output head.
    fn is_low_bit(self) -> bool {
        matches!(
            self,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q4K | Self::Q5K
        )
    }

    /// The next format to try when a row does not fit this one's blocks (llama.cpp's choices).
    pub fn fallback(self) -> Option<Self> {
        match self {
            Self::Q4K => Some(Self::Q5_0),
            Self::Q5K => Some(Self::Q5_1),
            Self::Q6K => Some(Self::Q8_0),
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 => Some(Self::F16),
            Self::F16 | Self::Bf16 => Some(Self::F32),
            Self::F32 => None,
        }
    }

    /// This format if rows of `row_len` fit its blocks, else the first fallback that fits.
    pub fn fitting(self, row_len: usize) -> Self {
        let mut q = self;
        while !row_len.is_multiple_of(q.row_multiple()) {
            match q.fallback() {
                Some(next) => q = next,
                None => break,
            }
        }
        q
    }
}

/// The format a checkpoint of floats (f32, f16, bf16, what Hugging Face repositories ship) runs in
/// when none is asked for; one stored in a block format sanctum's kernels run keeps it
/// ([`crate::models::llama::auto_quant`]).
///
/// Measured with `sanctum bench --quality` (docs/performance.md, SmolLM2-135M, 1024 positions of
/// a license text against f32): q8_0 with 16-bit activations (the default
/// [`crate::kernels::Activations::Int16`]) has a mean KL divergence of 0.0014 and the f32 top token
/// at 98% of positions, keeps f32's capital-of-France answer, and generates about twice as fast as
/// candle's f16 (KL 0.000004); q4_0 is faster still but diverges 190 times more (0.27).
pub const AUTO_FOR_FLOATS: Quant = Quant::Q8_0;

/// What a weight matrix does, which decides how far it may be quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A projection inside a layer, or the token embedding table.
    Layer,
    /// The output head (logits); kept at 6 bits or more like llama.cpp does, since its error shows
    /// directly in every token's distribution.
    Output,
}

/// The format chosen for one weight, and why it differs from the one asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Tensor name in the checkpoint.
    pub tensor: String,
    /// The format asked for.
    pub requested: Quant,
    /// The format used.
    pub used: Quant,
    /// Why they differ (None when they do not).
    pub reason: Option<String>,
    /// How activations are quantized for it on sanctum's kernels (q8_0, q4_0, q4_1, q5_0, q4k, q6k on the CPU); candle's
    /// kernels quantize their own, to 8 bits.
    pub activations: Activations,
}

impl Choice {
    /// The choice, multiplied with `activations` on sanctum's kernels.
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        self
    }
}

/// Picks the format for one weight of shape `[rows, row_len]`.
pub fn choose(tensor: &str, requested: Quant, role: Role, row_len: usize) -> Choice {
    let (target, raised) = if role == Role::Output && requested.is_low_bit() {
        (Quant::Q6K, true)
    } else {
        (requested, false)
    };
    let used = target.fitting(row_len);
    let reason = match (raised, used == target) {
        (false, true) => None,
        (false, false) => Some(format!(
            "rows of {row_len} are not a multiple of {} as {target} needs",
            target.row_multiple()
        )),
        (true, true) => Some("output head kept at 6 bits".to_owned()),
        (true, false) => Some(format!(
            "output head kept at 6 bits; rows of {row_len} are not a multiple of {} as {target} needs",
            target.row_multiple()
        )),
    };
    Choice {
        tensor: tensor.to_owned(),
        requested,
        used,
        reason,
        activations: Activations::default(),
    }
}

/// A weight matrix ready for matmuls: on candle's kernels, or, for q8_0, q4_0, q4_1, q5_0, q4k and q6k on the CPU, on
/// sanctum's own ([`crate::kernels`]), which tile batched prompts and multiply 4-6x faster there.
#[derive(Debug, Clone)]
pub enum Matrix {
    /// Dense f32, or a ggml block tensor multiplied by candle.
    Candle(QMatMul),
    /// q8_0, q4_0, q4_1, q5_0, q4k or q6k packed for [`crate::kernels`].
    Packed(Arc<PackedMatrix>),
}

thread_local! {
    /// Quantized activations reused by every packed matmul on this thread.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl Matrix {
    /// Bytes the matrix takes in memory.
    pub fn bytes(&self) -> u64 {
        let bytes = match self {
            Self::Packed(p) => p.bytes(),
            Self::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        };
        bytes as u64
    }

    /// `x · Wᵀ` for `x` of shape `[..., cols]` (f32 for packed matrices).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let packed = match self {
            Self::Candle(m) => return m.forward(x),
            Self::Packed(p) => p,
        };
        let mut dims = x.dims().to_vec();
        let input = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut y = vec![0f32; input.len() / packed.cols() * packed.rows()];
        SCRATCH
            .with_borrow_mut(|scratch| packed.matmul(&input, &mut y, scratch))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if let Some(last) = dims.last_mut() {
            *last = packed.rows();
        }
        Tensor::from_vec(y, dims, x.device())
    }

    /// The rows `ids` (`[batch, seq]`) as `[batch, seq, cols]` f32: the embedding lookup.
    pub fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let packed = match self {
            Self::Candle(m) => return m.embedding(ids),
            Self::Packed(p) => p,
        };
        let (batch, seq) = ids.dims2()?;
        let cols = packed.cols();
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let mut out = vec![0f32; ids.len() * cols];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(cols)) {
            let id = id as usize;
            if id >= packed.rows() {
                candle_core::bail!("token id {id} is outside the {} rows", packed.rows());
            }
            packed.dequantize_row(id, row);
        }
        Tensor::from_vec(out, (batch, seq, cols), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for q in ALL {
            assert_eq!(q.name().parse::<Quant>().ok(), Some(q));
        }
        assert_eq!("Q4_K".parse::<Quant>().ok(), Some(Quant::Q4K));
        assert!("q3k".parse::<Quant>().is_err());
    }

    #[test]
    fn k_quants_fall_back_on_rows_of_576() {
        assert_eq!(Quant::Q4K.fitting(576), Quant::Q5_0);
        assert_eq!(Quant::Q5K.fitting(576), Quant::Q5_1);
        assert_eq!(Quant::Q6K.fitting(576), Quant::Q8_0);
        assert_eq!(Quant::Q4K.fitting(1536), Quant::Q4K);
        assert_eq!(Quant::Q8_0.fitting(48), Quant::F16);
        assert_eq!(Quant::Q8_0.fitting(64), Quant::Q8_0);
        assert_eq!(Quant::Q4_1.fitting(288), Quant::F16);
        assert_eq!(Quant::Q4_0.fitting(288), Quant::Q4_0);
    }

    #[test]
    fn output_head_keeps_six_bits() {
        let c = choose("lm_head.weight", Quant::Q4_0, Role::Output, 576);
        assert_eq!(c.used, Quant::Q8_0);
        assert!(c.reason.is_some());
        let c = choose("lm_head.weight", Quant::Q8_0, Role::Output, 576);
        assert_eq!(c.used, Quant::Q8_0);
        assert_eq!(c.reason, None);
        let c = choose("x", Quant::Q4_0, Role::Layer, 576);
        assert_eq!((c.used, c.reason), (Quant::Q4_0, None));
    }
}
