//! The Llama family (Llama 2/3.x, SmolLM, Mistral, Qwen2/2.5) from Hugging Face checkpoints, with
//! every matrix quantized in memory at load.
//!
//! Weights keep the Hugging Face layout (`model.layers.N.self_attn.q_proj.weight`, rotary embedding
//! on the two halves of each head), so nothing is permuted. Qwen2 differs only by biases on the q, k,
//! v projections; Mistral's sliding window equals or exceeds the contexts run here.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, IndexOp, Result, Tensor};
use serde::Deserialize;

use super::config::{self, ConfigError, ModelConfig};
use crate::kernels::ops::{self, AttentionShape, CacheValue};
use crate::kernels::{self, Activations, PackedMatrix, Scratch};
use crate::quant::{self, Choice, Matrix, Quant, Role};
use crate::weights::{Plan, TensorHeader, Weights};
use half::f16;

/// The variants of the family, as `config.json` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM`: biases on q, k and v.
    Qwen2,
}

/// `config.json` of a Llama-family checkpoint (the fields used here).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (Llama 3.1+ `llama3`, or `linear`).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model was trained for.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// The output head reuses the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v and o (Llama); Qwen2 has q, k, v biases without this field.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Biases in the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation; only `silu` is supported.
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

/// `rope_scaling` in `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    /// `llama3`, `linear` or `default`.
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Scaling factor.
    #[serde(default = "one")]
    pub factor: f64,
    /// Llama 3: low-frequency factor.
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    /// Llama 3: high-frequency factor.
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    /// Llama 3: the context the base model was trained for.
    #[serde(default)]
    pub original_max_position_embeddings: Option<f64>,
}

impl ModelConfig for Config {
    /// The ranges this implementation runs: every width, count and constant that the loader and
    /// the rotary embedding divide by, allocate from or exponentiate.
    fn validate(&self) -> std::result::Result<(), ConfigError> {
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return Err(ConfigError::new(
                "hidden_act",
                format!("{act:?}"),
                "only silu is supported",
            ));
        }
        config::count("hidden_size", self.hidden_size, 1..=config::MAX_WIDTH)?;
        config::count(
            "intermediate_size",
            self.intermediate_size,
            1..=config::MAX_WIDTH,
        )?;
        config::count(
            "num_hidden_layers",
            self.num_hidden_layers,
            1..=config::MAX_COUNT,
        )?;
        config::count("vocab_size", self.vocab_size, 1..=config::MAX_POSITIONS)?;
        let heads = self.num_attention_heads;
        config::count("num_attention_heads", heads, 1..=config::MAX_COUNT)?;
        config::divides(
            "num_key_value_heads",
            self.kv_heads(),
            "num_attention_heads",
            heads,
        )?;
        match self.head_dim {
            Some(d) => config::count("head_dim", d, 2..=config::MAX_COUNT)?,
            None => config::divides(
                "num_attention_heads",
                heads,
                "hidden_size",
                self.hidden_size,
            )?,
        }
        let head_dim = self.head_dim();
        if !head_dim.is_multiple_of(2) || head_dim == 0 {
            return Err(ConfigError::new(
                "head_dim",
                head_dim,
                "it must be even and positive (rotary embedding pairs)",
            ));
        }
        if let Some(max) = self.max_position_embeddings {
            config::count("max_position_embeddings", max, 1..=config::MAX_POSITIONS)?;
        }
        config::positive("rms_norm_eps", self.rms_norm_eps, 1.0)?;
        config::positive("rope_theta", self.rope_theta, f64::MAX)?;
        if let Some(s) = &self.rope_scaling {
            match s.rope_type.as_str() {
                "default" => {}
                "linear" => config::positive("rope_scaling.factor", s.factor, f64::MAX)?,
                "llama3" => {
                    config::positive("rope_scaling.factor", s.factor, f64::MAX)?;
                    config::positive("rope_scaling.low_freq_factor", s.low_freq_factor, f64::MAX)?;
                    config::positive(
                        "rope_scaling.high_freq_factor",
                        s.high_freq_factor,
                        f64::MAX,
                    )?;
                    if s.high_freq_factor <= s.low_freq_factor {
                        return Err(ConfigError::new(
                            "rope_scaling.high_freq_factor",
                            s.high_freq_factor,
                            format!(
                                "it must be above rope_scaling.low_freq_factor ({})",
                                s.low_freq_factor
                            ),
                        ));
                    }
                    if let Some(original) = s.original_max_position_embeddings {
                        config::positive(
                            "rope_scaling.original_max_position_embeddings",
                            original,
                            config::MAX_POSITIONS as f64,
                        )?;
                    }
                }
                other => {
                    return Err(ConfigError::new(
                        "rope_scaling.rope_type",
                        format!("{other:?}"),
                        "it must be llama3, linear or default",
                    ));
                }
            }
        }
        Ok(())
    }
}

fn one() -> f64 {
    1.0
}

fn four() -> f64 {
    4.0
}

impl Config {
    /// Query heads' width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Inverse frequencies of the rotary embedding, after scaling.
    fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim();
        let base: Vec<f64> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f64 / d as f64))
            .collect();
        let scaled: Vec<f64> = match &self.rope_scaling {
            Some(s) if s.rope_type == "linear" => base.iter().map(|f| f / s.factor).collect(),
            Some(s) if s.rope_type == "llama3" => {
                let original = s.original_max_position_embeddings.unwrap_or(8192.0);
                let low_wavelen = original / s.low_freq_factor;
                let high_wavelen = original / s.high_freq_factor;
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / s.factor
                        } else {
                            let smooth = (original / wavelen - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * freq / s.factor + smooth * freq
                        }
                    })
                    .collect()
            }
            _ => base,
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }
}

/// A linear layer: a (possibly quantized) weight and an optional bias.
#[derive(Debug, Clone)]
struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Growing key/value cache of one layer on candle's path, `[batch, kv_heads, positions, head_dim]`.
#[derive(Debug, Clone, Default)]
struct CandleKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

/// Positions the cache grows by at least.
const CACHE_CHUNK: usize = 256;

impl CandleKv {
    fn append(&mut self, k: &Tensor, v: &Tensor, max: usize) -> Result<(Tensor, Tensor)> {
        let add = k.dim(2)?;
        let need = self.len + add;
        let cap = match &self.k {
            Some(t) => t.dim(2)?,
            None => 0,
        };
        if need > cap {
            let new_cap = need
                .next_multiple_of(CACHE_CHUNK)
                .max(cap * 2)
                .min(max.max(need));
            self.k = Some(Self::grow(self.k.as_ref(), k, self.len, new_cap)?);
            self.v = Some(Self::grow(self.v.as_ref(), v, self.len, new_cap)?);
        }
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else {
            candle_core::bail!("kv cache not allocated")
        };
        kb.slice_set(k, 2, self.len)?;
        vb.slice_set(v, 2, self.len)?;
        self.len = need;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }

