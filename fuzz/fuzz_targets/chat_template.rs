//! Chat templates (`runner::template`), as a model's `tokenizer_config.json` carries them and
//! `ChatModel::render` runs them for every prompt and every server request:
//! `TokenizerConfig::parse` (a template string or a list of named ones, special tokens plain or
//! as added-token objects), `ChatTemplate::new` (minijinja with transformers' syntax settings,
//! `raise_exception`, `strftime_now`, `tojson`, Python string methods) and `render`.
//!
//! Input: parts joined by `sanctum_fuzz::FILE_SEP`. The first is a whole `tokenizer_config.json`
//! when it starts with `{`, else the template source itself. Each further part is one message,
//! `role:content`; without any, a fixed conversation (system, user, assistant, user) is used.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runner::template::{ChatTemplate, Message, SpecialTokens, TokenizerConfig};
use sanctum_fuzz::{FILE_SEP, split};

fn conversation() -> Vec<Message> {
    vec![
        Message::new("system", "You are a helpful assistant."),
        Message::new(
            "user",
            "Hello! Ünïcödé, \"quotes\", {{ braces }} and <|im_end|>.",
        ),
        Message::new("assistant", "Hi. How can I help?"),
        Message::new("user", "  Tell me a joke.\n"),
    ]
}

fuzz_target!(|data: &[u8]| {
    let parts = split(data, FILE_SEP, 16);
    let Ok(first) = std::str::from_utf8(parts[0]) else {
        return;
    };
    let (source, special) = if first.trim_start().starts_with('{') {
        match TokenizerConfig::parse(first.as_bytes()) {
            Ok(TokenizerConfig {
                chat_template: Some(source),
                special,
            }) => (source, special),
            _ => return,
        }
    } else {
        let special = SpecialTokens {
            bos: Some("<|im_start|>".into()),
            eos: Some("<|im_end|>".into()),
            unk: Some("<|endoftext|>".into()),
            pad: None,
        };
        (first.to_owned(), special)
    };
    let mut messages: Vec<Message> = parts[1..]
        .iter()
        .filter_map(|p| std::str::from_utf8(p).ok())
        .map(|p| match p.split_once(':') {
            Some((role, content)) => Message::new(role, content),
            None => Message::new("user", p),
        })
        .collect();
    if messages.is_empty() {
        messages = conversation();
    }
    let Ok(template) = ChatTemplate::new(&source, special) else {
        return;
    };
    let _ = template.render(&messages, true);
    let _ = template.render(&messages[..1], false);
});
