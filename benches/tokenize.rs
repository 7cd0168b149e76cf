//! Tokenization throughput of the real SmolLM2 tokenizer (byte-level BPE, as sanctum's GGUF import
//! builds it): what every prompt pays before its first forward pass.
//!
//! `SANCTUM_TEST_HOME=target/sanctum-test-home cargo bench --bench tokenize` (the store
//! `scripts/test` pulls the real models into); without it the bench says so and measures nothing.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokenizers::Tokenizer;

/// `tokenizer.json` of the pulled SmolLM2, when a store is named.
fn smollm2_tokenizer() -> Option<PathBuf> {
    let home = PathBuf::from(std::env::var_os("SANCTUM_TEST_HOME")?);
    let versions = home.join("models/smollm2-135m-instruct");
    let version = std::fs::read_dir(&versions).ok()?.next()?.ok()?;
    Some(version.path().join("tokenizer.json"))
}

fn tokenize(c: &mut Criterion) {
    let Some(path) = smollm2_tokenizer() else {
        eprintln!(
            "tokenize: set SANCTUM_TEST_HOME to a store with smollm2-135m-instruct (scripts/test pulls it)"
        );
        return;
    };
    let tokenizer = Tokenizer::from_file(&path).expect("the pulled tokenizer loads");
    let paragraph = "Local inference is invisible to network security tools: nobody can tell which \
        model wrote which code, whether its weights were tampered with, or whether its license \
        allows commercial use. fn main() { println!(\"{}\", 1 + 2 * 3); } 12345 tokens, ünïcödé. ";
    let text = paragraph.repeat(32);
    let tokens = tokenizer
        .encode(text.as_str(), false)
        .expect("encodes")
        .len();
    let mut group = c.benchmark_group("tokenize");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function(
        format!("smollm2 encode {} bytes ({tokens} tokens)", text.len()),
        |b| {
            b.iter(|| {
                tokenizer
                    .encode(black_box(text.as_str()), false)
                    .expect("encodes")
            })
        },
    );
    let ids = tokenizer
        .encode(text.as_str(), false)
        .expect("encodes")
        .get_ids()
        .to_vec();
    group.bench_function(format!("smollm2 decode {tokens} tokens"), |b| {
        b.iter(|| tokenizer.decode(black_box(&ids), false).expect("decodes"))
    });
    group.finish();
}

criterion_group!(benches, tokenize);
criterion_main!(benches);
