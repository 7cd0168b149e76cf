//! Output quality of a format, measured instead of guessed: perplexity on a text, and, against a
//! reference run of the same weights (f32), the KL divergence of each next-token distribution and
//! whether the most likely token agrees, as llama.cpp's `llama-perplexity --kl-divergence` reports
//! them.
//!
//! The text is cut into windows of `ctx` tokens; each window runs from an empty cache and only its
//! second half is scored, so that every scored token has at least `ctx / 2` tokens of context
//! (llama-perplexity's method). The reference keeps its log-probabilities of every scored position
//! (`positions × vocab` f32) so that each format is compared with it afterwards, one model in
//! memory at a time.

use rayon::prelude::*;

use crate::chat::{ChatModel, PROMPT_CHUNK};

/// Why a measurement could not be made.
#[derive(Debug, thiserror::Error)]
pub enum QualityError {
    /// Windows need a scored half.
    #[error("a window of {0} tokens is too small: use at least 4")]
    Window(usize),
    /// The window does not fit the model.
    #[error("a window of {window} tokens exceeds the model's context of {context}")]
    Context {
        /// Tokens per window.
        window: usize,
        /// The model's context.
        context: usize,
    },
    /// Not even one window of text.
    #[error("the text has {tokens} tokens, fewer than one window of {window}")]
    TooShort {
        /// Tokens in the text.
        tokens: usize,
        /// Tokens per window.
        window: usize,
    },
    /// The model compared is not the reference's.
    #[error("the reference has a vocabulary of {reference} tokens, the model {model}")]
    Vocabulary {
        /// The reference's vocabulary.
        reference: usize,
        /// The model's.
        model: usize,
    },
    /// A forward pass failed.
    #[error("forward pass: {0}")]
    Forward(#[from] candle_core::Error),
}

/// The text's tokens cut into whole windows of `window` tokens, at most `max` of them.
pub fn windows(
    tokens: &[u32],
    window: usize,
    max: Option<usize>,
) -> Result<Vec<Vec<u32>>, QualityError> {
    if window < 4 {
        return Err(QualityError::Window(window));
    }
    let all: Vec<Vec<u32>> = tokens
        .chunks_exact(window)
        .take(max.unwrap_or(usize::MAX))
        .map(<[u32]>::to_vec)
        .collect();
    if all.is_empty() {
        return Err(QualityError::TooShort {
            tokens: tokens.len(),
            window,
        });
    }
    Ok(all)
}

/// The reference run: its windows and, per scored position, its log-probabilities.
#[derive(Debug, Clone)]
pub struct Reference {
    windows: Vec<Vec<u32>>,
    vocab: usize,
    /// `positions × vocab`, window after window.
    log_probs: Vec<f32>,
}

/// How a format's predictions compare with the reference's, over every scored position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// Scored positions.
    pub positions: usize,
    /// `exp` of the mean negative log-likelihood of the text's next tokens.
    pub perplexity: f64,
    /// Mean KL divergence from the reference's next-token distribution (nats).
    pub mean_kl: f64,
    /// Its 99th percentile.
    pub kl_p99: f64,
    /// Its maximum.
    pub max_kl: f64,
    /// Share of positions whose most likely token is the reference's (0 to 1).
    pub top1: f64,
}

impl Reference {
    /// Runs `model` (the reference format) over `windows`.
    pub fn measure(model: &ChatModel, windows: Vec<Vec<u32>>) -> Result<Self, QualityError> {
        let vocab = model.network().vocab();
        let mut log_probs = Vec::new();
        for window in &windows {
            log_probs.extend(scored_log_probs(model, window)?);
        }
        Ok(Self {
            windows,
            vocab,
            log_probs,
        })
    }

    /// Scored positions.
    pub fn positions(&self) -> usize {
        self.log_probs.len() / self.vocab
    }

    /// The reference's own numbers (divergence 0, agreement 1).
    pub fn quality(&self) -> Quality {
        let targets = self.targets();
        let nll: f64 = self
            .log_probs
            .chunks_exact(self.vocab)
            .zip(&targets)
            .map(|(lp, &t)| -f64::from(lp[t as usize]))
            .sum();
        let n = self.positions();
        Quality {
            positions: n,
            perplexity: (nll / n as f64).exp(),
            mean_kl: 0.0,
            kl_p99: 0.0,
            max_kl: 0.0,
            top1: 1.0,
        }
    }

