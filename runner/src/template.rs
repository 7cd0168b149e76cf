//! Chat templates from `tokenizer_config.json`, rendered with minijinja the way Hugging Face
//! transformers renders them (`apply_chat_template`).
//!
//! Like transformers: `trim_blocks` and `lstrip_blocks` on, loop controls, `raise_exception(msg)`,
//! `strftime_now(fmt)`, a `tojson` that does not escape HTML, Python string methods (`.strip()`,
//! `.startswith()`...), and the variables `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token` (plus `unk_token` and `pad_token` when set).

use std::fmt::Write as _;
use std::time::SystemTime;

use chrono::{DateTime, Utc};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// Name of the template inside the environment.
const NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
        }
    }
}

/// A template failed to compile or render.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The template's syntax is wrong, or it needs something not available.
    #[error("{0:#}")]
    Jinja(#[from] minijinja::Error),
    /// Rendering took more than [`RENDER_FUEL`] instructions (a template that loops without end).
    #[error(
        "rendering took more than {RENDER_FUEL} template instructions; the chat template loops without end"
    )]
    OutOfFuel,
    /// Rendering produced more than [`MAX_RENDERED_BYTES`].
    #[error("the rendered prompt is larger than {MAX_RENDERED_BYTES} bytes")]
    TooLarge,
    /// `tokenizer_config.json`'s `chat_template` has a shape not understood.
    #[error("chat_template is neither a string nor a list of named templates with a \"default\"")]
    Shape,
}

/// The special-token strings a template may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<String>,
    /// End of sequence.
    pub eos: Option<String>,
    /// Unknown token.
    pub unk: Option<String>,
    /// Padding.
    pub pad: Option<String>,
}

/// What `tokenizer_config.json` says about chat formatting.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    /// The chat template source, if the model has one.
    pub chat_template: Option<String>,
    /// Special tokens by role.
    pub special: SpecialTokens,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Plain(String),
    Added { content: String },
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    chat_template: Option<TemplateField>,
    #[serde(default)]
    bos_token: Option<TokenField>,
    #[serde(default)]
    eos_token: Option<TokenField>,
    #[serde(default)]
    unk_token: Option<TokenField>,
    #[serde(default)]
    pad_token: Option<TokenField>,
}

impl TokenizerConfig {
    /// Parses `tokenizer_config.json`. A list of named templates gives its `default` one.
    pub fn parse(json: &[u8]) -> Result<Self, ParseError> {
        let raw: RawConfig = serde_json::from_slice(json)?;
        let chat_template = match raw.chat_template {
            None => None,
            Some(TemplateField::One(t)) => Some(t),
            Some(TemplateField::Named(list)) => Some(
                list.into_iter()
                    .find(|t| t.name == "default")
                    .map(|t| t.template)
                    .ok_or(ParseError::Template(TemplateError::Shape))?,
            ),
        };
        let token = |t: Option<TokenField>| {
            t.map(|t| match t {
                TokenField::Plain(s) | TokenField::Added { content: s } => s,
            })
        };
        Ok(Self {
            chat_template,
            special: SpecialTokens {
                bos: token(raw.bos_token),
                eos: token(raw.eos_token),
                unk: token(raw.unk_token),
                pad: token(raw.pad_token),
            },
        })
    }
}

/// `tokenizer_config.json` could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Not the expected JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The template field is malformed.
    #[error(transparent)]
    Template(TemplateError),
}

/// Instructions one render may run. Real templates take about a hundred per message; a template
/// with nested loops over large ranges would otherwise render forever.
pub const RENDER_FUEL: u64 = 10_000_000;

/// Largest rendered prompt: far beyond any context (a million tokens is about 4 MB of text).
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
}

impl ChatTemplate {
    /// Compiles `source`; syntax errors are reported here rather than at the first render.
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?;
        env.set_syntax(syntax);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_owned())?;
        Ok(Self { env, special })
    }

    /// Renders a conversation; `add_generation_prompt` appends the opening of the assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template(NAME)?;
        let opt = |s: &Option<String>| s.as_deref().map_or(Value::UNDEFINED, Value::from);
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => opt(&self.special.bos),
            eos_token => opt(&self.special.eos),
            unk_token => opt(&self.special.unk),
            pad_token => opt(&self.special.pad),
        };
        let mut out = CappedText::default();
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.text).map_err(|_| {
                minijinja::Error::new(ErrorKind::BadSerialization, "not UTF-8").into()
            }),
            Err(_) if out.overflowed => Err(TemplateError::TooLarge),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(TemplateError::OutOfFuel),
            Err(e) => Err(e.into()),
        }
    }
}

