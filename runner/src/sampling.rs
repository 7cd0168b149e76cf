//! Choosing the next token from logits: greedy, or seeded sampling with llama.cpp's usual filters.
//!
//! Order, as llama.cpp's default chain: repetition penalty, top-k, top-p, min-p (both on the
//! untempered distribution), temperature, then one draw. The random stream is ChaCha20 seeded from
//! `seed` and turned into uniform numbers here (not through `rand`'s distributions, whose algorithms
//! may change between versions), so the same seed, logits and settings always give the same token.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// Sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher flattens the distribution.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide (or multiply, when negative) recent tokens' logits by this; 1 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

/// A setting out of range.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum InvalidParams {
    /// Negative or not a number.
    #[error("temperature must be 0 or more, got {0}")]
    Temperature(f32),
    /// Outside 0..=1.
    #[error("top-p must be in (0, 1], got {0}")]
    TopP(f32),
    /// Outside 0..=1.
    #[error("min-p must be in [0, 1], got {0}")]
    MinP(f32),
    /// Not positive.
    #[error("repeat penalty must be more than 0, got {0}")]
    RepeatPenalty(f32),
}

impl SamplingParams {
    /// Checks every setting's range.
    pub fn validate(&self) -> Result<(), InvalidParams> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(InvalidParams::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InvalidParams::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(InvalidParams::MinP(self.min_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return Err(InvalidParams::RepeatPenalty(self.repeat_penalty));
        }
        Ok(())
    }

    /// True when sampling never draws (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Picks tokens; holds the random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
}

impl Sampler {
    /// A sampler whose stream starts at `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha20Rng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits` is modified (penalties); `history` holds the tokens so far
    /// (prompt and generated), of which the last `repeat_last_n` are penalized.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.penalize(logits, history);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        // Most likely first; ties by token id so the order never depends on the sort.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k;
        if k > 0 && k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, by_logit);
            candidates.truncate(k);
        }
        candidates.sort_unstable_by(by_logit);

        // top-p and min-p on the distribution at temperature 1.
        let probs = softmax(candidates.iter().map(|c| c.1), 1.0);
        let mut keep = candidates.len();
        if self.params.top_p < 1.0 {
            let mut sum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                sum += p;
                if sum >= f64::from(self.params.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.params.min_p > 0.0 {
            let floor = probs[0] * f64::from(self.params.min_p);
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        candidates.truncate(keep);

        let probs = softmax(candidates.iter().map(|c| c.1), self.params.temperature);
        let u = self.uniform();
        let mut sum = 0.0;
        for (c, p) in candidates.iter().zip(&probs) {
            sum += p;
            if u < sum {
                return c.0;
            }
        }
        candidates[candidates.len() - 1].0
    }

    fn penalize(&self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repeat_penalty;
        if penalty == 1.0 || self.params.repeat_last_n == 0 {
            return;
        }
        let start = history.len().saturating_sub(self.params.repeat_last_n);
        let mut seen: Vec<u32> = history[start..].to_vec();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }

    /// Uniform in [0, 1) from the top 53 bits of one ChaCha20 output.
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the largest logit; the lowest index among equals; NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

fn softmax(logits: impl Iterator<Item = f32> + Clone, temperature: f32) -> Vec<f64> {
    let t = f64::from(temperature.max(1e-6));
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits
        .map(|l| ((f64::from(l) - f64::from(max)) / t).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        exps.iter().map(|e| e / sum).collect()
    } else {
        // All -inf: uniform over candidates.
        let n = exps.len().max(1) as f64;
        exps.iter().map(|_| 1.0 / n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 7,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params(5.0)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [1.0, 2.0, 0.5], &[]), 1);
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // p(0) ≈ 0.9999: token 1 is far below 0.5 × p(0).
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            ..params(1.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [10.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [2.0, 1.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn repeat_penalty_turns_greedy_away() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]), 1);
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            repeat_last_n: 1,
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0, 1]), 0);
    }

    #[test]
    fn validation_names_the_setting() {
        assert_eq!(
            params(-1.0).validate(),
            Err(InvalidParams::Temperature(-1.0))
        );
        assert!(
            SamplingParams {
                top_p: 0.0,
                ..params(1.0)
            }
            .validate()
            .is_err()
        );
        assert!(SamplingParams::default().validate().is_ok());
    }
}