    fn grow(old: Option<&Tensor>, like: &Tensor, len: usize, cap: usize) -> Result<Tensor> {
        let mut shape = like.dims().to_vec();
        shape[2] = cap;
        let buf = Tensor::zeros(shape, like.dtype(), like.device())?;
        if let Some(old) = old
            && len > 0
        {
            buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        }
        Ok(buf)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A loaded Llama-family model: weights only, shared by every sequence that runs on it (each has
/// its own [`Cache`]), so one loaded model serves many requests.
#[derive(Debug, Clone)]
pub struct Llama {
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Matrix,
    cos: Tensor,
    sin: Tensor,
    eps: f32,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    context: usize,
    vocab: usize,
    device: Device,
    /// The CPU path, when every matrix is on sanctum's kernels; candle's ops otherwise.
    cpu: Option<CpuModel>,
    /// What the CPU path's caches hold.
    kv_precision: KvPrecision,
}

/// Takes the built tensors out of [`Weights`], checking each one's shape.
struct Loader<'a> {
    weights: &'a mut Weights,
    choices: Vec<Choice>,
}

impl Loader<'_> {
    /// A vector (norm weight, bias), f32 on the device.
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let t = self.weights.dense(name)?;
        if t.dims() != [len] {
            candle_core::bail!("{name}: shape {:?}, expected [{len}]", t.dims());
        }
        Ok(t)
    }

    /// A `[rows, cols]` matrix in the format its plan chose.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let (m, choice) = self.weights.matrix(name)?;
        let dims = match &m {
            Matrix::Packed(p) => vec![p.rows(), p.cols()],
            Matrix::Candle(QMatMul::QTensor(q)) => q.shape().dims().to_vec(),
            Matrix::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims().to_vec(),
        };
        if dims != [rows, cols] {
            candle_core::bail!("{name}: shape {dims:?}, expected [{rows}, {cols}]");
        }
        self.choices.push(choice);
        Ok(m)
    }

    fn linear(&mut self, name: &str, rows: usize, cols: usize, bias: bool) -> Result<Linear> {
        let weight = self.matrix(&format!("{name}.weight"), rows, cols)?;
        let bias = if bias {
            Some(self.vector(&format!("{name}.bias"), rows)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}

/// The names of a layer's weight matrices, after `model.layers.N.`.
const LAYER_MATRICES: [&str; 7] = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

/// How a checkpoint's tensors are built for [`Llama::load`]: weight matrices in `quant` (the
/// output head, and the embedding table when it is the head too, at 6 bits or more unless the
/// file already stores them in `quant`: a second rounding would only add error), norms and
/// biases as f32, anything else skipped; matrices on sanctum's kernels multiply `activations`.
/// With `keep_stored` (`--quant auto`), a matrix stored in a block format sanctum's kernels run
/// keeps it, as llama.cpp runs a GGUF's mix (Q4_K_M: q4_K, q6_K, q5_0, q8_0) tensor by tensor.
/// `tied` says the embedding table is the output head.
pub fn plan(
    tensors: &[TensorHeader],
    quant: Quant,
    keep_stored: bool,
    activations: Activations,
    tied: bool,
) -> Vec<Plan> {
    tensors
        .iter()
        .map(|t| {
            let name = t.name.as_str();
            let stored = kernel_format(t.blocks);
            let fits = |q: Quant| matches!(t.shape.as_slice(), [_, cols] if q.fitting(*cols) == q);
            let quant = match stored {
                Some(q) if keep_stored && fits(q) => q,
                _ => quant,
            };
            let stored_as_asked = t.blocks == Some(quant.ggml());
            let matrix = |role| match t.shape.as_slice() {
                [_, cols] if stored_as_asked => Plan::Matrix(
                    quant::choose(name, quant, Role::Layer, *cols).with_activations(activations),
                ),
                [_, cols] => Plan::Matrix(
                    quant::choose(name, quant, role, *cols).with_activations(activations),
                ),
                _ => Plan::Dense,
            };
            if name == "model.embed_tokens.weight" {
                return matrix(if tied { Role::Output } else { Role::Layer });
            }
            if name == "lm_head.weight" {
                return if tied {
                    Plan::Skip
                } else {
                    matrix(Role::Output)
                };
            }
            if name == "model.norm.weight" {
                return Plan::Dense;
            }
            let Some(rest) = name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once('.'))
                .map(|(_, rest)| rest)
            else {
                return Plan::Skip;
            };
            if LAYER_MATRICES.contains(&rest) {
                matrix(Role::Layer)
            } else if rest.ends_with("layernorm.weight") || rest.ends_with(".bias") {
                Plan::Dense
            } else {
                Plan::Skip
            }
        })
        .collect()
}

/// The format `auto` runs a checkpoint in: the block format most of its layer matrices are stored
/// in when sanctum's own kernels run it (the weights as published, with nothing to quantize at
/// load; matrices stored in another such format keep theirs, see [`plan`]), else
/// [`quant::AUTO_FOR_FLOATS`].
pub fn auto_quant(tensors: &[TensorHeader]) -> Quant {
    let mut stored: Vec<(Option<GgmlDType>, usize)> = Vec::new();
    for t in tensors {
        let is_layer_matrix = t
            .name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(_, rest)| LAYER_MATRICES.contains(&rest));
        if !is_layer_matrix {
            continue;
        }
        match stored.iter_mut().find(|(b, _)| *b == t.blocks) {
            Some((_, n)) => *n += t.elements(),
            None => stored.push((t.blocks, t.elements())),
        }
    }
    let most = stored.iter().max_by_key(|(_, n)| *n).and_then(|(b, _)| *b);
    kernel_format(most).unwrap_or(quant::AUTO_FOR_FLOATS)
}

/// The format a tensor stored in `blocks` runs in unchanged on sanctum's own kernels, if any.
fn kernel_format(blocks: Option<GgmlDType>) -> Option<Quant> {
    quant::ALL
        .into_iter()
        .find(|q| blocks == Some(q.ggml()) && q.packed_format().is_some())
}

/// Whether the output head is the embedding table: the config says so, or no weight file has an
/// `lm_head.weight` (the index of a sharded checkpoint names every tensor; a single file's header
/// is its list, seen when it streams in).
#[derive(Debug, Clone, Copy)]
pub struct HeadTying {
    tied: bool,
    single_file: bool,
}

/// `model.safetensors.index.json` of a sharded checkpoint: which file holds each tensor.
#[derive(Debug, Deserialize)]
struct WeightIndex {
    weight_map: std::collections::HashMap<String, String>,
}

