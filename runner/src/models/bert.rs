//! The BERT family: encoders such as sentence-transformers' all-MiniLM-L6-v2, run by candle's
//! `BertModel`. Pooling and normalization live in [`crate::embed`]; this file only loads and runs
//! the encoder.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::BertModel;

pub use candle_transformers::models::bert::Config;

/// A loaded BERT encoder.
pub struct Bert {
    model: BertModel,
    hidden_size: usize,
    max_positions: usize,
}

impl Bert {
    /// Builds the encoder from its f32 tensors (on `device`), by checkpoint name.
    pub fn load(
        config: &Config,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = BertModel::load(vb, config)?;
        Ok(Self {
            model,
            hidden_size: config.hidden_size,
            max_positions: config.max_position_embeddings,
        })
    }

    /// Width of the token embeddings it produces.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Longest input it accepts, in tokens.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Token embeddings `[batch, seq, hidden]` for ids, token types and attention mask (all
    /// `[batch, seq]`, u32).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.model.forward(ids, type_ids, Some(mask))
    }
}