/// The rendered text, refusing to grow past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct CappedText {
    text: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedText {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + bytes.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered prompt too large"));
        }
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' `tojson`.
fn tojson(value: Value, indent: Option<usize>) -> Result<Value, minijinja::Error> {
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = match indent {
        None => python_compact_json(&json),
        Some(n) => {
            let mut out = Vec::new();
            let pad = vec![b' '; n];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
            json.serialize(&mut ser)
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    Ok(Value::from_safe_string(text))
}

/// JSON with Python's default separators (`", "` and `": "`).
fn python_compact_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(python_compact_json).collect();
            format!("[{}]", inner.join(", "))
        }
        serde_json::Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}: {}",
                        serde_json::Value::from(k.as_str()),
                        python_compact_json(v)
                    )
                })
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
        scalar => scalar.to_string(),
    }
}

/// transformers' `strftime_now(format)`: the current UTC time formatted with `strftime` codes.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    strftime(&format, DateTime::<Utc>::from(SystemTime::now()))
}

/// Formats `time` with `strftime` codes; an unknown code fails the render instead of panicking.
fn strftime(format: &str, time: DateTime<Utc>) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    write!(out, "{}", time.format(format)).map_err(|_| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format {format:?}"),
        )
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_like_strftime() {
        let at = |secs: i64| DateTime::<Utc>::from_timestamp(secs, 0).unwrap();
        // 2024-07-26 13:05:09 UTC
        let t = at(1_722_085_509 - 86_400);
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %j %%", t).unwrap(),
            "2024-07-26 13:05:09 208 %"
        );
        assert_eq!(strftime("%B %e, %y", at(0)).unwrap(), "January  1, 70");
        assert!(
            strftime("%Q", t).is_err(),
            "an unknown code is an error, not a panic"
        );
    }

    #[test]
    fn tojson_matches_python() -> Result<(), minijinja::Error> {
        let v = Value::from(Serde(serde_json::json!({"a": [1, "é<>"], "b": null})));
        assert_eq!(
            tojson(v.clone(), None)?.to_string(),
            r#"{"a": [1, "é<>"], "b": null}"#
        );
        assert!(tojson(v, Some(2))?.to_string().contains("\n  \"a\""));
        Ok(())
    }

    #[test]
    fn raise_exception_fails_the_render() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            SpecialTokens::default(),
        )
        .unwrap();
        let err = t
            .render(&[Message::new("assistant", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
        assert_eq!(t.render(&[Message::new("user", "x")], false).unwrap(), "ok");
    }

    /// Issue 13: nested loops rendered forever; huge output grew without bound.
    #[test]
    fn endless_or_huge_renders_are_stopped() {
        let user = [Message::new("user", "x")];
        let endless = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
            SpecialTokens::default(),
        )
        .unwrap();
        let err = endless.render(&user, false).unwrap_err();
        assert!(matches!(err, TemplateError::OutOfFuel), "{err}");
        assert!(err.to_string().contains("loops without end"), "{err}");

        let huge = ChatTemplate::new(
            "{% for a in range(20) %}{{ 'x' * 1000000 }}{% endfor %}",
            SpecialTokens::default(),
        )
        .unwrap();
        let err = huge.render(&user, false).unwrap_err();
        assert!(matches!(err, TemplateError::TooLarge), "{err}");
    }

    #[test]
    fn named_templates_and_added_tokens_parse() {
        let cfg = TokenizerConfig::parse(
            br#"{"chat_template":[{"name":"tool_use","template":"T"},{"name":"default","template":"D"}],
                "bos_token":{"content":"<s>","__type":"AddedToken"},"eos_token":"</s>"}"#,
        )
        .unwrap();
        assert_eq!(cfg.chat_template.as_deref(), Some("D"));
        assert_eq!(cfg.special.bos.as_deref(), Some("<s>"));
        assert_eq!(cfg.special.eos.as_deref(), Some("</s>"));
    }
}