impl HeadTying {
    /// What the config and the index (if any) say.
    pub fn new(
        model: &(impl attest::verify::ModelFiles + ?Sized),
        config: &Config,
    ) -> std::result::Result<Self, super::LoadError> {
        let index: Option<WeightIndex> =
            super::optional_json(model, "model.safetensors.index.json")?;
        let mut tied = config.tie_word_embeddings;
        if let Some(index) = &index {
            tied |= !index.weight_map.contains_key("lm_head.weight");
        }
        let single_file = index.is_none() && model.weight_files().len() == 1;
        Ok(Self { tied, single_file })
    }

    /// True when the embedding table is the output head.
    pub fn tied(&self) -> bool {
        self.tied
    }

    /// [`plan`] for one weight file's tensors, learning from a single file's header whether it
    /// has a head of its own.
    pub fn plan(
        &mut self,
        tensors: &[TensorHeader],
        quant: Quant,
        keep_stored: bool,
        activations: Activations,
    ) -> Vec<Plan> {
        if self.single_file && !tensors.iter().any(|t| t.name == "lm_head.weight") {
            self.tied = true;
        }
        plan(tensors, quant, keep_stored, activations, self.tied)
    }
}

impl Llama {
    /// Assembles the model from tensors built by [`plan`] (on `device`). `context` is the most
    /// positions it will ever hold. Returns the format chosen per matrix.
    pub fn load(
        config: &Config,
        variant: Variant,
        weights: &mut Weights,
        tied: bool,
        device: &Device,
        context: usize,
    ) -> Result<(Self, Vec<Choice>)> {
        if let Err(problem) = config.validate() {
            candle_core::bail!("config.json: {problem}");
        }
        let (hidden, head_dim) = (config.hidden_size, config.head_dim());
        let (heads, kv_heads) = (config.num_attention_heads, config.kv_heads());
        let qkv_bias = config.attention_bias.unwrap_or(variant == Variant::Qwen2);
        let o_bias = config.attention_bias.unwrap_or(false) && variant != Variant::Qwen2;
        let mut loader = Loader {
            weights,
            choices: Vec::new(),
        };
        let embed = loader.matrix("model.embed_tokens.weight", config.vocab_size, hidden)?;
        let lm_head = if tied {
            embed.clone()
        } else {
            loader.matrix("lm_head.weight", config.vocab_size, hidden)?
        };
        let inter = config.intermediate_size;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: loader.vector(&format!("{p}.input_layernorm.weight"), hidden)?,
                post_attention_norm: loader
                    .vector(&format!("{p}.post_attention_layernorm.weight"), hidden)?,
                q: loader.linear(
                    &format!("{p}.self_attn.q_proj"),
                    heads * head_dim,
                    hidden,
                    qkv_bias,
                )?,
                k: loader.linear(
                    &format!("{p}.self_attn.k_proj"),
                    kv_heads * head_dim,
                    hidden,
                    qkv_bias,
                )?,
                v: loader.linear(
                    &format!("{p}.self_attn.v_proj"),
                    kv_heads * head_dim,
                    hidden,
                    qkv_bias,
                )?,
                o: loader.linear(
                    &format!("{p}.self_attn.o_proj"),
                    hidden,
                    heads * head_dim,
                    o_bias,
                )?,
                gate: loader.linear(
                    &format!("{p}.mlp.gate_proj"),
                    inter,
                    hidden,
                    config.mlp_bias,
                )?,
                up: loader.linear(&format!("{p}.mlp.up_proj"), inter, hidden, config.mlp_bias)?,
                down: loader.linear(
                    &format!("{p}.mlp.down_proj"),
                    hidden,
                    inter,
                    config.mlp_bias,
                )?,
            });
        }
        let norm = loader.vector("model.norm.weight", hidden)?;

        let inv_freq = config.inv_freq();
        let half = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), &Device::Cpu)?;
        let positions = Tensor::arange(0u32, context as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((context, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        let cos = freqs.cos()?;
        let sin = freqs.sin()?;
        let cpu = CpuModel::new(&embed, &lm_head, &layers, &norm, &cos, &sin)?;
        let cos = cos.to_device(device)?;
        let sin = sin.to_device(device)?;

        let model = Self {
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            eps: config.rms_norm_eps as f32,
            heads,
            kv_heads,
            head_dim,
            context,
            vocab: config.vocab_size,
            device: device.clone(),
            cpu,
            kv_precision: KvPrecision::default(),
        };
        Ok((model, loader.choices))
    }

    /// Most positions the model holds (prompt and generated tokens together).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// An empty key/value cache for one sequence on this model.
    pub fn new_cache(&self) -> Cache {
        let layer = LayerCache {
            candle: CandleKv::default(),
            cpu: CpuCache::new(self.kv_precision),
        };
        Cache {
            layers: vec![layer; self.layers.len()],
            cached: 0,
        }
    }

    /// What the CPU path's key/value caches hold; None on candle's path, which keeps its own
    /// dtype.
    pub fn kv_precision(&self) -> Option<KvPrecision> {
        self.cpu.as_ref().map(|_| self.kv_precision)
    }

    /// What the CPU path's key/value caches made from now on hold (candle's path keeps its own
    /// dtype).
    pub fn set_kv_precision(&mut self, precision: KvPrecision) {
        self.kv_precision = precision;
    }

    /// Feeds `tokens` after the ones in `cache`; returns the logits (`[vocab]`) that follow the
    /// last. `work` holds the intermediate buffers and can be shared by any caches of this model.
    pub fn forward(
        &self,
        cache: &mut Cache,
        work: &mut Workspace,
        tokens: &[u32],
    ) -> Result<Vec<f32>> {
        let mut one = [(cache, tokens)];
        self.forward_batch(&mut one, work)
    }

    /// Feeds `tokens` after the ones in `cache`, as [`Self::forward`], and returns the logits after
    /// every one of them, `[tokens.len(), vocab]`: what perplexity and divergence measurements
    /// read ([`crate::quality`]).
    pub fn forward_all(
        &self,
        cache: &mut Cache,
        work: &mut Workspace,
        tokens: &[u32],
    ) -> Result<Vec<f32>> {
        self.check_room(cache, tokens.len())?;
        let Some(cpu) = &self.cpu else {
            let logits = self.forward_candle(cache, tokens, Logits::Every)?;
            return logits.flatten_all()?.to_vec1::<f32>();
        };
        let shape = self.cpu_shape();
        let mut one = [(cache, tokens)];
        kernels::on_pool(|| {
            Ok(cpu
                .run(shape, &mut one, Logits::Every, &mut work.bufs)?
                .to_vec())
        })
    }

    /// Several sequences in one pass: each `(cache, tokens)` feeds `tokens` after the positions in
    /// `cache` (one token for a decode step, or a piece of a prompt), and returns the logits after
    /// each sequence's last token, `[batch.len(), vocab]`. On the CPU path every matrix is read
    /// once for all of them (a GEMM over every token of the batch); each sequence's numbers are
    /// exactly those it gets alone. candle's path runs the sequences one after the other.
    pub fn forward_batch(
        &self,
        batch: &mut [(&mut Cache, &[u32])],
        work: &mut Workspace,
    ) -> Result<Vec<f32>> {
        for (cache, tokens) in batch.iter() {
            self.check_room(cache, tokens.len())?;
        }
        let Some(cpu) = &self.cpu else {
            let mut logits = Vec::with_capacity(batch.len() * self.vocab);
            for (cache, tokens) in batch.iter_mut() {
                let last = self.forward_candle(cache, tokens, Logits::Last)?;
                logits.extend(last.flatten_all()?.to_vec1::<f32>()?);
            }
            return Ok(logits);
        };
        // The CPU path runs on a pool worker: from outside the pool every matmul's parallel loop
        // would cost a hand-off and a wake-up, a third of generation's time. candle's ops run
        // slower from inside it (q4k tg128: 101 vs 117 tokens/s), so they stay outside.
        let shape = self.cpu_shape();
        kernels::on_pool(|| {
            Ok(cpu
                .run(shape, batch, Logits::Last, &mut work.bufs)?
                .to_vec())
        })
    }

    fn check_room(&self, cache: &Cache, seq: usize) -> Result<()> {
        if seq == 0 {
            candle_core::bail!("forward needs at least one token");
        }
        if cache.cached + seq > self.context {
            candle_core::bail!(
                "{} positions exceed the context of {}",
                cache.cached + seq,
                self.context
            );
        }
        Ok(())
    }

    fn cpu_shape(&self) -> HeadShape {
        HeadShape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            eps: self.eps,
        }
    }

    /// candle's forward pass: the logits after the last token (`[vocab]`) or after every one
    /// (`[seq, vocab]`).
    fn forward_candle(&self, cache: &mut Cache, tokens: &[u32], logits: Logits) -> Result<Tensor> {
        self.check_room(cache, tokens.len())?;
        let (seq, pos) = (tokens.len(), cache.cached);
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.embedding(&ids)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let mask = if seq > 1 {
            Some(causal_mask(seq, pos, &self.device)?)
        } else {
            None
        };
        let shape = self.cpu_shape();
        for (layer, kv) in self.layers.iter().zip(&mut cache.layers) {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, shape.eps)?;
            let attn = attention(
                layer,
                &mut kv.candle,
                &h,
                (&cos, &sin),
                mask.as_ref(),
                shape,
                self.context,
            )?;
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_attention_norm, shape.eps)?;
            let gate = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
            let mlp = layer.down.forward(&(gate * layer.up.forward(&h)?)?)?;
            x = (x + mlp)?;
        }
        cache.cached = pos + seq;
        let rows = match logits {
            Logits::Last => x.i((.., seq - 1, ..))?.contiguous()?,
            Logits::Every => x,
        };
        let rows = candle_nn::ops::rms_norm(&rows, &self.norm, shape.eps)?;
        let logits = self.lm_head.forward(&rows)?;
        logits.squeeze(0)?.to_dtype(DType::F32)
    }
}

