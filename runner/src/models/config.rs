//! `config.json` checked before any arithmetic uses it. An approved model's config is still input:
//! a zero head count divides by zero, a negative epsilon or a zero RoPE base makes every output NaN,
//! and a dimension of 2^40 asks for memory no machine has. Each family's config type states the
//! range of every field it reads ([`ModelConfig::validate`]), and the error names the field.

use std::ops::RangeInclusive;

use attest::verify::ModelFiles;
use serde::de::DeserializeOwned;

use super::LoadError;

/// Largest width (hidden size, MLP width) accepted: four times the largest models shipped today.
pub const MAX_WIDTH: usize = 1 << 18;
/// Largest vocabulary or position count accepted.
pub const MAX_POSITIONS: usize = 1 << 24;
/// Largest layer or head count accepted.
pub const MAX_COUNT: usize = 1 << 12;

/// A field of `config.json` outside its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} is {value}; {expected}")]
pub struct ConfigError {
    /// The field, as `config.json` spells it.
    pub field: &'static str,
    /// Its value, as read.
    pub value: String,
    /// What it must be.
    pub expected: String,
}

impl ConfigError {
    /// A field whose value breaks a rule that involves other fields.
    pub fn new(field: &'static str, value: impl ToString, expected: impl Into<String>) -> Self {
        Self {
            field,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// A family's `config.json`, with the ranges its loader relies on.
pub trait ModelConfig: DeserializeOwned {
    /// Checks every field the loader reads.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Reads and validates `config.json`.
pub fn read<T: ModelConfig>(model: &(impl ModelFiles + ?Sized)) -> Result<T, LoadError> {
    let config: T = super::json_file(model, "config.json")?;
    config.validate().map_err(|source| LoadError::Config {
        model: model.name().to_owned(),
        source,
    })?;
    Ok(config)
}

/// A count or size in `range`.
pub fn count(
    field: &'static str,
    value: usize,
    range: RangeInclusive<usize>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::new(
        field,
        value,
        format!("it must be from {} to {}", range.start(), range.end()),
    ))
}

/// A finite number above zero and at most `max`.
pub fn positive(field: &'static str, value: f64, max: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 && value <= max {
        return Ok(());
    }
    Err(ConfigError::new(
        field,
        value,
        format!("it must be a finite number above 0 and at most {max}"),
    ))
}

/// A fraction from 0 to 1.
pub fn fraction(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if (0.0..=1.0).contains(&value) {
        return Ok(());
    }
    Err(ConfigError::new(field, value, "it must be from 0 to 1"))
}

/// `value` divides evenly into `whole` (heads into a width, key/value heads into heads).
pub fn divides(
    field: &'static str,
    value: usize,
    whole_field: &str,
    whole: usize,
) -> Result<(), ConfigError> {
    if value != 0 && whole.is_multiple_of(value) {
        return Ok(());
    }
    Err(ConfigError::new(
        field,
        value,
        format!("it must divide {whole_field} ({whole})"),
    ))
}

impl ModelConfig for candle_transformers::models::bert::Config {
    fn validate(&self) -> Result<(), ConfigError> {
        count("vocab_size", self.vocab_size, 1..=MAX_POSITIONS)?;
        count("hidden_size", self.hidden_size, 1..=MAX_WIDTH)?;
        count("num_hidden_layers", self.num_hidden_layers, 1..=MAX_COUNT)?;
        count(
            "num_attention_heads",
            self.num_attention_heads,
            1..=MAX_COUNT,
        )?;
        divides(
            "num_attention_heads",
            self.num_attention_heads,
            "hidden_size",
            self.hidden_size,
        )?;
        count("intermediate_size", self.intermediate_size, 1..=MAX_WIDTH)?;
        count(
            "max_position_embeddings",
            self.max_position_embeddings,
            1..=MAX_POSITIONS,
        )?;
        count("type_vocab_size", self.type_vocab_size, 1..=MAX_COUNT)?;
        count("pad_token_id", self.pad_token_id, 0..=self.vocab_size - 1)?;
        positive("layer_norm_eps", self.layer_norm_eps, 1.0)?;
        fraction("hidden_dropout_prob", self.hidden_dropout_prob)?;
        if let Some(p) = self.classifier_dropout {
            fraction("classifier_dropout", p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_transformers::models::bert::Config as BertConfig;

    fn bert(change: impl FnOnce(&mut serde_json::Value)) -> Result<(), ConfigError> {
        let mut json = serde_json::json!({
            "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "max_position_embeddings": 64, "type_vocab_size": 2,
            "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
            "classifier_dropout": null, "model_type": "bert"
        });
        change(&mut json);
        serde_json::from_value::<BertConfig>(json)
            .expect("parses")
            .validate()
    }

    #[test]
    fn bert_fields_are_range_checked_by_name() {
        assert_eq!(bert(|_| {}), Ok(()));
        for (field, value, expected) in [
            ("num_attention_heads", serde_json::json!(0), "from 1 to"),
            (
                "num_attention_heads",
                serde_json::json!(5),
                "divide hidden_size (32)",
            ),
            ("layer_norm_eps", serde_json::json!(-1e-12), "above 0"),
            ("hidden_size", serde_json::json!(1u64 << 40), "from 1 to"),
            ("pad_token_id", serde_json::json!(100), "from 0 to 99"),
            ("vocab_size", serde_json::json!(0), "from 1 to"),
        ] {
            let e = bert(|j| j[field] = value.clone()).unwrap_err();
            assert_eq!(e.field, field);
            assert!(e.to_string().contains(expected), "{field}: {e}");
        }
    }
}