    /// Runs `model` over the reference's windows and compares.
    pub fn compare(&self, model: &ChatModel) -> Result<Quality, QualityError> {
        let vocab = model.network().vocab();
        if vocab != self.vocab {
            return Err(QualityError::Vocabulary {
                reference: self.vocab,
                model: vocab,
            });
        }
        let mut log_probs = Vec::with_capacity(self.log_probs.len());
        for window in &self.windows {
            log_probs.extend(scored_log_probs(model, window)?);
        }
        let targets = self.targets();
        // Per position: (KL, negative log-likelihood of the target, top tokens agree).
        let per_position: Vec<(f64, f64, bool)> = self
            .log_probs
            .par_chunks_exact(vocab)
            .zip(log_probs.par_chunks_exact(vocab))
            .zip(targets.par_iter())
            .map(|((reference, ours), &target)| {
                let kl: f64 = reference
                    .iter()
                    .zip(ours)
                    .map(|(&p, &q)| {
                        let (p, q) = (f64::from(p), f64::from(q));
                        p.exp() * (p - q)
                    })
                    .sum();
                let nll = -f64::from(ours[target as usize]);
                (kl.max(0.0), nll, argmax(reference) == argmax(ours))
            })
            .collect();
        let n = per_position.len();
        let mut kls: Vec<f64> = per_position.iter().map(|p| p.0).collect();
        kls.sort_by(f64::total_cmp);
        let nll: f64 = per_position.iter().map(|p| p.1).sum();
        let agree = per_position.iter().filter(|p| p.2).count();
        Ok(Quality {
            positions: n,
            perplexity: (nll / n as f64).exp(),
            mean_kl: kls.iter().sum::<f64>() / n as f64,
            kl_p99: kls[(n * 99).div_ceil(100).saturating_sub(1)],
            max_kl: kls[n - 1],
            top1: agree as f64 / n as f64,
        })
    }

    /// The token each scored position predicts.
    fn targets(&self) -> Vec<u32> {
        self.windows
            .iter()
            .flat_map(|w| w[first_scored(w.len())..].iter().copied())
            .collect()
    }
}

/// The first token of a window that is scored: the second half.
fn first_scored(window: usize) -> usize {
    window / 2
}

/// Log-probabilities (`scored × vocab`) of the next token at every scored position of `window`,
/// run from an empty cache in pieces of at most [`PROMPT_CHUNK`] tokens, as prompts are.
fn scored_log_probs(model: &ChatModel, window: &[u32]) -> Result<Vec<f32>, QualityError> {
    let network = model.network();
    if window.len() > network.context() {
        return Err(QualityError::Context {
            window: window.len(),
            context: network.context(),
        });
    }
    let vocab = network.vocab();
    let mut cache = network.new_cache();
    let mut work = crate::models::llama::Workspace::default();
    // Token `j` is predicted by the logits after token `j - 1`.
    let first = first_scored(window.len());
    let mut out = Vec::with_capacity((window.len() - first) * vocab);
    let mut at = 0;
    for piece in window[..window.len() - 1].chunks(PROMPT_CHUNK) {
        let logits = network.forward_all(&mut cache, &mut work, piece)?;
        for (k, row) in logits.chunks_exact(vocab).enumerate() {
            if at + k + 1 >= first {
                log_softmax(row, &mut out);
            }
        }
        at += piece.len();
    }
    Ok(out)
}

/// Appends `row`'s log-softmax, computed in f64.
fn log_softmax(row: &[f32], out: &mut Vec<f32>) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    out.extend(row.iter().map(|&v| (f64::from(v) - lse) as f32));
}

/// The index of the largest value (the first among equals).
fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_and_bounded() {
        let tokens: Vec<u32> = (0..100).collect();
        let w = windows(&tokens, 32, None).expect("fits");
        assert_eq!(w.len(), 3);
        assert_eq!(w[1][0], 32);
        assert_eq!(windows(&tokens, 32, Some(2)).expect("fits").len(), 2);
        assert!(matches!(
            windows(&tokens, 101, None),
            Err(QualityError::TooShort { tokens: 100, .. })
        ));
        assert!(matches!(
            windows(&tokens, 2, None),
            Err(QualityError::Window(2))
        ));
    }

    #[test]
    fn log_softmax_normalizes() {
        let mut out = Vec::new();
        log_softmax(&[1.0, 2.0, 3.0, 1000.0], &mut out);
        let total: f64 = out.iter().map(|&v| f64::from(v).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(argmax(&out), 3);
    }
}