/// Which positions a forward pass computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Logits {
    /// Each sequence's last token (generation).
    Last,
    /// Every token (of one sequence).
    Every,
}

/// The key/value cache of one sequence: what it has seen, kept between calls so that each new
/// token costs one position. Made by [`Llama::new_cache`].
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<LayerCache>,
    cached: usize,
}

impl Cache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.cached
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.cached == 0
    }

    /// Forgets every position after the first `len`.
    pub fn truncate(&mut self, len: usize) {
        self.cached = self.cached.min(len);
        for layer in &mut self.layers {
            layer.candle.len = self.cached;
        }
    }

    /// Forgets everything and frees the memory.
    pub fn clear(&mut self) {
        self.cached = 0;
        for layer in &mut self.layers {
            layer.candle = CandleKv::default();
            layer.cpu = CpuCache::new(layer.cpu.precision());
        }
    }
}

/// What the CPU path's key/value cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPrecision {
    /// Half the memory of f32 and close to its answers: llama.cpp's default.
    #[default]
    F16,
    /// The keys and values exactly as computed.
    F32,
}

impl KvPrecision {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }
}

impl std::fmt::Display for KvPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Not a key/value cache precision.
#[derive(Debug, thiserror::Error)]
#[error("unknown key/value cache precision {0:?}: use f16 or f32")]
pub struct UnknownKvPrecision(pub String);

impl std::str::FromStr for KvPrecision {
    type Err = UnknownKvPrecision;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            _ => Err(UnknownKvPrecision(s.to_owned())),
        }
    }
}

/// One layer's keys and values: candle tensors on candle's path, plain vectors on the CPU path.
#[derive(Debug, Clone)]
struct LayerCache {
    candle: CandleKv,
    cpu: CpuCache,
}

/// The CPU path's keys and values of one layer in the precision asked for.
#[derive(Debug, Clone)]
enum CpuCache {
    F16(CpuKv<f16>),
    F32(CpuKv<f32>),
}

impl CpuCache {
    fn new(precision: KvPrecision) -> Self {
        match precision {
            KvPrecision::F16 => Self::F16(CpuKv::default()),
            KvPrecision::F32 => Self::F32(CpuKv::default()),
        }
    }

    fn precision(&self) -> KvPrecision {
        match self {
            Self::F16(_) => KvPrecision::F16,
            Self::F32(_) => KvPrecision::F32,
        }
    }

    /// [`CpuKv::append`]; returns the capacity after it.
    fn append(
        &mut self,
        k: &[f32],
        v: &[f32],
        pos: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        match self {
            Self::F16(c) => c.append(k, v, pos, kv_heads, head_dim),
            Self::F32(c) => c.append(k, v, pos, kv_heads, head_dim),
        }
    }

    /// [`ops::attention`] over the cached keys and values.
    fn attention(
        &self,
        shape: ops::AttentionShape,
        q: &[f32],
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        match self {
            Self::F16(c) => ops::attention(shape, q, &c.keys, &c.values, out, scratch),
            Self::F32(c) => ops::attention(shape, q, &c.keys, &c.values, out, scratch),
        }
    }
}

/// Keys and values `[kv_heads, capacity, head_dim]` (head-major, so attention streams each head's
/// keys), grown as positions arrive.
#[derive(Debug, Clone, Default)]
struct CpuKv<T> {
    keys: Vec<T>,
    values: Vec<T>,
    capacity: usize,
}

