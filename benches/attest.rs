//! Stamping and verifying output attestations: the cost `run`/`chat`/`embed` pay per output, and how
//! many bundles `sanctum attest verify` checks per second (one core).
//!
//! `cargo bench --bench attest`

use std::hint::black_box;
use std::time::SystemTime;

use attest::Sha256Digest;
use attest::attestation::Verifier;
use attest::keys::SigningKey;
use attest::lock_signature::LockStatus;
use attest::lockfile::{HfSource, LockedFile, Lockfile, ModelEntry, Source, Task};
use attest::policy::{KeyRing, LicensePolicy};
use attest::stamp::{LockInfo, OutputRecord, RunnerInfo, Stamper};
use attest::statement::{OutputTask, RuntimeRecord, SamplingRecord, UsageRecord};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn entry() -> ModelEntry {
    let files: Vec<LockedFile> = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .map(|p| LockedFile {
        path: (*p).into(),
        sha256: Sha256Digest::of(p.as_bytes()),
        size: 1 << 20,
    })
    .collect();
    let source = Source::Hf(HfSource {
        repo: "o/m".into(),
        revision: "r".into(),
        files: None,
    });
    ModelEntry::new(
        "smollm2-135m-instruct",
        Task::Chat,
        "llama",
        "Apache-2.0",
        source,
        files,
    )
}

fn record<'a>(model: &'a ModelEntry, output: &'a [u8], prompt: &'a str) -> OutputRecord<'a> {
    let now = SystemTime::now();
    OutputRecord {
        name: "src/generated.py",
        bytes: output,
        task: OutputTask::Run,
        model,
        runtime: RuntimeRecord {
            device: "cpu".into(),
            threads: 2,
            quantization: Some("q8_0".into()),
        },
        sampling: Some(SamplingRecord {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 42,
            max_tokens: Some(256),
            stop: vec![],
        }),
        prompt,
        include_prompt_text: false,
        usage: UsageRecord {
            prompt_tokens: 40,
            completion_tokens: 256,
        },
        request: None,
        started: now,
        finished: now,
    }
}

fn stamper(key: SigningKey) -> Stamper {
    Stamper::new(
        key,
        RunnerInfo {
            version: "0.1.0".into(),
            git_commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            binary_sha256: Sha256Digest::of(b"exe"),
        },
        LockInfo {
            digest: Sha256Digest::of(b"lock"),
            signer: None,
        },
    )
}

/// One stamp: hash the output, build and canonicalize the statement, sign the PAE, write bundle JSON.
fn stamping(c: &mut Criterion) {
    let model = entry();
    let stamper = stamper(SigningKey::generate().expect("key"));
    let prompt = "<|im_start|>user\nWrite a function<|im_end|>\n".repeat(4);
    let mut group = c.benchmark_group("stamp");
    for size in [1usize << 10, 64 << 10] {
        let output: Vec<u8> = (0..size).map(|i| b"abcdefgh \n"[i % 10]).collect();
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("output {} KiB", size >> 10), |b| {
            b.iter(|| {
                stamper
                    .stamp(black_box(&record(&model, &output, &prompt)))
                    .expect("stamp")
            })
        });
    }
    group.finish();
}

/// One verification, all eight steps (output digest given), against a lock of 20 models.
fn verification(c: &mut Criterion) {
    let model = entry();
    let key = SigningKey::generate().expect("key");
    let mut signers = KeyRing::new();
    for _ in 0..4 {
        signers.add(
            "other",
            SigningKey::generate().expect("key").public().clone(),
        );
    }
    signers.add("ci", key.public().clone());
    let mut lock = Lockfile::new();
    for i in 0..19 {
        let mut m = model.clone();
        m.name = format!("model-{i}");
        lock.models.push(m);
    }
    lock.models.push(model.clone());
    let licenses = LicensePolicy::default();
    let verifier = Verifier::new(&signers, &lock, &licenses, Ok(LockStatus::Unsigned));
    let output = vec![b'x'; 1 << 10];
    let prompt = "prompt";
    let bundle = stamper(key)
        .stamp(&record(&model, &output, prompt))
        .expect("stamp")
        .json;
    let digest = Sha256Digest::of(&output);
    verifier.verify(&bundle, Some(&digest)).expect("verifies");

    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bundle", |b| {
        b.iter(|| {
            verifier
                .verify(black_box(&bundle), Some(&digest))
                .expect("verifies")
        })
    });
    group.finish();
}

criterion_group!(benches, stamping, verification);
criterion_main!(benches);
