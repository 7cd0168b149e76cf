//! The engine API that every front end shares (`sanctum run/chat/embed/bench` and `sanctum serve`):
//! open an approved model by name (pulling it into the verified store when it is missing), load it
//! for its task, and describe a reply or embedding as the [`OutputRecord`] its attestation is made
//! of. Trust decisions stay where they are: the lock handed to [`Engine::new`] was already read
//! under the policy, and loaders only ever see verified bytes (`attest::verify::StreamedLoad`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use attest::lockfile::{Lockfile, ModelEntry, Task, UnknownModel};
use attest::policy::Violation;
use attest::progress::Progress;
use attest::stamp::{OutputRecord, Stamp};
use attest::statement::{
    OutputTask, RequestRecord, RuntimeRecord, SamplingRecord, UsageRecord, f32_as_decimal,
};
use attest::verify::VerifyError;
use candle_core::Device;

use crate::chat::{ChatModel, GenerateOptions, Generation, LoadOptions};
use crate::embed::Embedder;
use crate::models::LoadError;
use crate::quant::Quant;
use crate::store::{ModelState, PullError, PullOptions, Store};

/// Opening or loading a model failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The model is not in the lock.
    #[error(transparent)]
    NotApproved(#[from] UnknownModel),
    /// The model is approved for another task.
    #[error("model {name:?} is approved for the task {task:?}: {advice}")]
    WrongTask {
        /// Model name.
        name: String,
        /// The task the lock gives it.
        task: String,
        /// What to use instead.
        advice: &'static str,
    },
    /// Pulling it into the store failed.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// The stored copy does not verify.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Building the network failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The policy refuses the model's origin format or the format its weights would run in.
    #[error(transparent)]
    Policy(#[from] Violation),
}

impl EngineError {
    /// True when a check said no (not approved, a digest mismatch), not a failure.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::NotApproved(_) | Self::Verify(_) | Self::Policy(_) => true,
            Self::Pull(e) => e.is_refusal(),
            Self::Load(e) => e.is_refusal(),
            Self::WrongTask { .. } => false,
        }
    }
}

/// Where inference runs, as the attestation records it.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The device.
    pub device: Device,
    /// Its name (`cpu`, `cuda:0`, `metal`).
    pub device_name: String,
    /// CPU threads.
    pub threads: usize,
}

impl Runtime {
    /// A runtime on `device` with `threads` CPU threads.
    pub fn new(device: Device, threads: usize) -> Self {
        Self {
            device_name: crate::device::describe(&device),
            device,
            threads,
        }
    }

    /// The attestation's record of it, with the format the weights run in.
    pub fn record(&self, quantization: Option<String>) -> RuntimeRecord {
        RuntimeRecord {
            device: self.device_name.clone(),
            threads: self.threads as u32,
            quantization,
        }
    }
}

/// A loaded model and how long opening it took (hashing, reading, quantizing).
#[derive(Debug)]
pub struct Loaded<M> {
    /// The model.
    pub model: M,
    /// Verify and load time together.
    pub load_time: Duration,
}

/// The approved models of one lock, in one store.
#[derive(Debug, Clone)]
pub struct Engine {
    store: Store,
    lock: Lockfile,
    pull: PullOptions,
}

impl Engine {
    /// An engine over `lock` (already read and judged under the policy) and `store`; `pull` says
    /// where missing models come from.
    pub fn new(store: Store, lock: Lockfile, pull: PullOptions) -> Self {
        Self { store, lock, pull }
    }