/// Buffers a forward pass reuses from call to call, so that a generated token allocates nothing
/// once they have grown. One is enough for any number of sequences run one call at a time.
#[derive(Debug, Clone, Default)]
pub struct Workspace {
    bufs: Buffers,
}

/// The attention sizes and norm epsilon every forward pass needs.
#[derive(Debug, Clone, Copy)]
struct HeadShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

/// One decoder layer on the CPU path: the packed matrices (shared with the candle path's
/// [`Layer`]) and its norms as plain vectors.
#[derive(Debug, Clone)]
struct CpuLayer {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    q: CpuLinear,
    k: CpuLinear,
    v: CpuLinear,
    o: CpuLinear,
    gate: CpuLinear,
    up: CpuLinear,
    down: CpuLinear,
}

/// A packed weight and its bias (Qwen2's q, k and v have one), on the CPU path.
#[derive(Debug, Clone)]
struct CpuLinear {
    weight: Arc<PackedMatrix>,
    bias: Option<Vec<f32>>,
}

impl CpuLinear {
    /// The CPU path's form of `l`, or None when its weight is not on sanctum's kernels.
    fn new(l: &Linear) -> Result<Option<Self>> {
        let Matrix::Packed(weight) = &l.weight else {
            return Ok(None);
        };
        let bias = match &l.bias {
            Some(b) => Some(b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec1()?),
            None => None,
        };
        Ok(Some(Self {
            weight: weight.clone(),
            bias,
        }))
    }

    /// `y = x · wᵀ + bias` into `y`, sized to fit.
    fn forward(&self, x: &[f32], y: &mut Vec<f32>, scratch: &mut Scratch) -> Result<()> {
        matmul(&self.weight, x, y, scratch)?;
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(bias.len()) {
                add(row, bias);
            }
        }
        Ok(())
    }
}

impl<T: CacheValue> CpuKv<T> {
    /// Writes the keys and values of positions `pos..` (`[seq, kv_heads × head_dim]`), growing
    /// the cache by at least [`CACHE_CHUNK`] positions (or doubling) when it is full; returns the
    /// capacity.
    fn append(
        &mut self,
        k: &[f32],
        v: &[f32],
        pos: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        let width = kv_heads * head_dim;
        let seq = k.len() / width;
        if pos + seq > self.capacity {
            let capacity = (pos + seq)
                .next_multiple_of(CACHE_CHUNK)
                .max(2 * self.capacity);
            let grow = |old: &[T]| {
                let mut new = vec![T::default(); kv_heads * capacity * head_dim];
                for h in 0..kv_heads {
                    let n = pos * head_dim;
                    new[h * capacity * head_dim..][..n]
                        .copy_from_slice(&old[h * self.capacity * head_dim..][..n]);
                }
                new
            };
            self.keys = grow(&self.keys);
            self.values = grow(&self.values);
            self.capacity = capacity;
        }
        for (cache, new) in [(&mut self.keys, k), (&mut self.values, v)] {
            for (i, row) in new.chunks_exact(width).enumerate() {
                for (h, head) in row.chunks_exact(head_dim).enumerate() {
                    let at = &mut cache[(h * self.capacity + pos + i) * head_dim..][..head_dim];
                    for (c, &x) in at.iter_mut().zip(head) {
                        *c = T::from_f32(x);
                    }
                }
            }
        }
        self.capacity
    }
}

/// Buffers the CPU path reuses from call to call, so a generated token allocates nothing once they
/// have grown.
#[derive(Debug, Clone, Default)]
struct Buffers {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    attention: Vec<f32>,
    tokens: Vec<u32>,
    scratch: Scratch,
}

/// The forward pass on plain f32 buffers and sanctum's kernels, used on the CPU when every matrix
/// is on sanctum's kernels (q8_0, q4_0, q4_1, q5_0, q4_K); biases (Qwen2's) are added after their
/// matmuls. At one token per call candle's per-op overhead (a tensor and a dispatch per op, two
/// dozen ops per layer) cost as much as the matmuls.
#[derive(Debug, Clone)]
struct CpuModel {
    embed: Arc<PackedMatrix>,
    lm_head: Arc<PackedMatrix>,
    norm: Vec<f32>,
    /// `[context, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    layers: Vec<CpuLayer>,
}

