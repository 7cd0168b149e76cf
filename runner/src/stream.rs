//! Turning generated tokens into text as they come, without ever splitting a character, and
//! holding back text that may be the start of a stop string.

use tokenizers::Tokenizer;

/// Decoding failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode tokens: {0}")]
pub struct DecodeError(String);

/// Anything that turns token ids back into text (a tokenizer; a table in tests).
pub trait Decode {
    /// Text of `ids`, special tokens left out. Incomplete UTF-8 shows as U+FFFD.
    fn decode(&self, ids: &[u32]) -> Result<String, DecodeError>;
}

impl Decode for Tokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, DecodeError> {
        std::ops::Deref::deref(self)
            .decode(ids, true)
            .map_err(|e| DecodeError(e.to_string()))
    }
}

/// Incremental decoder: emits only complete characters.
///
/// It decodes a short window of recent tokens twice (with and without the newest ones) and emits
/// the difference once it no longer ends in U+FFFD, the replacement for an incomplete UTF-8
/// sequence. Decoding the window with its left context keeps decoders that treat the first token
/// specially (SentencePiece's leading space) right.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text that became complete (often empty).
    pub fn push(&mut self, decoder: &impl Decode, id: u32) -> Result<String, DecodeError> {
        self.ids.push(id);
        let before = decoder.decode(&self.ids[self.prefix..self.read])?;
        let now = decoder.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let Some(new) = now.get(before.len()..) else {
                return Ok(String::new());
            };
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(new.to_owned());
        }
        Ok(String::new())
    }

    /// Whatever is still held back (an incomplete character at the very end shows as U+FFFD).
    pub fn finish(&mut self, decoder: &impl Decode) -> Result<String, DecodeError> {
        let before = decoder.decode(&self.ids[self.prefix..self.read])?;
        let now = decoder.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_owned())
    }
}

/// Finds stop strings in streamed text. Text that could be the beginning of a stop string is held
/// back until it is clear either way, so a stop string never reaches the output, even in part.
#[derive(Debug, Default, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds text; returns the text safe to emit and whether a stop string was reached (the stop
    /// string and everything after it are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return (out, true);
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut hold = 0;
        for len in (1..longest.min(self.pending.len() + 1)).rev() {
            let start = self.pending.len() - len;
            if self.pending.is_char_boundary(start)
                && self
                    .stops
                    .iter()
                    .any(|s| s.starts_with(&self.pending[start..]))
            {
                hold = len;
                break;
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (out, false)
    }

    /// The held-back text, once no more is coming.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens are raw bytes; decoding is lossy UTF-8, as a byte-level BPE decoder does.
    struct Bytes(Vec<Vec<u8>>);

    impl Decode for Bytes {
        fn decode(&self, ids: &[u32]) -> Result<String, DecodeError> {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&i| self.0[i as usize].clone())
                .collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    #[test]
    fn a_character_split_across_tokens_comes_out_whole() {
        let euro = "€".as_bytes(); // three bytes
        let vocab = Bytes(vec![
            b"a ".to_vec(),
            euro[..1].to_vec(),
            euro[1..].to_vec(),
            b"!".to_vec(),
        ]);
        let mut s = TextStream::new();
        let out: Vec<String> = [0, 1, 2, 3]
            .iter()
            .map(|&id| s.push(&vocab, id).unwrap())
            .collect();
        assert_eq!(out, ["a ", "", "€", "!"]);
        assert_eq!(s.finish(&vocab).unwrap(), "");
    }

    #[test]
    fn an_unfinished_character_is_flushed_at_the_end() {
        let vocab = Bytes(vec![b"x".to_vec(), vec![0xE2, 0x82]]);
        let mut s = TextStream::new();
        assert_eq!(s.push(&vocab, 0).unwrap(), "x");
        assert_eq!(s.push(&vocab, 1).unwrap(), "");
        assert_eq!(s.finish(&vocab).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let mut m = StopMatcher::new(&["</end>".to_owned()]);
        assert_eq!(m.push("Hello </"), ("Hello ".to_owned(), false));
        assert_eq!(m.push("e"), (String::new(), false));
        assert_eq!(m.push("nd> after"), (String::new(), true));
    }

    #[test]
    fn a_false_start_is_released() {
        let mut m = StopMatcher::new(&["STOP".to_owned()]);
        assert_eq!(m.push("ST"), (String::new(), false));
        assert_eq!(m.push("AY"), ("STAY".to_owned(), false));
        assert_eq!(m.push("S"), (String::new(), false));
        assert_eq!(m.finish(), "S");
    }

    #[test]
    fn multibyte_text_near_a_stop_string() {
        let mut m = StopMatcher::new(&["é!".to_owned()]);
        assert_eq!(m.push("café"), ("caf".to_owned(), false));
        assert_eq!(m.push("?"), ("é?".to_owned(), false));
        assert_eq!(m.push("é!x"), (String::new(), true));
    }
}