    /// The lock in force.
    pub fn lock(&self) -> &Lockfile {
        &self.lock
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The lock entry of `name`, refused unless it is approved for `task` and the policy allows
    /// the format it was converted from (`formats.files`).
    pub fn entry(&self, name: &str, task: Task) -> Result<&ModelEntry, EngineError> {
        let entry = self.lock.model(name)?;
        self.pull.rules.check_model_format(entry)?;
        if entry.task != task {
            let advice = match entry.task {
                Task::Chat => "use `sanctum run`, `sanctum chat` or a chat/generate route",
                Task::Embed => "use `sanctum embed` or an embeddings route",
            };
            return Err(EngineError::WrongTask {
                name: name.to_owned(),
                task: entry.task.to_string(),
                advice,
            });
        }
        Ok(entry)
    }

    /// True when `entry` is not in the store yet (opening it will pull it first).
    pub fn is_missing(&self, entry: &ModelEntry) -> bool {
        self.store.state(entry) == ModelState::Missing
    }

    /// Pulls `entry` into the verified store when it is missing.
    pub fn ensure_pulled(
        &self,
        entry: &ModelEntry,
        progress: &dyn Progress,
    ) -> Result<(), EngineError> {
        if self.is_missing(entry) {
            self.store.pull(entry, &self.pull, progress)?;
        }
        Ok(())
    }

    /// Opens and loads a chat model, refused when the policy does not allow the format its weights
    /// run in (`formats.weights`): before loading when `--quant` names it, else once the automatic
    /// choice is known, before anything is generated.
    pub fn load_chat(
        &self,
        name: &str,
        options: &LoadOptions,
        progress: &dyn Progress,
    ) -> Result<Loaded<ChatModel>, EngineError> {
        let entry = self.entry(name, Task::Chat)?;
        let rules = &self.pull.rules;
        if let Some(quant) = options.quant {
            rules.check_weights(name, quant.name())?;
        }
        self.ensure_pulled(entry, progress)?;
        let started = Instant::now();
        let opened = self.store.open(entry, progress)?;
        let model = ChatModel::load(opened, options)?;
        rules.check_weights(name, model.quant().name())?;
        Ok(Loaded {
            model,
            load_time: started.elapsed(),
        })
    }

    /// Opens and loads an embedding model.
    pub fn load_embedder(
        &self,
        name: &str,
        device: &Device,
        progress: &dyn Progress,
    ) -> Result<Loaded<Embedder>, EngineError> {
        let entry = self.entry(name, Task::Embed)?;
        self.pull.rules.check_weights(name, Quant::F32.name())?;
        self.ensure_pulled(entry, progress)?;
        let started = Instant::now();
        let opened = self.store.open(entry, progress)?;
        let model = Embedder::load(opened, device)?;
        Ok(Loaded {
            model,
            load_time: started.elapsed(),
        })
    }
}

/// The sampling settings as an attestation records them.
pub fn sampling_record(options: &GenerateOptions) -> SamplingRecord {
    let s = &options.sampling;
    SamplingRecord {
        temperature: f32_as_decimal(s.temperature),
        top_k: s.top_k as u64,
        top_p: f32_as_decimal(s.top_p),
        min_p: f32_as_decimal(s.min_p),
        repeat_penalty: f32_as_decimal(s.repeat_penalty),
        repeat_last_n: s.repeat_last_n as u64,
        seed: s.seed,
        max_tokens: options.max_tokens.map(|n| n as u64),
        stop: options.stop.clone(),
    }
}

/// A generated reply as its attestation describes it.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    /// Which front end produced it.
    pub task: OutputTask,
    /// The settings it was generated with.
    pub options: &'a GenerateOptions,
    /// The rendered prompt (chat template applied).
    pub prompt: &'a str,
    /// Exactly the bytes returned.
    pub bytes: &'a [u8],
    /// The generation's counts.
    pub generation: &'a Generation,
    /// When the work started.
    pub started: SystemTime,
    /// The HTTP request answered, for the server.
    pub request: Option<&'a RequestRecord>,
}

impl<'a> Reply<'a> {
    /// The record to stamp for `model` (its lock entry `entry`) run on `runtime`.
    pub fn record(
        &self,
        model: &ChatModel,
        entry: &'a ModelEntry,
        runtime: &Runtime,
    ) -> OutputRecord<'a> {
        OutputRecord {
            name: "stdout",
            bytes: self.bytes,
            task: self.task,
            model: entry,
            runtime: runtime.record(Some(model.arithmetic())),
            sampling: Some(sampling_record(self.options)),
            prompt: self.prompt,
            include_prompt_text: false,
            usage: UsageRecord {
                prompt_tokens: self.generation.prompt_tokens as u64,
                completion_tokens: self.generation.tokens.len() as u64,
            },
            request: self.request.cloned(),
            started: self.started,
            finished: SystemTime::now(),
        }
    }
}

/// Embeddings as their attestation describes them.
#[derive(Debug, Clone, Copy)]
pub struct Embeddings<'a> {
    /// Exactly the bytes returned (the CLI's JSON, or the server's vectors).
    pub bytes: &'a [u8],
    /// The texts embedded, one per line.
    pub texts: &'a str,
    /// Tokens over all texts.
    pub tokens: usize,
    /// When the work started.
    pub started: SystemTime,
    /// The HTTP request answered, for the server.
    pub request: Option<&'a RequestRecord>,
}

impl<'a> Embeddings<'a> {
    /// The record to stamp for the embedding model `entry` run on `runtime` (weights in f32).
    pub fn record(&self, entry: &'a ModelEntry, runtime: &Runtime) -> OutputRecord<'a> {
        OutputRecord {
            name: "stdout",
            bytes: self.bytes,
            task: OutputTask::Embed,
            model: entry,
            runtime: runtime.record(Some(Quant::F32.name().to_owned())),
            sampling: None,
            prompt: self.texts,
            include_prompt_text: false,
            usage: UsageRecord {
                prompt_tokens: self.tokens as u64,
                completion_tokens: 0,
            },
            request: self.request.cloned(),
            started: self.started,
            finished: SystemTime::now(),
        }
    }
}

/// Writes a stamp into the local attestation store (`<home>/attestations/sha256/<output>/…`),
/// atomically; returns its path.
pub fn store_stamp(home: &Path, stamp: &Stamp) -> std::io::Result<PathBuf> {
    let path =
        attest::attestation::layout::store_path(home, &stamp.subject.digest.sha256, &stamp.json);
    attest::attestation::layout::write_atomic(&path, &stamp.json)?;
    Ok(path)
}