impl CpuModel {
    /// The CPU path for these weights, or None when one of them is not on sanctum's kernels.
    fn new(
        embed: &Matrix,
        lm_head: &Matrix,
        layers: &[Layer],
        norm: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Option<Self>> {
        let (Matrix::Packed(embed), Matrix::Packed(lm_head)) = (embed, lm_head) else {
            return Ok(None);
        };
        let mut cpu_layers = Vec::with_capacity(layers.len());
        for l in layers {
            let (Some(q), Some(k), Some(v), Some(o), Some(gate), Some(up), Some(down)) = (
                CpuLinear::new(&l.q)?,
                CpuLinear::new(&l.k)?,
                CpuLinear::new(&l.v)?,
                CpuLinear::new(&l.o)?,
                CpuLinear::new(&l.gate)?,
                CpuLinear::new(&l.up)?,
                CpuLinear::new(&l.down)?,
            ) else {
                return Ok(None);
            };
            cpu_layers.push(CpuLayer {
                input_norm: l.input_norm.to_device(&Device::Cpu)?.to_vec1()?,
                post_attention_norm: l.post_attention_norm.to_device(&Device::Cpu)?.to_vec1()?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        Ok(Some(Self {
            embed: embed.clone(),
            lm_head: lm_head.clone(),
            norm: norm.to_device(&Device::Cpu)?.to_vec1()?,
            cos: cos.flatten_all()?.to_vec1()?,
            sin: sin.flatten_all()?.to_vec1()?,
            layers: cpu_layers,
        }))
    }

    /// The layers over every token of `batch` (see [`Llama::forward_batch`]): the matmuls take all
    /// rows at once; rope, the cache and attention go sequence by sequence. Logits are computed for
    /// each sequence's last row, and each cache advances by its tokens.
    fn run<'b>(
        &self,
        shape: HeadShape,
        batch: &mut [(&mut Cache, &[u32])],
        logits: Logits,
        b: &'b mut Buffers,
    ) -> Result<&'b [f32]> {
        b.tokens.clear();
        for (_, tokens) in batch.iter() {
            b.tokens.extend_from_slice(tokens);
        }
        let tokens = std::mem::take(&mut b.tokens);
        let result = self.layers_and_head(shape, batch, logits, b, &tokens);
        b.tokens = tokens;
        result?;
        for (cache, tokens) in batch.iter_mut() {
            cache.cached += tokens.len();
        }
        Ok(&b.logits)
    }

    fn layers_and_head(
        &self,
        shape: HeadShape,
        batch: &mut [(&mut Cache, &[u32])],
        logits: Logits,
        b: &mut Buffers,
        tokens: &[u32],
    ) -> Result<()> {
        let seq = tokens.len();
        let hidden = self.embed.cols();
        let half = shape.head_dim / 2;
        let (width, kv_width) = (
            shape.heads * shape.head_dim,
            shape.kv_heads * shape.head_dim,
        );
        b.x.resize(seq * hidden, 0.0);
        b.h.resize(seq * hidden, 0.0);
        for (&id, row) in tokens.iter().zip(b.x.chunks_exact_mut(hidden)) {
            let id = id as usize;
            if id >= self.embed.rows() {
                candle_core::bail!(
                    "token id {id} is outside the vocabulary of {}",
                    self.embed.rows()
                );
            }
            self.embed.dequantize_row(id, row);
        }

        for (li, layer) in self.layers.iter().enumerate() {
            ops::rms_norm(&b.x, &layer.input_norm, shape.eps, &mut b.h);
            layer.q.forward(&b.h, &mut b.q, &mut b.scratch)?;
            layer.k.forward(&b.h, &mut b.k, &mut b.scratch)?;
            layer.v.forward(&b.h, &mut b.v, &mut b.scratch)?;
            b.att.resize(b.q.len(), 0.0);
            let attention_shape = |pos, capacity, seq| AttentionShape {
                heads: shape.heads,
                kv_heads: shape.kv_heads,
                head_dim: shape.head_dim,
                pos,
                capacity,
                seq,
            };
            let mut row = 0;
            for (cache, tokens) in batch.iter_mut() {
                let (pos, n) = (cache.cached, tokens.len());
                let angles = pos * half..(pos + n) * half;
                let q = &mut b.q[row * width..][..n * width];
                let att = &mut b.att[row * width..][..n * width];
                let k = &mut b.k[row * kv_width..][..n * kv_width];
                let v = &b.v[row * kv_width..][..n * kv_width];
                ops::rope(
                    q,
                    shape.head_dim,
                    &self.cos[angles.clone()],
                    &self.sin[angles.clone()],
                );
                ops::rope(
                    k,
                    shape.head_dim,
                    &self.cos[angles.clone()],
                    &self.sin[angles],
                );
                let kv = &mut cache.layers[li].cpu;
                let capacity = kv.append(k, v, pos, shape.kv_heads, shape.head_dim);
                kv.attention(attention_shape(pos, capacity, n), q, att, &mut b.attention);
                row += n;
            }
            layer.o.forward(&b.att, &mut b.proj, &mut b.scratch)?;
            add(&mut b.x, &b.proj);
            ops::rms_norm(&b.x, &layer.post_attention_norm, shape.eps, &mut b.h);
            layer.gate.forward(&b.h, &mut b.gate, &mut b.scratch)?;
            layer.up.forward(&b.h, &mut b.up, &mut b.scratch)?;
            ops::silu_mul(&mut b.gate, &b.up);
            layer.down.forward(&b.gate, &mut b.proj, &mut b.scratch)?;
            add(&mut b.x, &b.proj);
        }
        // The last row of each sequence (or every row), normalized, through the output head.
        let rows = match logits {
            Logits::Every => {
                ops::rms_norm(&b.x, &self.norm, shape.eps, &mut b.h);
                seq
            }
            Logits::Last => {
                let mut end = 0;
                for (i, (_, tokens)) in batch.iter().enumerate() {
                    end += tokens.len();
                    let last = &b.x[(end - 1) * hidden..end * hidden];
                    ops::rms_norm(
                        last,
                        &self.norm,
                        shape.eps,
                        &mut b.h[i * hidden..(i + 1) * hidden],
                    );
                }
                batch.len()
            }
        };
        matmul(
            &self.lm_head,
            &b.h[..rows * hidden],
            &mut b.logits,
            &mut b.scratch,
        )?;
        Ok(())
    }
}

/// `y = x · wᵀ` into `y`, sized to fit.
fn matmul(w: &PackedMatrix, x: &[f32], y: &mut Vec<f32>, scratch: &mut Scratch) -> Result<()> {
    y.resize(x.len() / w.cols() * w.rows(), 0.0);
    w.matmul(x, y, scratch)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

fn add(x: &mut [f32], y: &[f32]) {
    for (x, &y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// Additive causal mask `[seq, pos + seq]`: query `i` (at position `pos + i`) sees keys `0..=pos + i`.
fn causal_mask(seq: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let kv = pos + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..kv).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, kv), device)
}

/// Self-attention of one layer on candle's ops, its keys and values appended to `kv`.
fn attention(
    layer: &Layer,
    kv: &mut CandleKv,
    x: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    mask: Option<&Tensor>,
    shape: HeadShape,
    context: usize,
) -> Result<Tensor> {
    let HeadShape {
        heads,
        kv_heads,
        head_dim,
        ..
    } = shape;
    let (b, seq, _) = x.dims3()?;
    let q = layer.q.forward(x)?;
    let k = layer.k.forward(x)?;
    let v = layer.v.forward(x)?;
    let q = q
        .reshape((b, seq, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?;
    let k = k
        .reshape((b, seq, kv_heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?;
    let v = v
        .reshape((b, seq, kv_heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?;
    let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
    let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
    let (k, v) = kv.append(&k, &v, context)?;
    let kv_len = k.dim(2)?;

    // Grouped-query attention without copying keys: the query heads sharing one key/value head
    // become rows of one matrix, `[b, kv_heads, group * seq, head_dim]`.
    let group = heads / kv_heads;
    let q = q.reshape((b, kv_heads, group * seq, head_dim))?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut att = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        att = att
            .reshape((b, kv_heads, group, seq, kv_len))?
            .broadcast_add(mask)?
            .reshape((b, kv_heads, group * seq, kv_len))?;
    }
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    let y = att.matmul(&v)?;
    let y = y
        .reshape((b, heads, seq, head_dim))?
        .transpose(1, 2)?
        .reshape((b, seq, heads * head_dim))?;
    layer.o.forward(&y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_sees_prefix_and_causal_triangle() -> Result<()> {
        let m: Vec<Vec<f32>> = causal_mask(2, 1, &Device::Cpu)?.to_vec2()?;
        assert_eq!(m[0], [0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], [0.0, 0.0, 0.0]);
        Ok(())
    }

    /// `auto` on a GGUF mix (Q4_K_M's): every matrix whose stored format sanctum's kernels run
    /// keeps it, whatever the most common one; others, and an explicit format, take the one asked.
    #[test]
    fn auto_keeps_each_matrix_stored_format() {
        use GgmlDType::{Q4K, Q5_0, Q5_1, Q6K, Q8_0};
        // Most of the weights in q5_0, as most of Q4_K_M's rows of 576 are.
        let header = |name: &str, cols: usize, blocks: Option<GgmlDType>| TensorHeader {
            name: name.to_owned(),
            dtype: safetensors::Dtype::U8,
            shape: vec![if blocks == Some(Q5_0) { 512 } else { 64 }, cols],
            blocks,
        };
        let layer =
            |name: &str, cols, blocks| header(&format!("model.layers.0.{name}"), cols, blocks);
        let tensors = [
            header("model.embed_tokens.weight", 576, Some(Q8_0)),
            layer("self_attn.q_proj.weight", 576, Some(Q5_0)),
            layer("self_attn.k_proj.weight", 576, Some(Q5_0)),
            layer("self_attn.v_proj.weight", 576, Some(Q8_0)),
            layer("mlp.down_proj.weight", 1536, Some(Q6K)),
            layer("mlp.up_proj.weight", 1536, Some(Q4K)),
            layer("mlp.gate_proj.weight", 1536, Some(Q5_1)),
        ];
        let auto = auto_quant(&tensors);
        assert_eq!(auto, Quant::Q5_0, "the most common stored format");
        let used = |plans: Vec<Plan>| -> Vec<Quant> {
            plans
                .into_iter()
                .map(|p| match p {
                    Plan::Matrix(choice) => choice.used,
                    other => panic!("{other:?} is not a matrix"),
                })
                .collect()
        };
        let kept = used(plan(&tensors, auto, true, Activations::Int8, true));
        let (q8, q5, q6, q4k) = (Quant::Q8_0, Quant::Q5_0, Quant::Q6K, Quant::Q4K);
        // q5_1 has no sanctum kernel: it takes `auto`'s q5_0.
        assert_eq!(kept, [q8, q5, q5, q8, q6, q4k, q5]);
        let asked = used(plan(&tensors, Quant::Q4_0, false, Activations::Int8, true));
        // The tied head at 6 bits: q8_0 where rows of 576 do not fit q6_K.
        let q4 = Quant::Q4_0;
        assert_eq!(asked, [q8, q4, q4, q4, q4, q4, q4]);
    }

    #[test]
    fn kv_cache_grows_and_truncates() -> Result<()> {
        let mut c = CandleKv::default();
        let t = Tensor::ones((1, 2, 3, 4), DType::F32, &Device::Cpu)?;
        let (k, _) = c.append(&t, &t, 10_000)?;
        assert_eq!(k.dims(), [1, 2, 3, 4]);
        for _ in 0..100 {
            c.append(&t, &t, 10_000)?;
        }
        assert_eq!(c.len, 303);
        c.len = 5;
        let (k, _) = c.append(&t, &t, 10_000)?;
        assert_eq!(k.dims(), [1, 2, 8, 4]);
        Ok(())
    }

    /// A random two-layer model (GQA, tied embeddings) as Safetensors bytes, and its config.
    fn tiny_model() -> (Config, Vec<u8>) {
        tiny_model_of(Variant::Llama)
    }

    /// The tiny model as `variant` has it: Qwen2's q, k and v have biases.
    fn tiny_model_of(variant: Variant) -> (Config, Vec<u8>) {
        let cfg: Config = serde_json::from_str(
            r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
                "num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,
                "rope_theta":10000.0,"vocab_size":96,"tie_word_embeddings":true}"#,
        )
        .expect("config parses");
        let mut state = 5u64;
        let mut values = |n: usize, scale: f32| -> Vec<u8> {
            (0..n)
                .flat_map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let v = ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
                    v.to_le_bytes()
                })
                .collect()
        };
        let (h, i, kv) = (64, 128, 32);
        let mut tensors = vec![(
            "model.embed_tokens.weight".to_owned(),
            vec![96, h],
            values(96 * h, 1.0),
        )];
        tensors.push(("model.norm.weight".to_owned(), vec![h], values(h, 1.0)));
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![h, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, h]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ] {
                let n = shape.iter().product();
                tensors.push((format!("{p}.{name}"), shape, values(n, 0.3)));
            }
            if variant == Variant::Qwen2 {
                for (name, len) in [("q_proj", h), ("k_proj", kv), ("v_proj", kv)] {
                    let bias = values(len, 0.5);
                    tensors.push((format!("{p}.self_attn.{name}.bias"), vec![len], bias));
                }
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, shape, data)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    data,
                )
                .expect("view");
                (name.clone(), view)
            })
            .collect();
        (
            cfg,
            safetensors::serialize(views, None).expect("serializes"),
        )
    }

    /// The tiny model built through the streaming intake, as a verified load builds it.
    fn load_tiny(cfg: &Config, bytes: &[u8], quant: Quant) -> Result<Llama> {
        load_tiny_as(cfg, Variant::Llama, bytes, quant)
    }

    fn load_tiny_as(cfg: &Config, variant: Variant, bytes: &[u8], quant: Quant) -> Result<Llama> {
        let tied = cfg.tie_word_embeddings;
        let mut weights = Weights::from_bytes(bytes, &Device::Cpu, &mut |t| {
            plan(t, quant, false, Activations::Int8, tied)
        })
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (model, _) = Llama::load(cfg, variant, &mut weights, tied, &Device::Cpu, 64)?;
        Ok(model)
    }

    /// The CPU path against candle's ops on the same packed weights: a prompt, single tokens, and a
    /// truncated cache refilled; with Qwen2's biases too; on an f32 cache, and on an f16 cache
    /// whose rounding is all that differs.
    #[test]
    fn cpu_path_matches_candle_ops() -> Result<()> {
        let cases = [
            (Variant::Llama, Quant::Q8_0, KvPrecision::F32),
            (Variant::Llama, Quant::Q4_0, KvPrecision::F32),
            (Variant::Llama, Quant::Q4_1, KvPrecision::F32),
            (Variant::Qwen2, Quant::Q8_0, KvPrecision::F32),
            (Variant::Llama, Quant::Q8_0, KvPrecision::F16),
            (Variant::Qwen2, Quant::Q8_0, KvPrecision::F16),
        ];
        for (variant, quant, precision) in cases {
            let (cfg, bytes) = tiny_model_of(variant);
            let mut fast = load_tiny_as(&cfg, variant, &bytes, quant)?;
            assert_eq!(fast.kv_precision(), Some(KvPrecision::F16), "the default");
            fast.set_kv_precision(precision);
            let bound = match precision {
                KvPrecision::F32 => 1e-4,
                KvPrecision::F16 => 1e-2,
            };
            let mut reference = load_tiny_as(&cfg, variant, &bytes, quant)?;
            assert!(fast.cpu.is_some(), "{quant}: the CPU path is not used");
            reference.cpu = None;
            let (mut fast_cache, mut reference_cache) = (fast.new_cache(), reference.new_cache());
            let mut work = Workspace::default();
            let steps: [&[u32]; 5] = [&[1, 5, 9, 3, 77], &[4], &[95], &[0, 2], &[8]];
            for (n, tokens) in steps.iter().enumerate() {
                if n == 3 {
                    fast_cache.truncate(4);
                    reference_cache.truncate(4);
                }
                let a = fast.forward(&mut fast_cache, &mut work, tokens)?;
                let b = reference.forward(&mut reference_cache, &mut work, tokens)?;
                let err: f32 = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).powi(2))
                    .sum::<f32>()
                    .sqrt();
                let norm: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
                assert!(
                    err / norm < bound,
                    "{quant} {precision} cache, step {n}: relative error {}",
                    err / norm
                );
                assert_eq!(fast_cache.len(), reference_cache.len());
            }
        }
        Ok(())
    }

    /// Every position's logits from one pass are the ones `forward` gives after that position,
    /// on both paths.
    #[test]
    fn forward_all_gives_each_positions_logits() -> Result<()> {
        let (cfg, bytes) = tiny_model();
        for (quant, cpu) in [
            (Quant::Q8_0, true),
            (Quant::Q8_0, false),
            (Quant::F32, false),
        ] {
            let mut model = load_tiny(&cfg, &bytes, quant)?;
            if !cpu {
                model.cpu = None;
            }
            let mut work = Workspace::default();
            let tokens = [1, 5, 9, 3, 77, 4];
            let mut cache = model.new_cache();
            let all = model.forward_all(&mut cache, &mut work, &tokens)?;
            assert_eq!(all.len(), tokens.len() * model.vocab());
            assert_eq!(cache.len(), tokens.len());
            for end in 1..=tokens.len() {
                let want = model.forward(&mut model.new_cache(), &mut work, &tokens[..end])?;
                let got = &all[(end - 1) * model.vocab()..end * model.vocab()];
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4, "{quant} cpu={cpu} position {end}: {err}");
            }
        }
        Ok(())
    }

    /// `on_pool` runs a pass on fewer threads when other programs keep cores busy: the logits must
    /// be the same bits on any number of threads, or an output would depend on the machine's load.
    #[test]
    fn logits_do_not_depend_on_the_thread_count() -> Result<()> {
        let (cfg, bytes) = tiny_model();
        let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 96).collect();
        for quant in [Quant::Q8_0, Quant::Q4_0] {
            let model = load_tiny(&cfg, &bytes, quant)?;
            let run = |threads: usize| -> Result<Vec<f32>> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                pool.install(|| {
                    let (mut cache, mut work) = (model.new_cache(), Workspace::default());
                    let mut logits = model.forward(&mut cache, &mut work, &prompt)?;
                    for t in [5, 17, 90] {
                        logits.extend(model.forward(&mut cache, &mut work, &[t])?);
                    }
                    Ok(logits)
                })
            };
            let one = run(1)?;
            for threads in [2, 3] {
                assert!(
                    one == run(threads)?,
                    "{quant}: {threads} threads differ from one"
                );
            }
        }
        Ok(())
    }

    /// A batched pass gives every sequence exactly the logits it gets alone, on both paths,
    /// whatever the other sequences' lengths: prompts of several lengths together, and decode
    /// steps of 1 to 7 sequences.
    #[test]
    fn batched_step_equals_solo_steps_bit_for_bit() -> Result<()> {
        let (cfg, bytes) = tiny_model();
        for (quant, cpu) in [
            (Quant::Q8_0, true),
            (Quant::Q4_0, true),
            (Quant::Q8_0, false),
        ] {
            let mut model = load_tiny(&cfg, &bytes, quant)?;
            if !cpu {
                model.cpu = None;
            }
            let prompts: [&[u32]; 7] = [
                &[1, 5, 9],
                &[7],
                &[3, 3, 3, 3, 3, 3, 3, 3, 2],
                &[90, 4],
                &[11; 20],
                &[2, 4, 6, 8],
                &[60; 7],
            ];
            let mut work = Workspace::default();
            // The prompts: one by one, and all seven in one pass.
            let mut solo: Vec<Cache> = Vec::new();
            let mut alone = Vec::new();
            for prompt in prompts {
                let mut cache = model.new_cache();
                alone.extend(model.forward(&mut cache, &mut work, prompt)?);
                solo.push(cache);
            }
            let mut batch: Vec<Cache> = prompts.iter().map(|_| model.new_cache()).collect();
            let mut refs: Vec<(&mut Cache, &[u32])> = batch.iter_mut().zip(prompts).collect();
            let together = model.forward_batch(&mut refs, &mut work)?;
            assert_eq!(alone, together, "{quant} cpu={cpu}: prompts");
            // Each step splits the seven sequences into batches of other sizes (1 to 7), so every
            // tile shape the kernels have runs.
            let splits: [&[usize]; 4] = [&[7], &[3, 4], &[2, 5], &[6, 1]];
            for (step, split) in (0u32..).zip(splits) {
                let tokens: Vec<u32> = (0..prompts.len() as u32)
                    .map(|i| (i * 17 + step * 5) % 96)
                    .collect();
                let mut alone = Vec::new();
                for (cache, &t) in solo.iter_mut().zip(&tokens) {
                    alone.extend(model.forward(cache, &mut work, &[t])?);
                }
                let mut together = Vec::new();
                let (mut rest, mut first): (&mut [Cache], usize) = (&mut batch, 0);
                for &size in split {
                    let (now, later) = rest.split_at_mut(size);
                    let step_tokens = &tokens[first..first + size];
                    let mut refs: Vec<(&mut Cache, &[u32])> =
                        now.iter_mut().zip(step_tokens.chunks(1)).collect();
                    together.extend(model.forward_batch(&mut refs, &mut work)?);
                    (rest, first) = (later, first + size);
                }
                assert_eq!(alone, together, "{quant} cpu={cpu} step {step}");
                for (a, b) in solo.iter().zip(&batch) {
                    assert_eq!(a.len(), b.len());
                }
            }
        }
        Ok(())
    }

    #[test]
    fn unsupported_activation_is_named() {
        let cfg: Config = serde_json::from_str(
            r#"{"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
                "rms_norm_eps":1e-5,"vocab_size":10,"hidden_act":"gelu"}"#,
        )
        .unwrap();
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.field, "hidden_act");
        assert!(e.to_string().contains("gelu"), "{e}");
    }
}
